"""Async, incremental, crash-safe snapshots of training state (see :class:`Checkpointer`)."""

from .checkpointer import (
    MOMENTS,
    Checkpointer,
    ChecksumError,
    LoadMismatchError,
    SaveHandle,
    SnapshotInfo,
    SnapshotNotFoundError,
)
from .manifest import Manifest, ManifestError
from .policy import Level, Policy
from .tree import UnsupportedValueError

__all__ = [
    "Checkpointer",
    "MOMENTS",
    "Policy",
    "Level",
    "SaveHandle",
    "SnapshotInfo",
    "Manifest",
    "ManifestError",
    "ChecksumError",
    "LoadMismatchError",
    "SnapshotNotFoundError",
    "UnsupportedValueError",
]
