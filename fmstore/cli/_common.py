"""What the ``fmstore`` commands share: root arguments and opening (a root, or a snapshot's own
directory: :func:`resolve_root`), exit codes, JSON output, progress bars and human-readable
sizes and times.  Nothing here imports torch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..errors import (
    BlobNotFoundError,
    ConfigError,
    CorruptBlobError,
    FmstoreError,
    ManifestError,
    RootNotFoundError,
    SnapshotNotFoundError,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT = 0, 1, 2, 3, 4

#: The help of a ROOT argument that also takes a snapshot's own directory (see snapshot_dir).
ROOT_HELP = (
    "a checkpoint root: a directory, file://, s3://bucket/prefix, ...; or a snapshot's own "
    "directory (ROOT/step-0000000200), the same as ROOT --step 200"
)

_NOT_FOUND = (SnapshotNotFoundError, RootNotFoundError, BlobNotFoundError)
_CORRUPT = (CorruptBlobError, ManifestError)
_USAGE = (ConfigError,)  # a URL scheme, size or option that does not parse


def exit_code(e: FmstoreError) -> int:
    """The exit status for an error: not found 3, corrupt 4, bad configuration 2, else 1 (by class:
    every error is defined in the torch-free :mod:`fmstore.errors`)."""
    if isinstance(e, _NOT_FOUND):
        return EXIT_NOT_FOUND
    if isinstance(e, _CORRUPT):
        return EXIT_CORRUPT
    if isinstance(e, _USAGE):
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
    from ..checkpoint.snapshot import Root

    return Root(url, storage_options(args, attr))


def snapshot_dir(path: str, args: argparse.Namespace, attr: str = "storage_option") -> tuple[str, int | None]:
    """``(root, step)`` when ``path`` is a snapshot's own directory or URL (what ``ls`` and DCP's
    ``checkpoint_id`` show: ``ckpt/step-0000000200``, ``s3://bucket/run/step-0000000200``),
    else ``(path, None)``.

    A path is a snapshot's directory when its last component is a step directory's name
    (``step-`` and ten digits) and its parent is a root: where that directory holds a
    ``manifest.json``, or holds no step directories of its own (a step being written, or not
    there: the command then names the step and the root it is missing from).  A root that is
    itself named like a step directory, holding step directories, stays a root.  Only a path
    so named is looked at in storage; any other path is returned as it is, unread.
    """
    from ..checkpoint.manifest import MANIFEST, parse_step_dir
    from ..storage import Storage

    text = str(path)
    parent, sep, name = text.rstrip("/").rpartition("/")
    step = parse_step_dir(name)
    if step is None:
        return text, None
    if not sep:
        parent = "."  # a relative path of one component: the root is the working directory
    elif not parent:
        parent = "/"
    elif "://" in parent and not parent.split("://", 1)[1]:
        return text, None  # a bucket (or file system root) named like a step: not a snapshot
    try:
        storage = Storage(parent, storage_options(args, attr), create=False)
    except RootNotFoundError:
        return text, None  # no parent root: the command names the path itself as missing
    try:
        if storage.exists(f"{name}/{MANIFEST}"):
            return parent, step
        if any(parse_step_dir(n) is not None for n in storage.list_dir(name)):
            return text, None
        return parent, step
    finally:
        storage.close()


def resolve_root(
    path: str,
    step: int | None,
    args: argparse.Namespace,
    *,
    attr: str = "storage_option",
    option: str = "--step",
) -> tuple[str, int | None]:
    """``(root, step)`` for a command's ``ROOT [--step N]`` where ROOT may be a snapshot's own
    directory (:func:`snapshot_dir`): the step it names, or ``step``.  A snapshot directory and
    a different ``--step`` is a usage error (:class:`~fmstore.errors.ConfigError`, exit 2)."""
    root, own = snapshot_dir(path, args, attr)
    if own is None:
        return root, step
    if step is not None and step != own:
        raise ConfigError(
            f"{path!r} is the directory of step {own} of root {root!r}, but {option} {step} was given: "
            f"give the root with {option}, or the snapshot's directory alone"
        )
    return root, own


def whole_root(path: str, args: argparse.Namespace, command: str, attr: str = "storage_option") -> str:
    """``path`` for a command that works on a whole root (``du``, ``gc``): a snapshot's
    directory is a usage error naming its root, never read as a root of its own (``gc`` there
    would see no committed snapshot; ``du`` would count its files as strays)."""
    root, own = snapshot_dir(path, args, attr)
    if own is not None:
        raise ConfigError(
            f"{path!r} is the directory of step {own} of root {root!r}; fmstore {command} works on a "
            f"whole root: fmstore {command} {root}"
        )
    return root


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
