"""fmstore: tiered storage for foundation-model training and serving.

Tensors move between GPU memory, pinned host memory, local NVMe and object storage
(:mod:`fmstore.tiers`), under one key space (:class:`TieredStore`).
"""

from ._source_tree import install as _install_source_tree
from .blob import BlobInfo
from .checkpoint import Checkpointer, Level, Policy, RNGState, SaveHandle, SnapshotInfo
from .errors import (
    BlobNotFoundError,
    CapacityError,
    ConfigError,
    CorruptBlobError,
    FmstoreError,
    InvalidKeyError,
)
from .store import PrefetchHandle, TieredStore
from .tiers import DeviceTier, HostTier, LocalTier, ObjectTier, Tier
from .units import format_size, parse_size

__version__ = "0.1.0"

_install_source_tree()  # a checkout run with PYTHONPATH=. finds fmstore.kernels / fmstore.integrations

__all__ = [
    "Checkpointer",
    "RNGState",
    "Policy",
    "Level",
    "SaveHandle",
    "SnapshotInfo",
    "TieredStore",
    "PrefetchHandle",
    "Tier",
    "DeviceTier",
    "HostTier",
    "LocalTier",
    "ObjectTier",
    "BlobInfo",
    "FmstoreError",
    "BlobNotFoundError",
    "CapacityError",
    "ConfigError",
    "CorruptBlobError",
    "InvalidKeyError",
    "parse_size",
    "format_size",
]
