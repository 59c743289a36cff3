"""Async, incremental, crash-safe snapshots of training state (see :class:`Checkpointer`).

The names below are loaded on first use: the read side (:class:`Root`, manifests, listing)
imports no torch, so ``fmstore ls`` / ``inspect`` / ``du`` / ``gc`` answer without paying for
``import torch`` (seconds), while ``from fmstore.checkpoint import Checkpointer`` works as
before.  The errors come from :mod:`fmstore.errors` (torch-free) at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names
from ..errors import (
    ChecksumError,
    LoadMismatchError,
    ManifestError,
    RootNotFoundError,
    SnapshotNotFoundError,
    StateKeysError,
    UnsupportedValueError,
)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads them
    from .checkpointer import Checkpointer, SaveHandle, SnapshotInfo
    from .manifest import Manifest
    from .policy import Level, Policy
    from .snapshot import Problem, Root, ShardInfo, Snapshot, TensorInfo
    from .snapshots import Snapshots
    from .stateful import RNGState, is_stateful
    from .writing import MOMENTS

#: Public name -> the submodule defining it (those marked torch-free import no torch).
_LAZY = {
    "Checkpointer": "checkpointer",
    "SaveHandle": "checkpointer",
    "SnapshotInfo": "checkpointer",
    "Manifest": "manifest",  # torch-free
    "Level": "policy",
    "Policy": "policy",
    "Problem": "snapshot",  # torch-free
    "Root": "snapshot",  # torch-free
    "ShardInfo": "snapshot",  # torch-free
    "Snapshot": "snapshot",  # torch-free
    "Snapshots": "snapshots",  # torch-free
    "TensorInfo": "snapshot",  # torch-free
    "RNGState": "stateful",
    "is_stateful": "stateful",
    "MOMENTS": "writing",
}


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)


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
    "Snapshots",
    "TensorInfo",
    "ShardInfo",
    "Problem",
    "RootNotFoundError",
]
