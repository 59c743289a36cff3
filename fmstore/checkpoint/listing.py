"""The committed snapshots of one root, read from storage: which steps are committed and each
one's manifest.  Torch-free, so that the read side (``fmstore ls``, ``inspect``, ``du``, ``gc``
and :class:`~fmstore.checkpoint.snapshot.Root`) lists a root without importing torch;
:class:`~fmstore.checkpoint.level.SnapshotLevel` lists through the same functions."""

from __future__ import annotations

from ..errors import SnapshotNotFoundError
from ..storage import Storage
from .manifest import MANIFEST, Manifest, parse_step_dir, step_dir


def committed_steps(storage: Storage) -> list[int]:
    """Committed steps, oldest first (a snapshot without its manifest does not exist)."""
    out = []
    for name in storage.list_dir():
        step = parse_step_dir(name)
        if step is not None and storage.exists(f"{name}/{MANIFEST}"):
            out.append(step)
    return sorted(out)


def read_manifest(storage: Storage, step: int | None = None) -> Manifest:
    """The manifest of ``step`` (default: the newest committed one)."""
    url = storage.url
    if step is None:
        steps = committed_steps(storage)
        if not steps:
            raise SnapshotNotFoundError(f"no committed snapshot under {url!r}")
        step = steps[-1]
    rel = f"{step_dir(step)}/{MANIFEST}"
    try:
        raw = storage.read_bytes(rel)
    except FileNotFoundError:
        raise SnapshotNotFoundError(
            f"no committed snapshot for step {step} under {url!r} (have {committed_steps(storage)})"
        ) from None
    return Manifest.from_json(raw, where=f"{url}/{rel}")


