"""The codec chains that shrink checkpoint bytes.

- ``registry``: the codecs by name, as manifests record them (``planes-zstd``, ``fmhs``,
  ``int8-absmax``), each with its checksum meaning, devices and lossiness.
- ``chain`` (``encode``/``decode``): the CPU chain, byte-plane split, per-chunk zstd or raw
  (FMC1 blobs), encoded in the background persist.
- ``huffman``: the GPU chain's FMHS format (byte planes, per-chunk canonical Huffman or raw)
  and its CPU reference, byte for byte what ``kernels/huffman.cu`` writes; ``gpu`` wraps the
  kernels, ``native`` loads the compiled CPU decoder (an extension built at install).
- ``planes`` and ``quant``: the CPU references of the split/merge and int8 kernels.
"""

from .._lazy import lazy_names
from ..errors import CodecError

# Loaded on first use: the registry (what a manifest's codec names mean) is torch-free, so reading
# manifests (``fmstore ls``, ``inspect``) needs no torch; the chains below import it.
_LAZY = {
    "Encoded": "chain",
    "decode": "chain",
    "encode": "chain",
    "estimated_ratio": "chain",
    "read_header": "chain",
    "split": "planes",
    "merge": "planes",
}


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)

__all__ = [
    "encode",
    "decode",
    "Encoded",
    "CodecError",
    "read_header",
    "estimated_ratio",
    "split",
    "merge",
]
