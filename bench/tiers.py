"""Throughput of LocalTier and ObjectTier against the raw I/O each is built on.

One blob of ``--size`` random bytes (a uint8 tensor made once; the same bytes for every
variant) is written and read back ``--repeats`` times through:

* ``LocalTier.put/get`` versus a plain file on the same disk (``open('wb')``, ``write``,
  ``flush``, ``fsync``; ``open('rb')``, ``readinto`` a buffer allocated before the timer);
* ``ObjectTier.put/get`` (s3://) versus raw s3fs ``pipe``/``cat`` on the same SeaweedFS
  server (``weed mini`` on loopback, its data on the same disk).

Fairness: every local file is evicted from the page cache (fsync + POSIX_FADV_DONTNEED) right
before each timed read; fmstore goes first on even repeats and raw on odd ones; files are
deleted between repeats so each write creates a new file; read-back is checked once
(``torch.equal``) outside the timed region.  Figures are medians over repeats in GB/s
(10**9 bytes per second).  Targets: LocalTier >= 0.9x raw, ObjectTier >= 0.8x raw s3fs.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python bench/tiers.py                 # 1 GiB, 3 repeats
    PYTHONPATH=. .venv/bin/python bench/tiers.py --size 256MiB --skip-s3 --local-threads 1
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from common import evict, loadavg, machine_info  # bench/common.py (the script's own folder)

from fmstore import LocalTier, ObjectTier, format_size, parse_size
from fmstore.testing import start_seaweedfs

KEY = "bench/blob"
BUCKET = "fmstore-bench"
RAW_S3 = f"{BUCKET}/raw/blob"


@dataclass
class Variant:
    """One way of writing and reading the blob, and the seconds each timed call took."""

    name: str
    write: Callable[[], None]
    read: Callable[[], Any]
    delete: Callable[[], None]
    before_read: Callable[[], None] = lambda: None  # untimed: evict caches, allocate buffers
    writes: list[float] = field(default_factory=list)
    reads: list[float] = field(default_factory=list)


def as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():  # frombuffer warns about read-only bytes; we only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(value, dtype=torch.uint8)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_pair(fm: Variant, raw: Variant, repeats: int, data: torch.Tensor) -> None:
    """Time both variants ``repeats`` times, alternating which goes first."""
    for r in range(repeats):
        order = [fm, raw] if r % 2 == 0 else [raw, fm]
        for v in order:
            dt, _ = timed(v.write)
            v.writes.append(dt)
            print(f"  repeat {r}: {v.name:<22} write {data.numel() / dt / 1e9:7.3f} GB/s", flush=True)
        for v in order:
            v.before_read()
            dt, out = timed(v.read)
            v.reads.append(dt)
            print(f"  repeat {r}: {v.name:<22} read  {data.numel() / dt / 1e9:7.3f} GB/s", flush=True)
            if r == 0 and not torch.equal(as_tensor(out), data):
                raise SystemExit(f"FAIL: {v.name} read back different bytes")
            del out
        for v in order:
            v.delete()


def local_pair(root: str, data: torch.Tensor, args: argparse.Namespace) -> tuple[Variant, Variant]:
    tier = LocalTier(os.path.join(root, "local"), io_threads=args.local_threads, chunk=args.local_chunk)
    raw_path = os.path.join(root, "raw", "blob")
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    view = memoryview(data.numpy())
    state: dict[str, np.ndarray] = {}

    def raw_write() -> None:
        with open(raw_path, "wb") as f:
            f.write(view)
            f.flush()
            os.fsync(f.fileno())

    def raw_before_read() -> None:
        evict(raw_path)
        state["buf"] = np.empty(len(view), dtype=np.uint8)  # untouched pages, as torch.empty's

    def raw_read() -> np.ndarray:
        buf = state.pop("buf")
        with open(raw_path, "rb") as f:
            n = f.readinto(buf)
        assert n == len(view), f"short read: {n} of {len(view)} bytes"
        return buf

    fm = Variant(
        f"LocalTier(t={args.local_threads},c={args.local_chunk})",
        lambda: tier.put(KEY, data) and None,
        lambda: tier.get(KEY),
        lambda: tier.delete(KEY),
        lambda: evict(tier.path_of(KEY)),
    )
    return fm, Variant("raw file", raw_write, raw_read, lambda: os.unlink(raw_path), raw_before_read)


def s3_pair(server: Any, data: torch.Tensor, args: argparse.Namespace) -> tuple[Variant, Variant]:
    tier = ObjectTier(
        f"s3://{BUCKET}/tier",
        server.storage_options(),
        part_size=args.part_size,
        max_concurrency=args.concurrency,
    )
    fs = server.filesystem()
    blob = data.numpy().tobytes()  # made once, outside the timed region
    fm = Variant(
        f"ObjectTier(p={args.part_size},n={args.concurrency})",
        lambda: tier.put(KEY, data) and None,
        lambda: tier.get(KEY),
        lambda: tier.delete(KEY),
    )
    raw = Variant(
        "raw s3fs pipe/cat", lambda: fs.pipe(RAW_S3, blob), lambda: fs.cat(RAW_S3), lambda: fs.rm(RAW_S3)
    )
    return fm, raw


def report(pairs: list[tuple[Variant, Variant, float]], nbytes: int) -> bool:
    def gbs(times: list[float]) -> list[float]:
        return [nbytes / t / 1e9 for t in times]

    def cell(times: list[float]) -> str:
        runs = ", ".join(f"{x:.3f}" for x in gbs(times))
        return f"{statistics.median(gbs(times)):7.3f} [{runs}]"

    print(f"\n{'variant':<30} {'write GB/s median [runs]':<36} read GB/s median [runs]")
    for fm, raw, _ in pairs:
        for v in (fm, raw):
            print(f"{v.name:<30} {cell(v.writes):<36} {cell(v.reads)}")
    ok = True
    print()
    for fm, raw, target in pairs:
        w = statistics.median(gbs(fm.writes)) / statistics.median(gbs(raw.writes))
        r = statistics.median(gbs(fm.reads)) / statistics.median(gbs(raw.reads))
        passed = w >= target and r >= target
        ok &= passed
        verdict = "PASS" if passed else "FAIL"
        print(f"{fm.name} / {raw.name}: write {w:.2f}x  read {r:.2f}x  (target >= {target:.1f}x)  {verdict}")
    print(f"RESULT: {'PASS' if ok else 'FAIL'}   (load at end: {loadavg()})", flush=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1GiB", help="blob size (default 1GiB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--dir", default=os.path.join("fmstore-data", "bench"), help="where data goes (a disk, not tmpfs)"
    )
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument("--skip-local", action="store_true")
    p.add_argument("--local-threads", type=int, default=4, help="LocalTier io_threads (its default: 4)")
    p.add_argument("--local-chunk", default="16MiB", help="LocalTier chunk (its default: 16MiB)")
    p.add_argument("--part-size", default="32MiB", help="ObjectTier part_size (its default: 32MiB)")
    p.add_argument("--concurrency", type=int, default=8, help="ObjectTier max_concurrency (its default: 8)")
    args = p.parse_args()
    n = parse_size(args.size, what="--size") or 0
    os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="run-", dir=os.path.abspath(args.dir))
    machine_info(root)
    print(f"blob:    {format_size(n)} ({n} bytes), {args.repeats} repeats, data in {root}\n", flush=True)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8)
    pairs: list[tuple[Variant, Variant, float]] = []
    try:
        if not args.skip_local:
            print("local disk:", flush=True)
            fm, raw = local_pair(root, data, args)
            run_pair(fm, raw, args.repeats, data)
            pairs.append((fm, raw, 0.9))
        if not args.skip_s3:
            print("S3 (SeaweedFS on loopback):", flush=True)
            with start_seaweedfs(os.path.join(root, "s3"), bucket=BUCKET) as server:
                fm, raw = s3_pair(server, data, args)
                run_pair(fm, raw, args.repeats, data)
                pairs.append((fm, raw, 0.8))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if report(pairs, n) else 1


if __name__ == "__main__":
    sys.exit(main())
