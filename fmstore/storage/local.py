"""LocalStorage: files in a directory on this machine, written crash-safely, read in parallel.

A write goes to a temporary file beside its target, fsync'd and renamed into place (an
exclusive one hard-linked, so of two writers exactly one wins); reads are ``pread`` s of
``chunk`` pieces on the I/O pool.  See :mod:`fmstore.storage.files`.
"""

from __future__ import annotations

import os
import queue
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ..errors import ConfigError, RootNotFoundError, StorageError
from ..keys import TMP_MARKER
from .base import Reader, Storage
from .files import (
    chunks,
    pid_alive,
    pwrite_all,
    read_ranges_fd,
    read_ranges_into,
    tmp_owner_pid,
    write_atomic,
    write_atomic_with,
)

T = TypeVar("T")


class LocalStorage(Storage):
    """Files under a local directory (a path or ``file://`` URL).

    ``create=False``: a root that is not there is :class:`RootNotFoundError` (readers), not
    made.  ``chunk``: bytes per ``pwrite``/``pread`` of one file's parallel I/O; ``fsync``:
    off only for scratch data that need not survive a crash.
    """

    local = True

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        io_threads: int = 8,
        part_size: int = 32 << 20,
        concurrency: int = 8,
        fs: Any = None,
        create: bool = True,
        chunk: int = 16 << 20,
        fsync: bool = True,
    ) -> None:
        super().__init__(url, io_threads=io_threads, part_size=part_size, concurrency=concurrency)
        self.root = os.path.abspath(self.url.removeprefix("file://"))
        self.chunk = max(1, chunk)
        self.fsync = fsync
        # One file's pieces go to the pool only when it has threads to spare.
        self._piece_pool = self.pool if io_threads > 1 else None
        try:
            self._open(create)
        except BaseException:
            self.pool.shutdown()
            raise

    def _open(self, create: bool) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(f"storage root {self.url!r} is a file, not a directory")
        if not create:
            if not os.path.isdir(self.root):
                raise RootNotFoundError(f"no storage root at {self.url!r} (not a directory)")
            return
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StorageError.of(e, f"cannot create storage root {self.url!r}: {e.strerror or e}") from e

    def path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/")) if rel else self.root

    # ------------------------------------------------------------------ write

    def _write(self, rel: str, segments: Sequence[bytes | memoryview], exclusive: bool) -> int:
        return write_atomic(
            self.path(rel),
            segments,
            pool=self._piece_pool,
            chunk=self.chunk,
            fsync=self.fsync,
            exclusive=exclusive,
        )

    def _write_streamed(
        self, rel: str, size: int, fill: Callable[[int, memoryview], None], part: int
    ) -> None:
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(self.concurrency):  # the parts in memory at once
            free.put(bytearray(min(part, size)))

        def write(fd: int) -> None:
            def one(a: int, b: int) -> None:
                buf = free.get()
                try:
                    mv = memoryview(buf)[: b - a]
                    fill(a, mv)
                    pwrite_all(fd, mv, a, self.fsync)
                finally:
                    free.put(buf)

            futures = [self.pool.submit(one, a, b) for a, b in chunks(0, size, part)]
            for e in [f.exception() for f in futures]:
                if e is not None:
                    raise e

        write_atomic_with(self.path(rel), write, fsync=self.fsync)

    # ------------------------------------------------------------------ read

    def _open_read(self, rel: str) -> int:
        try:
            return os.open(self.path(rel), os.O_RDONLY | os.O_CLOEXEC)
        except NotADirectoryError:  # a parent is a file: then rel is not there either
            raise FileNotFoundError(self.path(rel)) from None

    def _read_bytes(self, rel: str) -> bytes:
        fd = self._open_read(rel)
        with open(fd, "rb", closefd=True) as f:
            return f.read()

    def _read_ranges(self, rel: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        read_ranges_into(self.path(rel), ranges, pool=self._piece_pool, chunk=self.chunk)

    def _read_with(self, rel: str, use: Callable[[Reader], T]) -> T:
        # One open file is one version: a rename over the name leaves this inode as it was.
        fd = self._open_read(rel)
        try:
            return use(_FileReader(fd, self.path(rel), self))
        finally:
            os.close(fd)

    def _size(self, rel: str) -> int:
        return os.path.getsize(self.path(rel))

    def _exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel))

    # ------------------------------------------------------------------ listing and deleting

    def _list_dir(self, rel: str) -> list[str]:
        try:
            names = os.listdir(self.path(rel))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if TMP_MARKER not in n)

    def _scan(self, rel: str, temp: bool) -> Iterator[tuple[str, int]]:
        for dirpath, _dirs, names in os.walk(self.path(rel)):
            for name in names:
                if not temp and TMP_MARKER in name:
                    continue
                full = os.path.join(dirpath, name)
                try:
                    size = os.lstat(full).st_size
                except FileNotFoundError:  # removed since the listing
                    continue
                yield os.path.relpath(full, self.root).replace(os.sep, "/"), size

    def _delete(self, rel: str) -> None:
        path = self.path(rel)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        # Prune directories the delete left empty, so directories are the prefixes of files
        # (as on an object store) and a tree of deleted keys does not linger.
        d = os.path.dirname(path)
        while d != self.root and d.startswith(self.root):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)

    def _delete_dir(self, rel: str) -> None:
        def gone_already(_fn: Any, _path: str, exc: Any) -> None:
            if not isinstance(exc[1], FileNotFoundError):  # another deleter was quicker: fine
                raise exc[1]

        shutil.rmtree(self.path(rel), onerror=gone_already)

    def _sweep_temp(self, rel: str) -> int:
        path = self.path(rel)
        if os.path.isdir(path):
            found = [(d, n) for d, _, names in os.walk(path) for n in names if TMP_MARKER in n]
        else:  # a file's own temporary files, beside it
            folder, base = os.path.split(path)
            try:
                names = os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                return 0
            found = [(folder, n) for n in names if n.startswith(f".{base}{TMP_MARKER}")]
        swept = 0
        for folder, name in found:
            owner = tmp_owner_pid(name)
            if owner is None or owner == os.getpid() or pid_alive(owner):
                continue  # a write in progress (this process's or another's)
            try:
                os.unlink(os.path.join(folder, name))
                swept += 1
            except FileNotFoundError:
                pass
        return swept


class _FileReader(Reader):
    """One open file: every read sees the inode it was opened on."""

    def __init__(self, fd: int, name: str, storage: LocalStorage) -> None:
        self.fd, self.name, self.storage = fd, name, storage

    def head(self, n: int) -> tuple[bytes, int]:
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, min(n, size), 0), size

    def read_into(self, ranges: Sequence[tuple[int, memoryview]]) -> None:
        read_ranges_fd(self.fd, ranges, self.name, self.storage._piece_pool, self.storage.chunk)
