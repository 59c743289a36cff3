"""What pinning a save's host memory costs, and what it does to training meanwhile (issue 11).

The buffers of one snapshot of train.py's ``--size`` model (fp32 weights and two AdamW moments,
one buffer per tensor, as the stager acquires them) are pinned two ways, each in a fresh
process, while the main thread keeps a GPU busy with matmuls (a stand-in for training steps):

- ``torch``: ``torch.empty(n, pin_memory=True)`` per buffer (torch's pinned allocator:
  ``cudaHostAlloc``, blocks rounded up to a power of two);
- ``fmstore``: ``BufferPool.reserve`` (pages faulted in first, ``cudaHostRegister`` in place,
  four buffers at once).

Prints, per way: seconds to pin, bytes pinned, the matmul loop's slowest iteration and its
mean against an undisturbed loop, and the device-to-host copy speed into the pinned buffers.

    python3 bench/pinning.py --size 1b
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time


def state_sizes(size: str) -> list[int]:
    import torch

    from fmstore.integrations.train import GPT, SIZES, GPTConfig
    from fmstore.checkpoint import BufferPool

    d, n_layer, n_head = SIZES[size]
    with torch.device("meta"):
        model = GPT(GPTConfig(d_model=d, n_layer=n_layer, n_head=n_head))
    per_param = [BufferPool.size_class(p.numel() * 4) for p in model.parameters()]
    return per_param * 3  # fp32 weights, exp_avg, exp_avg_sq


def one(way: str, size: str) -> dict[str, float]:
    import torch

    from fmstore.checkpoint import BufferPool

    sizes = state_sizes(size)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def loop(seconds: float, out: list[float], stop: threading.Event | None = None) -> None:
        end = time.perf_counter() + seconds
        while (stop is None and time.perf_counter() < end) or (stop is not None and not stop.is_set()):
            t0 = time.perf_counter()
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)

    quiet: list[float] = []
    loop(2.0, quiet)
    busy: list[float] = []
    stop = threading.Event()
    held: list[torch.Tensor] = []
    t0 = time.perf_counter()

    def pin() -> None:
        if way == "torch":
            held.extend(torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in sizes)
        else:
            pool = BufferPool(pinned=True)
            pool.reserve(sizes, 1)
            held.extend(b for bucket in pool._free.values() for b in bucket)
        stop.set()

    th = threading.Thread(target=pin)
    th.start()
    loop(0, busy, stop)
    th.join()
    seconds = time.perf_counter() - t0
    if way == "torch":
        pinned = torch.cuda.memory.host_memory_stats()["allocated_bytes.current"]
    else:
        pinned = sum(b.numel() for b in held)
    assert all(b.is_pinned() for b in held)
    src = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes[: len(sizes) // 3]]
    dst = sorted(held, key=lambda b: -b.numel())
    pairs = []
    for s in src:
        for i, b in enumerate(dst):
            if b.numel() >= s.numel():
                pairs.append((s, dst.pop(i)))
                break
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for s, b in pairs:
        b[: s.numel()].copy_(s, non_blocking=True)
    torch.cuda.synchronize()
    copied = sum(s.numel() for s, _ in pairs)
    return {
        "pin_s": seconds,
        "wanted_gib": sum(sizes) / 2**30,
        "pinned_gib": pinned / 2**30,
        "quiet_ms": statistics.median(quiet) * 1e3,
        "busy_mean_ms": statistics.mean(busy) * 1e3 if busy else float("nan"),
        "busy_max_ms": max(busy) * 1e3 if busy else float("nan"),
        "d2h_gbs": copied / (time.perf_counter() - t1) / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1b")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--one", default=None)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.size)))
        return
    for r in range(a.repeat):
        for way in ("torch", "fmstore"):
            out = subprocess.run(
                [sys.executable, __file__, "--size", a.size, "--one", way], capture_output=True, text=True
            )
            if out.returncode:
                print(way, out.stderr[-3000:])
                continue
            m = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"run {r} {way:>8}: pinned {m['pinned_gib']:.2f} GiB for {m['wanted_gib']:.2f} GiB of buffers "
                f"in {m['pin_s']:.2f} s; matmul loop {m['quiet_ms']:.1f} ms quiet, {m['busy_mean_ms']:.1f} ms mean / "
                f"{m['busy_max_ms']:.0f} ms max while pinning; D2H into them {m['d2h_gbs']:.1f} GB/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
