"""The codec chain that shrinks checkpoint bytes: XOR delta, byte-plane split, per-chunk
zstd (or raw where a chunk does not compress).  This is the CPU reference; the GPU path
(``kernels/``) must produce identical bytes."""

from .chain import CodecError, Encoded, decode, encode, estimated_ratio, read_header
from .planes import merge, split, xor

__all__ = [
    "encode",
    "decode",
    "Encoded",
    "CodecError",
    "read_header",
    "estimated_ratio",
    "split",
    "merge",
    "xor",
]
