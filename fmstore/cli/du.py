"""``fmstore du ROOT``: where a checkpoint root's bytes are.  Per committed step: the bytes of
the files it wrote (own), the bytes it references in earlier steps' files, the bytes of its
files that later steps reference (shared), and what dropping it alone would free; then every
byte under the root by class (own, manifests, retained for references, incomplete,
unreferenced, other: the root's ``writer.lease`` too), which adds up to the total stored: every
file under the root."""

from __future__ import annotations

import argparse

from ..units import format_size
from ._common import add_storage_options, print_json, storage_options, table, whole_root


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("du", help="bytes per snapshot: own, referenced, shared; and the root's total")
    p.add_argument("root", help="a checkpoint root: a directory, file://, s3://bucket/prefix, ...")
    p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md for its fields)")
    add_storage_options(p)
    p.set_defaults(run=run)


def _size(n: int) -> str:
    return format_size(n) if n else "-"


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.snapshots import Snapshots
    from ..storage import Storage
    from ._copy_usage import usage

    storage = Storage(whole_root(args.root, args, "du"), storage_options(args), create=False)
    try:
        out = usage(Snapshots(storage).scan())
    finally:
        storage.close()
    if args.json:
        print_json(out)
        return 0
    rows = [
        [
            str(s["step"]),
            _size(s["own_bytes"]),
            _size(s["referenced_bytes"]),
            _size(s["shared_bytes"]),
            _size(s["freed_if_dropped"]),
            f"{len(s['missing_files'])} file(s) MISSING" if s["missing_files"] else "",
        ]
        for s in out["steps"]
    ]
    for s in out["incomplete"]:
        when = "being written?" if s["newer_than_newest_committed"] else "left by a crash or retention"
        what = []
        if s["bytes"] or not s["retained_bytes"]:
            what.append(f"{format_size(s['bytes'])} incomplete")
        if s["retained_bytes"]:
            what.append(f"{format_size(s['retained_bytes'])} retained: committed steps reference it")
        rows.append([str(s["step"]), "-", "-", "-", "-", f"no manifest ({when}): " + ", ".join(what)])
    rows.sort(key=lambda r: int(r[0]))
    if rows:
        print(table(rows, ["step", "own", "referenced", "shared", "freed if dropped", ""]))
    t = out["totals"]
    parts = [
        f"own {format_size(t['own_bytes'])}",
        f"manifests {format_size(t['manifest_bytes'])}",
    ]
    for key, label in (
        ("retained_bytes", "retained for references"),
        ("incomplete_bytes", "incomplete"),
        ("unreferenced_bytes", "unreferenced"),
        ("other_bytes", "other"),
    ):
        if t[key]:
            parts.append(f"{label} {format_size(t[key])}")
    print(
        f"{format_size(t['total_bytes'])} ({t['total_bytes']} bytes) in {out['files']} file(s) under "
        f"{out['root']}: " + ", ".join(parts)
    )
    return 0
