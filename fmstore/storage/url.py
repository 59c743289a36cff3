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


def open_storage(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, **kwargs: Any) -> Storage:
    """The :class:`Storage` for ``url`` (a path, ``file://``, ``s3://``, ``memory://``, ...);
    the same as ``Storage(url, storage_options, ...)``, for code that prefers a function.

    ``storage_options`` go to fsspec untouched (S3 gets fmstore's timeouts unless they set
    their own); keyword arguments as the implementation's constructor takes them
    (``io_threads``, ``part_size``, ``concurrency``; ``fs``: an already open
    ``(filesystem, root path)`` to share; ``create=False``: a local root that is not there is
    :class:`~fmstore.errors.RootNotFoundError`, not made)."""
    return Storage(os.fspath(url), storage_options, **kwargs)


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec file system, root path) for ``url`` with the options fmstore's storage for that
    URL would use (S3: the timeouts); for code that needs fsspec itself."""
    cls = storage_class(url) if isinstance(url, str) else FsspecStorage
    if not issubclass(cls, FsspecStorage):
        cls = FsspecStorage  # a local path, through fsspec's local file system
    return cls.open_fs(url, storage_options)
