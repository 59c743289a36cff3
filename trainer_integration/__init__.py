"""fmstore's drop-ins for trainers, installed as ``fmstore.integrations``: a Lightning
CheckpointIO and callback (``lightning``), a Hugging Face TrainerCallback (``hf``), a
plain-loop helper (``loop``) and a torch DCP storage writer and reader (``dcp``).

Each uses fmstore's public API; the trainers' libraries are optional extras, imported only by
the module that needs them (:func:`require` names the extra when one is missing).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, *, by: str) -> ModuleType:
    """Import ``module`` for the integration ``by``; if it is not installed, raise
    :class:`ModuleNotFoundError` saying which of fmstore's extras brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise  # something the library itself needs: its own message is the right one
        raise ModuleNotFoundError(
            f"{by} needs {top!r}, which is not installed: pip install \"fmstore[{extra}]\"", name=top
        ) from e
