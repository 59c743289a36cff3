"""Named files under a root, behind one interface: the lowest layer of fmstore.

:class:`Storage` is what the durable tiers and the snapshot levels write and read through;
``Storage(url, ...)`` picks the implementation once, by URL (a local directory, S3, any other
fsspec file system).  Timeouts, retries and the translation of faults into
:class:`~fmstore.errors.StorageError` live here and nowhere else.
"""

from .base import Reader, Storage, scheme_of
from .files import fsync_path, write_atomic
from .fsspec_ import FsspecStorage
from .local import LocalStorage
from .output import AtomicOutput, remove_local
from .s3 import S3_ATTEMPTS, S3_CONFIG, S3Storage
from .url import delete_file, open_fs, storage_class

__all__ = [
    "Storage",
    "Reader",
    "LocalStorage",
    "FsspecStorage",
    "S3Storage",
    "open_fs",
    "delete_file",
    "storage_class",
    "scheme_of",
    "S3_CONFIG",
    "S3_ATTEMPTS",
    "fsync_path",  # a local file or directory made durable (an export, a bench measuring raw writes)
    "write_atomic",
    "AtomicOutput",  # a local file or directory written under a temporary name, renamed into place
    "remove_local",  # a local scratch file or folder removed (not under a root: Snapshots owns those)  # a local file written crash-safely (temp + fsync + rename), outside a Storage
]
