"""S3Storage: files as S3 objects, through s3fs, with time-bounded requests.

A file is one PUT or a multipart upload whose completion is the commit (parts go
``concurrency`` at a time; a failed upload is aborted), so no reader sees part of one.  An
exclusive write and the lease's requests are S3 conditional requests (``If-None-Match`` /
``If-Match`` on the ETag).  A file read through :meth:`Storage.read_with` is read at one
ETag: a range of another version is refused by the server and the read starts again.
Every request has the timeouts and bounded retries below.
"""

from __future__ import annotations

import asyncio
import copy
import errno
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ..errors import RootNotFoundError, StorageError
from .base import Reader
from .files import byte_view, chunks
from .fsspec_ import FsspecStorage, coalesce, fill_group, gather_bytes

T = TypeVar("T")

#: botocore settings for S3 requests unless storage_options' ``config_kwargs`` say otherwise: a
#: connection that does not open in 5 s, or a response that stops for 10 s, fails the try.
S3_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 10,
    "retries": {"max_attempts": 1, "mode": "standard"},
}
#: Attempts of one S3 call (s3fs retries timeouts and throttling with backoff).  Measured with a
#: SIGSTOPped SeaweedFS (docs/RELIABILITY.md): one attempt takes about 2 x read_timeout, so a
#: call to a server that accepts connections and never answers fails in about a minute.
S3_ATTEMPTS = 3
#: Whole-file reads of :meth:`S3Storage.read_with` when the object keeps being replaced meanwhile.
READ_ATTEMPTS = 5
#: The slowest a request body may go out (bytes per second, each part on its own) before the
#: request is given up.  botocore's read_timeout starts only once the body is sent, and a body
#: larger than the socket buffers never is to a server that stopped reading (a SIGSTOPped
#: SeaweedFS held a save over 600 s), so requests with a body get a deadline of their own.
MIN_SEND_RATE = 4 << 20
#: S3's multipart limits: parts of at least 5 MiB (but the last), at most 10,000 of them.
MIN_PART, MAX_PARTS = 5 << 20, 10_000


def send_deadline(nbytes: int, config: dict[str, Any]) -> float:
    """Seconds a request sending ``nbytes`` may take, retries included: each attempt's connect
    and (about 2x, measured) read timeouts, plus the body at :data:`MIN_SEND_RATE`."""
    conf = {**S3_CONFIG, **config}
    per_try = float(conf["connect_timeout"]) + 2 * float(conf["read_timeout"])
    return S3_ATTEMPTS * per_try + nbytes / MIN_SEND_RATE


