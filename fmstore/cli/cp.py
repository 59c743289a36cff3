"""``fmstore cp SRC DST``: copy committed snapshots between two roots (local directories, S3 or
any fsspec URL), oldest first.  Each step's files are streamed in parts, an earlier step's file
it references included (carried under the same path), read back from the destination and
verified, and only then is its manifest written there: the commit.  Rerunning a killed copy
skips the files already complete at the destination; a step committed there already is skipped,
never overwritten.  SRC may be a snapshot's own directory (``ckpt/step-0000000200``): that step.
See :mod:`fmstore.cli._copy` for how the bytes are checked."""

from __future__ import annotations

import argparse
import sys
import threading

from ..units import format_size
from ._common import add_storage_options, print_json, progress, snapshot_dir, storage_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cp",
        help="copy snapshots between roots (local, S3, ...), verified before they are committed",
        description="Copy committed snapshots from SRC_ROOT to DST_ROOT (default: the newest step), "
        "oldest first; each is verified at the destination before its manifest is written there.",
    )
    p.add_argument(
        "src",
        metavar="SRC_ROOT",
        help="the root to copy from: a directory or URL; or a snapshot's own directory "
        "(SRC_ROOT/step-0000000200): that step",
    )
    p.add_argument("dst", metavar="DST_ROOT", help="the root to copy to (made if missing)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--step", type=int, action="append", default=[], metavar="N", help="a step to copy (repeatable)"
    )
    which.add_argument("--all", action="store_true", help="every committed step of SRC_ROOT")
    p.add_argument(
        "--part-size",
        default="32MiB",
        metavar="SIZE",
        help="bytes per copy part (default 32MiB; S3 parts are at least 5MiB); at most 8 parts "
        "are in memory at once",
    )
    p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md for its fields)")
    add_storage_options(p)  # -o: for SRC_ROOT
    p.add_argument(
        "--dst-storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec storage option for DST_ROOT (repeatable); -o/--storage-option is for SRC_ROOT",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.listing import SnapshotNotFoundError
    from ..checkpoint.manifest import parse_step_dir
    from ..errors import ConfigError
    from ..storage import Storage
    from ..units import parse_size
    from ._copy import Copier, committed_steps, source_manifest

    part = parse_size(args.part_size, what="--part-size") or 0
    if part < 1 << 20:
        raise ConfigError(f"--part-size must be at least 1MiB, got {args.part_size!r}")
    src_url, own = snapshot_dir(args.src, args)
    if own is not None:  # SRC_ROOT/step-N: that step, the same as SRC_ROOT --step N
        if args.all or (args.step and set(args.step) != {own}):
            given = "--all" if args.all else " ".join(f"--step {s}" for s in args.step)
            raise ConfigError(
                f"{args.src!r} is the directory of step {own} of root {src_url!r}, but {given} was "
                "given: give the root with --step/--all, or the snapshot's directory alone"
            )
        args.step = [own]
    dst_name = str(args.dst).rstrip("/").rpartition("/")[2]
    if parse_step_dir(dst_name) is not None:
        # A root named like a step directory would nest snapshots as ROOT/step-N/step-N/...:
        # surely meant as the root above it.
        parent = str(args.dst).rstrip("/").rpartition("/")[0] or "."
        raise ConfigError(
            f"DST_ROOT {args.dst!r} is named like a snapshot's directory; cp writes a root, whose "
            f"snapshots go in step-... directories under it: give {parent!r}"
        )
    src = Storage(src_url, storage_options(args), create=False, part_size=part)
    try:
        dst = Storage(args.dst, storage_options(args, "dst_storage_option"), part_size=part)
    except BaseException:
        src.close()
        raise
    results = []
    try:
        have = committed_steps(src)
        if args.all:
            steps = have
        elif args.step:
            steps = sorted(set(args.step))
        else:
            steps = have[-1:]
        if not steps:
            raise SnapshotNotFoundError(f"no committed snapshot under {src_url!r}")
        manifests = []
        for step in steps:  # every step's manifest first: a missing step fails before any copy
            manifests.append((step, *source_manifest(src, step)))
        total = sum(src.size(f) for _, _, m in manifests for f in sorted(m.referenced_files() | set(m.files)))
        lock = threading.Lock()
        with progress(total, "cp") as bar:

            def on_bytes(n: int) -> None:
                with lock:
                    bar.update(n)

            copier = Copier(src, dst, part_size=part, on_bytes=on_bytes)
            try:
                for step, raw, manifest in manifests:
                    res = copier.copy(step, raw, manifest)
                    results.append(res)
                    if not args.json:
                        bar.clear()
                        print(summary(res), flush=True)
            finally:
                copier.close()
    finally:
        src.close()
        dst.close()
    conflicts = [r for r in results if r.status == "committed" and "DIFFERENT" in r.note]
    if args.json:
        print_json({"src": src_url, "dst": args.dst, "steps": [r.to_json() for r in results]})
    else:
        copied = [r for r in results if r.status == "copied"]
        print(
            f"{len(copied)} step(s) copied and committed at {args.dst}, {len(results) - len(copied)} skipped"
        )
    if conflicts:
        print(
            f"fmstore: step(s) {[r.step for r in conflicts]} differ at the destination (not overwritten)",
            file=sys.stderr,
        )
        return 1
    return 0


def summary(res: object) -> str:
    """One line per step: files copied and skipped, bytes, time, throughput."""
    j = res.to_json()  # type: ignore[attr-defined]
    if j["status"] == "committed":
        return f"step {j['step']}: {j['note']}"
    line = f"step {j['step']}: copied {j['files_copied']} file(s), {format_size(j['bytes_copied'])}"
    if j["files_skipped"]:
        line += f"; skipped {j['files_skipped']} already there, verified ({format_size(j['bytes_skipped'])})"
    line += f"; {j['seconds']:.2f} s"
    if j["bytes_copied"]:
        line += f", {j['gb_per_s']:.3f} GB/s"
    return line + "; committed"
