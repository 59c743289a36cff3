"""The pieces of parameter offload (:mod:`fmstore.offload.parameters`): a unit's parameters and
their place in its flat blobs, the tokens saved weights are packed into for the backward pass,
and the autograd function that sends a weight's gradient back to the host."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .parameters import OffloadedParameters


@dataclass
class ParamSlot:
    """Where one parameter lives in its unit's flat blob."""

    name: str
    param: nn.Parameter
    dtype: torch.dtype
    offset: int
    numel: int
    shape: torch.Size


@dataclass
class Unit:
    index: int
    name: str
    module: nn.Module
    slots: list[ParamSlot]
    keys: dict[torch.dtype, str]  # one blob per dtype
    numels: dict[torch.dtype, int]
    nbytes: int
    # (data_ptr, version) of every parameter when last written to the store: a change means an
    # update the store has not seen (optimizer step, new .data).
    stamps: list[tuple[int, int]] = field(default_factory=list)
    version: int = 0  # bumped on each write-back; device copies of older versions are stale
    active: int = 0  # forwards of this unit in progress (nested or recursive calls)
    unpacks_due: int = 0  # saved-weight tokens alive and not yet unpacked by a backward


@dataclass
class Resident:
    flats: dict[torch.dtype, torch.Tensor]
    version: int


@dataclass
class Pending:
    future: Future[tuple[dict[torch.dtype, torch.Tensor], Any]]
    version: int


class Token:
    """What a saved weight is packed into: the unit and the view's geometry, a few bytes."""

    __slots__ = ("owner", "unit", "version", "dtype", "offset", "size", "stride", "unpacked", "__weakref__")

    def __init__(self, owner: OffloadedParameters, unit: Unit, dtype: torch.dtype, t: torch.Tensor) -> None:
        self.owner = owner
        self.unit = unit.index
        self.version = unit.version
        self.dtype = dtype
        self.offset = t.storage_offset()
        self.size = tuple(t.shape)
        self.stride = t.stride()
        self.unpacked = False

    def __del__(self) -> None:
        # A graph freed without a backward: its weights are no longer due, so the backward
        # prefetch must not wait for them.
        if not self.unpacked:
            try:
                self.owner._token_dropped(self.unit)
            except Exception:  # noqa: BLE001 - interpreter shutdown; nothing left to count
                pass


class Fetch(torch.autograd.Function):
    """Identity from the host parameter to its device copy, for autograd: the backward sends
    the gradient to the host, where AccumulateGrad adds it to ``param.grad``."""

    @staticmethod
    def forward(ctx: Any, param: torch.Tensor, view: Callable[[], torch.Tensor]) -> torch.Tensor:
        # ``view`` is a callable, not a tensor argument: a tensor input returned (or viewed)
        # would make autograd treat the output as a view of it.
        return view()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to("cpu"), None


def stamp(p: torch.Tensor) -> tuple[int, int]:
    return (p.data_ptr(), p._version)


def flatten(slots: list[ParamSlot]) -> dict[torch.dtype, torch.Tensor]:
    """The unit's parameters as one flat host tensor per dtype."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for s in slots:
        groups.setdefault(s.dtype, []).append(s.param.detach().to("cpu").reshape(-1))
    return {dt: torch.cat(ts) if len(ts) > 1 else ts[0].clone() for dt, ts in groups.items()}


def bind(fn: Callable[..., Any], index: int) -> Callable[..., Any]:
    def hook(*args: Any) -> Any:
        return fn(index, *args)

    return hook
