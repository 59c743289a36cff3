"""A shard file's safetensors header: what a writer puts there (:func:`shard_header`) and the
check a reader makes of it against the manifest before it reads (:func:`check_shard_file`).

A shard file is a valid safetensors file: a header naming each entry (a tensor's raw bytes
under its dtype's code and shape, or an encoded blob as U8 bytes) and the entries' bytes.  The
manifest records where each shard lies; before a load allocates buffers for a file's byte
ranges it checks them against the file's real size and its header (an entry at each range,
named for the tensor, with the dtype and shape the manifest implies), so a truncated file or a
manifest whose names or dtypes were permuted is a :class:`CorruptBlobError`, never other values.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from ..blob import SAFETENSORS_CODES, dtype_name
from ..errors import CorruptBlobError
from ..storage import Storage
from .manifest_check import FileRows, FileShard

#: The longest safetensors header a shard file may have (safetensors' own limit).
MAX_HEADER = 100_000_000
#: The first read of a shard file: its header length and, for all but huge tables, its header.
HEAD_READ = 64 << 10
#: The safetensors dtype code of each dtype (by the manifest's name for it) that has one.
_CODES_BY_NAME: dict[str, str] = {dtype_name(d): c for d, c in SAFETENSORS_CODES.items()}


@dataclass
class FileEntry:
    """One safetensors entry of a shard file: its name, safetensors dtype code, shape, size in
    bytes and the codec stages of an encoded blob (a U8 entry; empty for raw bytes)."""

    name: str
    code: str
    shape: list[int]
    nbytes: int
    codec: list[dict]

    @classmethod
    def raw(cls, name: str, dtype: torch.dtype, shape: Sequence[int]) -> FileEntry:
        """The entry of a tensor stored as its raw bytes, as a save writes one: its own dtype
        code and shape where safetensors has the dtype, else U8 bytes (the manifest has the
        dtype)."""
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        code = SAFETENSORS_CODES.get(dtype)
        return cls(name, code or "U8", list(shape) if code else [nbytes], nbytes, [])


def shard_header(entries: list[FileEntry]) -> tuple[bytes, list[tuple[int, int]]]:
    """A safetensors header for the entries to write, in order, and each one's byte range in
    the file (the header included)."""
    body: dict[str, Any] = {"__metadata__": {"format": "fmstore.shard", "fmstore": "1"}}
    pos = 0
    spans = []
    for e in entries:
        body[e.name] = {"dtype": e.code, "shape": e.shape, "data_offsets": [pos, pos + e.nbytes]}
        spans.append((pos, pos + e.nbytes))
        pos += e.nbytes
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    hlen = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, [(a + hlen, b + hlen) for a, b in spans]


def header_digest(header: bytes | bytearray | memoryview) -> str:
    """The digest a manifest records of a shard file's header (:attr:`.Manifest.headers`):
    the xxh3-128 of the bytes :func:`shard_header` returns, the file's first."""
    return xxhash.xxh3_128_hexdigest(header)


