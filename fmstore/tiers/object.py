"""ObjectTier: blobs in object storage or any file system fsspec reaches (s3://, gs://, ...).

A blob becomes visible only once complete: on S3 a blob is one PUT or a multipart upload
whose completion is the commit (parts upload concurrently, and a failed upload is aborted);
on ``file://`` it is a temporary file renamed into place; other fsspec back ends get a single
``pipe_file``.  All of that is the storage's (:mod:`fmstore.storage`), chosen by the URL.
``storage_options`` go to fsspec untouched; credentials come from them or the standard AWS
variables and are never logged.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..storage import FsspecStorage, Storage
from ..units import parse_size
from .blobfiles import FileTier

__all__ = ["ObjectTier"]


class ObjectTier(FileTier):
    """Blobs stored as ``<url>/<key>.safetensors`` objects.

    ``part_size`` and ``max_concurrency`` set how large blobs are cut into parts and how
    many parts move at once (S3 multipart upload and ranged reads; ``file://`` chunked I/O).
    """

    kind = "object"

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        capacity: int | str | None = None,
        part_size: int | str = "32MiB",
        max_concurrency: int = 8,
        name: str | None = None,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise ConfigError(f"ObjectTier needs a URL such as 's3://bucket/prefix', got {url!r}")
        self.url = url
        self.part_size = max(parse_size(part_size, what="part_size") or 0, 5 << 20)  # S3 minimum
        self.max_concurrency = max(1, max_concurrency)
        storage = Storage(
            url,
            storage_options,
            io_threads=self.max_concurrency,
            part_size=self.part_size,
            concurrency=self.max_concurrency,
        )
        self.root = storage.root
        super().__init__(storage, capacity=capacity, name=name)

    @property
    def fs(self) -> Any:
        """The fsspec file system under the tier (None for a local directory)."""
        return self.storage.fs if isinstance(self.storage, FsspecStorage) else None

    def __repr__(self) -> str:  # the URL only: storage_options may hold credentials
        return f"ObjectTier({self.url!r}, name={self.name!r})"
