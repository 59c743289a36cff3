"""Parameter offload: a model's weights live in a :class:`~fmstore.TieredStore`, not on the device.

:func:`offload_parameters` splits a model into *units* (the smallest submodules that own
parameters directly) and keeps every unit's weights in the store (pinned host memory, spilling
to local disk).  A unit's weights come to the device just before its forward, the next
``prefetch`` units (in the execution order recorded on the first forward) are fetched ahead on a
background thread, and the device copy is released after the unit's forward.  At most ``budget``
bytes of unit weights are on the device at once.

Training works too: weights saved for the backward are packed into small tokens
(:func:`torch.autograd.graph.saved_tensors_hooks`) and fetched back, prefetched in reverse
order, when the backward needs them.  Gradients go to the host as they are produced: each
parameter stays an ordinary leaf whose ``.data`` is a host (CPU) tensor, the master copy, and
its ``.grad`` is a host tensor accumulated by autograd across backward passes, so a plain
``torch.optim.AdamW(model.parameters())`` steps on the host.

Write-back is automatic: before a unit is fetched (or prefetched), parameters updated in place
since they were stored (an optimizer step bumps their version counter) or given new ``.data``
are written to the store again.  :meth:`OffloadedParameters.sync` does it for every unit at once
(for anyone else reading the store: a checkpoint); changes that autograd cannot see (in place
through ``param.data``) need :meth:`OffloadedParameters.sync_all`.

Limitations: a parameter shared by several modules (weight tying) is rejected; a module that
reads a child's parameters without calling the child (``nn.MultiheadAttention`` reads
``out_proj.weight``) sees the host copy, which works on ``device="cpu"`` only.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import CapacityError, ConfigError, InvalidKeyError
from ..keys import check_key
from ..units import format_size, parse_size
from .units import Fetch, ParamSlot, Pending, Resident, Token, Unit, bind, flatten, stamp

__all__ = ["offload_parameters", "OffloadedParameters"]

# Every module of every model offloaded now (a module in two offloaded models would be fetched
# by two handles with two budgets).  Weak both ways: the handle refers to the model, so a strong
# value would keep a dropped model alive forever.
_OFFLOADED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[OffloadedParameters]] = (
    weakref.WeakKeyDictionary()
)


class OffloadedParameters:
    """The handle :func:`offload_parameters` returns: statistics, :meth:`sync`, :meth:`remove`."""

    def __init__(
        self,
        model: nn.Module,
        units: list[Unit],
        *,
        store: Any,
        device: torch.device,
        budget: int,
        prefetch: int,
    ) -> None:
        self.model = model
        self.store = store
        self.device = device
        self.budget = budget
        self.prefetch = prefetch
        self._units = units
        self._order: list[int] = [u.index for u in units]  # module order until a forward is seen
        self._pos: dict[int, int] = {u: i for i, u in enumerate(self._order)}
        self._recording: list[int] | None = None
        self._recorded = False
        # RLock: a token's finalizer may run (garbage collection) while this thread holds it.
        self._lock = threading.RLock()
        self._resident: dict[int, Resident] = {}
        self._pending: dict[int, Pending] = {}
        self._resident_bytes = 0
        self._pending_bytes = 0
        self._peak = 0
        self._fetches = 0
        self._prefetches = 0
        self._hits = 0
        self._writebacks = 0
        # storage pointer of a resident flat buffer -> (unit, dtype), to recognise saved weights
        self._ptrs: dict[int, tuple[int, torch.dtype]] = {}
        # (unit, saved_tensors_hooks context) entered by unit pre-hooks, innermost last
        self._hook_ctx: list[tuple[int, Any]] = []
        self._handles: list[RemovableHandle] = []
        self._removed = False
        self._cuda = device.type == "cuda"
        # One worker: prefetches are consumed in order, and one copy at a time keeps the PCIe
        # link (and the budget) simple to reason about.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmstore-param-prefetch")
        self._side_stream = torch.cuda.Stream(device=device) if self._cuda else None

    # ------------------------------------------------------------------ public API

    def stats(self) -> dict[str, int]:
        """``peak_resident_bytes`` (unit weights on the device at once, prefetched ones
        included), ``resident_bytes`` now, ``units``, ``fetches`` (loads from the store),
        ``prefetches`` (of them, started ahead), ``prefetch_hits`` (prefetched loads used),
        ``writebacks`` (units written to the store again after an update), ``budget``."""
        with self._lock:
            return {
                "peak_resident_bytes": self._peak,
                "resident_bytes": self._resident_bytes + self._pending_bytes,
                "units": len(self._units),
                "fetches": self._fetches,
                "prefetches": self._prefetches,
                "prefetch_hits": self._hits,
                "writebacks": self._writebacks,
                "budget": self.budget,
            }

    def reset_peak(self) -> None:
        """Start ``peak_resident_bytes`` again from what is on the device now."""
        with self._lock:
            self._peak = self._resident_bytes + self._pending_bytes

    def sync(self) -> int:
        """Write every unit whose parameters changed to the store; returns how many were.

        Fetches do this on their own, so it is needed only to make the store current for
        another reader (a checkpoint).  Updates autograd cannot see (in place through
        ``param.data``) are not detected: call :meth:`sync_all` after those.
        """
        with self._lock:
            return sum(self._sync_unit(u) for u in self._units)

    def sync_all(self) -> None:
        """Write every unit to the store, changed or not (after in-place ``.data`` updates)."""
        with self._lock:
            for u in self._units:
                self._write(u)

    def remove(self) -> None:
        """Undo the offload: hooks removed, the store's blobs deleted, device copies released.

        The parameters stay ordinary leaf tensors on the host (CPU), current (they always are:
        they are the master copy), gradients included; call ``model.to(device)`` to move them
        back.  Buffers stay on the device.  Idempotent.  Call it after the last backward: a
        graph still waiting for one cannot fetch its weights any more.
        """
        with self._lock:
            if self._removed:
                return
            self._removed = True
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._drop_all()
            self._worker.shutdown(wait=True)
            for u in self._units:
                for slot in u.slots:  # in case remove() is called from inside a forward
                    u.module._parameters[slot.name] = slot.param
                for key in u.keys.values():
                    if key in self.store:
                        self.store.delete(key)
            for m in self.model.modules():
                ref = _OFFLOADED.get(m)
                if ref is not None and ref() is self:
                    del _OFFLOADED[m]

    def __enter__(self) -> OffloadedParameters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ hooks

    def _root_pre(self, module: nn.Module, args: Any) -> None:
        if not self._recorded and self._recording is None:
            self._recording = []

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        with self._lock:
            if self._recording is not None:
                seen = set(self._recording)
                self._order = self._recording + [u.index for u in self._units if u.index not in seen]
                self._pos = {u: i for i, u in enumerate(self._order)}
                self._recording = None
                self._recorded = True
            if torch.is_grad_enabled():
                # The backward starts with the last units: fetch them while the loss is computed.
                self._prefetch_backward(len(self._order))

    def _unit_pre(self, index: int, module: nn.Module, args: Any) -> None:
        unit = self._units[index]
        with self._lock:
            if self._recording is not None and index not in self._recording:
                self._recording.append(index)
            flats = self._acquire(unit)
            unit.active += 1
            for slot in unit.slots:
                flat = flats[slot.dtype]
                view = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
                module._parameters[slot.name] = Fetch.apply(slot.param, lambda v=view: v)
            # Entered per unit (not per model) so a unit called on its own still packs its
            # weights; contexts nest, and the post-hook (always called) leaves them in order.
            ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            ctx.__enter__()
            self._hook_ctx.append((index, ctx))
            pos = self._pos[index]
            for nxt in self._order[pos + 1 : pos + 1 + self.prefetch]:
                if not self._schedule(self._units[nxt]):
                    break

    def _unit_post(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        unit = self._units[index]
        with self._lock:
            for slot in unit.slots:
                module._parameters[slot.name] = slot.param
            # The post-hook also runs when the pre-hook failed (always_call): then it entered
            # nothing and counted nothing.
            if not self._hook_ctx or self._hook_ctx[-1][0] != index:
                return
            self._hook_ctx.pop()[1].__exit__(None, None, None)
            unit.active = max(0, unit.active - 1)
            if unit.active == 0:
                self._release(unit.index)

    def _pack(self, t: torch.Tensor) -> Any:
        if t.device != self.device or t.layout != torch.strided:
            return t
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. nested)
            return t
        with self._lock:
            hit = self._ptrs.get(ptr)
            if hit is None:
                return t
            unit = self._units[hit[0]]
            unit.unpacks_due += 1
            return Token(self, unit, hit[1], t)

    def _unpack(self, token: Any) -> torch.Tensor:
        if not isinstance(token, Token):
            return token
        with self._lock:
            unit = self._units[token.unit]
            flat = self._acquire(unit)[token.dtype]
            if unit.version != token.version:
                # What autograd's version check says of a saved tensor modified in place: the
                # weights changed (an optimizer step) between this forward and its backward.
                raise RuntimeError(
                    f"parameter offload: the parameters of {unit.name or 'the model'!r} were modified "
                    "in place after the forward that saved them for this backward (an optimizer "
                    "step between forward and backward?)"
                )
            out = flat.as_strided(token.size, token.stride, token.offset)
            if not token.unpacked:
                token.unpacked = True
                unit.unpacks_due -= 1
            if unit.unpacks_due <= 0 and unit.active == 0:
                # The engine holds ``out`` as long as it needs it; we stop counting it.
                self._release(unit.index)
            self._prefetch_backward(self._pos[unit.index])
        return out

    def _token_dropped(self, index: int) -> None:
        with self._lock:
            self._units[index].unpacks_due -= 1

    # ------------------------------------------------------------------ residency

    def _acquire(self, unit: Unit) -> dict[torch.dtype, torch.Tensor]:
        """The unit's device copy, current: resident, prefetched, or loaded now (lock held)."""
        self._sync_unit(unit)
        res = self._resident.get(unit.index)
        if res is not None:
            if res.version == unit.version:
                return res.flats
            self._release(unit.index)
        pending = self._pending.pop(unit.index, None)
        if pending is not None:
            flats, event = pending.future.result()
            self._pending_bytes -= unit.nbytes
            if pending.version == unit.version:
                self._hits += 1
                self._use_on_current_stream(flats, event)
                self._add_resident(unit, flats)
                return flats
            del flats  # stale: written back since the prefetch started
        self._make_room(unit)
        flats, _ = self._load(unit)
        self._fetches += 1
        self._add_resident(unit, flats)
        return flats

    def _schedule(self, unit: Unit) -> bool:
        """Start fetching ``unit`` ahead if the budget allows; False if it does not (lock held)."""
        if self._removed or unit.index in self._resident or unit.index in self._pending:
            return True
        if self._resident_bytes + self._pending_bytes + unit.nbytes > self.budget:
            return False  # never evict for a prefetch: what is resident is needed sooner
        self._sync_unit(unit)
        future = self._worker.submit(self._load, unit, True)
        self._pending[unit.index] = Pending(future, unit.version)
        self._pending_bytes += unit.nbytes
        self._fetches += 1
        self._prefetches += 1
        self._note_peak()
        return True

    def _prefetch_backward(self, before: int) -> None:
        """Prefetch the units the backward needs next: those before position ``before`` in the
        forward order that still have saved weights due (lock held)."""
        if self.prefetch == 0:
            return
        started = 0
        for pos in range(before - 1, -1, -1):
            unit = self._units[self._order[pos]]
            if unit.unpacks_due <= 0:
                continue
            if not self._schedule(unit):
                return
            started += 1
            if started >= self.prefetch:
                return

    def _load(self, unit: Unit, ahead: bool = False) -> tuple[dict[torch.dtype, torch.Tensor], Any]:
        """Read the unit's blobs onto the device.  ``ahead`` (on the worker): on the side
        stream, with an event the consumer's stream waits on.  Touches nothing of ours but the
        unit's keys, so it runs without the lock."""
        if ahead and self._side_stream is not None:
            with torch.cuda.stream(self._side_stream):
                flats = {dt: self.store.get(key, device=self.device) for dt, key in unit.keys.items()}
                event = torch.cuda.Event()
                event.record(self._side_stream)
            return flats, event
        return {dt: self.store.get(key, device=self.device) for dt, key in unit.keys.items()}, None

    def _use_on_current_stream(self, flats: dict[torch.dtype, torch.Tensor], event: Any) -> None:
        if event is None or not self._cuda:
            return
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        for flat in flats.values():
            # Allocated on the side stream, used on this one: the allocator must not hand the
            # memory out again before this stream's work on it is done.
            flat.record_stream(stream)

    def _add_resident(self, unit: Unit, flats: dict[torch.dtype, torch.Tensor]) -> None:
        self._resident[unit.index] = Resident(flats, unit.version)
        self._resident_bytes += unit.nbytes
        for dt, flat in flats.items():
            self._ptrs[flat.untyped_storage().data_ptr()] = (unit.index, dt)
        self._note_peak()

    def _release(self, index: int) -> None:
        res = self._resident.pop(index, None)
        if res is None:
            return
        self._resident_bytes -= self._units[index].nbytes
        for flat in res.flats.values():
            self._ptrs.pop(flat.untyped_storage().data_ptr(), None)

    def _make_room(self, unit: Unit) -> None:
        """Drop prefetches, then resident units not in a forward, until ``unit`` fits."""

        def over() -> bool:
            return self._resident_bytes + self._pending_bytes + unit.nbytes > self.budget

        for index in sorted(self._pending, key=self._far_from(unit)):
            if not over():
                return
            pending = self._pending.pop(index)
            pending.future.result()  # its device memory is in use until the copy is done
            self._pending_bytes -= self._units[index].nbytes
        for index in sorted(self._resident, key=self._far_from(unit)):
            if not over():
                return
            if self._units[index].active == 0:
                self._release(index)
        # Setup checks every unit with its enclosing units; this happens only when a unit runs
        # inside another one that does not enclose it (a module reached by two paths).
        if over():
            raise CapacityError(
                f"parameter offload: {unit.name or 'the model'} ({format_size(unit.nbytes)}) does not fit "
                f"the budget ({format_size(self.budget)}) next to the units in a forward now"
            )

    def _far_from(self, unit: Unit) -> Callable[[int], int]:
        here = self._pos[unit.index]
        return lambda index: -abs(self._pos[index] - here)

    def _note_peak(self) -> None:
        self._peak = max(self._peak, self._resident_bytes + self._pending_bytes)

    def _drop_all(self) -> None:
        for pending in self._pending.values():
            try:
                pending.future.result()
            except Exception:  # noqa: BLE001 - dropped anyway; a failed prefetch is re-read later
                pass
        self._pending.clear()
        self._pending_bytes = 0
        for index in list(self._resident):
            self._release(index)

    # ------------------------------------------------------------------ write-back

    def _sync_unit(self, unit: Unit) -> bool:
        """Write ``unit`` to the store if a parameter changed since it was written (lock held)."""
        if [stamp(s.param) for s in unit.slots] == unit.stamps:
            return False
        self._write(unit)
        return True

    def _write(self, unit: Unit) -> None:
        for dt, flat in flatten(unit.slots).items():
            self.store.put(unit.keys[dt], flat)
        unit.stamps = [stamp(s.param) for s in unit.slots]
        unit.version += 1
        self._writebacks += 1


