"""Where a checkpoint's files live: a local directory or any fsspec URL.

Files are written whole and crash-safely (local: temp + fsync + rename; S3: one PUT or a
completed multipart upload), from a list of memory segments without concatenating them,
and read back by byte ranges in parallel.  This is the "how bytes reach storage" half of a
checkpoint; what to write is decided by the checkpointer.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..blob import byte_view
from ..errors import ConfigError, CorruptBlobError, FmstoreError, StorageError
from ..keys import TMP_MARKER
from ..tiers.files import _pwrite_all, chunks, read_ranges_into, write_atomic, write_atomic_with
from ..tiers.object import gather_bytes, open_fs, s3_put, s3_put_parts


class RootNotFoundError(FmstoreError):
    """A checkpoint root that is not there (opened for reading)."""


#: Packages whose exceptions are storage faults (an object store's client stack), not bugs.
_CLIENT_PACKAGES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "fsspec", "s3fs", "gcsfs", "adlfs"}

_F = TypeVar("_F", bound=Callable[..., Any])


def _storage_errors(verb: str) -> Callable[[_F], _F]:
    """Turn a storage call's faults into :class:`StorageError` naming the file and the URL (the
    original as ``__cause__``).  A missing file stays ``FileNotFoundError`` and an exclusive
    write's existing file ``FileExistsError`` (callers ask for them), fmstore's own errors pass,
    and anything else (a bug) is not hidden."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def call(self: SnapshotStorage, rel: str = "", *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, rel, *args, **kwargs)
            except (FileNotFoundError, FileExistsError, FmstoreError):
                raise
            except OSError as e:
                where = f"{verb} {rel or '.'!r} under {self.url!r}"
                raise StorageError.of(e, f"{where} failed: {e.strerror or e}") from e
            except Exception as e:
                if type(e).__module__.split(".")[0] not in _CLIENT_PACKAGES:
                    raise
                where = f"{verb} {rel or '.'!r} under {self.url!r}"
                raise StorageError(f"{where} failed: {type(e).__name__}: {e}") from e

        return call  # type: ignore[return-value]

    return wrap


def _precondition_failed(e: BaseException) -> bool:
    """Whether an S3 error is a failed ``If-Match``/``If-None-Match`` (HTTP 412); s3fs turns
    it into an ``OSError`` (EINVAL or ``FileExistsError``) with the response as its cause."""
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if error.get("Code") in ("PreconditionFailed", "412") or status == 412:
                return True
    return isinstance(e, FileExistsError) or "pre-condition" in str(e).lower()


