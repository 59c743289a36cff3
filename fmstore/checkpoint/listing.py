"""The committed snapshots of one root, read from storage: which steps are committed and each
one's manifest.  Torch-free, so that the read side (``fmstore ls``, ``inspect``, ``du``, ``gc``
and :class:`~fmstore.checkpoint.snapshot.Root`) lists a root without importing torch;
:class:`~fmstore.checkpoint.level.SnapshotLevel` lists through the same functions."""

from __future__ import annotations

from ..errors import FmstoreError
from .manifest import MANIFEST, Manifest, parse_step_dir, step_dir
from .storage import SnapshotStorage


class SnapshotNotFoundError(FmstoreError, KeyError):
    """No committed snapshot of that step (or none at all) under a root, or no such tensor."""

    def __str__(self) -> str:
        return str(self.args[0])


def committed_steps(storage: SnapshotStorage) -> list[int]:
    """Committed steps, oldest first (a snapshot without its manifest does not exist)."""
    out = []
    for name in storage.list_dir():
        step = parse_step_dir(name)
        if step is not None and storage.exists(f"{name}/{MANIFEST}"):
            out.append(step)
    return sorted(out)


def read_manifest(storage: SnapshotStorage, step: int | None = None) -> Manifest:
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


def numel(shape: object) -> int:
    """Elements of a tensor of ``shape`` (1 for a scalar's empty shape)."""
    n = 1
    for s in shape:  # type: ignore[attr-defined]
        n *= int(s)
    return n