def offload_parameters(
    model: nn.Module,
    *,
    store: Any,
    device: str | torch.device,
    budget: int | str,
    prefetch: int = 2,
    key_prefix: str = "params",
) -> OffloadedParameters:
    """Keep ``model``'s parameters in ``store`` (a :class:`~fmstore.TieredStore`) and bring each
    unit's weights to ``device`` only for its forward and backward, at most ``budget`` bytes at
    once, fetching ``prefetch`` units ahead.

    A unit is a submodule with parameters of its own; its parameters are stored as one flat
    blob per dtype under ``{key_prefix}/{index}-{module name}/{dtype}``: one read and one copy
    to the device per unit instead of one per tensor, and one contiguous device buffer that a
    saved weight can be recognised by.  Afterwards each parameter is a host (CPU) leaf, the
    master copy (optimizers step it on the host), buffers are on ``device``.

    Raises :class:`~fmstore.ConfigError`, before anything is moved or stored, for
    ``prefetch < 0``, a bad ``budget``, a unit (with the units enclosing it) larger than the
    budget, a parameter that is not a leaf or is shared by two modules, keys the store already
    holds, or a model (or submodule) already offloaded.
    """
    # ---- validate everything first: a failure leaves model and store untouched
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ConfigError(f"prefetch must be an int >= 0, got {prefetch!r}")
    if budget is None:
        raise ConfigError("budget is required: the bytes of parameters allowed on the device at once")
    nbudget = parse_size(budget, what="budget")
    assert nbudget is not None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"bad device {device!r}: {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    for name, m in model.named_modules():
        ref = _OFFLOADED.get(m)
        if ref is not None and ref() is not None:
            raise ConfigError(
                f"module {name or type(model).__name__!r} is already offloaded; call remove() first"
            )

    owner: dict[int, str] = {}
    plan: list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]] = []
    for name, m in model.named_modules():
        params = [(pn, p) for pn, p in m._parameters.items() if p is not None]
        if not params:
            continue
        for pn, p in params:
            full = f"{name}.{pn}" if name else pn
            if not p.is_leaf:
                raise ConfigError(f"parameter {full!r} of module {name or '<root>'!r} is not a leaf tensor")
            if id(p) in owner:
                raise ConfigError(
                    f"parameter {full!r} is shared with {owner[id(p)]!r} (tied weights); "
                    "parameter offload does not support shared parameters"
                )
            owner[id(p)] = full
        plan.append((name, m, params))

    units: list[Unit] = []
    for index, (name, m, params) in enumerate(plan):
        slots: list[ParamSlot] = []
        numels: dict[torch.dtype, int] = {}
        for pn, p in params:
            off = numels.get(p.dtype, 0)
            slots.append(ParamSlot(pn, p, p.dtype, off, p.numel(), p.shape))
            numels[p.dtype] = off + p.numel()
        nbytes = sum(n * dt.itemsize for dt, n in numels.items())
        keys = {}
        for dt in numels:
            key = f"{key_prefix}/{index:05d}-{name or 'root'}/{str(dt).removeprefix('torch.')}"
            try:
                check_key(key)
            except InvalidKeyError as e:
                raise ConfigError(f"key_prefix {key_prefix!r} gives an invalid key: {e}") from e
            if key in store:
                raise ConfigError(
                    f"the store already holds {key!r}: another model offloaded with key_prefix "
                    f"{key_prefix!r}? pass another key_prefix"
                )
            keys[dt] = key
        units.append(Unit(index, name, m, slots, keys, numels, nbytes))

    # A unit's forward may run inside an enclosing unit's (a module with parameters of its own
    # and children with parameters): both are on the device then, so the chain must fit.
    by_module = {id(u.module): u for u in units}
    for u in units:
        chain = u.nbytes
        parts = u.name.split(".") if u.name else []
        for k in range(len(parts)):
            anc = model.get_submodule(".".join(parts[:k]))
            if id(anc) in by_module:
                chain += by_module[id(anc)].nbytes
        if chain > nbudget:
            what = f"module {u.name or '<root>'!r} ({type(u.module).__name__})"
            extra = f" with its enclosing units, {format_size(chain)}," if chain != u.nbytes else ""
            raise ConfigError(
                f"{what} has {format_size(u.nbytes)} of parameters{extra} more than the budget of "
                f"{format_size(nbudget)} ({nbudget} bytes); raise the budget"
            )

    # ---- store (undone if the store is full), then move the model
    handle = OffloadedParameters(model, units, store=store, device=dev, budget=nbudget, prefetch=prefetch)
    written: list[str] = []
    try:
        for u in units:
            for dt, flat in flatten(u.slots).items():
                store.put(u.keys[dt], flat)
                written.append(u.keys[dt])
    except BaseException:
        for key in written:
            store.delete(key)
        handle._worker.shutdown(wait=False)
        raise
    with torch.no_grad():
        for u in units:
            for s in u.slots:
                if s.param.device.type != "cpu":
                    s.param.data = s.param.data.to("cpu")
                    if s.param.grad is not None:
                        s.param.grad = s.param.grad.to("cpu")
            u.stamps = [stamp(s.param) for s in u.slots]
        for m in model.modules():
            for bn, b in m._buffers.items():
                if b is not None:
                    m._buffers[bn] = b.to(dev)

    # Hook order: the model's pre-hook runs first (prepend) and its post-hook last, even when
    # the model is itself a unit.
    for u in units:
        handle._handles.append(u.module.register_forward_pre_hook(bind(handle._unit_pre, u.index)))
        handle._handles.append(
            u.module.register_forward_hook(bind(handle._unit_post, u.index), always_call=True)
        )
    handle._handles.append(model.register_forward_pre_hook(handle._root_pre, prepend=True))
    handle._handles.append(model.register_forward_hook(handle._root_post, always_call=True))
    for m in model.modules():
        _OFFLOADED[m] = weakref.ref(handle)
    return handle
