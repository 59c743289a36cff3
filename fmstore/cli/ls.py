"""``fmstore ls ROOT [--step N]``: the committed steps of a checkpoint root, and the steps left
without a manifest (being written, or by a crash).  ROOT may be a snapshot's own directory
(``ckpt/step-0000000200``): then that step alone is listed, as ``--step`` does.  A path that
holds no step at all (no snapshot, nothing incomplete) is "not found", exit status 3."""

from __future__ import annotations

import argparse
from typing import Any

from ..units import format_size
from ._common import add_storage_options, open_root, print_json, resolve_root, table, when


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the snapshots of a checkpoint root (a directory or URL)")
    p.add_argument(
        "root",
        help="a checkpoint root: a directory, file://, s3://bucket/prefix, ...; or a snapshot's "
        "directory (ROOT/step-0000000200): that step alone",
    )
    p.add_argument("--step", type=int, default=None, help="list this step only")
    p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md for its fields)")
    add_storage_options(p)
    p.set_defaults(run=run)


def listing(root: Any, step: int | None = None) -> dict[str, Any]:
    """What ``ls --json`` prints: the root, its committed snapshots and its incomplete steps
    (``step``: that step's entry alone)."""
    snaps = []
    referenced: set[str] = set()
    for snap in root.snapshots():
        # Every snapshot's references count, the step listed or not: they decide whether a
        # directory without a manifest is carried data or an incomplete save.
        referenced |= snap.manifest.referenced_files()
        if step is not None and snap.step != step:
            continue
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
    for s in root.incomplete():
        if step is not None and s != step:
            continue
        files = root.files(s)
        (carried if files and all(f in referenced for f in files) else incomplete).append(s)
    return {"root": root.url, "snapshots": snaps, "incomplete": incomplete, "carried": carried}


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.listing import SnapshotNotFoundError

    url, step = resolve_root(args.root, args.step, args)
    with open_root(url, args) as root:
        out = listing(root, step)
    if not (out["snapshots"] or out["incomplete"] or out["carried"]):
        # Nothing to list is "not found" (exit 3), as for inspect: a script can tell a mistyped
        # path or an empty root from a listing.
        what = f"no step {step}" if step is not None else "no snapshots"
        given = f"{args.root!r}: " if url != args.root else ""  # a snapshot's directory
        raise SnapshotNotFoundError(f"{given}{what} under {out['root']!r}")
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
    print(table(rows, ["step", "created", "stored", "written", "tensors", "codecs", "incremental"]))
    n, m = len(out["snapshots"]), len(out["incomplete"])
    print(f"{n} committed snapshot(s)" + (f", {m} incomplete" if m else "") + f" under {out['root']}")
    return 0
