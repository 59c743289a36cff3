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

from ..blob import as_memoryview
from ..codec import Encoded, registry
from ..codec.quant import BLOCK as QUANT_BLOCK
from ..codec.registry import Codec, Int8Absmax
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
        self.codec = registry.choose(codec)
        self.quantize = tuple(quantize)
        self.hash_pool = hash_pool
        self.codec_pool = codec_pool

    def quantizes(self, name: str, dtype: torch.dtype) -> bool:
        return (
            bool(self.quantize) and dtype in QUANTIZABLE and any(fnmatchcase(name, p) for p in self.quantize)
        )

    def items(self, staged: Sequence[StagedTensor], pieces: Sequence[Piece]) -> list[WriteItem]:
        """One item per (staged tensor, piece) pair this rank writes."""
        return [self._item(st, p, self.codec_for(p.name, st)) for st, p in zip(staged, pieces) if p.writes]

    def codec_for(self, name: str, st: StagedTensor) -> Codec | None:
        """How a tensor is stored: as its GPU encode while staging left it, as int8 where a
        ``quantize`` pattern names it, with the lossless codec when compressing, else raw."""
        if st.codec:
            return registry.get(st.codec[0])
        if self.quantizes(name, st.dtype):
            return Int8Absmax(QUANT_BLOCK)
        if not self.compression or not st.nbytes:
            return None
        return registry.lossless(self.codec, st.dtype.itemsize)

    def _item(self, st: StagedTensor, p: Piece, codec: Codec | None) -> WriteItem:
        """The item's checksum follows what its codec's checksum means (``Codec.checksum``)."""
        if codec is None:
            return WriteItem(st, p, self.hash_pool.submit(digest_all, [st.data]), None)
        if st.codec:  # encoded on the GPU while staging: the staged bytes are the stream
            enc = Encoded([memoryview(st.data.numpy())], list(st.codec))
            digest = self.hash_pool.submit(stream_digest, codec, st.data, st.raw_nbytes, p.name)
            return WriteItem(st, p, digest, lambda _, e=enc: e)
        if codec.checksum == "chunks" and not codec.lossy:
            # The raw bytes' checksums, hashed while the persist encodes (later, in background).
            def encoder(s: StagedTensor, c: Codec = codec) -> Encoded:
                return Encoded(c.encode(s.data, dtype=s.dtype, pool=self.codec_pool), [c.to_json()])

            return WriteItem(st, p, self.hash_pool.submit(digest_all, [st.data]), encoder)
        enc = Encoded(codec.encode(st.data, dtype=st.dtype, pool=self.codec_pool), [codec.to_json()])
        if codec.checksum == "stream":
            digest = completed(stream_digest(codec, enc.segments[0], st.nbytes, p.name))
        else:  # lossy: the checksums of the bytes a load gives back
            back = torch.empty(st.nbytes, dtype=torch.uint8)
            blob = torch.frombuffer(bytearray(b"".join(bytes(x) for x in enc.segments)), dtype=torch.uint8)
            codec.decode(blob, back, dtype=st.dtype, name=p.name, pool=None)
            digest = completed(digest_all([back], self.hash_pool))
        return WriteItem(st, p, digest, lambda _, e=enc: e)


def completed(value: Any) -> Future[Any]:
    """A future already holding ``value``."""
    f: Future[Any] = Future()
    f.set_result(value)
    return f


def stream_digest(codec: Codec, stream: Any, nbytes: int, name: str) -> list[tuple[str, list[str]]]:
    """The manifest checksum of a stream-checked codec's blob (its chunk checks; no chunk digests)."""
    view = stream.numpy() if isinstance(stream, torch.Tensor) else np.frombuffer(stream, dtype=np.uint8)
    return [(codec.digest(view, nbytes, name), [])]
