"""What a save writes for each staged tensor: the checksum of its bytes and how it is encoded.

Raw tensors are hashed in chunks (xxh3-128) in the background; a tensor encoded on the GPU while
staging (FMHS) carries its own chunk checks; ``compression="lossless"`` encodes the others with
the CPU chain (byte planes + zstd); ``quantize`` patterns store float tensors as blockwise int8,
with the checksum of the bytes a load gives back.  The checkpointer and the torch DCP writer
build their write items here.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor, Future
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch

from ..blob import as_bytes_tensor, as_memoryview
from ..codec import Encoded
from ..codec.quant import BLOCK as QUANT_BLOCK
from ..codec.quant import dequantize as dequantize_int8
from ..codec.quant import quantize as quantize_int8
from ..codec.registry import Fmhs, Int8Absmax, PlanesZstd
from .level import WriteItem
from .manifest import CHUNK_SIZE
from .sharding import Piece
from .staging import StagedTensor

#: ``quantize=`` patterns for Adam's (and AdamW's) moments in an optimizer's state_dict.
MOMENTS = ("*/exp_avg", "*/exp_avg_sq")
QUANTIZABLE = (torch.float32, torch.bfloat16, torch.float16)


def digest_all(
    buffers: list[torch.Tensor], pool: Executor | None = None, chunk_size: int = CHUNK_SIZE
) -> list[tuple[str, list[str]]]:
    """(checksum, per-chunk xxh3_128 digests) for each flat uint8 CPU tensor.

    xxHash's xxh3 runs at ~7 GB/s a core and releases the GIL, so the chunks of all
    tensors are hashed in parallel on ``pool``.  A checksum hashes the chunk digests: two
    byte strings have equal checksums exactly when all their chunks match.
    """
    import xxhash

    views = [as_memoryview(b) for b in buffers]
    jobs = [(i, v[a : a + chunk_size]) for i, v in enumerate(views) for a in range(0, len(v), chunk_size)]
    pieces = [m for _, m in jobs]
    hashes = (
        list(pool.map(xxhash.xxh3_128_hexdigest, pieces))
        if pool
        else [xxhash.xxh3_128_hexdigest(m) for m in pieces]
    )
    chunks: list[list[str]] = [[] for _ in buffers]
    for (i, _), h in zip(jobs, hashes):
        chunks[i].append(h)
    return [("xxh3_128:" + xxhash.xxh3_128_hexdigest("".join(c).encode()), c) for c in chunks]


class ItemBuilder:
    """Turns a save's staged tensors into :class:`WriteItem` s (checksum futures, encoders)."""

    def __init__(
        self,
        *,
        compression: str | None,
        codec: str,
        quantize: Sequence[str],
        hash_pool: Executor,
        codec_pool: Executor,
    ) -> None:
        self.compression = compression
        self.codec = codec
        self.quantize = tuple(quantize)
        self.hash_pool = hash_pool
        self.codec_pool = codec_pool

    def quantizes(self, name: str, dtype: torch.dtype) -> bool:
        return (
            bool(self.quantize) and dtype in QUANTIZABLE and any(fnmatchcase(name, p) for p in self.quantize)
        )

    def items(self, staged: Sequence[StagedTensor], pieces: Sequence[Piece]) -> list[WriteItem]:
        """One item per (staged tensor, piece) pair this rank writes."""
        items = []
        for st, p in zip(staged, pieces):
            if not p.writes:
                continue
            if st.codec:  # encoded on the GPU while staging
                enc = Encoded([memoryview(st.data.numpy())], list(st.codec))
                digest = self.hash_pool.submit(fmhs_digest, st.data, st.raw_nbytes, p.name)
                items.append(WriteItem(st, p, digest, lambda _, e=enc: e))
                continue
            if self.compression and self.codec == "fmhs" and st.nbytes:
                enc = _huffman_cpu(st, self.codec_pool)
                digest = completed(fmhs_digest(enc.segments[0], st.nbytes, p.name))
                items.append(WriteItem(st, p, digest, lambda _, e=enc: e))
                continue
            if self.quantizes(p.name, st.dtype):
                # Lossy: the checksum is of the bytes a load will give back.
                enc, digests = _quantized(st, self.hash_pool)
                items.append(WriteItem(st, p, completed(digests), lambda _, e=enc: e))
                continue
            digest = self.hash_pool.submit(digest_all, [st.data])
            items.append(WriteItem(st, p, digest, self._encoder if self.compression else None))
        return items

    def _encoder(self, st: Any) -> Encoded:
        """The CPU codec chain for one staged tensor, its chunks spread over the codec pool."""
        codec = PlanesZstd(st.dtype.itemsize)
        return Encoded(codec.encode(st.data, pool=self.codec_pool), [codec.to_json()])


def completed(value: Any) -> Future[Any]:
    """A future already holding ``value``."""
    f: Future[Any] = Future()
    f.set_result(value)
    return f


def fmhs_digest(stream: Any, nbytes: int, name: str) -> list[tuple[str, list[str]]]:
    """The manifest checksum of an FMHS-coded tensor (its chunk checks; no chunk digests)."""
    view = stream.numpy() if isinstance(stream, torch.Tensor) else np.frombuffer(stream, dtype=np.uint8)
    return [(Fmhs.digest(view, nbytes, name), [])]


def _huffman_cpu(st: Any, pool: Executor) -> Encoded:
    codec = Fmhs(st.dtype.itemsize)
    return Encoded(codec.encode(st.data, pool=pool), [codec.to_json()])


def _quantized(st: Any, pool: Executor) -> tuple[Encoded, list[tuple[str, list[str]]]]:
    """The int8 blob (codes, then float32 scales) of a staged float tensor, and the digest of
    the bytes its load will return."""
    x = st.data.view(st.dtype).to(torch.float32)
    codes, scales = quantize_int8(x)
    back = dequantize_int8(codes, scales).to(st.dtype)
    digest = digest_all([as_bytes_tensor(back)], pool)
    blob = [memoryview(codes.numpy()).cast("B"), memoryview(scales.numpy()).cast("B")]
    return Encoded(blob, [Int8Absmax(QUANT_BLOCK).to_json()]), digest
