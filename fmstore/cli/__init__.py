"""The ``fmstore`` command: list, inspect, verify, diff, export, import, copy and clean up
snapshots, plus ``blobs`` (what a tier holds).  (The demo is ``make demo`` / ``python -m
fmstore.integrations.demo``: an application of fmstore, not part of its command.)

Each command lives in its own module here with ``register(subparsers)``; a module imports
torch and the checkpoint layer only inside its ``run``, so ``fmstore --help`` and
``fmstore --version`` answer without importing torch.  Exit status: 0 success, 1 an error,
2 bad usage, 3 not found (no root, step or tensor), 4 corrupt (verification failed), 141 the
reader of its output went away (``fmstore ls ckpt | head -1``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import FmstoreError
from ._common import EXIT_ERROR, exit_code

#: The exit status when stdout's reader goes away: 128 + SIGPIPE, what a shell reports for a
#: command that SIGPIPE ended (``yes | head -1``; ``${PIPESTATUS[0]}`` is 141), so scripts see
#: fmstore as any other filter.  Not 0: the output was cut short.  Not 1: nothing failed.
EXIT_BROKEN_PIPE = 141

__all__ = ["main"]  # ``main(argv) -> exit status``: the ``fmstore`` command, run in-process

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ["ls", "inspect", "verify", "diff", "export", "import_", "cp", "gc", "du", "blobs", "serve"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fmstore",
        description="Tiered storage for foundation models: inspect and move checkpoint snapshots.",
        epilog="Exit status: 0 ok, 1 error, 2 usage, 3 not found, 4 corrupt, 141 output cut short "
        "(its reader went away).  ROOT --step N may be given as the snapshot's own directory "
        "(ROOT/step-0000000N...).  "
        "URLs (s3://...) use the standard AWS variables and --storage-option KEY=VALUE.",
    )
    ap.add_argument("--version", action="version", version=f"fmstore {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # here, not at exit (--help's SystemExit too), so a reader gone away is caught
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader of stdout went away (``| head -1``): stop quietly, as Python's docs advise
        # (signal module, "Note on SIGPIPE"): point stdout at devnull, so that the interpreter's
        # flush at exit does not raise again and print "Exception ignored ...".
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


def _quiet_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture): nothing to flush
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _main(argv: list[str] | None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except FmstoreError as e:
        print(f"fmstore: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("fmstore: interrupted", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