class S3Storage(FsspecStorage):
    """Objects under ``s3://bucket/prefix`` (or ``s3a://``).  A missing bucket or refused
    credentials are errors at construction, not an empty root."""

    @classmethod
    def _fs_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        # Time-bounded requests: botocore's defaults (60 s per read, retried, and s3fs retrying
        # those 5 times) left a save blocked for minutes behind a server that stopped answering.
        # storage_options' own config_kwargs win.  A deep copy: botocore rewrites the retries
        # of the config it is given (max_attempts into total_max_attempts), which changed
        # S3_CONFIG itself, so fsspec's cache key, and made one more client per process.
        return {
            **options,
            "config_kwargs": {**copy.deepcopy(S3_CONFIG), **(options.get("config_kwargs") or {})},
        }

    @classmethod
    def _configure(cls, fs: Any) -> None:
        fs.retries = S3_ATTEMPTS

    def _check_root(self) -> None:
        """A missing or misspelt bucket, or credentials it refuses, is an error now: listing it
        would otherwise look like a root with nothing in it, and a job that resumes "if there
        is a checkpoint" would silently start from scratch."""
        bucket = self.root.split("/", 1)[0]
        with self._faults("reaching", ""):
            try:
                self.fs.info(bucket)  # (exists() answers False for a refused request too)
            except FileNotFoundError:
                raise RootNotFoundError(f"no bucket {bucket!r} for storage root {self.url!r}") from None
            except PermissionError as e:
                raise StorageError.of(
                    e,
                    f"access to bucket {bucket!r} of storage root {self.url!r} is denied "
                    "(check the credentials: the AWS_* variables or storage_options)",
                ) from e
            except OSError as e:
                raise StorageError.of(e, f"cannot reach storage root {self.url!r}: {type(e).__name__}") from e

    async def _send(self, method: str, body: bytes | bytearray, **kwargs: Any) -> Any:
        """``method`` with ``Body=body``, given up after :func:`send_deadline` (a
        ``TimeoutError`` naming the request) however the server stalls."""
        deadline = send_deadline(len(body), getattr(self.fs, "config_kwargs", None) or {})
        try:
            async with asyncio.timeout(deadline) as bound:
                return await self.fs._call_s3(method, Body=body, **kwargs)
        except TimeoutError as e:
            if not bound.expired():
                raise
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"S3 {method} of {len(body)} bytes took over {deadline:.0f} s "
                f"(sending under {MIN_SEND_RATE >> 20} MiB/s, or a server that stopped answering)",
            ) from e

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.path(rel))
        return bucket, key

    # ------------------------------------------------------------------ write

    def _write(self, rel: str, segments: Sequence[bytes | memoryview], exclusive: bool) -> int:
        views = [byte_view(s) for s in segments]
        total = sum(len(v) for v in views)
        if exclusive:  # one conditional PUT (so at most 5 GiB): atomic, unlike a check first
            self._put_if(rel, gather_bytes(views, 0, total), None)
            return total

        async def body(start: int, end: int) -> bytes:
            return gather_bytes(views, start, end)

        self._sync(self._put_parts(rel, total, body, _part_for(total, self.part_size)))
        return total

    def _write_streamed(
        self, rel: str, size: int, fill: Callable[[int, memoryview], None], part: int
    ) -> None:
        part = _part_for(size, part)

        async def filled(a: int, b: int) -> bytearray:  # the fill runs on the pool, not the loop
            buf = bytearray(b - a)
            await asyncio.get_running_loop().run_in_executor(self.pool, fill, a, memoryview(buf))
            return buf

        self._sync(self._put_parts(rel, size, filled, part))

    async def _put_parts(
        self, rel: str, total: int, body: Callable[[int, int], Awaitable[bytes | bytearray]], part: int
    ) -> None:
        """Upload ``total`` bytes as one object, ``body(start, end)`` giving each part's bytes.

        Small objects are one PUT; larger ones a multipart upload whose parts go
        ``concurrency`` at a time (so at most that many are in memory); the completion is the
        commit, and a failed upload is aborted.
        """
        fs = self.fs
        bucket, key = self._bucket_key(rel)
        try:
            if total <= part:
                await self._send("put_object", await body(0, total), Bucket=bucket, Key=key)
                return
            mpu = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
            upload_id = mpu["UploadId"]
            gate = asyncio.Semaphore(self.concurrency)

            async def upload(number: int, start: int, end: int) -> dict[str, Any]:
                async with gate:  # at most `concurrency` parts in memory at once
                    data = await body(start, end)
                    out = await self._send(
                        "upload_part", data, Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number
                    )
                    return {"PartNumber": number, "ETag": out["ETag"]}

            try:
                parts = await asyncio.gather(
                    *(upload(i + 1, a, b) for i, (a, b) in enumerate(chunks(0, total, part)))
                )
                await fs._call_s3(
                    "complete_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": list(parts)},
                )
            except BaseException:
                try:  # the object never appeared; free the parts the server holds
                    await asyncio.shield(
                        fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
                    )
                except Exception:  # noqa: BLE001 - a lifecycle rule frees what is left
                    pass
                raise
        finally:
            fs.invalidate_cache(self.path(rel))

    def _delete_dir(self, rel: str) -> None:
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, withdirs=True, detail=True)
        except FileNotFoundError:
            found = {}
        super()._delete_dir(rel)
        # Servers with real folders (SeaweedFS) keep emptied ones, listed as prefixes: their
        # markers go too, deepest first (a folder holding a folder stays).  Harmless elsewhere:
        # on AWS there are none, or they mark nothing.
        folders = [p for p, meta in found.items() if meta.get("type") == "directory" and p != path]
        for folder in [*sorted(folders, key=len, reverse=True), path]:
            bucket, key, _ = self.fs.split_path(folder)
            try:
                self._sync(self.fs._call_s3("delete_object", Bucket=bucket, Key=key.rstrip("/") + "/"))
            except FileNotFoundError:
                pass
        self.fs.invalidate_cache(path)

    def _exists(self, rel: str) -> bool:
        # One HEAD: s3fs's exists follows a 404 with a LIST (is it a directory?), and fmstore
        # asks only for files; ranks waiting for a commit ask this of one key together.
        return bool(self._sync(self._head(*self._bucket_key(rel))))

    async def _head(self, bucket: str, key: str) -> bool:
        # The 404 is caught here, on the loop: raised through fsspec's sync it would sit in a
        # reference cycle with the caller's frames (and keep a dropped Checkpointer alive).
        try:
            await self.fs._call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    # ------------------------------------------------------------------ conditional requests

    @property
    def conditional(self) -> bool:
        return True  # SeaweedFS and AWS honour If-Match / If-None-Match

    def _put_if(self, rel: str, data: bytes, tag: str | None) -> str:
        bucket, key = self._bucket_key(rel)
        cond = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            out = self._sync(self._send("put_object", data, Bucket=bucket, Key=key, **cond))
        except OSError as e:
            if precondition_failed(e):
                raise FileExistsError(f"{self.url}/{rel} changed (a conditional write lost)") from None
            raise
        finally:
            self.fs.invalidate_cache(self.path(rel))
        return str(out["ETag"])

    def _read_tagged(self, rel: str) -> tuple[bytes, str]:
        bucket, key = self._bucket_key(rel)
        out = self._sync(self.fs._call_s3("get_object", Bucket=bucket, Key=key))
        body = out["Body"]
        try:
            data = self._sync(body.read())
        finally:
            body.close()
        return data, str(out["ETag"])

    def _delete_if(self, rel: str, tag: str) -> bool:
        bucket, key = self._bucket_key(rel)
        try:
            self._sync(self.fs._call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag))
        except FileNotFoundError:
            return False
        except OSError as e:
            if precondition_failed(e):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path(rel))
        return True

    # ------------------------------------------------------------------ read

    def _read_with(self, rel: str, use: Callable[[Reader], T]) -> T:
        for _attempt in range(READ_ATTEMPTS):
            try:
                return use(_VersionReader(self, rel))
            except _ObjectChanged:
                continue
        raise StorageError(
            f"reading {rel!r} under {self.url!r} failed: the object kept changing while it was read "
            f"({READ_ATTEMPTS} attempts)"
        )


