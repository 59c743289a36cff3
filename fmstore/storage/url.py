"""Choosing the storage for a URL, once: a local directory, S3, or any other fsspec file system."""

from __future__ import annotations

import os
from typing import Any

from .base import Storage, scheme_of
from .fsspec_ import FsspecStorage
from .local import LocalStorage
from .s3 import S3Storage

#: Schemes served by :class:`LocalStorage` (fsspec's names for the local file system).
LOCAL_SCHEMES = frozenset({"file", "local"})
#: Schemes served by :class:`S3Storage`.
S3_SCHEMES = frozenset({"s3", "s3a"})


def storage_class(url: str, fs: Any = None) -> type[Storage]:
    """The implementation for ``url``; ``fs`` (an open fsspec file system to use) rules out
    the local one."""
    scheme = scheme_of(url)
    if scheme in S3_SCHEMES:
        return S3Storage
    if scheme in LOCAL_SCHEMES and fs is None:
        return LocalStorage
    return FsspecStorage


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec file system, root path) for ``url`` with the options fmstore's storage for that
    URL would use (S3: the timeouts); for code that needs fsspec itself."""
    cls = storage_class(url) if isinstance(url, str) else FsspecStorage
    if not issubclass(cls, FsspecStorage):
        cls = FsspecStorage  # a local path, through fsspec's local file system
    return cls.open_fs(url, storage_options)


def delete_file(path: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the one file ``path`` (a local path or a URL) that lies outside any checkpoint
    root, e.g. a Lightning checkpoint's pointer file; one that is not there is fine.  What is
    under a root is deleted by its owner, :class:`fmstore.checkpoint.snapshots.Snapshots`, only."""
    try:
        if scheme_of(path) == "file":
            os.unlink(path.removeprefix("file://"))
        else:
            fs, p = open_fs(path, storage_options)
            fs.rm_file(p)
    except FileNotFoundError:
        pass
