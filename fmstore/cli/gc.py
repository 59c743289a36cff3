"""``fmstore gc ROOT``: what a crash, retention or an interrupted copy left behind, and (with
``--yes``) delete it.  A dry run by default: it lists and deletes nothing.

Collected, in step directories older than the newest committed snapshot only (a newer one may
be being written now): directories without a manifest (a crashed save or copy), the files no
kept snapshot references, and with ``--keep-last K`` the snapshots retention would drop
(uncommitted first: their manifests go, then their unreferenced files), as the checkpointer's
own retention does.  A file a kept snapshot references is never deleted.

``--yes`` claims the root's writer lease first, as a checkpointer's first save does, and plans
and deletes under it: while a job holds the root (it may reference any of these files in its
next incremental save) it is refused, :class:`~fmstore.errors.WriterConflictError` naming the
holder (exit status 1), and deletes nothing.  The dry run claims nothing (and imports no
torch): it can run beside a job."""

from __future__ import annotations

import argparse

from ..units import format_size
from ._common import add_storage_options, print_json, storage_options, whole_root


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gc",
        help="list (and with --yes delete) incomplete steps and unreferenced files of a root",
        description="Collect garbage under a checkpoint root: a dry run unless --yes.",
    )
    p.add_argument("root", help="a checkpoint root: a directory, file://, s3://bucket/prefix, ...")
    p.add_argument(
        "--keep-last", type=int, metavar="K", help="also drop all but the newest K committed snapshots"
    )
    p.add_argument("--yes", action="store_true", help="delete what is listed (default: a dry run)")
    p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md for its fields)")
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.snapshots import Snapshots
    from ..errors import ConfigError
    from ..storage import Storage

    if args.keep_last is not None and args.keep_last < 1:
        raise ConfigError(f"--keep-last must be >= 1, got {args.keep_last}")
    root = whole_root(args.root, args, "gc")
    storage = Storage(root, storage_options(args), create=False)
    try:
        snapshots = Snapshots(storage)
        if not args.yes:
            plan = snapshots.plan_gc(args.keep_last)
        else:
            with snapshots.claimed("gc"):
                # Listed under the lease: no save or retention changes the root meanwhile.
                plan = snapshots.plan_gc(args.keep_last)
                snapshots.collect(plan)
    finally:
        storage.close()
    if args.json:
        print_json(plan.to_json(deleted=args.yes))
        return 0
    verb = "deleted" if args.yes else "would delete"
    if plan.newest is None:
        print(f"{args.root}: no committed snapshot; nothing is collected (a step may be being written)")
        return 0
    for step in plan.uncommit:
        print(
            f"step {step}: {'uncommitted' if args.yes else 'would uncommit'} (--keep-last {args.keep_last})"
        )
    for d in plan.dirs:
        what = "the whole directory" if d["whole"] else f"{len(d['files'])} file(s)"
        print(f"{d['dir']}/  ({d['reason']}): {verb} {what}, {format_size(d['bytes'])}")
        for f, n in d["files"]:
            print(f"  {f}  {format_size(n)}")
    for step in plan.left_alone:
        print(f"step {step}: no manifest, newer than the newest committed step {plan.newest}: left alone")
    n = len(plan.files)
    summary = f"{verb} {n} file(s), {format_size(plan.bytes)} ({plan.bytes} bytes)"
    if not args.yes and (n or plan.uncommit or plan.dirs):
        summary += "; run again with --yes to delete"
    print(summary)
    return 0
