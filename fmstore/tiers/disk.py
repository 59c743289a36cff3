"""LocalTier: blobs as files under a directory on local disk (NVMe), written crash-safely."""

from __future__ import annotations

import os

from ..storage import LocalStorage
from ..units import parse_size
from .blobfiles import SUFFIX, FileTier

__all__ = ["LocalTier", "SUFFIX"]


class LocalTier(FileTier):
    """Blobs stored as ``<path>/<key>.safetensors`` files, up to ``capacity`` bytes on disk.

    Each write goes to a temporary file that is fsync'd and renamed into place, so a crash
    never leaves a partial blob under a key.  Large blobs are written and read in ``chunk``
    pieces by ``io_threads`` threads.  Temporary files left by dead writers are removed when
    the tier opens.
    """

    kind = "local"

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int | str | None = None,
        *,
        io_threads: int = 4,
        chunk: int | str = "16MiB",
        fsync: bool = True,
        name: str | None = None,
    ) -> None:
        self.chunk = parse_size(chunk, what="chunk") or (16 << 20)
        self.fsync = fsync
        storage = LocalStorage(path, io_threads=io_threads, chunk=self.chunk, fsync=fsync)
        self.root = storage.root
        super().__init__(storage, capacity=capacity, name=name)
