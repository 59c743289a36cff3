"""fmstore's Checkpointer against torch.save, safetensors and torch.distributed.checkpoint.

One process, one state, one disk directory (``--dir``, not tmpfs).  The state is made once
with ``torch.randn`` on ``--device``: bf16 ``params`` (1/3 of the bytes), fp32 ``exp_avg`` and
``exp_avg_sq`` (1/3 each), in tensors of about ``--tensor-size``.  Per variant: stall = how long
the save call blocks the caller; total = from the call until the files are fsync'd; load =
reading them back into new CPU tensors, every page touched (safetensors reads lazily), after
evicting the variant's files from the page cache (fsync + POSIX_FADV_DONTNEED).  Variants:
fmstore ``Checkpointer(incremental=False)`` (a new step each save; total = until
``handle.wait()``), and the same with ``Policy(host_memory=1)`` (load = restore from the host-memory
copy, no disk read); ``torch.save`` + fsync; safetensors ``save_file`` + fsync; ``dcp.save`` +
fsync of the files it wrote (its FileSystemWriter fsyncs already); ``dcp.async_save`` with its
default stager, and with one reused ``BlockingAsyncStager(cache_staged_state_dict=True)``
(stall = until it returns, or until ``staging_completion`` for an AsyncSaveResponse; total =
until the upload is done and fsync'd).  ``dcp.load`` fills ``zeros_like`` CPU tensors made
before the timer.  Raw limits in the same rounds: memcpy (``copy_`` into preallocated host
memory, pinned with CUDA), one-file write + fsync, ``readinto`` after eviction.  A warm-up
round (discarded; it checks every read-back bit-exactly), then ``--repeats`` rounds, the order
rotated each round, outputs deleted between rounds.  Medians; GB/s = 10**9 bytes/s.  Run::

    PYTHONPATH=. .venv/bin/python bench/checkpoint.py --state-size 1GiB --repeats 3
    PYTHONPATH=. python3 bench/checkpoint.py --state-size 8GiB          # CUDA machine
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from common import evict, loadavg, machine_info  # bench/common.py (the script's own folder)
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from fmstore import format_size, parse_size
from fmstore.checkpoint import Checkpointer, Policy

State = dict[str, dict[str, torch.Tensor]]
COLS = 4096  # row length of every tensor: 2-D, like a weight matrix
sync: Callable[[], None] = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
HOST_NAME = "fmstore Policy(host_memory=1)"
DCP_NAMES = ("dcp.save", "dcp.async_save(default)", "dcp.async_save(Blocking,cached)")


@dataclass
class Variant:  # a way to save and load the state
    name: str
    dir: str
    save: Callable[[int], tuple[float, float, int]]  # round -> (stall s, total s, bytes written)
    load: Callable[[int, Any], Any]  # (round, what prepare_load gave) -> flat or nested state
    prepare_load: Callable[[], Any] = lambda: None  # untimed
    times: list[tuple[float, float, float]] = field(default_factory=list)  # (stall, total, load)
    written: int = 0


def files_under(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


def fsync_tree(root: str) -> int:
    """fsync every file under ``root``; returns their total size."""
    for path in files_under(root):
        evict(path, drop=False)
    return sum(os.path.getsize(f) for f in files_under(root))


def make_state(nbytes: int, tensor_size: int, device: str) -> State:
    state: State = {}
    groups = {"params": torch.bfloat16, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}
    for group, dtype in groups.items():
        row = COLS * torch.empty(0, dtype=dtype).element_size()
        rows_left, per = max(1, nbytes // 3 // row), max(1, tensor_size // row)
        state[group] = {}
        while rows_left > 0:
            n = min(per, rows_left)
            state[group][f"layers.{len(state[group])}"] = torch.randn(n, COLS, dtype=dtype, device=device)
            rows_left -= n
    sync()
    return state


def flat(state: Any) -> dict[str, torch.Tensor]:
    return {f"{g}/{k}": t for g, d in state.items() for k, t in d.items()}


def as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def make_variants(root: str, state: State) -> list[Variant]:
    out: list[Variant] = []

    def fmstore_save(ck: Checkpointer) -> Callable[[int], tuple[float, float, int]]:
        def save(r: int) -> tuple[float, float, int]:  # stall = until save() returns
            sync()
            t0 = time.perf_counter()
            h = ck.save(r, state)
            t1 = time.perf_counter()
            info = h.wait()
            return t1 - t0, time.perf_counter() - t0, info.bytes_written

        return save

    d = os.path.join(root, "fmstore")
    ck = Checkpointer(d, incremental=False)
    out.append(Variant("fmstore Checkpointer", d, fmstore_save(ck), lambda r, _: ck.load(step=r)))
    # The multi-level policy's fastest level: the newest snapshot also kept in host memory,
    # restored from there (same save path; the pool holds two copies of the state).
    d = os.path.join(root, "fmstore_host")
    ck_host = Checkpointer(d, incremental=False, policy=Policy(host_memory=1))
    load_host = lambda r, _: ck_host.load(step=r, level="host")  # noqa: E731
    out.append(Variant(HOST_NAME, d, fmstore_save(ck_host), load_host))

    def blocking(path: str, fn: Callable[[], Any]) -> Callable[[int], tuple[float, float, int]]:
        def save(r: int) -> tuple[float, float, int]:  # stall = total: the call is the whole save
            dt, written = timed(lambda: (fn(), fsync_tree(path))[1])
            return dt, dt, written

        return save

    d = os.path.join(root, "torch_save")
    pt = os.path.join(d, "state.pt")
    save_pt = blocking(d, lambda: torch.save(state, pt))
    out.append(Variant("torch.save+fsync", d, save_pt, lambda r, _: torch.load(pt, "cpu", weights_only=True)))
    try:
        import safetensors.torch as st
    except ImportError:
        print("safetensors is not installed: its variant is skipped", flush=True)
    else:
        d = os.path.join(root, "safetensors")
        sf = os.path.join(d, "state.safetensors")
        save_sf = blocking(d, lambda: st.save_file(flat(state), sf))
        out.append(Variant("safetensors+fsync", d, save_sf, lambda r, _: st.load_file(sf)))

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist: intended

    def zeros() -> State:  # dcp.load's preallocated target, on the CPU like every other load
        return {g: {k: torch.zeros_like(t, device="cpu") for k, t in d.items()} for g, d in state.items()}

    def dcp_load(path: str) -> Callable[[int, Any], Any]:
        return lambda r, target: (dcp.load(target, checkpoint_id=path, no_dist=True), target)[1]

    d = os.path.join(root, "dcp")
    save_dcp = blocking(d, lambda p=d: dcp.save(state, checkpoint_id=p, no_dist=True))
    out.append(Variant(DCP_NAMES[0], d, save_dcp, dcp_load(d), zeros))
    stager = BlockingAsyncStager(cache_staged_state_dict=True)  # reused: its cache is the point
    if not torch.cuda.is_available():  # it pins its cache unconditionally, which fails without CUDA
        stager.state_dict_cache = {g: {k: t.clone() for k, t in d.items()} for g, d in state.items()}
        print("note: no CUDA: BlockingAsyncStager's cache is preallocated here, unpinned", flush=True)
    asyncs = [(DCP_NAMES[1], "dcp_async", {}), (DCP_NAMES[2], "dcp_cached", {"async_stager": stager})]
    for name, key, kw in asyncs:
        path = os.path.join(root, key)

        def async_save(r: int, path: str = path, kwargs: dict[str, Any] = kw) -> tuple[float, float, int]:
            sync()
            t0 = time.perf_counter()
            resp = dcp.async_save(state, checkpoint_id=path, no_dist=True, **kwargs)
            if not isinstance(resp, Future):  # AsyncSaveResponse: tensors may change once staged
                resp.staging_completion.result()
            t1 = time.perf_counter()
            (resp if isinstance(resp, Future) else resp.upload_completion).result()
            return t1 - t0, time.perf_counter() - t0, fsync_tree(path)

        out.append(Variant(name, path, async_save, dcp_load(path), zeros))
    return out


def raw_variant(root: str, state: State, host: dict[str, torch.Tensor]) -> Variant:
    """stall = memcpy into preallocated host memory, total = write+fsync, load = readinto."""
    d = os.path.join(root, "raw")
    p = os.path.join(d, "state.bin")
    src = flat(state)
    nbytes = sum(t.nbytes for t in host.values())

    def save(r: int) -> tuple[float, float, int]:
        def copy() -> None:
            for k, t in src.items():
                host[k].copy_(t, non_blocking=t.is_cuda)

        def write() -> None:
            with open(p, "wb", buffering=0) as f:
                for t in host.values():
                    mv = as_bytes(t)
                    while len(mv):
                        mv = mv[f.write(mv) :]
                os.fsync(f.fileno())

        return timed(copy)[0], timed(write)[0], os.path.getsize(p)

    def prepare() -> tuple[np.ndarray, dict[str, torch.Tensor]]:  # a buffer, and tensors viewing it
        buf = np.empty(nbytes, dtype=np.uint8)
        parts = torch.from_numpy(buf).split([t.nbytes for t in host.values()])
        return buf, {k: x.view(t.dtype).view(t.shape) for (k, t), x in zip(host.items(), parts)}

    def load(r: int, target: tuple[np.ndarray, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        view, pos = memoryview(target[0]), 0
        with open(p, "rb", buffering=0) as f:
            while pos < nbytes:
                n = f.readinto(view[pos : pos + (64 << 20)])
                assert n, f"short read: {pos} of {nbytes} bytes"
                pos += n
        return target[1]

    return Variant("raw limits", d, save, load, prepare)


def as_flat(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    return out if all(isinstance(t, torch.Tensor) for t in out.values()) else flat(out)


def touch(out: dict[str, Any]) -> dict[str, Any]:
    """Read one byte of every page: safetensors' load_file maps the file and reads it lazily."""
    for t in as_flat(out).values():
        t.reshape(-1).view(torch.uint8)[::4096].sum()
    return out


