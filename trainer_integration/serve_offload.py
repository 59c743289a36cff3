"""Where ``fmstore serve`` keeps a model's weights: all on the device, or (``--gpu-budget``)
offloaded when they exceed the budget.

:func:`place` moves a loaded model to its device when its parameters fit the budget (or no
budget is given); otherwise it keeps them in a :class:`~fmstore.TieredStore` of host memory
(:func:`fmstore.offload.offload_parameters`): each unit's weights come to the device for its
forward only, ``prefetch=2`` units ahead, at most ``budget`` bytes at once.  Inference only: the
engine decodes under ``torch.no_grad()``.  The handle is removed (:func:`release`) once the
weights are swapped out, its store closed.  Tied weights (one parameter in two modules) cannot be
offloaded: :func:`~fmstore.offload.offload_parameters` refuses them with a ConfigError.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmstore import ConfigError, HostTier, TieredStore, parse_size
from fmstore.offload import OffloadedParameters, offload_parameters

__all__ = ["default_device", "parse_budget", "param_bytes", "place", "release", "offload_info"]

#: Units fetched ahead of the one running.
PREFETCH = 2


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_budget(budget: int | str | None) -> int | None:
    """``--gpu-budget`` in bytes (``"2GiB"``, ``"500MB"``, an int), or None."""
    if budget is None or budget == "":
        return None
    n = parse_size(budget, what="--gpu-budget")
    if n is None or n <= 0:
        raise ConfigError(f"--gpu-budget must be a positive size, got {budget!r}")
    return int(n)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def place(model: nn.Module, device: torch.device, budget: int | None) -> OffloadedParameters | None:
    """Put ``model`` (loaded, on the host) on ``device``: whole when it fits ``budget`` (or no
    budget is given), else offloaded; returns the offload handle, or None."""
    if budget is None or param_bytes(model) <= budget:
        model.to(device)
        return None
    return offload_parameters(
        model, store=TieredStore([HostTier()]), device=device, budget=budget, prefetch=PREFETCH
    )


def release(handle: OffloadedParameters | None) -> None:
    """Undo an offload whose model serves no more: hooks removed, the store's blobs dropped."""
    if handle is None:
        return
    handle.remove()
    handle.store.close()


def offload_info(handle: OffloadedParameters | None, model: nn.Module) -> dict[str, Any] | None:
    """What ``/health`` and ``/v1/models`` report of an offload (None: the weights are all on the
    device)."""
    if handle is None:
        return None
    stats = handle.stats()
    return {
        "budget": stats["budget"],
        "peak_resident_bytes": stats["peak_resident_bytes"],
        "resident_bytes": stats["resident_bytes"],
        "model_bytes": param_bytes(model),
        "units": stats["units"],
        "fetches": stats["fetches"],
        "prefetch_hits": stats["prefetch_hits"],
        "device": str(handle.device),
    }
