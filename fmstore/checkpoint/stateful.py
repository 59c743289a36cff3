"""Stateful values in a checkpoint's state, and the RNG holder fmstore provides.

torch DCP's convention: a value with ``state_dict()`` and ``load_state_dict()`` (a module, an
optimizer, an LR scheduler, a data-loader wrapper, :class:`RNGState`) is saved through
``state_dict()`` and restored through ``load_state_dict()``, so a load fills a freshly built
optimizer instead of leaving it empty.  Modules, and optimizers whose parameters belong to a
module in the same state, go through ``torch.distributed.checkpoint.state_dict`` (as torchtitan
does): parameter names as keys (an optimizer's state keyed by parameter name, not index;
wrapper prefixes dropped), DTensors (FSDP2, tensor parallel) kept sharded, so a snapshot loads
across DDP, FSDP2 and plain models and onto another world size.  A Stateful with
``fmstore_per_rank = True`` (such as :class:`RNGState`) is saved once per rank and each rank
restores its own.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .sharding import is_dtensor
from .tree import MISSING, PerRank

__all__ = ["RNGState", "is_stateful", "init_optimizer_state"]


def is_stateful(value: Any) -> bool:
    """Whether ``value`` is saved through ``state_dict()`` and restored through ``load_state_dict()``."""
    if (
        isinstance(value, (torch.Tensor, dict, list, tuple, str, bytes, int, float, np.ndarray))
        or value is None
    ):
        return False
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


class RNGState:
    """The random number generators of this process: torch's (CPU, and each CUDA device where
    CUDA is available), numpy's global one and Python's ``random``.

    Put one in a checkpoint's state (``{"model": m, "optim": o, "rng": RNGState()}``): it is
    saved per rank, so every rank of a distributed job gets its own generators back.
    """

    fmstore_per_rank = True

    def __init__(
        self, *, torch_cpu: bool = True, cuda: bool = True, numpy: bool = True, python: bool = True
    ) -> None:
        self.torch_cpu, self.cuda, self.numpy, self.python = torch_cpu, cuda, numpy, python

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.torch_cpu:
            out["torch"] = torch.get_rng_state()
        if self.cuda and torch.cuda.is_available():
            # Whenever CUDA is there (initializing it if need be), so a save and a load agree on
            # the keys whether or not the program had touched the GPU yet.
            out["cuda"] = list(torch.cuda.get_rng_state_all())
        if self.numpy:
            kind, keys, pos, has_gauss, gauss = np.random.get_state()
            out["numpy"] = {
                "bit_generator": str(kind),
                "keys": np.asarray(keys, dtype=np.uint32).copy(),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(gauss),
            }
        if self.python:
            version, internal, gauss_next = random.getstate()
            out["python"] = {
                "version": int(version),
                "state": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss_next,
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "torch" in state:
            torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            for device, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), device)
        if "numpy" in state:
            n = state["numpy"]
            np.random.set_state(
                (
                    n["bit_generator"],
                    np.asarray(n["keys"], dtype=np.uint32),
                    n["pos"],
                    n["has_gauss"],
                    n["cached_gaussian"],
                )
            )
        if "python" in state:
            p = state["python"]
            random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))

    def __repr__(self) -> str:
        return "RNGState()"


def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create a fresh optimizer's state, which torch optimizers make lazily at their first step.

    As torch DCP does: one step with zero gradients at learning rate 0, which leaves the
    parameters as they are.  A load then has state tensors (on the parameters' devices) to fill
    in place and keys to check.  Does nothing if the optimizer has state, or gradients exist
    (a step would apply them).
    """
    if opt.state:
        return
    params = [p for group in opt.param_groups for p in group["params"]]
    if any(p.grad is not None for p in params):
        return
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    lrs = [group.get("lr") for group in opt.param_groups]
    for group in opt.param_groups:
        if "lr" in group:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
    try:
        opt.step()
    finally:
        for group, lr in zip(opt.param_groups, lrs):
            if lr is not None:
                group["lr"] = lr
        opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- walking the state


def _items(node: Any) -> list[tuple[Any, Any]] | None:
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    return None


