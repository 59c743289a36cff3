"""The ``fmstore`` command: list, inspect, verify, diff, export, import, copy and clean up
snapshots, plus ``demo`` and ``blobs`` (what a tier holds).

Each command lives in its own module here with ``register(subparsers)``; a module imports
torch and the checkpoint layer only inside its ``run``, so ``fmstore --help`` and
``fmstore --version`` answer without importing torch.  Exit status: 0 success, 1 an error,
2 bad usage, 3 not found (no root, step or tensor), 4 corrupt (verification failed).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import FmstoreError
from ._common import EXIT_ERROR, exit_code

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ["ls", "inspect", "verify", "diff", "export", "import_", "cp", "gc", "du", "blobs"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fmstore",
        description="Tiered storage for foundation models: inspect and move checkpoint snapshots.",
        epilog="Exit status: 0 ok, 1 error, 2 usage, 3 not found, 4 corrupt.  "
        "URLs (s3://...) use the standard AWS variables and --storage-option KEY=VALUE.",
    )
    ap.add_argument("--version", action="version", version=f"fmstore {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "demo", help="write tensors through a TieredStore and show where they live", add_help=False
    )
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    try:
        if args.command == "demo":
            from ..demo import main as demo_main

            return demo_main(rest)
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        return int(args.run(args) or 0)
    except FmstoreError as e:
        print(f"fmstore: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("fmstore: interrupted", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
