"""Optimizer-state and parameter offload through the tiered store: models larger than the GPU.

- :class:`OffloadedOptimizer`: fp32 master weights and optimizer states live in a
  :class:`~fmstore.TieredStore` (pinned host memory, spilling to local disk); each step streams
  them through the device in chunks, double-buffered, and writes them back.
- :func:`offload_parameters`: a model's parameters live in the store; each module's weights come
  to the device just before its forward (and backward), prefetched, and are released after use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .optimizer import OffloadedOptimizer
    from .parameters import OffloadedParameters, offload_parameters

__all__ = ["OffloadedOptimizer", "offload_parameters", "OffloadedParameters"]

_WHERE = {
    "OffloadedOptimizer": ".optimizer",
    "offload_parameters": ".parameters",
    "OffloadedParameters": ".parameters",
}


def __getattr__(name: str) -> Any:  # imported when first used: torch-heavy, optional
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name], __name__), name)
