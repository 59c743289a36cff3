"""The codec's CUDA kernels (kernels/planes.cu) against the same transforms written in
PyTorch, on one GPU buffer: byte-plane split and merge (bf16 and fp32 widths).

GB/s counts bytes read plus bytes written (the issue's measure; the HBM3 of an H100 moves
about 3,350 GB/s).  CUDA events, ``--repeats`` timed calls after a warm-up, medians; every
result is checked against the PyTorch version.  Run on a CUDA machine::

    PYTHONPATH=. python3 bench/gpu_kernels.py --size 1GiB
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
from common import machine_info

from fmstore import format_size, parse_size
from fmstore.codec import gpu


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1GiB")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    n = parse_size(args.size, what="--size") or 0
    machine_info(".", "cuda")
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    out = torch.empty_like(data)
    print(f"buffer: {format_size(n)} on {torch.cuda.get_device_name()}; {args.repeats} repeats, medians\n")
    print(f"{'transform':<22} {'fmstore s':>10} {'GB/s':>8} {'torch s':>10} {'GB/s':>8} {'speed-up':>9}")
    for w in (2, 4):
        planes = gpu.split(data, w)
        assert torch.equal(planes, data.view(-1, w).t().contiguous().view(-1))
        assert torch.equal(gpu.merge(planes, w), data)
        cases = {
            f"split (width {w})": (
                lambda w=w: gpu.split(data, w, out=out),
                lambda w=w: out.view(w, -1).copy_(data.view(-1, w).t()),
            ),
            f"merge (width {w})": (
                lambda w=w, pl=planes: gpu.merge(pl, w, out=out),
                lambda w=w, pl=planes: out.view(-1, w).copy_(pl.view(w, -1).t()),
            ),
        }
        for name, (ours, theirs) in cases.items():
            report(name, timed(ours, args.repeats), timed(theirs, args.repeats), 2 * n)
    return 0


def report(name: str, ours: float, theirs: float, moved: int) -> None:
    print(
        f"{name:<22} {ours:10.5f} {moved / ours / 1e9:8.0f} {theirs:10.5f} {moved / theirs / 1e9:8.0f} {theirs / ours:8.2f}x"
    )


if __name__ == "__main__":
    sys.exit(main())