class SnapshotStorage:
    """Files under ``root`` (a path, ``file://``, ``s3://``, ``memory://``, ...).  Its faults are
    :class:`StorageError` s naming the file and URL; S3 requests are time-bounded (see
    :data:`fmstore.tiers.object.S3_CONFIG`)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        io_threads: int = 8,
        part_size: int = 32 << 20,
        concurrency: int = 8,
        fs: tuple[Any, str] | None = None,
        create: bool = True,
    ) -> None:
        """``fs``: an already open (filesystem, path) to use for ``root`` (an ObjectTier's);
        ``create=False``: a local root that does not exist is an error, not made (readers)."""
        root = os.fspath(root)
        self.url = root
        self.local = fs is None and ("://" not in root or root.startswith("file://"))
        self.part_size = part_size
        self.concurrency = concurrency
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fmstore-ckpt-io")
        try:
            if self.local:
                self.root = os.path.abspath(root.removeprefix("file://"))
                self.fs = None
                self._open_local(create)
            else:
                self.fs, self.root = fs if fs is not None else open_fs(root, storage_options)
                protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
                self._s3 = "s3" in protocols or "s3a" in protocols
                if self._s3 and fs is None:
                    self._check_bucket()
        except BaseException:
            self.pool.shutdown()
            raise

    def _open_local(self, create: bool) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(f"checkpoint root {self.url!r} is a file, not a directory")
        if not create:
            if not os.path.isdir(self.root):
                raise RootNotFoundError(f"no checkpoint root at {self.url!r} (not a directory)")
            return
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StorageError.of(e, f"cannot create checkpoint root {self.url!r}: {e.strerror or e}") from e

    def _check_bucket(self) -> None:
        """A missing or misspelt bucket, or credentials it refuses, is an error now: listing it
        would otherwise look like a root with no checkpoints, and a job that resumes "if there
        is a checkpoint" would silently start from scratch."""
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.info(bucket)  # (exists() answers False for a refused request too)
        except FileNotFoundError:
            raise RootNotFoundError(f"no bucket {bucket!r} for checkpoint root {self.url!r}") from None
        except PermissionError as e:
            raise StorageError.of(
                e,
                f"access to bucket {bucket!r} of checkpoint root {self.url!r} is denied "
                "(check the credentials: the AWS_* variables or storage_options)",
            ) from e
        except OSError as e:
            raise StorageError.of(e, f"cannot reach checkpoint root {self.url!r}: {type(e).__name__}") from e

    def path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/")) if self.local else f"{self.root}/{rel}"

    # ------------------------------------------------------------------ write

    @_storage_errors("writing")
    def write(self, rel: str, segments: Sequence[bytes | memoryview], *, exclusive: bool = False) -> int:
        """Write ``rel`` as the concatenation of ``segments``; visible only once complete.

        ``exclusive``: never replace an existing ``rel`` (``FileExistsError``), atomically where
        the storage can (local: a hard link; S3: a conditional PUT, ``If-None-Match: *``, one
        request of at most 5 GiB); other fsspec back ends check first (a race window)."""
        path = self.path(rel)
        if self.local:
            return write_atomic(path, segments, pool=self.pool, exclusive=exclusive)
        views = [byte_view(s) for s in segments]
        total = sum(len(v) for v in views)
        if exclusive:
            if self._s3:
                self.put_if(rel, gather_bytes(views, 0, total), None)
                return total
            if self.fs.exists(path):
                raise FileExistsError(f"{self.url}/{rel} exists")
        if self._s3:
            self._sync(s3_put(self.fs, path, views, self.part_size, self.concurrency))
        else:
            self.fs.pipe_file(path, gather_bytes(views, 0, total))
        return total

    # ------------------------------------------------------------------ conditional requests (S3)

    @property
    def conditional(self) -> bool:
        """Whether :meth:`put_if` and :meth:`read_tagged` are atomic here (S3's conditional
        requests; SeaweedFS and AWS honour them)."""
        return not self.local and self._s3

    @_storage_errors("writing")
    def put_if(self, rel: str, data: bytes, tag: str | None) -> str:
        """One PUT of ``data`` to ``rel`` if the object there is still ``tag`` (its ETag; None:
        if there is none); returns the new tag.  ``FileExistsError`` when the condition fails."""
        bucket, key = self._bucket_key(rel)
        cond = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            out = self._sync(self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond))
        except OSError as e:
            if _precondition_failed(e):
                raise FileExistsError(f"{self.url}/{rel} changed (a conditional write lost)") from None
            raise
        finally:
            self.fs.invalidate_cache(self.path(rel))
        return str(out["ETag"])

    @_storage_errors("reading")
    def read_tagged(self, rel: str) -> tuple[bytes, str]:
        """A small object's bytes and its tag (ETag); ``FileNotFoundError`` if it is not there."""
        bucket, key = self._bucket_key(rel)
        out = self._sync(self.fs._call_s3("get_object", Bucket=bucket, Key=key))
        body = out["Body"]
        try:
            data = self._sync(body.read())
        finally:
            body.close()
        return data, str(out["ETag"])

    @_storage_errors("deleting")
    def delete_if(self, rel: str, tag: str) -> bool:
        """Delete ``rel`` if it is still ``tag``; whether it was deleted."""
        bucket, key = self._bucket_key(rel)
        try:
            self._sync(self.fs._call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag))
        except FileNotFoundError:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path(rel))
        return True

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.path(rel).partition("/")
        return bucket, key

    @_storage_errors("writing")
    def write_streamed(
        self,
        rel: str,
        size: int,
        fill: Callable[[int, memoryview], None],
        *,
        part_size: int | None = None,
    ) -> int:
        """Write ``rel`` (``size`` bytes) part by part, for files too large to hold in memory:
        ``fill(offset, buf)`` puts the file's bytes at ``offset`` into ``buf`` (called from
        worker threads, a few parts at once).  At most ``concurrency`` parts of ``part_size``
        bytes (default this storage's ``part_size``) are in memory at a time.  Visible only
        once complete, like :meth:`write`: local, a temporary file fsync'd and renamed; S3, a
        multipart upload (one PUT when it fits a part), aborted on failure; other fsspec back
        ends one ``pipe_file`` up to a part, else ``fs.open(path, "wb")`` (their own commit)."""
        part = max(1, part_size or self.part_size)
        path = self.path(rel)
        if self.local:
            self._write_streamed_local(path, size, fill, part)
        elif self._s3:
            part = max(part, 5 << 20, -(-size // 10_000))  # S3: parts of >= 5 MiB, at most 10,000
            self._sync(self._s3_put_streamed(path, size, fill, part))
        elif size <= part:
            buf = bytearray(size)
            fill(0, memoryview(buf))
            self.fs.pipe_file(path, bytes(buf))
        else:
            buf = bytearray(part)
            with self.fs.open(path, "wb") as f:
                for a, b in chunks(0, size, part):
                    mv = memoryview(buf)[: b - a]
                    fill(a, mv)
                    f.write(mv)
        return size

    def _write_streamed_local(
        self, path: str, size: int, fill: Callable[[int, memoryview], None], part: int
    ) -> None:
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(max(1, self.concurrency)):  # the parts in memory at once
            free.put(bytearray(min(part, size)))

        def write(fd: int) -> None:
            def one(a: int, b: int) -> None:
                buf = free.get()
                try:
                    mv = memoryview(buf)[: b - a]
                    fill(a, mv)
                    _pwrite_all(fd, mv, a, True)
                finally:
                    free.put(buf)

            futures = [self.pool.submit(one, a, b) for a, b in chunks(0, size, part)]
            for e in [f.exception() for f in futures]:
                if e is not None:
                    raise e

        write_atomic_with(path, write)

    async def _s3_put_streamed(
        self, path: str, size: int, fill: Callable[[int, memoryview], None], part: int
    ) -> None:
        loop = asyncio.get_running_loop()

        async def filled(a: int, b: int) -> bytearray:
            buf = bytearray(b - a)
            await loop.run_in_executor(self.pool, fill, a, memoryview(buf))
            return buf

        await s3_put_parts(self.fs, path, size, filled, part, self.concurrency)

    # ------------------------------------------------------------------ read

    @_storage_errors("reading")
    def read_bytes(self, rel: str) -> bytes:
        """A whole (small) file; ``FileNotFoundError`` if it is not there."""
        if self.local:
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    @_storage_errors("reading")
    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each ``(offset, dest)`` with the file's bytes there; short data is an error."""
        path = self.path(rel)
        if self.local:
            read_ranges_into(path, ranges, pool=self.pool)
            return
        pieces = [
            (off + a, dest[a:b]) for off, dest in ranges for a, b in chunks(0, len(dest), self.part_size)
        ]
        if getattr(self.fs, "async_impl", False):
            self._sync(self._read_async(path, pieces))
            return
        for off, dest in pieces:
            self._fill(path, off, dest, self.fs.cat_file(path, start=off, end=off + len(dest)))

    async def _read_async(self, path: str, pieces: list[tuple[int, memoryview]]) -> None:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(off: int, dest: memoryview) -> None:
            async with gate:
                data = await self.fs._cat_file(path, start=off, end=off + len(dest))
            self._fill(path, off, dest, data)

        await asyncio.gather(*(one(off, dest) for off, dest in pieces))

    @staticmethod
    def _fill(path: str, off: int, dest: memoryview, data: bytes) -> None:
        if len(data) != len(dest):
            raise CorruptBlobError(
                f"{path}: truncated file: {len(data)} of {len(dest)} bytes at offset {off}"
            )
        dest[:] = data

    @_storage_errors("asking the size of")
    def size(self, rel: str) -> int:
        if self.local:
            return os.path.getsize(self.path(rel))
        return int(self.fs.info(self.path(rel))["size"])

    # ------------------------------------------------------------------ listing and deleting

    @_storage_errors("looking for")
    def exists(self, rel: str) -> bool:
        if self.local:
            return os.path.exists(self.path(rel))
        return bool(self.fs.exists(self.path(rel)))

    @_storage_errors("listing")
    def list_dir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and directories), temp files left out."""
        if self.local:
            try:
                names = os.listdir(self.path(rel) if rel else self.root)
            except FileNotFoundError:
                return []
        else:
            base = f"{self.root}/{rel}" if rel else self.root
            self.fs.invalidate_cache(base)
            try:
                names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
            except FileNotFoundError:
                return []
        return sorted(n for n in names if TMP_MARKER not in n)

    @_storage_errors("deleting")
    def delete(self, rel: str) -> None:
        try:
            if self.local:
                os.unlink(self.path(rel))
            else:
                self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    @_storage_errors("deleting")
    def delete_dir(self, rel: str) -> None:
        """Remove a snapshot directory and everything in it (temp files of dead writers too)."""
        if self.local:
            shutil.rmtree(self.path(rel), ignore_errors=True)
            return
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def _sync(self, coro: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, lambda: coro)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def __repr__(self) -> str:  # the URL only: storage_options may hold credentials
        return f"SnapshotStorage({self.url!r})"
