"""The lossless codec chain for one tensor's bytes: byte planes -> per-chunk entropy coding
(zstd) or raw, decided by each chunk's measured byte entropy.  (An XOR-delta stage against the
previous snapshot was measured and removed: ``bench/xor_delta.py``, ``bench/RESULTS.md``.)

Encoded blob layout (little-endian)::

    b"FMC1" | u32 header length | header JSON | chunk payloads, in header order

The header names the stages, the element width, the original size, the chunk size and, per
chunk, its plane, stored length and codec (``raw`` or ``zstd``).  Chunks are independent:
they encode and decode in parallel, and a damaged one is reported by its position.  zstd
runs with a literal-oriented setting (tiny match search): exponent planes are skewed byte
distributions with few repeats, where Huffman-coded literals are what gains.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CodecError, FmstoreError

MAGIC = b"FMC1"
#: Chunk of one plane coded on its own: big enough for zstd, small enough to parallelize.
CHUNK = 1 << 20
#: Below this estimated gain a chunk is stored raw without trying (mantissa planes).
MIN_ESTIMATED_RATIO = 1.03
#: Bytes of a chunk sampled for that estimate.
SAMPLE = 64 << 10
#: A chunk keeps its zstd form only if that saves at least this fraction.
MIN_SAVING = 0.02
_local = threading.local()


@dataclass(frozen=True)
class Encoded:
    """An encoded tensor: ``segments`` concatenated are the blob; ``codec`` names the chain."""

    segments: list[bytes | memoryview]
    codec: list[Any]  # the manifest's codec entries (see registry), or a chain's stage names

    @property
    def nbytes(self) -> int:
        return sum(len(s) for s in self.segments)


def estimated_ratio(chunk: np.ndarray) -> float:
    """8 / (Shannon entropy in bits per byte) of ``chunk``: what an order-0 coder could get."""
    if chunk.size == 0:
        return 1.0
    counts = np.bincount(chunk, minlength=256)
    p = counts[counts > 0] / chunk.size
    bits = float(-(p * np.log2(p)).sum())
    return math.inf if bits == 0 else 8.0 / bits


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a declared dependency
        raise FmstoreError("compression needs the 'zstandard' package: pip install zstandard") from None
    return zstandard


def _compressor() -> Any:
    c = getattr(_local, "cctx", None)
    if c is None:
        z = _zstd()
        params = z.ZstdCompressionParameters(
            compression_level=1, min_match=7, search_log=1, hash_log=6, chain_log=6,
            window_log=17, strategy=z.STRATEGY_FAST, write_checksum=True,
        )  # fmt: skip
        c = _local.cctx = z.ZstdCompressor(compression_params=params)
    return c


def _decompressor() -> Any:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = _zstd().ZstdDecompressor()
    return d


def _encode_chunk(chunk: np.ndarray) -> tuple[str, bytes | memoryview]:
    # Entropy of an evenly spread sample: a chunk of near-random mantissa bytes is stored
    # raw without spending a compressor pass on it.
    sample = chunk[:: max(1, chunk.size // SAMPLE)]
    if chunk.size == 0 or estimated_ratio(sample) < MIN_ESTIMATED_RATIO:
        return "raw", memoryview(chunk)
    packed = _compressor().compress(chunk.data)
    if len(packed) <= chunk.size * (1 - MIN_SAVING):
        return "zstd", packed
    return "raw", memoryview(chunk)


def encode(data: torch.Tensor, width: int, *, chunk: int = CHUNK, pool: Executor | None = None) -> Encoded:
    """Encode flat uint8 CPU ``data`` of ``width``-byte elements."""
    stages = [f"planes{width}", "zstd"]
    rows = data.numpy().reshape(-1, width) if width else data.numpy()[:0]
    ranges = [(a, min(a + chunk, rows.shape[0])) for a in range(0, rows.shape[0], chunk)]

    def one(r: tuple[int, int]) -> list[tuple[str, bytes | memoryview]]:
        # Split and code one run of elements: each worker cuts its own planes out of the
        # data, so the split runs in parallel and stays in cache.
        return [_encode_chunk(np.ascontiguousarray(rows[r[0] : r[1], p])) for p in range(width)]

    per_range = list(pool.map(one, ranges)) if pool else [one(r) for r in ranges]
    jobs = [(p, per_range[j][p]) for p in range(width) for j in range(len(ranges))]  # plane-major
    header = {
        "v": 1,
        "stages": stages,
        "width": width,
        "nbytes": int(data.numel()),
        "chunk": chunk,
        "chunks": [[p, len(payload), kind] for p, (kind, payload) in jobs],
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    segments: list[bytes | memoryview] = [MAGIC + struct.pack("<I", len(raw)) + raw]
    segments += [payload for _, (_, payload) in jobs]
    return Encoded(segments, stages)


def read_header(blob: memoryview | bytes, name: str = "") -> tuple[dict[str, Any], int]:
    """(header, where the payloads start) of an encoded blob."""
    mv = memoryview(blob)
    where = f"tensor {name!r}: " if name else ""
    if len(mv) < 8 or bytes(mv[:4]) != MAGIC:
        raise CodecError(f"{where}not an fmstore codec blob (bad magic)")
    (hlen,) = struct.unpack("<I", mv[4:8])
    try:
        header = json.loads(bytes(mv[8 : 8 + hlen]))
    except ValueError:
        raise CodecError(f"{where}codec header is damaged") from None
    if header.get("v") != 1:
        raise CodecError(f"{where}codec version {header.get('v')!r} is not supported")
    return header, 8 + hlen


def decode(
    blob: memoryview | bytes,
    out: torch.Tensor,
    *,
    pool: Executor | None = None,
    name: str = "",
) -> torch.Tensor:
    """Decode ``blob`` into flat uint8 ``out`` (the original bytes); errors name the chunk."""
    header, pos = read_header(blob, name)
    mv = memoryview(blob)
    width, nbytes, chunk = int(header["width"]), int(header["nbytes"]), int(header["chunk"])
    where = f"tensor {name!r}: " if name else ""
    if nbytes != out.numel():
        raise CodecError(f"{where}encoded {nbytes} bytes, the target holds {out.numel()}")
    if header.get("stages") != [f"planes{width}", "zstd"]:
        raise CodecError(f"{where}unknown codec stages {header.get('stages')!r}")
    # Each chunk decodes straight into its column of the output's rows (no plane buffer);
    # the chunks of one run of elements go to one worker.
    rows = out.numpy().reshape(-1, width)
    per_plane = nbytes // width if width else 0
    groups: dict[int, list[tuple[int, int, str, memoryview, np.ndarray]]] = {}
    offsets = {p: 0 for p in range(width)}
    for i, (p, stored, kind) in enumerate(header["chunks"]):
        if p not in offsets:
            raise CodecError(f"{where}chunk {i} names plane {p} of a {width}-byte element")
        a = offsets[p]
        n = min(chunk, per_plane - a)
        offsets[p] = a + n
        groups.setdefault(a, []).append((i, p, kind, mv[pos : pos + stored], rows[a : a + n, p]))
        pos += stored
    if pos != len(mv) or any(offsets[p] != per_plane for p in offsets):
        raise CodecError(f"{where}codec blob is {len(mv)} bytes, its header describes {pos} (truncated?)")

    def group(jobs: list[tuple[int, int, str, memoryview, np.ndarray]]) -> None:
        for job in jobs:
            one(*job)

    def one(i: int, p: int, kind: str, payload: memoryview, dest: np.ndarray) -> None:
        try:
            if kind == "raw":
                if len(payload) != dest.size:
                    raise ValueError(f"{len(payload)} of {dest.size} bytes")
                dest[:] = np.frombuffer(payload, dtype=np.uint8)
            elif kind == "zstd":
                got = _decompressor().decompress(payload, max_output_size=dest.size)
                if len(got) != dest.size:
                    raise ValueError(f"{len(got)} of {dest.size} bytes")
                dest[:] = np.frombuffer(got, dtype=np.uint8)
            else:
                raise ValueError(f"unknown chunk codec {kind!r}")
        except Exception as e:  # zstd's own errors (checksum, corrupt frame) included
            raise CodecError(f"{where}chunk {i} (plane {p}) does not decode: {e}") from None

    if pool is not None:
        list(pool.map(group, groups.values()))
    else:
        for jobs in groups.values():
            group(jobs)
    return out
