"""``fmstore export --format safetensors`` against a raw copy of the snapshot's own files.

One process, one snapshot (``--size`` of bf16 tensors of ``--tensor-size``, saved raw by a
Checkpointer under ``--dir``).  Each round, in alternating order: ``raw`` = ``shutil.copyfile``
of the snapshot's shard files (the same bytes, plus their small headers) to the same disk and
an fsync of each copy; ``export`` = ``fmstore.cli.main(["export", ...])`` in this process,
which reads every tensor back verified against its checksums, streams it into one
safetensors file and fsyncs it (the command's own atomic rename included).  Both outputs are
deleted, and ``os.sync()`` called, before the next timed operation.  The source stays in the
page cache (both read it from memory) unless ``--cold``, which evicts the snapshot's files
with ``posix_fadvise(DONTNEED)`` before each operation.  The export is checked bit-exact once.
Medians of ``--repeats`` rounds; target: export throughput >= 0.8x the raw copy's.  Run::

    PYTHONPATH=. .venv/bin/python bench/cli_export.py --size 1GiB --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import shutil
import statistics
import sys
import time

import torch
from common import evict, loadavg, machine_info
from safetensors import safe_open

from fmstore import format_size, parse_size
from fmstore.checkpoint import Checkpointer, Root
from fmstore.cli import main as fmstore_main
from fmstore.storage import fsync_path

TARGET = 0.8


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1GiB")
    p.add_argument("--tensor-size", default="64MiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cold", action="store_true", help="evict the snapshot's files before each operation")
    p.add_argument(
        "--dir", default=os.path.join("fmstore-data", "bench-cli-export"), help="on a disk, not tmpfs"
    )
    args = p.parse_args()
    size = parse_size(args.size, what="--size") or 0
    tsize = parse_size(args.tensor_size, what="--tensor-size") or 1
    base = os.path.abspath(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    machine_info(base)
    root = os.path.join(base, "root")
    g = torch.Generator().manual_seed(0)
    n = max(1, size // tsize)
    rows = max(1, tsize // 2 // 4096)
    state = {
        "model": {f"layers.{i}.weight": torch.randn(rows, 4096, generator=g).bfloat16() for i in range(n)}
    }
    with Checkpointer(root) as ck:
        ck.save(1, state).wait()
    shards = sorted(glob.glob(os.path.join(root, "step-*", "*.safetensors")))
    raw_bytes = sum(os.path.getsize(f) for f in shards)
    nbytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    print(
        f"state:   {format_size(nbytes)} in {n} bf16 tensors; snapshot files {format_size(raw_bytes)} "
        f"in {len(shards)} file(s); {args.repeats} rounds, source {'evicted' if args.cold else 'in page cache'}\n"
    )
    del state
    raw_dir = os.path.join(base, "raw")
    out = os.path.join(base, "export.safetensors")

    def prepare() -> None:
        shutil.rmtree(raw_dir, ignore_errors=True)
        if os.path.exists(out):
            os.unlink(out)
        os.sync()
        time.sleep(0.5)  # let the journal commit of the deletes settle
        for f in shards:
            if args.cold:
                evict(f)
            else:  # warm it (a cold read in the first round would favour whichever ran second)
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass

    def raw() -> int:
        os.makedirs(raw_dir)
        for f in shards:
            dst = os.path.join(raw_dir, os.path.basename(f))
            shutil.copyfile(f, dst)
            fsync_path(dst)
        fsync_path(raw_dir)
        return raw_bytes

    def export() -> int:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = fmstore_main(["export", root, out, "--format", "safetensors"])
        if rc != 0:
            raise SystemExit(f"fmstore export exited {rc}")
        return os.path.getsize(out)

    times: dict[str, list[float]] = {"raw": [], "export": []}
    sizes: dict[str, int] = {}
    for r in range(args.repeats):
        order = ["raw", "export"] if r % 2 == 0 else ["export", "raw"]
        for name in order:
            prepare()
            t0 = time.perf_counter()
            sizes[name] = (raw if name == "raw" else export)()
            times[name].append(time.perf_counter() - t0)
            if name == "export" and r == 0:  # bit-exact, once
                snap = Root(root).snapshot(1)
                with safe_open(out, "pt") as f:
                    for t in snap.tensors():
                        a, b = f.get_tensor(t.name.removeprefix("model/")), snap.read(t.name)
                        assert a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16)), (
                            t.name
                        )
        print(
            f"  round {r + 1}: raw {times['raw'][-1]:.3f} s  export {times['export'][-1]:.3f} s  (order {'/'.join(order)})",
            flush=True,
        )
    prepare()
    med = {k: statistics.median(v) for k, v in times.items()}
    gbs = {k: sizes[k] / med[k] / 1e9 for k in med}
    print(f"\n{'variant':<44} {'median s':>9} {'min s':>7} {'GB/s':>7} {'bytes':>12}")
    print(
        f"{'raw copy of the shard files + fsync':<44} {med['raw']:9.3f} {min(times['raw']):7.3f} {gbs['raw']:7.3f} {sizes['raw']:>12}"
    )
    print(
        f"{'fmstore export --format safetensors':<44} {med['export']:9.3f} {min(times['export']):7.3f} "
        f"{gbs['export']:7.3f} {sizes['export']:>12}"
    )
    ratio = gbs["export"] / gbs["raw"]
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"\nexport throughput / raw copy throughput   {ratio:.2f}x  (target >= {TARGET}x)  {verdict}")
    print(f"load at end: {loadavg()}")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
