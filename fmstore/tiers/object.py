"""ObjectTier: blobs in object storage or any file system fsspec reaches (s3://, gs://, ...).

A blob becomes visible only once complete: on S3 a blob is one PUT or a multipart upload
whose completion is the commit (parts upload concurrently, and a failed upload is aborted);
on ``file://`` it is a temporary file renamed into place; other fsspec back ends get a single
``pipe_file``.  ``storage_options`` go to fsspec untouched; credentials come from them or the
standard AWS variables and are never logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import torch

from ..blob import (
    BlobInfo,
    Value,
    as_memoryview,
    byte_view,
    decode_header,
    encode_header,
    from_bytes_tensor,
    header_length,
)
from ..errors import BlobNotFoundError, ConfigError, CorruptBlobError, FmstoreError
from ..keys import RESERVED_DIR, TMP_MARKER
from ..units import parse_size
from .base import Tier
from .files import chunks
from .local import SUFFIX, LocalTier

#: Bytes fetched by the first ranged GET of a blob: the header, and small blobs whole.
FIRST_READ = 1 << 20
#: Whole-blob read attempts when the object keeps being overwritten during the read.
READ_ATTEMPTS = 5


class _ObjectChanged(Exception):
    """The object was replaced between two ranged GETs of one read."""


def open_fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """(fsspec file system, root path) for ``url``; unknown or unusable schemes raise ConfigError."""
    import fsspec
    from fsspec.core import url_to_fs

    if not isinstance(url, str) or not url:
        raise ConfigError(f"ObjectTier needs a URL such as 's3://bucket/prefix', got {url!r}")
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise ConfigError(
            f"unknown URL scheme {scheme!r} in {url!r}; fsspec knows e.g. s3, gs, az, file, memory"
        ) from None
    except ImportError as e:
        raise ConfigError(f"URL scheme {scheme!r} needs a package that is not installed: {e}") from None
    options = dict(storage_options or {})
    if scheme in ("s3", "s3a"):
        # Time-bounded requests: botocore's defaults (60 s per read, retried, and s3fs retrying
        # those 5 times) left a save blocked for minutes behind a server that stopped answering.
        # storage_options' own config_kwargs win.
        options["config_kwargs"] = {**S3_CONFIG, **(options.get("config_kwargs") or {})}
    fs, root = url_to_fs(url, **options)
    if scheme in ("s3", "s3a"):
        fs.retries = S3_ATTEMPTS
    return fs, root.rstrip("/")


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


class ObjectTier(Tier):
    """Blobs stored as ``<url>/<key>.safetensors`` objects.

    ``part_size`` and ``max_concurrency`` set how large blobs are cut into parts and how
    many parts move at once (S3 multipart upload and ranged reads; ``file://`` chunked I/O).
    """

    kind = "object"
    durable = True

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
        super().__init__(capacity=capacity, name=name)
        self.url = url
        self.fs, self.root = open_fs(url, storage_options)
        self.part_size = max(parse_size(part_size, what="part_size") or 0, 5 << 20)  # S3 minimum
        self.max_concurrency = max(1, max_concurrency)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._is_local = "file" in protocols
        self._is_s3 = "s3" in protocols or "s3a" in protocols
        # file:// is a local directory: the LocalTier code (atomic rename, parallel I/O,
        # clean-up of dead writers' temporary files) does the work.
        self._local = (
            LocalTier(self.root, io_threads=self.max_concurrency, chunk=self.part_size, name=self.name)
            if self._is_local
            else None
        )
        self._load_index()

    def path_of(self, key: str) -> str:
        return f"{self.root}/{key}{SUFFIX}" if self.root else f"{key}{SUFFIX}"

    def footprint(self, info: BlobInfo) -> int:
        return len(encode_header(info)) + info.nbytes

    def __repr__(self) -> str:  # the URL only: storage_options may hold credentials
        return f"ObjectTier({self.url!r}, name={self.name!r})"

    # ------------------------------------------------------------------ write

    def _write(self, key: str, value: Value, info: BlobInfo) -> None:
        if self._local is not None:
            return self._local._write(key, value, info)
        header = encode_header(info)
        data = as_memoryview(value)
        path = self.path_of(key)
        if self._is_s3:
            self._sync(s3_put(self.fs, path, [header, data], self.part_size, self.max_concurrency))
        else:
            self.fs.pipe_file(path, gather_bytes([memoryview(header), data], 0, len(header) + len(data)))

    # ------------------------------------------------------------------ read

    def _read(self, key: str, device: torch.device | None = None) -> tuple[Value, BlobInfo]:
        path = self.path_of(key)
        where = f"tier {self.name!r}"
        if self._local is not None:
            return self._local._read(key, device)
        if self._is_s3:
            return self._sync(self._s3_get(path, key))
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise BlobNotFoundError(key, where) from None
        name = f"{where}: {key!r} ({path})"
        hlen = header_length(raw, name=name)
        info = decode_header(raw[:hlen], name=name)
        _check_size(len(raw), hlen, info, name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            memoryview(buf.numpy())[:] = memoryview(raw)[hlen:]
        return from_bytes_tensor(buf, info), info

    async def _s3_get(self, path: str, key: str) -> tuple[Value, BlobInfo]:
        """Read a blob with concurrent ranged GETs, all of one version of the object.

        An object overwritten mid-read would otherwise mix ranges of two versions: every range
        after the first is asked for with ``If-Match`` on the first one's ETag, and every
        answer's ETag is checked; on a change the whole read starts again.
        """
        name = f"tier {self.name!r}: {key!r} ({path})"
        for _attempt in range(READ_ATTEMPTS):
            try:
                return await self._s3_get_once(path, key, name)
            except _ObjectChanged:
                continue
        raise FmstoreError(f"{name}: the object kept changing while it was read ({READ_ATTEMPTS} attempts)")

    async def _s3_get_once(self, path: str, key: str, name: str) -> tuple[Value, BlobInfo]:
        fs = self.fs
        bucket, skey, _ = fs.split_path(path)
        etag: str | None = None

        async def get_range(start: int, end: int) -> tuple[bytes, int, str | None]:
            cond = {"IfMatch": etag} if etag else {}
            try:
                resp = await fs._call_s3(
                    "get_object", Bucket=bucket, Key=skey, Range=f"bytes={start}-{end - 1}", **cond
                )
            except FileNotFoundError:
                if etag:  # deleted after the first range: a change like any other
                    raise _ObjectChanged() from None
                raise BlobNotFoundError(key, f"tier {self.name!r}") from None
            except OSError as e:
                if etag and _precondition_failed(e):
                    raise _ObjectChanged() from None
                raise
            try:
                body = await resp["Body"].read()
            finally:
                resp["Body"].close()
            if etag and resp.get("ETag") != etag:  # a server that ignores If-Match
                raise _ObjectChanged()
            total = int(str(resp.get("ContentRange", "")).rsplit("/", 1)[-1] or len(body))
            return body, total, resp.get("ETag")

        # A small first read learns the header, the size and the version (ETag); then every
        # other part goes at once.
        first, total, etag = await get_range(0, min(self.part_size, FIRST_READ))
        hlen = header_length(first, name=name)
        if hlen > len(first):
            first = first + (await get_range(len(first), hlen))[0]
        info = decode_header(first[:hlen], name=name)
        _check_size(total, hlen, info, name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            mv = memoryview(buf.numpy())
            have = min(len(first) - hlen, info.nbytes)
            mv[:have] = first[hlen : hlen + have]
            gate = asyncio.Semaphore(self.max_concurrency)

            async def fetch(a: int, b: int) -> None:
                async with gate:
                    body, _, _ = await get_range(hlen + a, hlen + b)
                if len(body) != b - a:
                    raise CorruptBlobError(f"{name}: short read ({len(body)} of {b - a} bytes at {a})")
                mv[a:b] = body

            await asyncio.gather(*(fetch(a, b) for a, b in chunks(have, info.nbytes, self.part_size)))
        return from_bytes_tensor(buf, info), info

    # ------------------------------------------------------------------ the rest

    def _stat(self, key: str) -> BlobInfo:
        if self._local is not None:
            return self._local._stat(key)
        path = self.path_of(key)
        where = f"tier {self.name!r}"
        name = f"{where}: {key!r} ({path})"
        try:
            head = self.fs.cat_file(path, start=0, end=64 * 1024)
            hlen = header_length(head, name=name)
            if hlen > len(head):
                head = self.fs.cat_file(path, start=0, end=hlen)
        except FileNotFoundError:
            raise BlobNotFoundError(key, where) from None
        return decode_header(head[:hlen], name=name)

    def _remove(self, key: str) -> None:
        if self._local is not None:
            return self._local._remove(key)
        path = self.path_of(key)
        if key not in self and not self.fs.exists(path):
            raise BlobNotFoundError(key, f"tier {self.name!r}")
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            raise BlobNotFoundError(key, f"tier {self.name!r}") from None

    def _probe(self, key: str) -> int | None:
        try:
            return int(self.fs.info(self.path_of(key))["size"])
        except (FileNotFoundError, OSError):
            return None

    def _scan(self) -> Iterator[tuple[str, int]]:
        if self._local is not None:
            yield from self._local._scan()
            return
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root, detail=True) if self.root else {}
        except FileNotFoundError:
            return
        prefix = self.root + "/"
        for path, meta in found.items():
            if not path.startswith(prefix) or not path.endswith(SUFFIX) or TMP_MARKER in path:
                continue
            if path[len(prefix) :].startswith(RESERVED_DIR + "/"):
                continue
            yield path[len(prefix) : -len(SUFFIX)], int(meta.get("size") or 0)

    def _sync(self, coro: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, lambda: coro)

    def close(self) -> None:
        if self._local is not None:
            self._local.close()


async def s3_put(
    fs: Any, path: str, segments: Sequence[bytes | memoryview], part_size: int, concurrency: int
) -> None:
    """Upload the concatenation of ``segments`` as one S3 object, visible only when complete
    (parts cut across segments without concatenating them; see :func:`s3_put_parts`)."""
    views = [byte_view(seg) for seg in segments]
    total = sum(len(v) for v in views)

    async def body(start: int, end: int) -> bytes:
        return gather_bytes(views, start, end)

    await s3_put_parts(fs, path, total, body, part_size, concurrency)


async def s3_put_parts(
    fs: Any,
    path: str,
    total: int,
    body: Callable[[int, int], Awaitable[bytes | bytearray]],
    part_size: int,
    concurrency: int,
) -> None:
    """Upload ``total`` bytes as one S3 object, ``body(start, end)`` giving each part's bytes.

    Small objects are one PUT; larger ones a multipart upload whose parts go ``concurrency``
    at a time (so at most that many are in memory); the completion is the commit, and a
    failed upload is aborted.
    """
    bucket, key, _ = fs.split_path(path)
    try:
        if total <= part_size:
            await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=await body(0, total))
            return
        mpu = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        upload_id = mpu["UploadId"]
        gate = asyncio.Semaphore(max(1, concurrency))

        async def upload(number: int, start: int, end: int) -> dict[str, Any]:
            async with gate:  # at most `concurrency` parts in memory at once
                data = await body(start, end)
                out = await fs._call_s3(
                    "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                return {"PartNumber": number, "ETag": out["ETag"]}

        try:
            parts = await asyncio.gather(
                *(upload(i + 1, a, b) for i, (a, b) in enumerate(chunks(0, total, part_size)))
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
            except Exception:
                pass
            raise
    finally:
        fs.invalidate_cache(path)


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


def _precondition_failed(e: BaseException) -> bool:
    """Whether an error (or what it was translated from) is S3's 412 PreconditionFailed."""
    seen: BaseException | None = e
    while seen is not None:
        resp = getattr(seen, "response", None)
        if isinstance(resp, dict):
            err = resp.get("Error", {})
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if err.get("Code") == "PreconditionFailed" or status == 412:
                return True
        if "pre-condition" in str(seen) or "PreconditionFailed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _check_size(total: int, hlen: int, info: BlobInfo, name: str) -> None:
    if total != hlen + info.nbytes:
        what = "truncated" if total < hlen + info.nbytes else "has trailing bytes"
        raise CorruptBlobError(
            f"{name}: object {what}: {total} bytes stored, header says {hlen + info.nbytes}"
        )
