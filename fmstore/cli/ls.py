"""``fmstore ls ROOT``: the committed steps of a checkpoint root, and the steps left without a
manifest (being written, or by a crash)."""

from __future__ import annotations

import argparse
from typing import Any

from ..units import format_size
from ._common import add_storage_options, open_root, print_json, table, when


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the snapshots of a checkpoint root (a directory or URL)")
    p.add_argument("root", help="a checkpoint root: a directory, file://, s3://bucket/prefix, ...")
    p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md for its fields)")
    add_storage_options(p)
    p.set_defaults(run=run)


def listing(root: Any) -> dict[str, Any]:
    """What ``ls --json`` prints: the root, its committed snapshots and its incomplete steps."""
    snaps = []
    referenced: set[str] = set()
    for snap in root.snapshots():
        referenced |= snap.manifest.referenced_files()
        tensors = snap.tensors()
        snaps.append(
            {
                "step": snap.step,
                "created": snap.created,
                "world_size": snap.world_size,
                "tensors": len(tensors),
                "raw_bytes": sum(t.raw_bytes for t in tensors),
                "stored_bytes": sum(t.stored_bytes for t in tensors),
                "written_bytes": snap.written_bytes,
                "referenced_bytes": sum(t.referenced_bytes for t in tensors),
                "codecs": sorted({c for t in tensors for c in t.codecs}),
            }
        )
    # A directory without a manifest whose files committed snapshots reference holds data an
    # incremental snapshot uses (e.g. copied by ``fmstore cp`` with one step): not a failed save.
    incomplete, carried = [], []
    for step in root.incomplete():
        files = root.files(step)
        (carried if files and all(f in referenced for f in files) else incomplete).append(step)
    return {"root": root.url, "snapshots": snaps, "incomplete": incomplete, "carried": carried}


def run(args: argparse.Namespace) -> int:
    with open_root(args.root, args) as root:
        out = listing(root)
    if args.json:
        print_json(out)
        return 0
    rows = []
    for s in out["snapshots"]:
        inc = f"{format_size(s['referenced_bytes'])} referenced" if s["referenced_bytes"] else "-"
        rows.append(
            [
                str(s["step"]),
                when(s["created"]),
                format_size(s["stored_bytes"]),
                format_size(s["written_bytes"]),
                str(s["tensors"]),
                ",".join(s["codecs"]),
                inc,
            ]
        )
    for step in out["incomplete"]:
        rows.append([str(step), "-", "-", "-", "-", "-", "incomplete (no manifest)"])
    for step in out["carried"]:
        rows.append([str(step), "-", "-", "-", "-", "-", "no manifest; files used by later steps"])
    rows.sort(key=lambda r: int(r[0]))
    if not rows:
        print(f"{out['root']}: no snapshots")
        return 0
    print(table(rows, ["step", "created", "stored", "written", "tensors", "codecs", "incremental"]))
    n, m = len(out["snapshots"]), len(out["incomplete"])
    print(f"{n} committed snapshot(s)" + (f", {m} incomplete" if m else "") + f" under {out['root']}")
    return 0
