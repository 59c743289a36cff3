"""``fmstore blobs LOCATION``: the blobs a tier holds (a directory or a URL)."""

from __future__ import annotations

import argparse
import os

from ..errors import FmstoreError
from ..units import format_size
from ._common import add_storage_options, storage_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "blobs", help="list the blobs in a tier (a directory or a URL such as s3://bucket/prefix)"
    )
    p.add_argument("location")
    p.add_argument("--prefix", default="", help="only keys starting with this")
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tiers import LocalTier, ObjectTier

    loc = args.location
    if "://" not in loc or loc.startswith("file://"):
        path = loc.removeprefix("file://")
        if os.path.isdir(path) and any(n.startswith("step-") for n in os.listdir(path)):
            raise FmstoreError(
                f"{loc!r} is a checkpoint root, not a tier: list its snapshots with `fmstore ls {loc}`"
            )
        tier = LocalTier(path, io_threads=1)
    else:
        tier = ObjectTier(loc, storage_options(args))
    keys = tier.list(args.prefix)
    total = 0
    for key in keys:
        info = tier.stat(key)
        shape = "x".join(map(str, info.shape)) or "()"
        kind = "bytes" if info.is_bytes else str(info.dtype).removeprefix("torch.")
        print(f"{format_size(info.nbytes):>10}  {kind:<14} {shape:<16} {key}")
        total += tier.size_of(key)
    print(f"{len(keys)} blob(s), {format_size(total)} stored")
    return 0
