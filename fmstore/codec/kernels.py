"""Builds and loads the CUDA kernels of the codec's GPU path (the sources in ``kernels/``).

The ``.cu`` sources live in the repository's top-level ``kernels/`` folder (sources only, no
Python: a top-level importable ``kernels`` would shadow PyPI's package of that name); a wheel
carries them as ``fmstore/codec/cuda/``.  ``planes.cu`` holds byte-plane split/merge, ``quant.cu`` blockwise int8
quantization, ``huffman.cu`` the GPU codec chain (FMH1 blobs), each with a plain C ABI.  On first use
on a CUDA machine it is compiled with ``nvcc`` for the current GPU's architecture into a
per-user cache (``$FMSTORE_KERNEL_CACHE``, default ``~/.cache/fmstore/kernels``), keyed by
the source's hash, and loaded with ctypes.  Each kernel's CPU reference, with identical
output, is in ``fmstore/codec/``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

from ..errors import KernelBuildError

__all__ = ["KernelBuildError", "SIGNATURES", "SOURCES", "find_nvcc", "load", "nvcc_command"]


def _source_dir() -> Path:
    """Where the ``.cu`` files are: beside this module in a wheel, ``kernels/`` in a checkout
    (an editable install included)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "cuda", here.parent.parent / "kernels"):
        if (cand / "planes.cu").is_file():
            return cand
    return here / "cuda"  # absent: load() names the missing file


HERE = _source_dir()
SOURCES = {"planes": HERE / "planes.cu", "quant": HERE / "quant.cu", "huffman": HERE / "huffman.cu"}
#: Each library's C functions: name -> argument types (all return an int cudaError_t).
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {
    "planes": {
        "fmstore_split": [_P, _P, _I64, ctypes.c_int, _P],
        "fmstore_merge": [_P, _P, _I64, ctypes.c_int, _P],
    },
    "quant": {"fmstore_quantize": [_P, _P, _P, _I64, _P], "fmstore_dequantize": [_P, _P, _P, _I64, _P]},
    "huffman": {
        "fmstore_huff_encode": [
            _P,
            ctypes.c_int,
            _P,
            _P,
            _I64,
            _I64,
            _I64,
            _P,
            _I64,
            _P,
            _P,
            _P,
            _P,
        ],
        "fmstore_huff_decode": [_P, _I64, ctypes.c_int, _P, _P, _I64, _P, _I64, _P, _P, _P, _P, _P],
        "fmstore_huff_scratch_bytes": [_I64, _I64, _I64],
        "fmstore_huff_max_bytes": [_I64, ctypes.c_int],
    },
}
#: Functions that return a size (int64) rather than a cudaError_t.
_SIZES = {"fmstore_huff_scratch_bytes", "fmstore_huff_max_bytes"}
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def find_nvcc() -> str:
    for cand in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if cand and os.path.isfile(cand):
            return cand
    raise KernelBuildError(
        "fmstore's GPU codec builds its CUDA kernels with nvcc on first use, and nvcc was not found "
        "(not on PATH, not in $CUDA_HOME/bin); install the CUDA toolkit or use the CPU codec"
    )


def nvcc_command(source: Path, output: Path, arch: str, *, shared: bool = True) -> list[str]:
    cmd = [
        find_nvcc(),
        "-O3",
        "-std=c++17",
        f"-arch={arch}",
        "-Xcompiler",
        "-fPIC",
        str(source),
        "-o",
        str(output),
    ]
    extra = os.environ.get("FMSTORE_NVCC_FLAGS", "").split()  # e.g. -lineinfo for a profiler
    return cmd[:1] + (["-shared"] if shared else ["-c"]) + extra + cmd[1:]


def _arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def load(name: str = "planes") -> ctypes.CDLL:
    """The compiled kernel library ``name``, building it first if needed."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        source = SOURCES[name]
        arch = _arch()
        # Every source counts: a library may #include another's kernels.
        text = b"".join(p.read_bytes() for p in sorted(HERE.glob("*.cu")))
        text += os.environ.get("FMSTORE_NVCC_FLAGS", "").encode()
        digest = hashlib.sha256(text + arch.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("FMSTORE_KERNEL_CACHE", Path.home() / ".cache" / "fmstore" / "kernels"))
        lib = cache / f"{name}-{arch}-{digest}.so"
        if not lib.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            proc = subprocess.run(nvcc_command(source, tmp, arch), capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelBuildError(
                    f"nvcc could not build {source.name} for {arch}:\n{proc.stderr[-4000:]}"
                )
            os.replace(tmp, lib)  # atomic: a concurrent builder never loads half a library
        handle = ctypes.CDLL(str(lib))
        for fn, argtypes in SIGNATURES[name].items():
            getattr(handle, fn).argtypes = argtypes
            getattr(handle, fn).restype = ctypes.c_int64 if fn in _SIZES else ctypes.c_int
        _loaded[name] = handle
        return handle
