"""FsspecStorage: files on any file system fsspec reaches (``memory://``, ``gs://``, ``az://``, ...).

A file is one ``pipe_file`` (the back end's own atomic put); a streamed file too large for
one is written under a temporary name and moved into place, so a failed write leaves nothing
a listing shows.  ``storage_options`` go to fsspec untouched.  S3 has its own subclass
(:mod:`fmstore.storage.s3`) for multipart uploads, conditional requests and timeouts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ..errors import ConfigError, CorruptBlobError
from ..keys import TMP_MARKER
from .base import Reader, Storage, scheme_of
from .files import byte_view, chunks, tmp_name

T = TypeVar("T")


class FsspecStorage(Storage):
    """Files under an fsspec URL.  ``fs``: an already open ``(filesystem, root path)`` to use
    instead of opening one (another object's connection, e.g. an ObjectTier's)."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        io_threads: int = 8,
        part_size: int = 32 << 20,
        concurrency: int = 8,
        fs: tuple[Any, str] | None = None,
        create: bool = True,
    ) -> None:
        super().__init__(url, io_threads=io_threads, part_size=part_size, concurrency=concurrency)
        try:
            self.fs, self.root = fs if fs is not None else self.open_fs(self.url, storage_options)
            self.root = self.root.rstrip("/")
            if fs is None:
                self._check_root()
        except BaseException:
            self.pool.shutdown()
            raise

    @classmethod
    def open_fs(cls, url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
        """(fsspec file system, root path) for ``url``; unknown or unusable schemes raise
        :class:`ConfigError`."""
        import fsspec
        from fsspec.core import url_to_fs

        if not isinstance(url, str) or not url:
            raise ConfigError(f"storage needs a URL such as 's3://bucket/prefix', got {url!r}")
        scheme = scheme_of(url)
        try:
            fsspec.get_filesystem_class(scheme)
        except ValueError:
            raise ConfigError(
                f"unknown URL scheme {scheme!r} in {url!r}; fsspec knows e.g. s3, gs, az, file, memory"
            ) from None
        except ImportError as e:
            raise ConfigError(f"URL scheme {scheme!r} needs a package that is not installed: {e}") from None
        fs, root = url_to_fs(url, **cls._fs_options(dict(storage_options or {})))
        cls._configure(fs)
        return fs, root.rstrip("/")

    @classmethod
    def _fs_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options the file system is opened with (subclasses add their defaults)."""
        return options

    @classmethod
    def _configure(cls, fs: Any) -> None:
        """Settings of a newly opened file system that are not options."""

    def _check_root(self) -> None:
        """A root that cannot be reached is an error at construction (subclasses)."""

    def path(self, rel: str) -> str:
        if not rel:
            return self.root
        return f"{self.root}/{rel}" if self.root else rel

    def _sync(self, coro: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, lambda: coro)

    # ------------------------------------------------------------------ write

    def _write(self, rel: str, segments: Sequence[bytes | memoryview], exclusive: bool) -> int:
        views = [byte_view(s) for s in segments]
        total = sum(len(v) for v in views)
        path = self.path(rel)
        if exclusive and self.fs.exists(path):  # fsspec has no atomic create: a race window
            raise FileExistsError(f"{self.url}/{rel} exists")
        self.fs.pipe_file(path, gather_bytes(views, 0, total))
        return total

    def _write_streamed(
        self, rel: str, size: int, fill: Callable[[int, memoryview], None], part: int
    ) -> None:
        path = self.path(rel)
        if size <= part:
            buf = bytearray(size)
            fill(0, memoryview(buf))
            self.fs.pipe_file(path, bytes(buf))
            return
        # A file closed after a failure would still be committed by most back ends: write a
        # temporary name (which listings skip) and move it into place once it is whole.
        tmp = tmp_name(path)
        buf = bytearray(part)
        try:
            with self.fs.open(tmp, "wb") as f:
                for a, b in chunks(0, size, part):
                    mv = memoryview(buf)[: b - a]
                    fill(a, mv)
                    f.write(mv)
            self.fs.mv(tmp, path)
        except BaseException:
            try:
                self.fs.rm_file(tmp)
            except Exception:  # noqa: BLE001 - never there, or gone with the failure
                pass
            raise

    # ------------------------------------------------------------------ read

    def _read_bytes(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self.path(rel)))

    def _read_ranges(self, rel: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        path = self.path(rel)
        groups = coalesce(ranges, self.part_size)
        if getattr(self.fs, "async_impl", False):
            self._sync(self._read_async(path, groups))
            return
        for start, end, group in groups:
            fill_group(path, start, group, self.fs.cat_file(path, start=start, end=end))

    async def _read_async(
        self, path: str, groups: list[tuple[int, int, list[tuple[int, memoryview]]]]
    ) -> None:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(start: int, end: int, group: list[tuple[int, memoryview]]) -> None:
            async with gate:
                data = await self.fs._cat_file(path, start=start, end=end)
            fill_group(path, start, group, data)

        await asyncio.gather(*(one(*g) for g in groups))

    def _read_with(self, rel: str, use: Callable[[Reader], T]) -> T:
        # fsspec has no general way to pin a version across requests: one request reads it all.
        path = self.path(rel)
        return use(BytesReader(self.fs.cat_file(path), path))

    def _size(self, rel: str) -> int:
        return int(self.fs.info(self.path(rel))["size"])

    def _exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    # ------------------------------------------------------------------ listing and deleting

    def _list_dir(self, rel: str) -> list[str]:
        base = self.path(rel)
        self.fs.invalidate_cache(base)
        try:
            found = [p.rstrip("/") for p in self.fs.ls(base, detail=False)]
        except FileNotFoundError:
            return []
        # (An emptied folder of a server that keeps folders lists itself: not a child.)
        names = [p.rsplit("/", 1)[-1] for p in found if p != base.rstrip("/")]
        return sorted(n for n in names if TMP_MARKER not in n)

    def _scan(self, rel: str, temp: bool) -> Iterator[tuple[str, int]]:
        base = self.path(rel)
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base, detail=True) if base else {}
        except FileNotFoundError:
            return
        prefix = f"{self.root}/" if self.root else ""
        for path, meta in found.items():
            if not path.startswith(prefix) or meta.get("type", "file") == "directory":
                continue
            if not temp and TMP_MARKER in path.rsplit("/", 1)[-1]:
                continue
            yield path[len(prefix) :], int(meta.get("size") or 0)

    def _delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def _delete_dir(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass


class BytesReader(Reader):
    """A file read whole already."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name = data, name

    def head(self, n: int) -> tuple[bytes, int]:
        return self.data[:n], len(self.data)

    def read_into(self, ranges: Sequence[tuple[int, memoryview]]) -> None:
        for off, dest in ranges:
            fill_exactly(self.name, off, dest, self.data[off : off + len(dest)])


#: Ranges of one file at most this far apart are read with one request (the bytes between
#: are read and dropped): a request to an object store costs tens of milliseconds, in which
#: a connection moves megabytes, and a load reads a file's tensors one range each (one GET per
#: tensor: 1,005 GETs for a 1,000-tensor file before, bench/s3_requests.py).
COALESCE_GAP = 1 << 20


def coalesce(
    ranges: Sequence[tuple[int, memoryview]], limit: int, gap: int = COALESCE_GAP
) -> list[tuple[int, int, list[tuple[int, memoryview]]]]:
    """``ranges`` (offset, destination) as requests ``(start, end, pieces)`` of at most
    ``limit`` bytes: a range longer than that is cut into pieces of ``limit`` (read in
    parallel); by offset, a piece joins the group before it when it starts at most ``gap``
    bytes after that group's end and the group stays within ``limit`` bytes (overlapping
    pieces share bytes)."""
    pieces = [(off + a, dest[a:b]) for off, dest in ranges for a, b in chunks(0, len(dest), limit)]
    groups: list[tuple[int, int, list[tuple[int, memoryview]]]] = []
    for off, dest in sorted(pieces, key=lambda p: p[0]):
        end = off + len(dest)
        if groups:
            start, last, group = groups[-1]
            if off - last <= gap and max(last, end) - start <= limit:
                group.append((off, dest))
                groups[-1] = (start, max(last, end), group)
                continue
        groups.append((off, end, [(off, dest)]))
    return groups


def fill_group(name: str, start: int, group: Sequence[tuple[int, memoryview]], data: bytes) -> None:
    """Each of ``group``'s destinations from ``data``, the file's bytes from ``start`` on."""
    if len(group) == 1:  # (its offset is the start)
        off, dest = group[0]
        fill_exactly(name, off, dest, data)
        return
    view = memoryview(data)
    for off, dest in group:
        fill_exactly(name, off, dest, view[off - start : off - start + len(dest)])


def fill_exactly(name: str, off: int, dest: memoryview, data: bytes | memoryview) -> None:
    """``dest[:] = data``, which must be as long: less is a file that ends too soon."""
    if len(data) != len(dest):
        raise CorruptBlobError(f"{name}: truncated file: {len(data)} of {len(dest)} bytes at offset {off}")
    dest[:] = data


def gather_bytes(views: Sequence[memoryview], start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the concatenation of ``views``, copying only that range."""
    out = bytearray()
    pos = 0
    for v in views:
        if pos >= end:
            break
        a, b = max(start, pos), min(end, pos + len(v))
        if a < b:
            out += v[a - pos : b - pos]
        pos += len(v)
    return bytes(out)
