"""fmstore: tiered storage for foundation-model training and serving.

Tensors move between GPU memory, pinned host memory, local NVMe and object storage
(:mod:`fmstore.tiers`), under one key space (:class:`TieredStore`).
"""

from ._lazy import lazy_names
from ._source_tree import install as _install_source_tree
from .errors import (
    BlobNotFoundError,
    CapacityError,
    ConfigError,
    CorruptBlobError,
    FmstoreError,
    InvalidKeyError,
    StorageError,
    WaitTimeoutError,
    WriterConflictError,
)
from .units import format_size, parse_size

__version__ = "0.1.0"

_install_source_tree()  # a checkout run with PYTHONPATH=. finds fmstore.integrations

# The rest import torch: loaded on first use, so ``import fmstore`` (and ``fmstore --help``) stays
# fast and the errors above can be caught without importing torch.
_LAZY = {
    "BackgroundJobs": "jobs",
    "Job": "jobs",
    "BlobInfo": "blob",
    "Checkpointer": "checkpoint",
    "Level": "checkpoint",
    "Policy": "checkpoint",
    "RNGState": "checkpoint",
    "SaveHandle": "checkpoint",
    "SnapshotInfo": "checkpoint",
    "PrefetchHandle": "store",
    "TieredStore": "store",
    "DeviceTier": "tiers",
    "HostTier": "tiers",
    "LocalTier": "tiers",
    "ObjectTier": "tiers",
    "Tier": "tiers",
}


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)


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
    "BackgroundJobs",
    "Job",
    "FmstoreError",
    "BlobNotFoundError",
    "CapacityError",
    "ConfigError",
    "CorruptBlobError",
    "InvalidKeyError",
    "StorageError",
    "WriterConflictError",
    "WaitTimeoutError",
    "parse_size",
    "format_size",
]
