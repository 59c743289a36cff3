"""LocalTier: blobs as files under a directory on local disk (NVMe), written crash-safely."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ..blob import BlobInfo, Value, as_memoryview, encode_header
from ..errors import BlobNotFoundError
from ..keys import RESERVED_DIR, TMP_MARKER
from ..units import parse_size
from .base import Tier
from .files import pid_alive, read_blob, stat_blob, tmp_owner_pid, write_atomic

#: Blob files are safetensors files; the suffix also keeps key "a" and key "a/b" apart.
SUFFIX = ".safetensors"


class LocalTier(Tier):
    """Blobs stored as ``<path>/<key>.safetensors`` files, up to ``capacity`` bytes on disk.

    Each write goes to a temporary file that is fsync'd and renamed into place, so a crash
    never leaves a partial blob under a key.  Large blobs are written and read in ``chunk``
    pieces by ``io_threads`` threads.  Temporary files left by dead writers are removed when
    the tier opens.
    """

    kind = "local"
    durable = True

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
        super().__init__(capacity=capacity, name=name)
        self.root = os.path.abspath(os.fspath(path))
        os.makedirs(self.root, exist_ok=True)
        self.chunk = parse_size(chunk, what="chunk") or (16 << 20)
        self.fsync = fsync
        self._pool = (
            ThreadPoolExecutor(io_threads, thread_name_prefix="fmstore-local") if io_threads > 1 else None
        )
        self._load_index()

    def path_of(self, key: str) -> str:
        """The file that holds (or would hold) ``key``."""
        return os.path.join(self.root, *key.split("/")) + SUFFIX

    def footprint(self, info: BlobInfo) -> int:
        return len(encode_header(info)) + info.nbytes

    def _write(self, key: str, value: Value, info: BlobInfo) -> None:
        write_atomic(
            self.path_of(key),
            [encode_header(info), as_memoryview(value)],
            pool=self._pool,
            chunk=self.chunk,
            fsync=self.fsync,
        )

    def _read(self, key: str, device: torch.device | None = None) -> tuple[Value, BlobInfo]:
        return read_blob(self.path_of(key), key, f"tier {self.name!r}", pool=self._pool, chunk=self.chunk)

    def _stat(self, key: str) -> BlobInfo:
        return stat_blob(self.path_of(key), key, f"tier {self.name!r}")

    def _remove(self, key: str) -> None:
        path = self.path_of(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFoundError(key, f"tier {self.name!r}") from None
        # Prune directories the delete left empty, so the tree mirrors the keys.
        d = os.path.dirname(path)
        while d != self.root:
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)

    def _probe(self, key: str) -> int | None:
        try:
            return os.stat(self.path_of(key)).st_size
        except OSError:
            return None

    def _scan(self) -> Iterator[tuple[str, int]]:
        for dirpath, dirs, files in os.walk(self.root):
            if dirpath == self.root and RESERVED_DIR in dirs:
                dirs.remove(RESERVED_DIR)  # not blobs (checkpoints of a store-backed Checkpointer)
            for fname in files:
                full = os.path.join(dirpath, fname)
                if TMP_MARKER in fname:
                    owner = tmp_owner_pid(fname)
                    if owner is not None and not pid_alive(owner):
                        try:  # left by a writer that died mid-write
                            os.unlink(full)
                        except OSError:
                            pass
                    continue
                if not fname.endswith(SUFFIX):
                    continue
                rel = os.path.relpath(full, self.root)[: -len(SUFFIX)]
                try:
                    yield rel.replace(os.sep, "/"), os.stat(full).st_size
                except FileNotFoundError:
                    continue

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
