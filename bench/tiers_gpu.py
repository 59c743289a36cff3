"""GPU tiers: DeviceTier and pinned HostTier put/get of one blob vs raw torch copies.

Run on a CUDA machine: ``PYTHONPATH=. python bench/tiers_gpu.py [--size 1GiB] [--repeats 5]``.
Baselines in the same process on the same bytes: a device-to-device ``copy_`` into a
preallocated tensor, and a device-to-host ``copy_`` into preallocated pinned memory (and
back).  HostTier reuses its pinned pool after the first put (the warm-up), which is what
the raw baseline's preallocation stands for.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fmstore import DeviceTier, HostTier, format_size, parse_size


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = parse_size(args.size) or 0
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    dev_dst = torch.empty_like(src)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev_tier = DeviceTier("cuda:0")
    host_tier = HostTier(2 * n + (1 << 20))
    rows = {
        "raw D2D copy_": lambda: dev_dst.copy_(src),
        "DeviceTier.put": lambda: dev_tier.put("b", src),
        "DeviceTier.get": lambda: dev_tier.get("b"),
        "raw D2H copy_ (pinned)": lambda: pinned.copy_(src),
        "HostTier.put (D2H)": lambda: host_tier.put("b", src),
        "raw H2D copy_ (pinned)": lambda: dev_dst.copy_(pinned),
        "HostTier.get(device=cuda)": lambda: host_tier.get("b", device="cuda"),
    }
    for fn in rows.values():  # warm-up: pool allocation, allocator caches
        fn()
    times = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            times[name].append(timed(fn))
    assert torch.equal(dev_tier.get("b"), src) and torch.equal(host_tier.get("b", device="cuda"), src)
    gbps = {k: n / statistics.median(v) / 1e9 for k, v in times.items()}
    print(
        f"{torch.cuda.get_device_name()}  torch {torch.__version__}  blob {format_size(n)}  "
        f"median of {args.repeats}"
    )
    for name, v in gbps.items():
        print(f"  {name:<26} {v:8.1f} GB/s")
    print(f"  DeviceTier.put / raw D2D: {gbps['DeviceTier.put'] / gbps['raw D2D copy_']:.2f}x")
    print(f"  HostTier.put / raw D2H:   {gbps['HostTier.put (D2H)'] / gbps['raw D2H copy_ (pinned)']:.2f}x")
    print(
        f"  HostTier.get / raw H2D:   {gbps['HostTier.get(device=cuda)'] / gbps['raw H2D copy_ (pinned)']:.2f}x"
    )
    print(f"  HostTier pool allocations: {host_tier.pool.allocations} (reused after warm-up)")


if __name__ == "__main__":
    main()
