"""OffloadedOptimizer: fp32 master weights and optimizer states in the tiered store, streamed
through the device in chunks at each step.

The parameters are packed into chunks of about ``chunk_bytes`` (fp32) per parameter group and
dtype.  Each chunk's master weights (when the parameters are not fp32 themselves) and its
optimizer states (for AdamW: ``exp_avg``, ``exp_avg_sq``) are flat blobs in a
:class:`~fmstore.TieredStore`: pinned host memory, spilling to a durable tier (local NVMe) when
the host tier is full.  A step runs the wrapped optimizer itself on each chunk's flat tensors on
the device, so the arithmetic is the wrapped optimizer's, element for element:

    load (store -> device, a side stream, ``prefetch`` chunks ahead)
      -> update (the wrapped optimizer on the flat chunk; masters cast back into the parameters)
      -> write back (device -> store, another side stream, ``prefetch`` chunks in flight)

so copies in both directions overlap the updates.  With ``overlap_backward=True`` a chunk is
updated as soon as its last gradient is accumulated (a post-accumulate-grad hook), so the
streaming hides under the rest of the backward pass; ``step()`` then finishes what is left.

``device_fraction`` keeps that fraction of the chunks (the first ones: in a backward pass their
gradients come last, so their update could not overlap anything) on the device for good.

Only element-wise optimizers can be chunked: a flat chunk must see the same update as its
parameters one by one (Adam-like optimizers, SGD, Adagrad, RMSprop...); others raise
:class:`~fmstore.errors.ConfigError` before any state is touched.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CapacityError, ConfigError
from ..store import TieredStore
from ..units import format_size, parse_size

__all__ = ["OffloadedOptimizer", "ELEMENTWISE"]

#: Optimizers whose update of a tensor is element-wise (a flat chunk gets the same update as
#: its parameters one by one); any other class needs ``elementwise=True`` from the caller.
ELEMENTWISE: tuple[type[torch.optim.Optimizer], ...] = tuple(
    getattr(torch.optim, n)
    for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SGD", "Adagrad", "RMSprop", "Adadelta")
    if hasattr(torch.optim, n)
)

_HYPER_SKIP = ("params",)


@dataclass(eq=False)
class _Chunk:
    index: int
    group: int
    params: list[torch.Tensor]
    offsets: list[int]
    numel: int
    dtype: torch.dtype
    flat: torch.nn.Parameter  # the wrapped optimizer's parameter; its data is swapped in per step
    names: list[str] = field(default_factory=list)  # the state tensors streamed (after a first step)
    resident: dict[str, torch.Tensor] | None = None  # kept on the device (partial offload)
    pending: int = 0  # overlap_backward: gradients still to come in this backward

    @property
    def master_offloaded(self) -> bool:
        return self.dtype != torch.float32


class OffloadedOptimizer(torch.optim.Optimizer):
    """Any element-wise torch optimizer (AdamW by default) whose fp32 master weights and states
    live in ``store``, streamed through ``device`` at each step.

    Use it as the wrapped optimizer: ``loss.backward(); opt.step(); opt.zero_grad()``; LR
    schedulers, ``torch.nn.utils.clip_grad_norm_`` (gradients stay ordinary device tensors) and
    ``state_dict()`` / ``load_state_dict()`` in the wrapped optimizer's format work as with it
    (low-precision parameters add a ``"master"`` entry per parameter: the fp32 master weights).
    ``state_dict()`` reads the states from the store's host tier, never through the device, so a
    :class:`~fmstore.Checkpointer` snapshots them from there.

    Parameters:
        params: the parameters (or parameter groups), leaves on ``device``.
        optimizer: the wrapped optimizer class; ``optimizer_kwargs`` go to it (``fused=True`` is
            the fast choice for AdamW on CUDA).
        store: where masters and states live; its tiers must be able to hold them.
        device: where updates run (``"cuda"``; ``"cpu"`` runs the same code without streams).
        chunk_bytes: fp32 bytes of parameters per chunk (the unit of streaming).
        prefetch: chunks loaded ahead of the update, and written back behind it, at most.
        device_fraction: the fraction of the chunks kept on the device (partial offload).
        overlap_backward: update each chunk during the backward pass as soon as its gradients
            are ready; then one backward per step, and no gradient clipping (the update does not
            wait for the global norm).
        elementwise: let another optimizer class through, when its update is element-wise.
        key_prefix: the store keys' prefix.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        store: TieredStore,
        device: str | torch.device,
        chunk_bytes: int | str = "64MiB",
        prefetch: int = 2,
        device_fraction: float = 0.0,
        overlap_backward: bool = False,
        elementwise: bool = False,
        key_prefix: str = "offload-optim",
        **optimizer_kwargs: Any,
    ) -> None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if not isinstance(store, TieredStore):
            raise ConfigError(f"store must be a fmstore.TieredStore, got {type(store).__name__}")
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer class, got {optimizer!r}")
        if not elementwise and not issubclass(optimizer, ELEMENTWISE):
            raise ConfigError(
                f"{optimizer.__name__} is not known to update element-wise, so its state cannot be "
                "chunked (pass elementwise=True if it is); supported: "
                + ", ".join(c.__name__ for c in ELEMENTWISE)
            )
        if not 0.0 <= device_fraction <= 1.0:
            raise ConfigError(f"device_fraction must be within [0, 1], got {device_fraction}")
        if prefetch < 1:
            raise ConfigError(f"prefetch must be at least 1, got {prefetch}")
        chunk = parse_size(chunk_bytes, what="chunk_bytes") or 0
        if chunk <= 0:
            raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes!r}")
        self._step_on_device, defaults = _probe(optimizer, optimizer_kwargs, dev)
        params = list(params)
        groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
        seen: set[int] = set()
        for gi, group in enumerate(groups):
            ps = group["params"]
            group["params"] = ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            for p in ps:
                name = f"parameter {len(seen)} (group {gi}, shape {tuple(p.shape)})"
                if not p.is_leaf:
                    raise ConfigError(f"{name} is not a leaf tensor: only leaves can be optimized")
                if p.device != dev:
                    raise ConfigError(f"{name} is on {p.device}, the optimizer's device is {dev}")
                if not p.is_floating_point():
                    raise ConfigError(f"{name} has dtype {p.dtype}: only floating-point parameters")
                if id(p) in seen:
                    raise ConfigError(f"{name} appears twice")
                seen.add(id(p))
        super().__init__(groups, defaults)
        self.store = store
        self.device = dev
        self.prefetch = prefetch
        self.overlap_backward = overlap_backward
        self.key_prefix = key_prefix.rstrip("/")
        self._chunks = self._plan(chunk)
        n_resident = round(device_fraction * len(self._chunks))
        self._check_room(n_resident)
        # The wrapped optimizer: one group per group here, holding one chunk's flat parameter
        # at a time (swapped in by _update), so its step touches exactly that chunk.
        self._inner = optimizer(
            [{"params": [torch.nn.Parameter(torch.zeros(1, device=dev))]} for _ in self.param_groups],
            **optimizer_kwargs,
        )
        self._index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._chunk_of: dict[int, _Chunk] = {}
        for c in self._chunks:
            for p in c.params:
                self._chunk_of[id(p)] = c
            if c.index < n_resident:
                c.resident = {}
        cuda = dev.type == "cuda"
        self._streams = (torch.cuda.Stream(dev), torch.cuda.Stream(dev)) if cuda else (None, None)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="fmstore-offload-load")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fmstore-offload-write")
        self._finalizer = weakref.finalize(self, _shutdown, self._loader, self._writer)
        self._loads: dict[int, Future[dict[str, torch.Tensor]]] = {}
        self._writes: deque[Future[None]] = deque()
        self._order: list[int] = []  # chunks in the order their updates ran, this step
        self._last_order: list[int] = [c.index for c in reversed(self._chunks)]  # and last step
        self._done: set[int] = set()  # chunks updated in this step (overlap_backward)
        self._lock = threading.Lock()
        self._warned_missing = False
        self._moved = [0, 0]  # bytes to and from the device
        self._hooks = []
        # Masters of low-precision parameters: made once, from the parameters.
        for c in self._chunks:
            if c.master_offloaded:
                self._put(c, {"master": self._gather(c, lambda p: p.detach())})
        if overlap_backward:
            for c in self._chunks:
                for p in c.params:
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))
            self._reset_pending()

    # ------------------------------------------------------------------ planning

    def _plan(self, chunk: int) -> list[_Chunk]:
        out: list[_Chunk] = []
        for gi, group in enumerate(self.param_groups):
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for p in group["params"]:
                by_dtype.setdefault(p.dtype, []).append(p)
            for dtype, params in by_dtype.items():
                cur: list[torch.Tensor] = []
                size = 0
                for p in params:
                    if cur and (size + p.numel()) * 4 > chunk:
                        out.append(self._chunk(len(out), gi, cur, dtype))
                        cur, size = [], 0
                    cur.append(p)
                    size += p.numel()
                if cur:
                    out.append(self._chunk(len(out), gi, cur, dtype))
        return out

    def _chunk(self, index: int, group: int, params: list[torch.Tensor], dtype: torch.dtype) -> _Chunk:
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += p.numel()
        flat = torch.nn.Parameter(torch.empty(0, device=self.device))
        return _Chunk(index, group, params, offsets, n, dtype, flat)

    def _check_room(self, n_resident: int) -> None:
        """A store that cannot hold the masters and states (AdamW: two per parameter) fails now."""
        need = 0
        for c in self._chunks[n_resident:]:
            need += c.numel * 4 * (2 + c.master_offloaded)
        caps = [t.capacity for t in self.store.tiers]
        if any(cap is None for cap in caps):
            return
        have = sum(cap or 0 for cap in caps)
        if need > have:
            raise CapacityError(
                f"the store's tiers ({', '.join(t.name for t in self.store.tiers)}) hold "
                f"{format_size(have)} in all; the offloaded masters and states need about "
                f"{format_size(need)} (add a durable tier to spill to, or raise device_fraction)"
            )

    # ------------------------------------------------------------------ moving chunks

    def _key(self, c: _Chunk, name: str) -> str:
        return f"{self.key_prefix}/{c.index:06d}/{name}"

    def _stored_names(self, c: _Chunk) -> list[str]:
        return (["master"] if c.master_offloaded else []) + c.names

    def _load(self, c: _Chunk) -> dict[str, torch.Tensor]:
        if c.resident is not None:
            return c.resident
        stream = self._streams[0]
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            out = {n: self.store.get(self._key(c, n), device=self.device) for n in self._stored_names(c)}
        self._moved[0] += sum(t.nbytes for t in out.values())
        return out

    def _put(self, c: _Chunk, tensors: dict[str, torch.Tensor]) -> None:
        if c.resident is not None:
            c.resident = {n: t.to(self.device) for n, t in tensors.items()}
            return
        stream = self._streams[1]
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for n, t in tensors.items():
                self.store.put(self._key(c, n), t)
        self._moved[1] += sum(t.nbytes for t in tensors.values())

    def _write(self, c: _Chunk, tensors: dict[str, torch.Tensor], ready: torch.cuda.Event | None) -> None:
        if ready is not None:
            ready.synchronize()  # the update that made them is done
        self._put(c, tensors)

    def _prefetch(self, c: _Chunk) -> None:
        if c.resident is None and c.index not in self._loads:
            self._loads[c.index] = self._loader.submit(self._load, c)

    def _fetch(self, c: _Chunk) -> dict[str, torch.Tensor]:
        fut = self._loads.pop(c.index, None)
        tensors = fut.result() if fut is not None else self._load(c)
        if self._streams[0] is not None and c.resident is None:
            for t in tensors.values():  # made on the load stream, used on this one
                t.record_stream(torch.cuda.current_stream(self.device))
        return tensors

    def _drain_writes(self, keep: int = 0) -> None:
        while len(self._writes) > keep:
            self._writes.popleft().result()

    # ------------------------------------------------------------------ the update

    def _gather(self, c: _Chunk, get: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor:
        flat = torch.empty(c.numel, dtype=torch.float32, device=self.device)
        for p, off in zip(c.params, c.offsets):
            t = get(p)
            view = flat[off : off + p.numel()]
            if t is None:
                view.zero_()
            else:
                view.copy_(t.reshape(-1))
        return flat

    def _update(self, c: _Chunk) -> None:
        """Run the wrapped optimizer on chunk ``c`` and queue its write-back."""
        tensors = self._fetch(c)
        if not self._warned_missing and any(p.requires_grad and p.grad is None for p in c.params):
            self._warned_missing = True
            warnings.warn(
                "some parameters have no gradient at this step while others in their chunk do; "
                "they are updated with a zero gradient (their optimizer states still decay)",
                stacklevel=3,
            )
        master = tensors.pop("master") if c.master_offloaded else self._gather(c, lambda p: p.detach())
        grad = self._gather(c, lambda p: p.grad)
        flat = c.flat
        flat.data = master
        flat.grad = grad
        state = self._inner.state[flat]
        state.update(tensors)
        inner_group = self._inner.param_groups[c.group]
        for k, v in self.param_groups[c.group].items():
            if k not in _HYPER_SKIP:
                inner_group[k] = v
        inner_group["params"] = [flat]
        self._inner.step()
        if not c.names:
            c.names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == master.shape]
        out = {n: state.pop(n) for n in c.names}
        for p, off in zip(c.params, c.offsets):
            p.data.copy_(master[off : off + p.numel()].view_as(p))
        if c.master_offloaded:
            out["master"] = master
        flat.data = torch.empty(0, device=self.device)
        flat.grad = None
        # A non-empty state says "has stepped" to torch DCP and to the Checkpointer.
        for p in c.params:
            self.state[p] = {"step": state.get("step")}
        if c.resident is not None:
            c.resident = out
            return
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self._drain_writes(keep=self.prefetch - 1)
        self._writes.append(self._writer.submit(self._write, c, out, ready))

    def _run(self, chunks: list[_Chunk]) -> None:
        """Update ``chunks`` in order, loading ``prefetch`` chunks ahead of the update."""
        queue = [c for c in chunks if c.resident is None]
        for c in queue[: self.prefetch]:
            self._prefetch(c)
        nxt = self.prefetch
        for c in chunks:
            self._update(c)
            self._order.append(c.index)
            if c.resident is None and nxt < len(queue):
                self._prefetch(queue[nxt])
                nxt += 1

    # ------------------------------------------------------------------ overlap with backward

    def _reset_pending(self) -> None:
        for c in self._chunks:
            c.pending = sum(1 for p in c.params if p.requires_grad)
        self._done.clear()
        for i in self._last_order[: self.prefetch]:
            self._prefetch(self._chunks[i])

    def _grad_ready(self, p: torch.Tensor) -> None:
        c = self._chunk_of[id(p)]
        with self._lock:
            c.pending -= 1
            if c.pending > 0:
                return
            if c.index in self._done:
                raise ConfigError(
                    "overlap_backward=True updates during the backward pass: call step() after "
                    "every backward (gradient accumulation needs overlap_backward=False)"
                )
            self._done.add(c.index)
            pos = len(self._order)
            self._order.append(c.index)
            self._update(c)
            # The chunks whose gradients came next last time: load them now.
            for i in self._last_order[pos + 1 : pos + 1 + self.prefetch]:
                if i not in self._done:
                    self._prefetch(self._chunks[i])

    # ------------------------------------------------------------------ torch.optim API

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.overlap_backward:
            # What the backward pass did not finish (chunks without all their gradients).
            self._run([c for c in self._chunks if c.index not in self._done and _has_grad(c)])
        else:
            self._run([c for c in self._chunks if _has_grad(c)])
        self._drain_writes()
        self._last_order, self._order = self._order, []
        if self.overlap_backward:
            self._reset_pending()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (parameter indices as keys), read from the store's
        host tier; low-precision parameters add ``"master"`` (fp32)."""
        self._drain_writes()
        state: dict[int, dict[str, Any]] = {}
        for c in self._chunks:
            step = self._inner.state[c.flat].get("step")
            if step is None and not c.names:
                continue  # never stepped: no state, nothing to read
            if c.resident is not None:
                host = {n: t.detach().cpu() for n, t in c.resident.items()}
            else:
                host = {n: self.store.get(self._key(c, n), promote=False) for n in self._stored_names(c)}
            for p, off in zip(c.params, c.offsets):
                st: dict[str, Any] = {}
                if step is not None:
                    st["step"] = step.detach().cpu().clone() if isinstance(step, torch.Tensor) else step
                for n in [*c.names, "master"] if c.master_offloaded else c.names:
                    st[n] = host[n][off : off + p.numel()].view(p.shape)
                state[self._index[id(p)]] = st
        groups = []
        for g in self.param_groups:
            groups.append(
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": [self._index[id(p)] for p in g["params"]],
                }
            )
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the wrapped optimizer's state dict (or this one's): states into the store."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ConfigError(
                f"the state dict has {len(groups) if isinstance(groups, list) else 'no'} parameter groups, "
                f"this optimizer {len(self.param_groups)}"
            )
        for i, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(mine["params"]) != len(theirs.get("params", ())):
                raise ConfigError(
                    f"parameter group {i}: the state dict has {len(theirs.get('params', ()))} parameters, "
                    f"this optimizer {len(mine['params'])}"
                )
        ids = [i for g in groups for i in g["params"]]
        saved = {ids[self._index[id(p)]]: p for g in self.param_groups for p in g["params"]}
        by_param = {id(p): state_dict["state"].get(i) for i, p in saved.items()}
        self._drain_writes()
        for c in self._chunks:
            sts = [by_param.get(id(p)) for p in c.params]
            have = [st for st in sts if st]
            if not have:
                continue
            p0, st0 = next((p, st) for p, st in zip(c.params, sts) if st)
            names = [
                k
                for k, v in st0.items()
                if k not in ("step", "master") and isinstance(v, torch.Tensor) and v.numel() == p0.numel()
            ]
            tensors = {}
            for n in names:
                tensors[n] = self._gather(c, lambda p, n=n: (by_param.get(id(p)) or {}).get(n))
            if c.master_offloaded:
                tensors["master"] = self._gather(
                    c, lambda p: (by_param.get(id(p)) or {}).get("master", p.detach())
                )
            c.names = names
            step = st0.get("step")
            if step is not None:
                on = self.device if self._step_on_device else torch.device("cpu")
                self._inner.state[c.flat]["step"] = torch.as_tensor(step, dtype=torch.float32).to(on).clone()
            self._put(c, tensors)
            for p in c.params:
                self.state[p] = {"step": self._inner.state[c.flat].get("step")}
        for mine, theirs in zip(self.param_groups, groups):
            for k, v in theirs.items():
                if k != "params":
                    mine[k] = v

    def stats(self) -> dict[str, Any]:
        """Chunks, where they are, and bytes moved to and from the device so far."""
        return {
            "chunks": len(self._chunks),
            "resident_chunks": sum(c.resident is not None for c in self._chunks),
            "bytes_to_device": self._moved[0],
            "bytes_from_device": self._moved[1],
        }

    def close(self) -> None:
        """Finish the write-backs in flight and stop the copy threads (the store keeps the states)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        try:
            self._drain_writes()
        finally:
            self._finalizer()

    def __repr__(self) -> str:
        return (
            f"OffloadedOptimizer({type(self._inner).__name__}, {len(self._chunks)} chunks, "
            f"device={self.device}, store tiers {[t.name for t in self.store.tiers]})"
        )


