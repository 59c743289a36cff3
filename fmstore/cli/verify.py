"""``fmstore verify ROOT [--step N | --all]``: read back every chunk of every tensor and check it
against the manifest's checksums; exit status 4 if any tensor fails, each named with its file
and chunk."""

from __future__ import annotations

import argparse
import sys
import time

from ..units import format_size
from ._common import (
    EXIT_CORRUPT,
    ROOT_HELP,
    add_storage_options,
    open_root,
    print_json,
    progress,
    resolve_root,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every chunk of a snapshot against its checksums")
    p.add_argument("root", help=ROOT_HELP)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="the step (default: the newest committed)")
    which.add_argument("--all", action="store_true", help="every committed step")
    p.add_argument("--threads", type=int, default=None, help="tensors checked at once (default: up to 8)")
    p.add_argument("--json", action="store_true", help="print JSON: per step, the bad tensors")
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import reader  # noqa: F401 - torch is imported here, not in the timed part
    from ..errors import ConfigError

    report = []
    url, step = resolve_root(args.root, args.step, args)
    if args.all and step is not None:
        raise ConfigError(f"{args.root!r} is the directory of step {step}; --all takes the root: {url}")
    with open_root(url, args) as root:
        snaps = list(root.snapshots()) if args.all else [root.snapshot(step)]
        sizes = [sum(t.stored_bytes for t in s.tensors()) for s in snaps]
        t0 = time.perf_counter()
        with progress(sum(sizes), "verify") as bar:
            for snap, nbytes in zip(snaps, sizes):
                problems = snap.verify(threads=args.threads, progress=bar.update)
                report.append(
                    {
                        "step": snap.step,
                        "tensors": len(snap.manifest.tensors),
                        "bytes": nbytes,
                        "problems": problems,
                    }
                )
        seconds = time.perf_counter() - t0
    bad = sum(len(r["problems"]) for r in report)
    if args.json:
        print_json(
            {
                "root": root.url,
                "ok": bad == 0,
                "seconds": seconds,
                "steps": [
                    {
                        "step": r["step"],
                        "tensors": r["tensors"],
                        "bytes": r["bytes"],
                        "bad": [
                            {"tensor": p.tensor, "file": p.file, "chunk": p.chunk, "error": p.message}
                            for p in r["problems"]
                        ],
                    }
                    for r in report
                ],
            }
        )
        return EXIT_CORRUPT if bad else 0
    for r in report:
        if not r["problems"]:
            print(f"step {r['step']}: ok ({r['tensors']} tensors, {format_size(r['bytes'])} checked)")
            continue
        print(f"step {r['step']}: {len(r['problems'])} of {r['tensors']} tensors DAMAGED")
        for p in r["problems"]:
            chunk = f", chunk {p.chunk}" if p.chunk is not None else ""
            print(f"  {p.tensor}: {p.file or '?'}{chunk}: {p.message}", file=sys.stderr)
    rate = sum(r["bytes"] for r in report) / seconds / 1e9 if seconds > 0 else 0.0
    print(
        f"{'all intact' if not bad else f'{bad} damaged tensor(s)'}: {len(report)} step(s) in {seconds:.2f} s ({rate:.2f} GB/s)"
    )
    return EXIT_CORRUPT if bad else 0
