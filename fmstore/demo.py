"""``make demo``: tensors written through a TieredStore, demoted, read back, placement shown;
then a small model trained with async checkpoints, killed, resumed and inspected
(:mod:`fmstore.demo_training`).

Tiers: host memory (small, so it overflows), a local directory under ``./fmstore-data/local``
and an object tier (default ``file://./fmstore-data/object``; any fsspec URL works, e.g.
``--object-url s3://bucket/demo`` with the standard AWS variables set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from .blob import as_bytes_tensor, dtype_name
from .store import TieredStore
from .tiers import HostTier, LocalTier, ObjectTier
from .units import format_size


def demo_values() -> dict[str, torch.Tensor | bytes]:
    g = torch.Generator().manual_seed(0)
    return {
        "model/embed.weight": torch.randn(2048, 1024, generator=g).to(torch.bfloat16),  # 4 MiB
        "model/layer0.weight": torch.randn(1024, 1024, generator=g).to(torch.bfloat16),  # 2 MiB
        "model/layer1.weight": torch.randn(1024, 1024, generator=g).to(torch.bfloat16),  # 2 MiB
        "model/head.weight": torch.randn(1024, 256, generator=g).to(torch.float8_e4m3fn),  # 256 KiB
        "optim/exp_avg": torch.randn(1024, 1024, generator=g),  # 4 MiB fp32
        "optim/exp_avg_sq": torch.rand(1024, 1024, generator=g),  # 4 MiB fp32
        "optim/step": torch.tensor(1000, dtype=torch.int64),  # 0-d
        "meta/config.json": json.dumps({"hidden": 1024, "layers": 2}).encode(),
    }


def describe(v: torch.Tensor | bytes) -> tuple[str, str, int]:
    if isinstance(v, bytes):
        return "bytes", "-", len(v)
    return dtype_name(v.dtype), "x".join(map(str, v.shape)) or "()", v.numel() * v.element_size()


def print_placement(store: TieredStore, values: dict[str, torch.Tensor | bytes], title: str) -> None:
    print(f"\n{title}")
    print(f"  {'key':<22} {'dtype':<14} {'shape':<11} {'size':>10}  tiers holding a copy")
    for key, v in values.items():
        dtype, shape, n = describe(v)
        print(f"  {key:<22} {dtype:<14} {shape:<11} {format_size(n):>10}  {', '.join(store.where(key))}")


def print_tiers(store: TieredStore) -> None:
    print(
        f"\n  {'tier':<8} {'kind':<7} {'used':>10} {'capacity':>10} {'entries':>7} {'moved in':>10} {'moved out':>10}"
    )
    for t in store.stats()["tiers"]:  # type: ignore[union-attr]
        print(
            f"  {t['name']:<8} {t['kind']:<7} {format_size(t['used']):>10} {format_size(t['capacity']):>10} "
            f"{t['entries']:>7} {format_size(t['moved_in']):>10} {format_size(t['moved_out']):>10}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fmstore demo", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fmstore-data", help="directory for the local and file:// tiers")
    ap.add_argument("--object-url", default=None, help="object tier URL (default file://DATA/object)")
    ap.add_argument("--host-capacity", default="8MiB")
    ap.add_argument("--local-capacity", default="8MiB")
    ap.add_argument("--no-training", action="store_true", help="skip the train / crash / resume part")
    args = ap.parse_args(argv)

    data = os.path.abspath(args.data)
    object_url = args.object_url or f"file://{data}/object"
    for sub in ("local", "object"):  # start from empty tiers so the run is repeatable
        shutil.rmtree(os.path.join(data, sub), ignore_errors=True)
    tiers = [
        HostTier(args.host_capacity),
        LocalTier(os.path.join(data, "local"), args.local_capacity),
        ObjectTier(object_url),
    ]
    print("fmstore demo: a TieredStore over")
    for t in tiers:
        where = (
            getattr(t, "root", None)
            or getattr(t, "url", None)
            or ("pinned" if getattr(t, "pinned", False) else "RAM")
        )
        print(f"  {t.name:<7} capacity {format_size(t.capacity):>10}  {where}")

    values = demo_values()
    t0 = time.perf_counter()
    with TieredStore(tiers) as store:
        for key, value in values.items():
            store.put(key, value)
        store.flush()
        print_placement(
            store,
            values,
            f"after writing {len(values)} blobs ({time.perf_counter() - t0:.2f} s): "
            "the least recently used were demoted down the chain",
        )
        print_tiers(store)

        # Read everything back, checking every bit; reads promote into host memory.
        for key, value in values.items():
            got = store.get(key)
            ok = (
                got == value
                if isinstance(value, bytes)
                else torch.equal(as_bytes_tensor(got), as_bytes_tensor(value))
            )
            if not ok:
                print(f"MISMATCH for {key}")
                return 1
        store.flush()
        print_placement(
            store, values, "after reading all back (bit-exact): reads promoted recent keys to host"
        )
        print_tiers(store)
    print(f"\nall {len(values)} blobs read back bit-exact; files are under {data}")
    if args.no_training:
        return 0
    from .demo_training import demo as training_demo

    return training_demo(data)


if __name__ == "__main__":
    raise SystemExit(main())
