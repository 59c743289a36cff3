"""``fmstore verify`` against the raw read of the same files, and ``fmstore --help`` time.

A snapshot of ``--size`` MiB (float32 tensors of 16 MiB, raw) is written to ``--dir``; then, in
one process and on the same files: the raw read (every shard file read whole into memory, in
16 MiB pieces, on as many threads as verify uses) and ``Snapshot.verify()`` (read back and
check every 16 MiB chunk against the manifest's xxh3-128 digests; local files are hashed in
place through a memory mapping, no copy), each ``--repeats`` times, medians.  The files are in
the page cache for both (written just before, read in turn): the strictest case for verify,
whose hashing is then the bottleneck rather than the disk.
Then the wall time of ``fmstore --help`` and ``fmstore --version`` in fresh processes.

    PYTHONPATH=. .venv/bin/python bench/cli_verify.py --size 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from common import machine_info  # bench/common.py

from fmstore import Checkpointer
from fmstore.checkpoint import Root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_read(paths: list[str], threads: int, piece: int = 16 << 20) -> int:
    def one(path: str) -> int:
        buf = bytearray(piece)
        n = 0
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buf):
                n += got
        return n

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, paths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB of tensors")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="fmstore-data/bench-verify")
    args = ap.parse_args()
    machine_info(args.dir if os.path.isdir(args.dir) else ".", "cpu")
    shutil.rmtree(args.dir, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(4 << 20, generator=g) for i in range(args.size // 16)}
    with Checkpointer(args.dir) as ck:
        ck.save(1, state)
    threads = min(8, os.cpu_count() or 1)
    with Root(args.dir) as root:
        snap = root.snapshot(1)
        files = sorted({s.file for t in snap.tensors() for s in t.shards})
        paths = [os.path.join(args.dir, *f.split("/")) for f in files]
        nbytes = sum(os.path.getsize(p) for p in paths)
        raw, ver = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            raw_read(paths, threads)
            raw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            problems = snap.verify(threads=threads)
            ver.append(time.perf_counter() - t0)
            assert not problems, problems
    r, v = statistics.median(raw), statistics.median(ver)
    print(
        f"data:    {nbytes / 2**20:.0f} MiB in {len(paths)} file(s), {len(state)} tensors; {threads} threads"
    )
    print(f"raw read (page cache)   {r:7.3f} s  {nbytes / r / 1e9:6.2f} GB/s")
    print(f"fmstore verify          {v:7.3f} s  {nbytes / v / 1e9:6.2f} GB/s  {r / v:.2f}x the raw read")
    env = dict(os.environ, PYTHONPATH=REPO)
    for what in (["--help"], ["--version"]):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "fmstore.cli", *what], env=env, check=True, capture_output=True
            )
            times.append(time.perf_counter() - t0)
        print(
            f"fmstore {what[0]:<10}      {statistics.median(times):7.3f} s  (median of {args.repeats}, a fresh process each)"
        )
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
