"""FileTier: blobs as ``<key>.safetensors`` files on a :class:`~fmstore.storage.Storage`.

The durable tiers (local disk, object storage) differ only in the storage under them, so the
blob format (a safetensors header, then the data) and its checks are written once, here.  A
blob is written whole (the storage makes it visible only once complete) and read at one
version of its file (:meth:`Storage.read_with`), so no reader sees a partial or torn blob.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..blob import (
    BlobInfo,
    Value,
    as_memoryview,
    decode_header,
    encode_header,
    from_bytes_tensor,
    header_length,
)
from ..errors import BlobNotFoundError, CorruptBlobError
from ..keys import RESERVED_DIR
from ..storage import Reader, Storage
from .base import Tier

#: Blob files are safetensors files; the suffix also keeps key "a" and key "a/b" apart.
SUFFIX = ".safetensors"
#: Bytes read first: the header and, for small blobs, all of the data in one request.
FIRST_READ = 1 << 20
#: Bytes read for a stat: enough for any header but a huge metadata one.
STAT_READ = 64 << 10


class FileTier(Tier):
    """A tier whose blobs are files of ``storage``; subclasses open the storage."""

    durable = True

    def __init__(
        self, storage: Storage, *, capacity: int | str | None = None, name: str | None = None
    ) -> None:
        super().__init__(capacity=capacity, name=name)
        self.storage = storage
        try:
            self._load_index()
        except BaseException:
            storage.close()
            raise

    def path_of(self, key: str) -> str:
        """The file that holds (or would hold) ``key``, in the storage's terms."""
        return self.storage.path(key + SUFFIX)

    def extent(self, key: str) -> tuple[str, int, BlobInfo]:
        """Where ``key``'s bytes lie: its file's name in :attr:`storage`, the offset of the data
        in it (past the header) and its info, for readers that read byte ranges of a blob in
        place (the serving cache).  Raises :class:`BlobNotFoundError` if it is not there."""
        info = self.stat(key)
        rel = key + SUFFIX
        return rel, self.storage.size(rel) - info.nbytes, info

    def footprint(self, info: BlobInfo) -> int:
        return len(encode_header(info)) + info.nbytes

    def _name(self, key: str) -> str:
        return f"tier {self.name!r}: {key!r} ({self.path_of(key)})"

    # ------------------------------------------------------------------ the Tier methods

    def _write(self, key: str, value: Value, info: BlobInfo) -> None:
        self.storage.write(key + SUFFIX, [encode_header(info), as_memoryview(value)])

    def _read(self, key: str, device: torch.device | None = None) -> tuple[Value, BlobInfo]:
        name = self._name(key)

        def read(f: Reader) -> tuple[Value, BlobInfo]:
            head, size = f.head(FIRST_READ)
            hlen, info = _header(f, head, name)
            _check_size(size, hlen, info, name)
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            if info.nbytes:
                mv = memoryview(buf.numpy())
                have = max(0, min(len(head) - hlen, info.nbytes))
                mv[:have] = head[hlen : hlen + have]
                if have < info.nbytes:
                    f.read_into([(hlen + have, mv[have:])])
            return from_bytes_tensor(buf, info), info

        try:
            return self.storage.read_with(key + SUFFIX, read)
        except FileNotFoundError:
            raise BlobNotFoundError(key, f"tier {self.name!r}") from None

    def _stat(self, key: str) -> BlobInfo:
        name = self._name(key)

        def stat(f: Reader) -> BlobInfo:
            head, size = f.head(STAT_READ)
            hlen, info = _header(f, head, name)
            _check_size(size, hlen, info, name)
            return info

        try:
            return self.storage.read_with(key + SUFFIX, stat)
        except FileNotFoundError:
            raise BlobNotFoundError(key, f"tier {self.name!r}") from None

    def _remove(self, key: str) -> None:
        if key not in self and not self.storage.exists(key + SUFFIX):
            raise BlobNotFoundError(key, f"tier {self.name!r}")
        self.storage.delete(key + SUFFIX)

    def _probe(self, key: str) -> int | None:
        try:
            return self.storage.size(key + SUFFIX)
        except OSError:  # not there (FileNotFoundError), or not reachable (StorageError)
            return None

    def _scan(self) -> Iterator[tuple[str, int]]:
        self.storage.sweep_temp()  # what writers that died mid-write left
        for rel, size in self.storage.scan():
            if rel.endswith(SUFFIX) and not rel.startswith(RESERVED_DIR + "/"):
                yield rel[: -len(SUFFIX)], size

    def close(self) -> None:
        self.storage.close()


def _header(f: Reader, head: bytes, name: str) -> tuple[int, BlobInfo]:
    """(header length, blob info) from a file's first bytes, reading the rest of a long header."""
    hlen = header_length(head, name=name)
    if hlen > len(head):
        rest = bytearray(hlen - len(head))
        f.read_into([(len(head), memoryview(rest))])
        head = head + bytes(rest)
    return hlen, decode_header(head[:hlen], name=name)


def _check_size(total: int, hlen: int, info: BlobInfo, name: str) -> None:
    if total != hlen + info.nbytes:
        what = "truncated" if total < hlen + info.nbytes else "has trailing bytes"
        raise CorruptBlobError(
            f"{name}: blob file {what}: {total} bytes stored, header says {hlen + info.nbytes}"
        )
