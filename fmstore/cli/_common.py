"""What the ``fmstore`` commands share: root arguments and opening, exit codes, JSON output,
progress bars and human-readable sizes and times.  Nothing here imports torch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..errors import ConfigError, FmstoreError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT = 0, 1, 2, 3, 4

_NOT_FOUND = {"SnapshotNotFoundError", "RootNotFoundError", "BlobNotFoundError"}
_CORRUPT = {"CorruptBlobError", "ManifestError"}
_USAGE = {"ConfigError"}  # a URL scheme, size or option that does not parse


def exit_code(e: FmstoreError) -> int:
    """The exit status for an error: not found 3, corrupt 4, bad configuration 2, else 1 (by class, without
    importing the modules that define them)."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & _NOT_FOUND:
        return EXIT_NOT_FOUND
    if names & _CORRUPT:
        return EXIT_CORRUPT
    if names & _USAGE:
        return EXIT_USAGE
    return EXIT_ERROR


def add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec storage option for URL roots (repeatable), e.g. endpoint_url=http://127.0.0.1:8333; "
        "credentials come from the standard AWS variables",
    )


def storage_options(args: argparse.Namespace, attr: str = "storage_option") -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` pairs as fsspec options; ``endpoint_url`` goes where s3fs
    reads it (``client_kwargs``); true/false and numbers are converted."""
    pairs = getattr(args, attr, None) or []
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--storage-option wants KEY=VALUE, got {pair!r}")
        out[key] = _value(value)
    if "endpoint_url" in out:
        out.setdefault("client_kwargs", {})["endpoint_url"] = out.pop("endpoint_url")
    return out


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def open_root(url: str, args: argparse.Namespace, attr: str = "storage_option") -> Any:
    """A :class:`fmstore.checkpoint.Root` for ``url`` (a directory or URL)."""
    from ..checkpoint import Root

    return Root(url, storage_options(args, attr))


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def progress(total: int, desc: str, *, unit: str = "B") -> Any:
    """A progress bar on stderr (tqdm; hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, disable=None, file=sys.stderr
    )


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell; numbers (cells starting with a digit) right-aligned."""
    cols = [header, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [
            c.rjust(w) if c[:1].isdigit() and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join(line(r) for r in cols)