def check_shard_file(
    storage: Storage,
    file: str,
    shards: Sequence[FileShard] | FileRows,
    step: int,
    digest: str | None = None,
) -> None:
    """See :meth:`SnapshotReader.check_file` (``shards``: those the manifest puts in ``file``,
    see :class:`.manifest_check.FileShard`).  ``digest``: the :func:`header_digest` of the
    header this file was written with, from a sealed manifest (:attr:`.Manifest.sealed`), whose
    shards are the ones that header was made from; a header with that digest is not parsed
    (a whole load of a large job checks every file: 512 k header entries at 1,024 ranks)."""
    at = f"snapshot step {step}: shard file {file!r}"
    size = storage.size(file)
    rows = shards if isinstance(shards, FileRows) else None  # (checked as columns, below)
    if rows is not None and any(bool((p[3] > size).any()) for p in rows.parts):
        rows, shards = None, rows.shards()  # (the loop names the first shard past the end)
    # The real size first: it is what bounds the buffers a load allocates for these ranges.
    for name, begin, end, *_ in shards if rows is None else ():
        if end > size:
            raise CorruptBlobError(
                f"{at}: tensor {name!r} is at bytes {begin}..{end}, the file has {size} (truncated file?)",
                file=file,
            )
    head = bytearray(min(size, HEAD_READ))
    try:
        storage.read_ranges(file, [(0, memoryview(head))])
        n = int.from_bytes(head[:8], "little") if size >= 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise CorruptBlobError(f"a safetensors header of {n} bytes in a file of {size}")
        raw = head[8 : 8 + n]
        if len(raw) < n:  # a long tensor table: the rest of the header
            rest = bytearray(n - len(raw))
            storage.read_ranges(file, [(len(head), memoryview(rest))])
            raw += rest
        if digest is not None and header_digest(head[:8] + raw) == digest:
            return  # the header written with these shards: what the checks below would find
        header = json.loads(bytes(raw))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except CorruptBlobError as e:
        raise CorruptBlobError(f"{at}: bad safetensors header ({e})", file=file) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptBlobError(f"{at}: safetensors header is not JSON ({e})", file=file) from None
    # The header's entries by byte range: each shard's must be there, named for its tensor,
    # with the dtype code and shape the manifest implies (a damaged manifest that permutes
    # names or dtypes keeps every byte range, and would load other values).
    entries = header_entries(header)
    base = 8 + n  # safetensors' data offsets count from the end of the header
    if rows is not None:
        if _rows_match(rows, entries, base):
            return
        shards = rows.shards()  # (the loop names the first shard that does not match)
    codes = _CODES_BY_NAME
    for s in shards:
        name, begin, end = s.name, s.begin, s.end
        found = entries.get((begin - base, end - base))
        if found is None:
            raise CorruptBlobError(
                f"{at}: its safetensors header lists no tensor at bytes {begin}..{end}, "
                f"where the manifest has tensor {name!r}",
                file=file,
            )
        key, code, shape = found
        if begin == end:
            continue  # an empty piece (a rank's empty FSDP shard): several share one offset, no bytes to misread
        # As the writer puts it (level.FileEntry): raw bytes under their dtype's code and
        # shape, where safetensors has one; coded bytes, or a dtype it lacks, as U8 bytes.
        want = None if s.coded else codes.get(s.dtype)
        want_code, want_shape = (want, list(s.lengths)) if want else ("U8", [end - begin])
        if not _names(key, name) or code != want_code or shape != want_shape:
            raise CorruptBlobError(
                f"{at}: its safetensors header has {key!r} ({code} {shape}) at bytes {begin}..{end}, "
                f"where the manifest has tensor {name!r} ({want_code} {want_shape})",
                file=file,
            )


def header_entries(header: dict[str, Any]) -> dict[tuple[int, int], tuple[str, Any, Any]]:
    """A safetensors header's entries by byte range: (name, dtype code, shape), as found."""
    entries: dict[tuple[int, int], tuple[str, Any, Any]] = {}
    for key, value in header.items():
        offsets = value.get("data_offsets") if isinstance(value, dict) and key != "__metadata__" else None
        if (
            type(offsets) is list
            and len(offsets) == 2
            and type(offsets[0]) is int
            and type(offsets[1]) is int
        ):
            entries[(offsets[0], offsets[1])] = (key, value.get("dtype"), value.get("shape"))
    return entries


