"""The GPU-to-host encode pipeline of fmstore's GPU codec (``huff_encode_many_to_host``) under
different groupings, beside cuZipNN, and the D2H link it is bound by, on one GPU.

Per data set (MiniLM's encoder layers as bf16 and fp32, and tiled to 511 MB, as in
``bench/gpu_codec.py``): the device-resident encode, the to-host pipeline with the default
grouping and with other (group, first group) sizes, and cuZipNN, each the median of
``--repeats``, twice.  Then the raw D2H copy rate with one, two and four streams (is the
link the limit?).  ``--trace DIR`` also writes a torch.profiler trace of one to-host encode
per data set (chrome://tracing).  Run on a CUDA machine::

    PYTHONPATH=. python3 bench/gpu_pipeline.py --weights .gpudata
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info  # noqa: E402
from gpu_codec import encoder_layers  # noqa: E402

from fmstore.codec import gpu as g  # noqa: E402

GROUPINGS = [(64, 4), (64, 8), (64, 32), (32, 16), (128, 16)]  # (group MiB, first group MiB)


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def link(repeats: int) -> None:
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    pin = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    streams = [torch.cuda.Stream() for _ in range(4)]

    def over(k: int) -> Callable[[], None]:
        def run() -> None:
            per = n // k
            for i in range(k):
                with torch.cuda.stream(streams[i]):
                    pin[i * per : (i + 1) * per].copy_(src[i * per : (i + 1) * per], non_blocking=True)

        return run

    for k in (1, 2, 4):
        print(f"raw D2H copy, 256 MiB over {k} stream(s): {n / median_s(over(k), repeats) / 1e9:.1f} GB/s")


def bench_one(name: str, t: torch.Tensor, repeats: int, trace: str | None) -> None:
    import cuzipnn

    b = t.view(torch.uint8).reshape(-1)
    width, n = t.element_size(), b.numel()
    host = torch.empty(g.huff_host_bytes(n, width), dtype=torch.uint8, pin_memory=True)
    dev_s = median_s(lambda: g.huff_encode(b, width), repeats)
    print(
        f"{name} ({n / 1e6:.1f} MB): device-resident encode {dev_s * 1e6:.0f} us, {n / dev_s / 1e9:.1f} GB/s"
    )

    def grouped(group: int, first: int) -> Callable[[], object]:
        return lambda: g.huff_encode_many_to_host(
            [(b, width, host)], group_bytes=group << 20, first_bytes=first << 20
        )

    for _ in range(2):
        cells = []
        for group, first in GROUPINGS:
            s = median_s(grouped(group, first), repeats)
            cells.append(f"{group}/{first}:{n / s / 1e9:5.1f}")
        cz = median_s(lambda: cuzipnn.compress_tensor(t, pin_memory=True), repeats)
        ours = median_s(lambda: g.huff_encode_to_host(b, width, out=host), repeats)
        print(
            f"  to host GB/s  {' '.join(cells)}  default:{n / ours / 1e9:5.1f}  cuZipNN:{n / cz / 1e9:5.1f}"
            f"  -> {cz / ours:.2f}x"
        )
    if trace:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                g.huff_encode_to_host(b, width, out=host)
                torch.cuda.synchronize()
        prof.export_chrome_trace(os.path.join(trace, f"trace_{name.replace(' ', '')}.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="folder with minilm_encoder.fmc1 and .json")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--trace", help="write a profiler trace per data set here")
    args = ap.parse_args()
    machine_info("/tmp", "cuda")
    w = encoder_layers(args.weights)
    data = {"bf16": w.to(torch.bfloat16).cuda(), "fp32": w.cuda()}
    data["bf16 x24"] = data["bf16"].repeat(24)
    data["fp32 x12"] = data["fp32"].repeat(12)
    for name, t in data.items():
        bench_one(name, t, args.repeats, args.trace)
    link(args.repeats)


if __name__ == "__main__":
    main()