def run_round(r: int, variants: list[Variant], host: dict[str, torch.Tensor], warm: bool) -> None:
    label = "warm-up" if warm else f"round {r}"
    k = r % len(variants)
    for v in variants[k:] + variants[:k]:
        shutil.rmtree(v.dir, ignore_errors=True)
        os.makedirs(v.dir)
        stall, total, written = v.save(r)
        for path in files_under(v.dir):
            evict(path)
        target = v.prepare_load()
        t_load, out = timed(lambda v=v, target=target: touch(v.load(r, target)))
        if warm and not all(torch.equal(t, host[name]) for name, t in as_flat(out).items()):
            raise SystemExit(f"FAIL: {v.name} read back a different state")
        if warm:
            v.written = written
        else:
            v.times.append((stall, total, t_load))
        del out, target
        shutil.rmtree(v.dir)
        times = f"stall {stall:7.3f}s  total {total:7.3f}s  load {t_load:7.3f}s"
        print(f"  {label}: {v.name:<32} {times}", flush=True)


def report(variants: list[Variant], nbytes: int, cuda: bool, host: dict[str, torch.Tensor]) -> bool:
    raw = variants[0]
    med = {v.name: [statistics.median(x) for x in zip(*v.times)] for v in variants}
    head = ["variant", "stall s", "total s", "load s", "stall GB/s", "total GB/s", "load GB/s"]
    print(f"\n{head[0]:<32}" + "".join(f"{h:>11}" for h in head[1:]) + "  bytes written")
    for v in variants:
        m = med[v.name]
        cells = "".join(f"{x:11.3f}" for x in m) + "".join(f"{nbytes / x / 1e9:11.3f}" for x in m)
        note = "  (memcpy / write+fsync / read)" if v is raw else ""
        print(f"{v.name:<32}{cells}  {v.written} ({(v.written / nbytes - 1) * 100:+.3f}%){note}")
    fm, lim = med["fmstore Checkpointer"], med[raw.name]
    memcpy = "pinned D2H" if cuda else "host memcpy"
    checks = [
        (f"stall / memcpy limit ({memcpy})", fm[0] / lim[0], "<=", 1.15 if cuda else 1.5),
        ("total / raw write+fsync time", fm[1] / lim[1], "<=", 1.15),
        ("load GB/s / raw read GB/s", lim[2] / fm[2], ">=", 0.8),
    ]
    dcps = [n for n in DCP_NAMES if n in med]
    if dcps:
        best = min(dcps, key=lambda n: med[n][1])
        checks.insert(2, (f"best DCP total ({best}) / fmstore total", med[best][1] / fm[1], ">=", 1.5))
    ok = True
    print("\nfmstore Checkpointer:")
    for what, x, op, target in checks:
        passed = x <= target if op == "<=" else x >= target
        ok &= passed
        print(f"  {what:<66} {x:6.2f}x  (target {op} {target:.2f}x)  {'PASS' if passed else 'FAIL'}")
    print("  vs peers (peer median / fmstore median; > 1 means fmstore is faster):")
    for v in variants[2:]:
        ratios = zip(("stall", "total", "load"), med[v.name], fm)
        print(f"    {v.name:<32}" + "".join(f"  {w} {x / y:6.2f}x" for w, x, y in ratios))
    if HOST_NAME in med:
        host_load = med[HOST_NAME][2]
        print(
            f"  restore from host memory (Policy(host_memory=1)): {host_load:.3f}s, "
            f"{fm[2] / host_load:.1f}x faster than its load from disk ({fm[2]:.3f}s)"
        )
    import xxhash  # fmstore's own dependency: what its save and load hash with

    t_sum, _ = timed(lambda: [xxhash.xxh3_128_hexdigest(as_bytes(t)) for t in host.values()])
    print(
        f"  diagnostic: xxh3_128 of the whole state, one core: {t_sum:.3f}s ({nbytes / t_sum / 1e9:.2f} GB/s);"
    )
    print(f"  fmstore hashes on save and on load; its persist (total - stall) took {fm[1] - fm[0]:.3f}s")
    print(f"RESULT: {'PASS' if ok else 'FAIL'}   (load at end: {loadavg()})", flush=True)
    return ok