def _find(state: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every Stateful in ``state`` (the root included)."""
    out: list[tuple[tuple[Any, ...], Any]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if is_stateful(node):
            out.append((path, node))
            return
        for k, v in _items(node) or ():
            walk(v, (*path, k))

    walk(state, ())
    return out


def _replace(state: Any, values: dict[tuple[Any, ...], Any], path: tuple[Any, ...] = ()) -> Any:
    """``state`` with the value at each path of ``values`` replaced (containers copied as needed)."""
    if path in values:
        return values[path]
    if not any(p[: len(path)] == path for p in values):
        return state
    if isinstance(state, dict):
        out = type(state)() if type(state) is not dict else {}
        if hasattr(state, "_metadata"):
            out._metadata = state._metadata  # type: ignore[attr-defined]
        for k, v in state.items():
            out[k] = _replace(v, values, (*path, k))
        return out
    if isinstance(state, (list, tuple)):
        seq = [_replace(v, values, (*path, i)) for i, v in enumerate(state)]
        return seq if isinstance(state, list) else tuple(seq)
    return state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


# torch DCP's getters check the whole model on every call (24 ms for a 20-layer GPT-2 on a slow
# core, per save); a snapshot every step cannot pay that.  Its naming of a module's state-dict
# keys (wrapper prefixes dropped) depends only on the module tree, so it is computed once per
# module and key set, and the state dicts are renamed with it, as DCP's getters do.
_NAMES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()
_OPT_NAMES: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[Any, tuple[int, ...], list[str]]] = (
    weakref.WeakKeyDictionary()
)


def _canonical(model: torch.nn.Module, keys: Any) -> dict[str, str] | None:
    """DCP's name for each state-dict key of ``model``, or None where DCP's own getters must run
    (FSDP1's flat parameters, a torch without the naming function)."""
    cached = _NAMES.get(model)
    if cached is not None and cached.keys() == set(keys):
        return cached
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - another torch: DCP's getters
        return None
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return None
    out = {}
    for k in keys:
        fqns = _get_fqns(model, k)
        if len(fqns) != 1:
            return None
        out[k] = next(iter(fqns))
    _NAMES[model] = out
    return out


def _model_state(model: torch.nn.Module) -> dict[str, Any]:
    """What DCP's ``get_model_state_dict`` gives (sharded DTensors stay sharded)."""
    sd = model.state_dict()
    names = _canonical(model, sd.keys())
    if names is None:
        from torch.distributed.checkpoint import state_dict as dsd

        return dsd.get_model_state_dict(model)
    return {names[k]: v for k, v in sd.items() if not (isinstance(v, torch.Tensor) and v.is_meta)}


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str] | None:
    """DCP's name of each of ``opt``'s parameters, in its order (None: DCP's getters)."""
    params = tuple(id(p) for group in opt.param_groups for p in group["params"])
    cached = _OPT_NAMES.get(opt)
    if cached is not None and cached[0]() is model and cached[1] == params:
        return cached[2]
    named = dict(model.named_parameters())
    names = _canonical(model, named.keys())
    if names is None:
        return None
    by_id = {id(p): names[k] for k, p in named.items()}
    if any(i not in by_id for i in params):
        return None
    out = [by_id[i] for i in params]
    _OPT_NAMES[opt] = (weakref.ref(model), params, out)
    return out


def _optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What DCP's ``get_optimizer_state_dict`` gives for an optimizer with state: its state
    dict with parameter names for indices."""
    names = _param_names(model, opt)
    if names is None:
        from torch.distributed.checkpoint import state_dict as dsd

        return dsd.get_optimizer_state_dict(model, opt)
    sd = opt.state_dict()
    return {
        "state": {names[i]: st for i, st in sd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


@dataclass
class Slot:
    """A Stateful found in a state: where, what, and how it is read and restored."""

    path: tuple[Any, ...]
    obj: Any
    model: torch.nn.Module | None = None  # a module, or an optimizer's module: through DCP's functions

    def state_dict(self, *, fresh_optimizer: bool = False) -> Any:
        """What is saved (or, for a load, the target to fill).  ``fresh_optimizer``: the state
        dict of an optimizer without state, creating none."""
        if fresh_optimizer and self.model is None:
            return self.obj.state_dict()
        if self.model is not None:
            if self.obj is self.model:
                return _model_state(self.model)
            if fresh_optimizer or not self.obj.state:
                # DCP's getter would create the state with a step (changing the optimizer).
                return _named_empty_state(self.model, self.obj)
            return _optimizer_state(self.model, self.obj)
        sd = self.obj.state_dict()
        return PerRank(sd) if getattr(self.obj, "fmstore_per_rank", False) else sd

    def load_state_dict(self, value: Any, strict: bool) -> None:
        if self.model is not None:
            from torch.distributed.checkpoint import state_dict as dsd

            options = dsd.StateDictOptions(strict=strict)
            if self.obj is self.model:
                dsd.set_model_state_dict(self.model, value, options=options)
            else:
                dsd.set_optimizer_state_dict(self.model, self.obj, value, options=options)
            return
        if isinstance(self.obj, torch.nn.Module):
            self.obj.load_state_dict(value, strict=strict)
        else:
            self.obj.load_state_dict(value)


def find_slots(state: Any) -> list[Slot]:
    """Every Stateful in ``state``.  Modules, and optimizers whose parameters all belong to a
    module of the state, go through torch DCP's state_dict functions: parameter names as keys
    (wrapper prefixes such as DDP's ``module.`` dropped), DTensors kept sharded, so a snapshot
    loads across DDP, FSDP2 and plain models and onto another world size."""
    slots = [Slot(path, obj) for path, obj in _find(state)]
    if not _dcp_available():
        return slots
    models = [s.obj for s in slots if isinstance(s.obj, torch.nn.Module)]
    for s in slots:
        if isinstance(s.obj, torch.nn.Module):
            s.model = s.obj
        elif isinstance(s.obj, torch.optim.Optimizer):
            ids = {id(p) for group in s.obj.param_groups for p in group["params"]}
            for m in models:
                if ids <= {id(p) for p in m.parameters()}:
                    s.model = m
                    break
    return slots


def _dcp_available() -> bool:
    import torch.distributed as dist

    return dist.is_available()


def _named_empty_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer without state, as DCP's getter names it (parameter names for indices)."""
    names = _param_names(model, opt)
    if names is None:  # FSDP1: matched by storage against DCP's model state dict
        from torch.distributed.checkpoint import state_dict as dsd

        by_pointer = {_local(t).data_ptr(): n for n, t in dsd.get_model_state_dict(model).items()}
        params = [p for group in opt.param_groups for p in group["params"]]
        names = [by_pointer.get(_local(p).data_ptr(), str(i)) for i, p in enumerate(params)]
    sd = opt.state_dict()
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {}, "param_groups": groups}


def guarded_tensors(slots: list[Slot]) -> set[int]:
    """Data pointers of the tensors in these Statefuls that only an optimizer step changes:
    modules' parameters and optimizers' state (a module's buffers may change in forward)."""
    out: set[int] = set()
    for s in slots:
        if isinstance(s.obj, torch.nn.Module):
            out.update(_local(p).data_ptr() for p in s.obj.parameters())
        elif isinstance(s.obj, torch.optim.Optimizer):
            for st in s.obj.state.values():
                out.update(_local(v).data_ptr() for v in st.values() if isinstance(v, torch.Tensor))
    return out


@dataclass
class Prepared:
    """A state made storable: Statefuls replaced by their state dicts."""

    state: Any
    slots: list[Slot] = field(default_factory=list)
    initialized: list[torch.optim.Optimizer] = field(default_factory=list)  # fresh state made by for_load


def for_save(state: Any) -> Prepared:
    """``state`` with every Stateful replaced by its state dict."""
    slots = find_slots(state)
    if not slots:
        return Prepared(state)
    return Prepared(_replace(state, {s.path: s.state_dict() for s in slots}), slots)


def for_load(state: Any, saved: Callable[[tuple[Any, ...]], Any]) -> Prepared:
    """The load target for ``state``: each Stateful's state dict.  ``saved(path)`` gives the
    snapshot's tree node at a path (None if absent).  A fresh optimizer for which the snapshot
    holds state first gets its state created, so the saved tensors are filled in place and its
    keys checked.  An optimizer saved as a plain ``state_dict()`` (parameter indices) is
    restored the same way."""
    slots = find_slots(state)
    if not slots:
        return Prepared(state)
    fresh = [s.obj for s in slots if isinstance(s.obj, torch.optim.Optimizer) and not s.obj.state]
    targets = {}
    for s in slots:
        if isinstance(s.obj, torch.optim.Optimizer):
            if s.model is not None and _saved_by_index(saved((*s.path, "param_groups"))):
                s.model = None
            if not s.obj.state:
                node = saved((*s.path, "state"))
                if node is None or not node.get("items"):
                    targets[s.path] = s.state_dict(fresh_optimizer=True)
                    continue
                init_optimizer_state(s.obj)
        targets[s.path] = s.state_dict()
    prepared = Prepared(_replace(state, targets), slots)
    prepared.initialized = [o for o in fresh if o.state]
    return prepared


def _saved_by_index(groups: Any) -> bool:
    """Whether a saved optimizer's param_groups name parameters by index (a plain state_dict)."""
    try:
        first = groups["items"][0]["items"]
        params = next(v for k, v in first if k == "params")
        return params["items"][0]["t"] == "value" and isinstance(params["items"][0]["v"], int)
    except (KeyError, IndexError, StopIteration, TypeError):
        return False


def undo_init(prepared: Prepared) -> None:
    """A load that failed leaves the optimizers it gave fresh state as fresh as they were (a
    caller who then starts from scratch must not train with a zero-step state)."""
    for opt in prepared.initialized:
        opt.state.clear()


def restore(restored: Any, slots: list[Slot], strict: bool, on_missing: Callable[[Slot], None]) -> Any:
    """Give each Stateful its part of ``restored`` (``load_state_dict``); returns ``restored``
    with the objects in their places.  ``on_missing(slot)`` is told of one the snapshot lacks."""
    values: dict[tuple[Any, ...], Any] = {}
    for s in slots:
        value = _get(restored, s.path)
        if value is MISSING:
            on_missing(s)
        else:
            s.load_state_dict(value, strict)
        values[s.path] = s.obj
    return _replace(restored, values) if slots else restored


def _get(state: Any, path: tuple[Any, ...]) -> Any:
    node = state
    for k in path:
        if isinstance(node, dict) and k in node:
            node = node[k]
        elif isinstance(node, (list, tuple)) and isinstance(k, int) and k < len(node):
            node = node[k]
        else:
            return MISSING
    return node
