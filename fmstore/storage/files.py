"""Crash-safe, parallel reading and writing of files on a local file system.

Writes go to a temporary name in the target directory, are fsync'd, then renamed over the
final name and the directory fsync'd: a reader sees the old file or the whole new one, never
a part, even if the writer is killed.  Large files are split into chunks written and read by
a thread pool with ``pwrite``/``preadv`` (which release the GIL), so one file keeps several
I/O requests in flight.
"""

from __future__ import annotations

import ctypes
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any

from ..errors import CorruptBlobError
from ..keys import TMP_MARKER


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of a buffer (``cast`` refuses empty multi-dimensional views).  Defined
    here, not in :mod:`fmstore.blob` (which re-exports it), because that module imports torch
    and the storage layer must not: listing a root needs no torch."""
    return memoryview(data).cast("B") if len(data) else memoryview(b"")


def tmp_name(path: str) -> str:
    """A temporary name beside ``path``: hidden, marked, and naming the writing process."""
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def tmp_owner_pid(filename: str) -> int | None:
    """The pid that wrote a temporary file, from its name, or ``None`` if it is not one."""
    if TMP_MARKER not in filename:
        return None
    try:
        return int(filename.split(TMP_MARKER, 1)[1].split("-", 1)[0])
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a just-written range to disk now, so the disk works
    while later chunks are still being copied and the final fsync has little left to do."""
    if _sync_file_range is not None and nbytes:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a hint: errors are harmless


def pwrite_all(fd: int, data: memoryview, offset: int, writeback: bool = False) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    start, total = offset, len(data)
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n
    if writeback:
        _start_writeback(fd, start, total)


def _pread_into(fd: int, dest: memoryview, offset: int, name: str) -> None:
    while len(dest):
        n = os.preadv(fd, [dest], offset)
        if n == 0:
            raise CorruptBlobError(f"{name}: truncated file (end of file at byte {offset})")
        dest = dest[n:]
        offset += n


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a rename or a new entry is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chunks(start: int, end: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` cut into pieces of at most ``chunk`` bytes."""
    for a in range(start, end, chunk):
        yield a, min(end, a + chunk)


def _run_chunked(pool: Executor | None, fn: Callable[..., None], pieces: list[tuple[Any, ...]]) -> None:
    """Call ``fn(*piece)`` for each piece: in the pool if there are several, else inline."""
    if pool is None or len(pieces) <= 1:
        for piece in pieces:
            fn(*piece)
        return
    futures = [pool.submit(fn, *piece) for piece in pieces]
    errors = [f.exception() for f in futures]  # all finished before any error is raised
    for e in errors:
        if e is not None:
            raise e


def write_atomic(
    path: str,
    segments: Sequence[bytes | memoryview],
    *,
    pool: Executor | None = None,
    chunk: int = 16 << 20,
    fsync: bool = True,
    exclusive: bool = False,
) -> int:
    """Write the concatenation of ``segments`` to ``path`` crash-safely; returns its size.

    Segments are written in place from the caller's memory (no concatenated copy), each cut
    into ``chunk`` pieces that the ``pool`` writes in parallel.  ``exclusive``: a ``path``
    that exists already is never replaced (``FileExistsError``; see :func:`write_atomic_with`).
    """
    total = 0

    def write(fd: int) -> None:
        nonlocal total
        pieces = []
        for seg in segments:
            mv = byte_view(seg)
            pieces += [(fd, mv[a:b], total + a, fsync) for a, b in chunks(0, len(mv), chunk)]
            total += len(mv)
        _run_chunked(pool, pwrite_all, pieces)

    write_atomic_with(path, write, fsync=fsync, exclusive=exclusive)
    return total


def write_atomic_with(
    path: str, write: Callable[[int], None], *, fsync: bool = True, exclusive: bool = False
) -> None:
    """Crash-safe ``path``: ``write(fd)`` fills a temp file beside it, which is fsync'd and
    renamed over ``path`` (the directory fsync'd too); on any error the temp file goes.

    ``exclusive``: the temp file is hard-linked to ``path`` instead of renamed over it, which
    fails with ``FileExistsError`` when ``path`` exists: of two writers, exactly one wins."""
    directory = os.path.dirname(path)
    tmp = tmp_name(path)
    for attempt in range(5):
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            break
        except (FileNotFoundError, FileExistsError):
            # A concurrent delete pruned the empty directory between makedirs' own check and
            # its mkdir (FileExistsError), or between makedirs and open: make it again.
            if attempt == 4:
                raise
    try:
        try:
            write(fd)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_path(directory)


def read_ranges_into(
    path: str,
    ranges: Sequence[tuple[int, memoryview]],
    *,
    pool: Executor | None = None,
    chunk: int = 16 << 20,
) -> None:
    """Fill each ``(offset, dest)`` from ``path`` (parallel, chunked); a short file is an error."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        read_ranges_fd(fd, ranges, path, pool, chunk)
    finally:
        os.close(fd)


def read_ranges_fd(
    fd: int, ranges: Sequence[tuple[int, memoryview]], name: str, pool: Executor | None, chunk: int
) -> None:
    """:func:`read_ranges_into` for an open file ``fd`` (``name`` is what errors call it)."""
    pieces = []
    for offset, dest in ranges:
        pieces += [(fd, dest[a:b], offset + a, name) for a, b in chunks(0, len(dest), chunk)]
    _run_chunked(pool, _pread_into, pieces)
