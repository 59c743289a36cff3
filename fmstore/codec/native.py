"""The compiled CPU decoder of the FMHS chain: the extension module ``fmstore.codec._fmhs``,
built from ``fmhs_cpu.c`` by setuptools when fmstore is installed (``setup.py``;
``pip install -e .`` builds it in place).  Optional: where the install had no C compiler the
extension is missing, :func:`load` warns once (naming why) and returns None, and the numpy
code in ``huffman.py`` (the reference) decodes instead.  ``FMSTORE_NO_NATIVE=1`` also says
no, without a warning: tests use it to run the numpy path."""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType

#: The version of fmhs_cpu.c's interface this file speaks (its ``ABI``): an editable install
#: whose .so predates a change of the C source is refused rather than misread.
ABI = 1
_lock = threading.Lock()
_mod: ModuleType | None = None
_tried = False


def load() -> ModuleType | None:
    """The extension module, or None where it is not built (or ``FMSTORE_NO_NATIVE`` is set)."""
    global _mod, _tried
    if os.environ.get("FMSTORE_NO_NATIVE"):
        return None
    if _tried:
        return _mod
    with _lock:
        if not _tried:
            _mod, why = _import()
            _tried = True
            if why:
                warnings.warn(
                    f"fmstore: {why}; FMHS streams decode with the numpy reference instead, "
                    "tens of times slower (reinstall fmstore where a C compiler is found to build it)",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _mod


def _import() -> tuple[ModuleType | None, str]:
    """(the module, "") or (None, why it cannot be used)."""
    from . import huffman

    try:
        _fmhs = importlib.import_module(f"{__package__}._fmhs")
    except ImportError as e:
        return None, f"the compiled FMHS decoder fmstore.codec._fmhs is not built ({e})"
    got = (_fmhs.ABI, _fmhs.CHUNK, _fmhs.SUB, _fmhs.MAX_LEN)
    want = (ABI, huffman.CHUNK, huffman.SUB, huffman.MAX_LEN)
    if got != want:
        return None, (
            f"the compiled FMHS decoder {_fmhs.__file__} was built from another version of "
            f"fmhs_cpu.c (ABI, CHUNK, SUB, MAX_LEN {got}, {want} expected)"
        )
    return _fmhs, ""
