"""Restoring training state in place, onto its device: the multi-level policy's fastest level
(host memory) against fmstore's disk level, ``dcp.load`` and the raw copy limit.

One process, one state (``--state-size`` of bf16 params and fp32 Adam moments on
``--device``), saved once per variant.  Each round restores the whole state into the live
tensors (the rollback after a crash of the step, or a loss spike): ``raw`` = ``copy_`` from a
pinned host copy (the limit); fmstore ``load(level="host")`` with ``Policy(host_memory=1)``;
fmstore ``load(level="local")`` after evicting the files from the page cache; ``dcp.load``
after the same eviction.  Each restore is checked bit-exact against the saved state;
``--repeats`` rounds in rotated order, medians.  Run::

    PYTHONPATH=. python3 bench/restore.py --state-size 8GiB      # CUDA machine
    PYTHONPATH=. .venv/bin/python bench/restore.py --state-size 1GiB
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed.checkpoint as dcp
from checkpoint import flat, make_state, start_run, sync  # bench/checkpoint.py: the same state
from common import evict, loadavg

from fmstore import format_size, parse_size
from fmstore.checkpoint import Checkpointer, Policy


def evict_tree(root: str) -> None:
    for d, _, names in os.walk(root):
        for n in names:
            evict(os.path.join(d, n))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-size", default="1GiB")
    p.add_argument("--tensor-size", default="64MiB")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--dir", default=os.path.join("fmstore-data", "bench-restore"), help="on a disk, not tmpfs"
    )
    args = p.parse_args()
    n, cuda, root = start_run(args)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    state = make_state(n, parse_size(args.tensor_size, what="--tensor-size") or 1, args.device)
    live = flat(state)
    saved = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda).copy_(t) for k, t in live.items()}
    nbytes = sum(t.nbytes for t in saved.values())
    print(f"state:   {format_size(nbytes)} in {len(live)} tensors on {args.device}; {args.repeats} rounds\n")
    try:
        ck = Checkpointer(os.path.join(root, "fmstore"), policy=Policy(host_memory=1))
        ck.save(1, state).wait()
        dcp_dir = os.path.join(root, "dcp")
        dcp.save(state, checkpoint_id=dcp_dir, no_dist=True)

        def scramble() -> None:  # the live state moved on (or is garbage) before the restore
            for t in live.values():
                t.zero_()

        def raw() -> None:
            for k, t in live.items():
                t.copy_(saved[k], non_blocking=cuda)

        variants: dict[str, Callable[[], object]] = {
            "raw copy from pinned host (limit)": raw,
            "fmstore load(level='host')": lambda: ck.load(state, level="host"),
            "fmstore load(level='local')": lambda: ck.load(state, level="local"),
            "dcp.load": lambda: dcp.load(state, checkpoint_id=dcp_dir, no_dist=True),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                scramble()
                evict_tree(os.path.join(root, "fmstore"))
                evict_tree(dcp_dir)
                sync()
                t0 = time.perf_counter()
                variants[name]()
                sync()
                dt = time.perf_counter() - t0
                bad = [k for k, t in live.items() if not torch.equal(t.cpu(), saved[k])]
                if bad:
                    raise SystemExit(f"FAIL: {name} restored {bad[0]} wrong")
                times[name].append(dt)
                print(f"  round {r + 1}: {name:<36} {dt:7.3f}s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        limit = med[names[0]]
        host = med["fmstore load(level='host')"]
        print(f"\n{'variant':<36} {'median s':>9} {'GB/s':>8} {'x limit':>8} {'x host restore':>15}")
        for k, v in med.items():
            print(f"{k:<36} {v:9.3f} {nbytes / v / 1e9:8.2f} {v / limit:8.2f} {v / host:15.2f}")
        print(f"\nload at end: {loadavg()}")
        ck.close()
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
