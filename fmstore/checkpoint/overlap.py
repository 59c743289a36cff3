"""Let a save's device-to-host copy run under the next forward and backward pass.

``save(..., block=False)`` returns while parameters and optimizer state are still being copied.
Only an optimizer step changes them, so every optimizer's step waits here, through one global
step pre-hook, until the copies have landed.  When the step takes a closure (Lightning runs
forward and backward inside ``optimizer.step(closure)``), the hook wraps the closure and waits
after it, just before the parameters are updated.

The same hook notes the optimizers it sees, so a save knows which tensors only an optimizer step
changes even when it is handed plain state dicts (as Lightning's CheckpointIO is): the
parameters and state of every optimizer that has stepped.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_lock = threading.Lock()
_installed = False
_seen: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_pending: list[Callable[[], None]] = []  # waits to run before the next parameter update


def install() -> None:
    """Register the global optimizer step pre-hook (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        register_optimizer_step_pre_hook(_before_step)
        _installed = True


def watch_optimizer_steps() -> None:
    """Let non-blocking saves overlap training, from any optimizer step on: each step waits for
    the device-to-host copies of the saves before it, and the optimizers seen stepping are noted,
    so that a save handed plain state dicts (Lightning's CheckpointIO, the Hugging Face callback)
    knows which tensors only a step changes.  Once per process, however often called; a
    :class:`~fmstore.checkpoint.Checkpointer` calls it when made, an integration when it is made
    (before the first step, which a checkpointer made later would miss)."""
    install()


def defer_until_staged(wait: Callable[[], None]) -> None:
    """Run ``wait`` before the next optimizer step updates parameters (then forget it)."""
    with _lock:
        _pending.append(wait)


def drain() -> None:
    """Run every pending wait now."""
    with _lock:
        waits = list(_pending)
        _pending.clear()
    for w in waits:
        w()


def guarded_pointers() -> set[int]:
    """Data pointers of the parameters and state tensors of the optimizers seen stepping."""
    from .sharding import is_dtensor

    out: set[int] = set()
    for opt in list(_seen):
        for group in opt.param_groups:
            for p in group["params"]:
                out.add((p.to_local() if is_dtensor(p) else p).data_ptr())
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    out.add((v.to_local() if is_dtensor(v) else v).data_ptr())
    return out


def _before_step(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    _seen.add(opt)
    if not _pending:
        return None
    if "closure" in kwargs and kwargs["closure"] is not None:
        kwargs = {**kwargs, "closure": _after(kwargs["closure"])}
        return args, kwargs
    if args and callable(args[0]):
        return (_after(args[0]), *args[1:]), kwargs
    drain()
    return None


def _after(closure: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        out = closure()  # forward and backward: the copies overlap them
        drain()
        return out

    return run