def _rows_match(rows: FileRows, entries: dict[tuple[int, int], tuple[str, Any, Any]], base: int) -> bool:
    """Whether every shard of ``rows`` has its header entry as :func:`check_shard_file`'s loop
    checks it (there is an entry at its byte range; for a shard with bytes: named for its
    tensor, with the dtype code and shape the manifest implies), compared as columns: a whole
    load checks every file, 512 k shards for a job of 1,024 ranks."""
    # The entries with bytes by where they begin (no two share a byte, so a begin is unique).
    index: dict[int, int] = {}
    keys: list[str] = []
    ends, code_of, nd = [], [], []
    code_ids: dict[Any, int] = {}
    shapes: list[list[int]] = []
    for (b, e), (key, code, shape) in entries.items():
        if b < e < 1 << 62 and b >= 0:  # (no shard is anywhere else: one out there fails below)
            index[b] = len(keys)
            keys.append(key)
            ends.append(e)
            code_of.append(code_ids.setdefault(code, len(code_ids)) if isinstance(code, str) else -1)
            good = type(shape) is list and all(type(x) is int and 0 <= x < 1 << 62 for x in shape)
            nd.append(len(shape) if good else -1)
            shapes.append(shape if good else [])
    width = max([1, *(p[4].shape[1] for p in rows.parts), *nd])
    hshape = np.full((len(keys), width), -1, dtype=np.int64)
    for i, sh in enumerate(shapes):
        hshape[i, : len(sh)] = sh
    hend, hcode, hnd = np.array(ends, np.int64), np.array(code_of, np.int64), np.array(nd, np.int64)
    u8 = code_ids.get("U8", -2)
    for k, info, begin, end, lengths, ndim, coded, dtype_of, dtypes in rows.parts:
        b, e = begin - base, end - base
        empty = b == e
        if empty.any():  # an empty piece: an entry at its (shared) offset, nothing else to check
            if not all((x, x) in entries for x in b[empty].tolist()):
                return False
        keep = ~empty
        b, e, k, lengths, ndim, coded, dtype_of = (
            b[keep], e[keep], k[keep], lengths[keep], ndim[keep], coded[keep], dtype_of[keep],
        )  # fmt: skip
        at = [index.get(x, -1) for x in b.tolist()]
        i = np.array(at, dtype=np.int64)
        if len(i) and (i.min() < 0 or (hend[i] != e).any()):
            return False
        names = [info[j][0] for j in k.tolist()]
        found = [keys[j] for j in at]
        if found != names and not all(key == name or _names(key, name) for key, name in zip(found, names)):
            return False  # (the first test compares the lists in one call: names as written)
        # The code and shape the writer gives: its dtype's code and the lengths, where
        # safetensors has a code and the bytes are raw; else U8 bytes of the stored size.
        want = np.array([code_ids.get(_CODES_BY_NAME[d], -2) if d in _CODES_BY_NAME else -3 for d in dtypes], np.int64)[dtype_of]  # fmt: skip
        plain = ~coded & (want != -3)
        want = np.where(plain, want, u8)
        want_nd = np.where(plain, ndim, 1)
        want_shape = np.full((len(i), width), -1, dtype=np.int64)
        cols = np.arange(width)
        w = lengths[:, : min(width, lengths.shape[1])]
        want_shape[:, : w.shape[1]] = np.where(cols[: w.shape[1]] < ndim[:, None], w, -1)
        want_shape[~plain] = -1
        want_shape[~plain, 0] = (e - b)[~plain]
        if (
            len(i)
            and ((hcode[i] != want) | (hnd[i] != want_nd) | (hshape[i] != want_shape).any(axis=1)).any()
        ):
            return False
    return True


#: What a writer may append to a tensor's name in a shard file's header: the offsets of one of
#: several pieces a rank writes of it (``parts.py``: ``name@[0,4]``) and a ``~N`` that keeps
#: entries distinct (``tree.unique_name``).
_HEADER_SUFFIX = re.compile(r"(@\[[0-9,]*\])?(~[0-9]+)?")


def _names(key: str, name: str) -> bool:
    """Whether header entry ``key`` is one the writer gives tensor ``name``."""
    return key.startswith(name) and _HEADER_SUFFIX.fullmatch(key, len(name)) is not None
