"""Where a checkpoint's files live: the storage layer under its old name.

A snapshot level writes and reads its files through a :class:`fmstore.storage.Storage` (a local
directory, S3 or any fsspec URL, chosen by URL).  ``SnapshotStorage(root, storage_options,
...)`` opens one, as it always did; it is :class:`~fmstore.storage.Storage` itself, so
annotations and tests that patch its methods cover every implementation.
"""

from __future__ import annotations

from ..errors import RootNotFoundError
from ..storage import Storage

#: The checkpoint code's name for :class:`fmstore.storage.Storage`.
SnapshotStorage = Storage

__all__ = ["SnapshotStorage", "RootNotFoundError"]