class _ObjectChanged(Exception):
    """The object was replaced (or deleted) between two ranged GETs of one read."""


class _VersionReader(Reader):
    """Ranged GETs of one version: the first learns the ETag, the rest ask ``If-Match`` on it."""

    def __init__(self, storage: S3Storage, rel: str) -> None:
        self.storage = storage
        self.name = storage.path(rel)
        self.bucket, self.key = storage._bucket_key(rel)
        self.etag: str | None = None

    async def _get(self, start: int, end: int) -> tuple[bytes, int]:
        fs = self.storage.fs
        cond = {"IfMatch": self.etag} if self.etag else {}
        try:
            resp = await fs._call_s3(
                "get_object", Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}", **cond
            )
        except FileNotFoundError:
            if self.etag:  # deleted after the first range: a change like any other
                raise _ObjectChanged() from None
            raise
        except OSError as e:
            if self.etag and precondition_failed(e):
                raise _ObjectChanged() from None
            if start == 0 and not self.etag and _s3_error(e, "InvalidRange", 416):
                return await self._empty()
            raise
        try:
            body = await resp["Body"].read()
        finally:
            resp["Body"].close()
        if self.etag and resp.get("ETag") != self.etag:  # a server that ignores If-Match
            raise _ObjectChanged()
        self.etag = self.etag or resp.get("ETag")
        total = int(str(resp.get("ContentRange", "")).rsplit("/", 1)[-1] or len(body))
        return body, total

    async def _empty(self) -> tuple[bytes, int]:
        """An empty object has no byte 0 to ask for (HTTP 416): its ETag from a HEAD."""
        head = await self.storage.fs._call_s3("head_object", Bucket=self.bucket, Key=self.key)
        self.etag = head.get("ETag")
        return b"", int(head.get("ContentLength", 0))

    def head(self, n: int) -> tuple[bytes, int]:
        if n <= 0:
            return b"", self.storage._sync(self._empty())[1]
        return self.storage._sync(self._get(0, n))

    def read_into(self, ranges: Sequence[tuple[int, memoryview]]) -> None:
        self.storage._sync(self._read_all(coalesce(ranges, self.storage.part_size)))

    async def _read_all(self, groups: list[tuple[int, int, list[tuple[int, memoryview]]]]) -> None:
        gate = asyncio.Semaphore(self.storage.concurrency)

        async def one(start: int, end: int, group: list[tuple[int, memoryview]]) -> None:
            async with gate:
                body, _ = await self._get(start, end)
            fill_group(self.name, start, group, body)

        await asyncio.gather(*(one(*g) for g in groups))


def _part_for(total: int, part: int) -> int:
    """The part size to upload ``total`` bytes with: ``part``, unless S3's limits ask for more."""
    return max(part, MIN_PART, -(-total // MAX_PARTS))


def _s3_error(e: BaseException, code: str, status: int) -> bool:
    """Whether ``e``, or what s3fs translated it from, is the S3 error ``code`` / HTTP ``status``."""
    seen: BaseException | None = e
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            got = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if error.get("Code") in (code, str(status)) or got == status:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def precondition_failed(e: BaseException) -> bool:
    """Whether an S3 error is a failed ``If-Match``/``If-None-Match`` (HTTP 412); s3fs turns it
    into an ``OSError`` (EINVAL, or ``FileExistsError`` for ``If-None-Match``) with the response
    as its cause; some servers say so only in the message."""
    if isinstance(e, FileExistsError) or _s3_error(e, "PreconditionFailed", 412):
        return True
    text = str(e)
    return "pre-condition" in text.lower() or "PreconditionFailed" in text
