"""Async, incremental, crash-safe snapshots of training state (see :class:`Checkpointer`)."""

from .checkpointer import (
    Checkpointer,
    ChecksumError,
    LoadMismatchError,
    SaveHandle,
    SnapshotInfo,
    SnapshotNotFoundError,
    StateKeysError,
)
from .manifest import Manifest, ManifestError
from .policy import Level, Policy
from .snapshot import Problem, Root, ShardInfo, Snapshot, TensorInfo
from .stateful import RNGState, is_stateful
from .storage import RootNotFoundError
from .tree import UnsupportedValueError
from .writing import MOMENTS

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
    "StateKeysError",
    "RNGState",
    "is_stateful",
    "Root",
    "Snapshot",
    "TensorInfo",
    "ShardInfo",
    "Problem",
    "RootNotFoundError",
]