def start_run(args: argparse.Namespace) -> tuple[int, bool, str]:
    """(state bytes, whether on CUDA, a fresh run directory under ``--dir``); prints the header."""
    n = parse_size(args.state_size, what="--state-size") or 0
    os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="run-", dir=os.path.abspath(args.dir))
    machine_info(root, args.device)
    return n, args.device.startswith("cuda"), root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-size", default="1GiB", help="bytes of state (default 1GiB; use 8GiB on a GPU)")
    p.add_argument("--tensor-size", default="64MiB", help="about how big each tensor is (default 64MiB)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated substrings of the variant names to run (default: all; "
        "the raw limits and fmstore Checkpointer always run)",
    )
    p.add_argument("--dir", default=os.path.join("fmstore-data", "bench-ckpt"), help="on a disk, not tmpfs")
    args = p.parse_args()
    n, cuda, root = start_run(args)
    state = make_state(n, parse_size(args.tensor_size, what="--tensor-size") or COLS, args.device)
    # the memcpy limit's target, and the reference the warm-up round checks read-backs against
    host = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda).copy_(t) for k, t in flat(state).items()}
    nbytes = sum(t.nbytes for t in host.values())
    print(f"state:   {format_size(nbytes)} ({nbytes} bytes) in {len(host)} tensors on {args.device}")
    print(f"rounds:  {args.repeats} after a warm-up; data in {root}\n", flush=True)
    try:
        variants = [raw_variant(root, state, host), *make_variants(root, state)]
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        if wanted:
            keep = ("raw limits", "fmstore Checkpointer")
            variants = [v for v in variants if v.name in keep or any(w in v.name for w in wanted)]
        for r in range(args.repeats + 1):
            run_round(r, variants, host, warm=r == 0)
        return 0 if report(variants, nbytes, cuda, host) else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