def _has_grad(c: _Chunk) -> bool:
    return any(p.grad is not None for p in c.params)


def _shutdown(*pools: ThreadPoolExecutor) -> None:
    for pool in pools:
        pool.shutdown(wait=True)


def _probe(
    optimizer: type[torch.optim.Optimizer], kwargs: dict[str, Any], device: torch.device
) -> tuple[bool, dict[str, Any]]:
    """Step ``optimizer`` once on a tiny parameter: it must keep element-wise state tensors (and
    scalars) only.  Returns whether its step counter lives on the device (fused, capturable),
    and its defaults."""
    p = torch.nn.Parameter(torch.zeros(4, device=device))
    p.grad = torch.ones(4, device=device)
    try:
        opt = optimizer([p], **kwargs)
        opt.step()
    except Exception as e:  # noqa: BLE001 - any failure here is a configuration the caller gave
        raise ConfigError(f"{optimizer.__name__}({kwargs}) cannot step on {device}: {e}") from e
    on_device = False
    for k, v in opt.state[p].items():
        if not isinstance(v, torch.Tensor):
            continue
        if v.shape == p.shape:
            continue
        if v.dim() == 0:
            on_device = on_device or (k == "step" and v.device == device)
            continue
        raise ConfigError(
            f"{optimizer.__name__} keeps state {k!r} of shape {tuple(v.shape)} for a parameter of shape "
            f"{tuple(p.shape)}: not element-wise, so it cannot be offloaded in chunks"
        )
    return on_device, dict(opt.defaults)
