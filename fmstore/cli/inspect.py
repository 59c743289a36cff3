"""``fmstore inspect ROOT [--step N] [--tensor PATTERN]``: one snapshot's manifest in human
terms: its tensors with dtype, shape, shards, codecs, stored against raw bytes and where the
bytes live."""

from __future__ import annotations

import argparse

from ..units import format_size
from ._common import (
    ROOT_HELP,
    add_storage_options,
    open_root,
    print_json,
    resolve_root,
    table,
    when,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a snapshot's tensors, shards, codecs and sizes")
    p.add_argument("root", help=ROOT_HELP)
    p.add_argument("--step", type=int, default=None, help="the step (default: the newest committed)")
    p.add_argument("--tensor", default=None, metavar="PATTERN", help="only tensors matching this glob")
    p.add_argument("--shards", action="store_true", help="one line per shard, with its file and byte range")
    p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md for its fields)")
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    url, step = resolve_root(args.root, args.step, args)
    with open_root(url, args) as root:
        snap = root.snapshot(step)
        tensors = snap.tensors(args.tensor)
    if args.json:
        print_json(
            {
                "root": root.url,
                "step": snap.step,
                "created": snap.created,
                "world_size": snap.world_size,
                "meta": snap.meta,
                "files": snap.manifest.files,
                "tensors": [t.to_json() for t in tensors],
            }
        )
        return 0
    print(
        f"step {snap.step} of {root.url}: {len(tensors)} tensor(s)"
        + (f" matching {args.tensor!r}" if args.tensor else "")
        + f", saved {when(snap.created)} by {snap.world_size} rank(s)"
    )
    rows = []
    for t in tensors:
        where = "earlier step" if all(s.referenced for s in t.shards) and t.shards else "this step"
        if t.shards and any(s.referenced for s in t.shards) and not all(s.referenced for s in t.shards):
            where = "mixed"
        rows.append(
            [
                t.name,
                t.dtype,
                "x".join(map(str, t.shape)) or "()",
                str(len(t.shards)),
                ",".join(t.codecs),
                format_size(t.raw_bytes),
                format_size(t.stored_bytes),
                where,
            ]
        )
        if args.shards:
            for s in t.shards:
                span = ",".join(f"{o}:{o + n}" for o, n in zip(s.offsets, s.lengths))
                rows.append(
                    [
                        f"  [{span}]",
                        "",
                        "",
                        "",
                        s.codec_label,
                        "",
                        format_size(s.stored_bytes),
                        f"{s.file} @{s.begin}",
                    ]
                )
    if rows:
        print(table(rows, ["tensor", "dtype", "shape", "shards", "codecs", "raw", "stored", "bytes in"]))
    raw = sum(t.raw_bytes for t in tensors)
    stored = sum(t.stored_bytes for t in tensors)
    ref = sum(t.referenced_bytes for t in tensors)
    ratio = f" ({raw / stored:.2f}x)" if stored and raw != stored else ""
    print(
        f"total: {format_size(raw)} raw, {format_size(stored)} stored{ratio}, "
        f"{format_size(ref)} of it in earlier steps' files"
    )
    if snap.meta:
        print(f"meta: {', '.join(sorted(snap.meta))}")
    return 0
