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
    from .host_level import HOST
    from .lease import DEFAULT_TTL
    from .listing import read_manifest
    from .manifest import Manifest, Shard, parse_step_dir, step_dir
    from .options import check_save_options
    from .overlap import watch_optimizer_steps
    from .parts import Part, PartsWritten, SnapshotWriter, tensor_names
    from .policy import Level, Policy
    from .reader import BufferPool, Region, SnapshotReader, verify_all
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
    "step_dir": "manifest",  # torch-free
    "Shard": "manifest",  # torch-free
    "parse_step_dir": "manifest",  # torch-free
    "read_manifest": "listing",  # torch-free
    "HOST": "host_level",
    "check_save_options": "options",
    "watch_optimizer_steps": "overlap",
    "DEFAULT_TTL": "lease",  # torch-free
    "POLL_RATE": "level",
    "REPORT_READERS": "level",
    "Part": "parts",
    "PartsWritten": "parts",
    "SnapshotWriter": "parts",
    "tensor_names": "parts",
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
    "SnapshotReader": "reader",
    "Region": "reader",
    "verify_all": "reader",
    "BufferPool": "reader",  # defined in fmstore.tiers.host; the pool a SnapshotReader reads through
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
    # for integrations that drive a save or a load themselves (fmstore.integrations)
    "HOST",  # the host-memory level's name in Checkpointer.level_names(), steps(level=), load(level=)
    "step_dir",  # the directory name of snapshot ``step`` under a root: ``step-NNNNNNNNNN``
    "parse_step_dir",  # the step of a directory name ``step-NNNNNNNNNN`` (None: not one)
    "read_manifest",  # the manifest of a step (default: the newest committed) of a root's Storage
    "check_save_options",  # compression= and codec= checked and resolved as a save does
    "watch_optimizer_steps",  # let non-blocking saves overlap the next forward and backward
    "SnapshotReader",  # reads regions of one committed snapshot (its Manifest), checked
    "Region",  # one region of a saved tensor and the tensor it is read into
    "Shard",  # one shard's record in a manifest: rank, offsets, lengths, file, byte range, checksums
    "verify_all",  # check bytes read from a shard against its chunk checksums (a streaming loader)
    "BufferPool",  # the reusable host buffers (pinned with CUDA) a SnapshotReader reads through
    "SnapshotWriter",  # writes one snapshot in parts (each rank's), then commits it: the save pipeline's
    "Part",  # one piece of a tensor a rank writes through a SnapshotWriter
    "PartsWritten",  # what SnapshotWriter.write wrote: the parts' shard records and files, for commit
    "tensor_names",  # path in a nested state -> the name a save gives the tensor there
    "DEFAULT_TTL",  # seconds a root's S3 writer lease stays valid unrenewed (lease_ttl= default)
    "POLL_RATE",  # at most this many polls a second of all ranks waiting on one object-store key
    "REPORT_READERS",  # threads a multi-rank save's coordinator reads the ranks' reports with
]
