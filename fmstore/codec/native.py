"""The compiled CPU helper of the FMHS chain (``fmhs_cpu.c``): built with the system's C
compiler on first use into the kernel cache (``$FMSTORE_KERNEL_CACHE``, default
``~/.cache/fmstore/kernels``) and loaded with ctypes.  Optional: where no compiler is found,
or the build fails, :func:`load` returns None and the numpy code in ``huffman.py`` (the
reference) decodes instead."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "fmhs_cpu.c"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def load() -> ctypes.CDLL | None:
    """The helper library, or None where it cannot be built (``FMSTORE_NO_NATIVE=1`` also
    says no: tests use it to run the numpy path)."""
    global _lib, _tried
    if os.environ.get("FMSTORE_NO_NATIVE"):
        return None
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            return None
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
        cache = Path(os.environ.get("FMSTORE_KERNEL_CACHE", Path.home() / ".cache" / "fmstore" / "kernels"))
        lib = cache / f"fmhs_cpu-{digest}.so"
        try:
            if not lib.exists():
                cache.mkdir(parents=True, exist_ok=True)
                tmp = lib.with_suffix(f".{os.getpid()}.tmp")
                cmd = [cc, "-O3", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)]
                if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
                    return None
                os.replace(tmp, lib)
            handle = ctypes.CDLL(str(lib))
        except (OSError, subprocess.SubprocessError):
            return None
        fn = handle.fmhs_decode_huff
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _lib = handle
        return _lib
