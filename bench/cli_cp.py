"""``fmstore cp`` against the raw copy it is built on: to S3 and local to local.

One snapshot of ``--size`` (float32 tensors of ``--tensor-size`` random values, saved once by
one process: one shard file and its manifest) is copied ``--repeats`` times by:

* ``fmstore cp`` to a SeaweedFS bucket (``weed mini`` on loopback, its data on the same disk),
  in this process through ``fmstore.cli.main``: stream, read back and verify every part and
  chunk, then commit the manifest; against raw s3fs ``put_file`` of the same two files (its
  own concurrent multipart upload, no verification): the link's limit;
* ``fmstore cp`` local to local (temp file, fsync, rename, read-back verification) against
  ``shutil.copyfile`` of the same files, plain and followed by an fsync of each copy (what a
  durable copy needs).

Fairness: the source files are in the page cache for every variant (read once before the
timer); fmstore goes first on even repeats and the raw copy on odd ones; every destination is
deleted between repeats.  Medians over repeats, GB/s = 10**9 bytes per second of the files
copied.  Target: cp to SeaweedFS >= 0.8x raw s3fs.  Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/cli_cp.py                # 1 GiB, 3 repeats
    PYTHONPATH=. .venv/bin/python bench/cli_cp.py --size 256MiB --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from common import loadavg, machine_info

from fmstore import Checkpointer, format_size, parse_size
from fmstore.cli import main as fmstore_main
from fmstore.testing import start_seaweedfs

BUCKET = "fmstore-bench"


def make_snapshot(root: str, n: int, tensor: int) -> list[str]:
    """A snapshot of ``n`` bytes at step 1 under ``root``; its files, relative."""
    g = torch.Generator().manual_seed(0)
    state = {}
    left, i = n, 0
    while left > 0:
        k = min(tensor, left) // 4
        state[f"t{i:03d}"] = torch.randn(k, generator=g)
        left -= k * 4
        i += 1
    with Checkpointer(root) as ck:
        ck.save(1, state).wait()
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, x), root) for x in names]
    return sorted(out)


def warm(root: str, files: list[str]) -> None:
    for f in files:
        with open(os.path.join(root, f), "rb") as fh:
            while fh.read(64 << 20):
                pass


def cp(src: str, dst: str, *extra: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = fmstore_main(["cp", src, dst, *extra])
    if rc != 0:
        raise SystemExit(f"fmstore cp failed ({rc}): {out.getvalue()}")


def timed(fn: Callable[[int], None], r: int) -> float:
    t = time.perf_counter()
    fn(r)
    return time.perf_counter() - t


def rounds(
    name: str,
    variants: list[tuple[str, Callable[[int], None], Callable[[int], None]]],
    repeats: int,
    nbytes: int,
) -> dict[str, list[float]]:
    """Each variant (label, run(r), clean(r)) once per repeat, the order rotated per repeat."""
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    for r in range(repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for label, run, clean in order:
            t = timed(run, r)
            times[label].append(t)
            print(f"  {name} round {r + 1}: {label:<34} {t:7.3f} s  {nbytes / t / 1e9:6.3f} GB/s", flush=True)
            clean(r)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1GiB", help="snapshot size (default 1GiB)")
    p.add_argument("--tensor-size", default="64MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=os.path.join("fmstore-data", "bench"), help="on a disk, not tmpfs")
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument("--skip-local", action="store_true")
    args = p.parse_args()
    n = parse_size(args.size, what="--size") or 0
    os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="cp-", dir=os.path.abspath(args.dir))
    machine_info(root)
    src = os.path.join(root, "src")
    files = make_snapshot(src, n, parse_size(args.tensor_size) or 1)
    nbytes = sum(os.path.getsize(os.path.join(src, f)) for f in files)
    print(
        f"snapshot: {format_size(nbytes)} ({nbytes} bytes) in {files}; {args.repeats} repeats\n", flush=True
    )
    warm(src, files)
    results: list[tuple[str, str, dict[str, list[float]], float | None]] = []
    try:
        if not args.skip_s3:
            print("to S3 (SeaweedFS on loopback):", flush=True)
            with start_seaweedfs(os.path.join(root, "s3"), bucket=BUCKET) as server:
                fs = server.filesystem()
                opts = server.storage_options()
                dst_opts = [
                    "--dst-storage-option",
                    f"key={opts['key']}",
                    "--dst-storage-option",
                    f"secret={opts['secret']}",
                    "--dst-storage-option",
                    f"endpoint_url={server.endpoint}",
                ]

                def put(r: int) -> None:
                    for f in files:
                        fs.put_file(os.path.join(src, f), f"{BUCKET}/raw-{r}/{f}")

                times = rounds(
                    "s3",
                    [
                        (
                            "fmstore cp (verified)",
                            lambda r: cp(src, f"s3://{BUCKET}/cp-{r}", *dst_opts),
                            lambda r: fs.rm(f"{BUCKET}/cp-{r}", recursive=True),
                        ),
                        (
                            "raw s3fs put_file",
                            put,
                            lambda r: fs.rm(f"{BUCKET}/raw-{r}", recursive=True),
                        ),
                    ],
                    args.repeats,
                    nbytes,
                )
                results.append(("fmstore cp (verified)", "raw s3fs put_file", times, 0.8))
        if not args.skip_local:
            print("local to local (same disk):", flush=True)

            def copyfile(r: int, sync: bool) -> None:
                for f in files:
                    out = os.path.join(root, f"raw-{r}", f)
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    shutil.copyfile(os.path.join(src, f), out)
                    if sync:
                        fd = os.open(out, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)

            def rm(what: str) -> Callable[[int], None]:
                return lambda r: shutil.rmtree(os.path.join(root, f"{what}-{r}"))

            times = rounds(
                "local",
                [
                    (
                        "fmstore cp (fsync, verified)",
                        lambda r: cp(src, os.path.join(root, f"cp-{r}")),
                        rm("cp"),
                    ),
                    ("shutil.copyfile + fsync", lambda r: copyfile(r, True), rm("raw")),
                    ("shutil.copyfile", lambda r: copyfile(r, False), rm("raw")),
                ],
                args.repeats,
                nbytes,
            )
            results.append(("fmstore cp (fsync, verified)", "shutil.copyfile + fsync", times, None))
            results.append(("fmstore cp (fsync, verified)", "shutil.copyfile", times, None))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def gbs(ts: list[float]) -> float:
        return nbytes / statistics.median(ts) / 1e9

    print(f"\n{'variant':<34} {'GB/s median':>11}  [runs]")
    seen = set()
    for _, _, times, _ in results:
        for label, ts in times.items():
            if label in seen:
                continue
            seen.add(label)
            runs = ", ".join(f"{nbytes / t / 1e9:.3f}" for t in ts)
            print(f"{label:<34} {gbs(ts):11.3f}  [{runs}]")
    ok = True
    print()
    for fm, raw, times, target in results:
        ratio = gbs(times[fm]) / gbs(times[raw])
        verdict = ""
        if target is not None:
            ok &= ratio >= target
            verdict = f"  (target >= {target:.1f}x)  {'PASS' if ratio >= target else 'FAIL'}"
        print(f"{fm} / {raw}: {ratio:.2f}x{verdict}")
    print(f"RESULT: {'PASS' if ok else 'FAIL'}   (load at end: {loadavg()})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
