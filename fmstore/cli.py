"""The ``fmstore`` command.  Snapshot commands (inspect, verify, diff, ...) arrive with the
checkpoint layer; for now: ``demo``, and ``blobs`` to list what a tier holds."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import FmstoreError
from .units import format_size


def _open_tier(location: str, storage_options: dict | None = None):
    from .tiers import LocalTier, ObjectTier

    if "://" in location and not location.startswith("file://"):
        return ObjectTier(location, storage_options)
    return LocalTier(location.removeprefix("file://"), io_threads=1)


def cmd_blobs(args: argparse.Namespace) -> int:
    tier = _open_tier(args.location)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fmstore", description="Tiered storage for foundation models.")
    ap.add_argument("--version", action="version", version=f"fmstore {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help="write tensors through a TieredStore and show where they live", add_help=False
    )
    p = sub.add_parser(
        "blobs", help="list the blobs in a tier (a directory or a URL such as s3://bucket/prefix)"
    )
    p.add_argument("location")
    p.add_argument("--prefix", default="", help="only keys starting with this")
    args, rest = ap.parse_known_args(argv)
    try:
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(rest)
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        return cmd_blobs(args)
    except FmstoreError as e:
        print(f"fmstore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
