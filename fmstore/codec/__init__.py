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

import importlib

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
    # (fmstore.blob) the flat uint8 view of a tensor's (or bytes') data, what encode() takes
    "as_bytes_tensor": ".blob",
}

#: Submodules public as a whole (the FMHS chain's parts, see above), imported when first asked for.
_SUBMODULES = ("huffman", "gpu", "native")

_lazy_getattr, _lazy_dir = lazy_names(__name__, globals(), _LAZY)


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    return _lazy_getattr(name)


def __dir__() -> list[str]:
    return sorted(set(_lazy_dir()) | set(_SUBMODULES))


__all__ = [
    "encode",
    "decode",
    "Encoded",
    "CodecError",
    "read_header",
    "estimated_ratio",
    "split",
    "merge",
    "as_bytes_tensor",
    # the FMHS chain's modules: huffman (format and CPU reference: encode, decode), gpu (the CUDA
    # kernels' wrappers), native (the compiled CPU decoder's loader)
    "huffman",
    "gpu",
    "native",
]
