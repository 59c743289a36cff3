"""Stage: copy a state's tensors into a reusable pool of host buffers, the only part of a
checkpoint that training waits for.

With CUDA the pool is pinned memory and device tensors are copied on a side stream (after
the work already queued on the caller's stream), so the copy runs at PCIe speed and the
caller can choose to wait for its completion event later.  The pool keeps its buffers
between saves: after the first save no memory is allocated or pinned again.

``deferred`` names the tensors that may still be copying when ``stage`` returns (those only an
optimizer step changes): the others are copied first and the caller's stream waits for them
(GPU), or they are copied before returning (CPU), so a forward pass that updates a buffer
cannot race their copy.  Deferred CPU tensors are copied by a background thread.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..blob import as_bytes_tensor
from ..codec import registry
from ..gcpause import paused_gc
from ..tiers.host import BufferPool


@dataclass
class StagedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: torch.Tensor  # flat uint8 view of a pooled host buffer, exactly nbytes long
    codec: list[dict] = field(default_factory=list)  # []: the raw bytes; else how data is coded

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def raw_nbytes(self) -> int:
        """The tensor's own size (``nbytes`` is the coded size when ``codec`` is set)."""
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


@dataclass
class Staged:
    """A save's staged tensors.  Its buffers go back to the pool when the last holder (the save's
    persist, the host-memory level) releases it: :meth:`retain` adds a holder."""

    tensors: list[StagedTensor]
    event: torch.cuda.Event | None
    releases: list[Callable[[], None]] = field(default_factory=list)
    copies: Future[None] | None = None  # deferred copies, made or queued by a background thread
    # Whether the feeder thread also lists the deferred tensors: ``tensors``, ``sizes`` and
    # ``nbytes`` are complete once ``copies`` is done (``wait_listed``).
    listed_later: bool = False
    sizes: list[int] = field(default_factory=list)  # the bytes asked of the pool, buffer by buffer
    _refs: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nbytes(self) -> int:
        self.wait_listed()
        return sum(t.nbytes for t in self.tensors)

    def wait_listed(self) -> None:
        """Block until ``tensors`` lists every staged tensor (see ``listed_later``)."""
        if self.listed_later and self.copies is not None:
            self.copies.result()

    def done(self) -> bool:
        """Whether every copy has landed (without waiting)."""
        if self.copies is not None and not self.copies.done():
            return False
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block until every copy has landed in host memory."""
        if self.copies is not None:
            self.copies.result()  # the copier has queued (or made) its copies: the event is final
        if self.event is not None:
            self.event.synchronize()

    def retain(self) -> Staged:
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("staged buffers were already given back")
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs > 0:
                return
        try:
            # A buffer goes back only once nothing copies into it any more (and once the
            # feeder, when it lists the deferred tensors, has acquired all of them).
            self.wait()
        except BaseException:  # noqa: BLE001 - the copy's error is the save's, reported there
            pass
        with self._lock:
            releases, self.releases = self.releases, []
        for r in releases:
            r()


#: Tensors up to this size are packed into one buffer per device and copied at once.
SMALL = 256 << 10
#: Offsets of packed tensors are multiples of this (any dtype's alignment).
ALIGN = 64
#: Deferred device-to-host copies are queued in groups of this many bytes (see ``_copy_later``).
FEED_BYTES = 16 << 20


class Stager:
    """Copies tensors into pooled host buffers (pinned when CUDA is present)."""

    def __init__(self, *, pinned: bool | None = None) -> None:
        cuda = torch.cuda.is_available()
        self.pinned = cuda if pinned is None else pinned
        self.pool = BufferPool(pinned=self.pinned)
        self._stream = torch.cuda.Stream() if cuda else None
        self._copier: ThreadPoolExecutor | None = None
        # Whether the feeder thread lists the deferred tensors too (``_stage_later``): with a
        # GPU the caller mostly waits for the device meanwhile, so that Python work is free; on
        # a CPU it would only contend for the GIL with training (tests set it to cover it).
        self.list_later = self._stream is not None

    def stage(
        self,
        tensors: dict[str, torch.Tensor],
        gpu_encode: Callable[[str, torch.Tensor], int | None] | None = None,
        deferred: set[str] | None = None,
        on_listed: Callable[[Staged], None] | None = None,
    ) -> Staged:
        """Copy ``tensors`` to pooled host memory.  Where ``gpu_encode(name, tensor)`` gives an
        element width, the tensor is encoded on its GPU first (FMHS stream, see
        :mod:`fmstore.codec.huffman`) and only the encoded bytes cross PCIe; that copy has
        landed when this returns.  Tensors of at most :data:`SMALL` bytes are packed into one
        buffer per device (one copy instead of hundreds: a model's biases, norms and Adam's
        step counters).  ``deferred``: see the module docstring.  ``on_listed(staged)`` is
        called once every buffer is acquired (by the feeder thread, before the copies count as
        done, when it lists the deferred tensors)."""
        staged = Staged([], None)
        encode_jobs: list[tuple[int, tuple]] = []  # GPU encodes, run together as one pipeline
        on_device = [t for t in tensors.values() if t.device.type == "cuda"]
        ordered = deferred is not None  # the caller goes on before the copies land
        deferred = deferred or set()
        slots: dict[str, int] = {}
        cpu_later: list[tuple[torch.Tensor, torch.Tensor]] = []
        gpu_later: list[tuple[torch.Tensor, torch.Tensor]] = []  # fed to the copy engine in groups
        listed_later = False
        rest: list[tuple[str, torch.Tensor]] = []
        try:
            if on_device and self._stream is not None:
                # Copy after the work the caller already queued (e.g. the optimizer step).
                self._stream.wait_stream(torch.cuda.current_stream(on_device[0].device))
            # Tensors that must not race the caller's next work are copied first.
            for later in (False, True):
                if later and ordered:
                    self._order_before_caller(on_device)
                    if self.list_later and gpu_encode is None and any(n in deferred for n in tensors):
                        # The rest (views, buffers, copies: most of a save's Python work) is
                        # the feeder thread's, off the caller's critical path (issue 10).
                        rest = [(n, t) for n, t in tensors.items() if n in deferred]
                        listed_later = True
                        break
                small: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
                for name, t in tensors.items():
                    if (name in deferred) != later:
                        continue
                    self._stage_one(
                        name, t, later, staged, slots, small, cpu_later, gpu_later, gpu_encode, encode_jobs
                    )
                for group in small.values():
                    self._copy_packed(group, staged, slots, gpu_later if later else None)
            if encode_jobs:
                from ..codec import gpu as gpu_codec

                try:
                    streams = gpu_codec.huff_encode_many_to_host([job for _, job in encode_jobs])
                except Exception as e:  # e.g. no GPU memory left for the encode's buffers
                    warnings.warn(
                        f"fmstore: GPU compression failed ({type(e).__name__}: {e}); staging those "
                        "tensors raw (the CPU chain compresses them in the background)",
                        stacklevel=3,
                    )
                    streams = []
                    for i, (src, _, buf) in encode_jobs:
                        streams.append(buf[: src.numel()].copy_(src))  # the buffer holds the raw bytes
                        staged.tensors[i].codec = []
                for (i, _), data in zip(encode_jobs, streams):
                    staged.tensors[i].data = data
            if on_device and self._stream is not None and not gpu_later:
                staged.event = torch.cuda.Event()  # (a feeder that copies later records a later one)
                staged.event.record(self._stream)
            if listed_later:
                staged.listed_later = True
                order = list(tensors)
                staged.copies = self._feeder().submit(
                    self._stage_later, rest, staged, slots, order, on_listed
                )
                return staged
            if cpu_later or gpu_later:
                staged.copies = self._feeder().submit(self._copy_later, cpu_later, gpu_later, staged)
        except BaseException:
            staged.release()
            raise
        # The tensors in their given order (the persist pairs them with the save's pieces).
        staged.tensors = [staged.tensors[slots[n]] for n in tensors]
        if on_listed is not None:
            on_listed(staged)
        return staged

    def _feeder(self) -> ThreadPoolExecutor:
        if self._copier is None:
            self._copier = ThreadPoolExecutor(1, thread_name_prefix="fmstore-stage")
        return self._copier

    def _stage_one(
        self,
        name: str,
        t: torch.Tensor,
        later: bool,
        staged: Staged,
        slots: dict[str, int],
        small: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]],
        cpu_later: list[tuple[torch.Tensor, torch.Tensor]],
        gpu_later: list[tuple[torch.Tensor, torch.Tensor]],
        gpu_encode: Callable[[str, torch.Tensor], int | None] | None,
        encode_jobs: list[tuple[int, tuple]],
    ) -> None:
        """One tensor's staged entry: a GPU encode job, a member of its device's packed small
        buffer, or its own pooled buffer with its copy made, queued or left for the feeder."""
        slots[name] = len(staged.tensors)
        src = as_bytes_tensor(t)
        width = gpu_encode(name, t) if gpu_encode is not None and src.device.type == "cuda" else None
        if width:
            from ..codec import gpu as gpu_codec

            buf, release = self._acquire(staged, gpu_codec.huff_host_bytes(src.numel(), width))
            staged.releases.append(release)
            encode_jobs.append((len(staged.tensors), (src, width, buf)))
            codec = [registry.gpu_codec(width).to_json()]
            staged.tensors.append(StagedTensor(name, t.dtype, tuple(t.shape), buf[:0], codec))
            return
        staged.tensors.append(StagedTensor(name, t.dtype, tuple(t.shape), src[:0]))
        if src.numel() <= SMALL and src.device.type in ("cpu", "cuda"):
            small.setdefault(src.device.type, []).append((name, t, src))
            return
        buf, release = self._acquire(staged, src.numel())
        staged.releases.append(release)
        staged.tensors[-1].data = dst = buf[: src.numel()]
        if later and src.device.type == "cuda" and self._stream is not None:
            gpu_later.append((dst, src))
        else:
            self._copy(dst, src, later, cpu_later)

    def _stage_later(
        self,
        rest: list[tuple[str, torch.Tensor]],
        staged: Staged,
        slots: dict[str, int],
        order: list[str],
        on_listed: Callable[[Staged], None] | None,
    ) -> None:
        """The deferred tensors' part of :meth:`stage`, in the feeder thread: their entries and
        buffers, then their copies (see :meth:`_copy_later`); the list is complete after it."""
        small: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        cpu_later: list[tuple[torch.Tensor, torch.Tensor]] = []
        gpu_later: list[tuple[torch.Tensor, torch.Tensor]] = []
        with paused_gc():
            for name, t in rest:
                self._stage_one(name, t, True, staged, slots, small, cpu_later, gpu_later, None, [])
            for group in small.values():
                self._copy_packed(group, staged, slots, gpu_later)
            staged.tensors = [staged.tensors[slots[n]] for n in order]
        if on_listed is not None:
            on_listed(staged)
        self._copy_later(cpu_later, gpu_later, staged)

    def _acquire(self, staged: Staged, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
        staged.sizes.append(nbytes)
        return self.pool.acquire(nbytes)

    def _copy(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        later: bool,
        cpu_later: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Queue (GPU), defer (CPU, ``later``) or make the copy of ``src`` into ``dst``."""
        if src.device.type == "cuda" and self._stream is not None:
            with torch.cuda.stream(self._stream):
                dst.copy_(src, non_blocking=True)
                src.record_stream(self._stream)  # keep the source alive until copied
        elif src.device.type == "cpu" and later:
            cpu_later.append((dst, src))
        elif src.device.type in ("cpu", "cuda"):
            dst.copy_(src)
        else:
            dst.copy_(src.cpu())
        return dst

    def _copy_packed(
        self,
        group: list[tuple[str, torch.Tensor, torch.Tensor]],
        staged: Staged,
        slots: dict[str, int],
        gpu_later: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """Small tensors of one device through one host buffer: packed on their device (one
        concatenation), one copy; each staged tensor is a slice at an aligned offset.  With
        ``gpu_later``, a GPU group's copy is left to the feeder, after the concatenation."""
        offsets, pos = [], 0
        for _, _, src in group:
            offsets.append(pos)
            pos += -(-src.numel() // ALIGN) * ALIGN  # aligned: a slice views as any dtype
        buf, release = self._acquire(staged, max(pos, 1))
        staged.releases.append(release)

        def packed() -> torch.Tensor:
            parts = []
            for _, _, src in group:
                parts.append(src)
                if src.numel() % ALIGN:
                    parts.append(src.new_empty(-src.numel() % ALIGN))  # padding, never read
            return torch.cat(parts)

        if group[0][2].device.type == "cuda" and self._stream is not None:
            with torch.cuda.stream(self._stream):  # ordered after the caller's work, as the others
                flat = packed()
                if gpu_later is None:
                    buf[:pos].copy_(flat, non_blocking=True)
            if gpu_later is not None:
                gpu_later.append((buf[:pos], flat))
            for _, _, src in group:
                src.record_stream(self._stream)
        else:  # small: copied now, also when deferred
            buf[:pos].copy_(packed())
        for (name, _, src), off in zip(group, offsets):
            staged.tensors[slots[name]].data = buf[off : off + src.numel()]

    def _order_before_caller(self, on_device: list[torch.Tensor]) -> None:
        """Make the caller's stream wait for the copies queued so far (the non-deferred ones)."""
        if on_device and self._stream is not None:
            done = torch.cuda.Event()
            done.record(self._stream)
            torch.cuda.current_stream(on_device[0].device).wait_event(done)

    def _copy_later(
        self,
        cpu: list[tuple[torch.Tensor, torch.Tensor]],
        gpu: list[tuple[torch.Tensor, torch.Tensor]],
        staged: Staged,
    ) -> None:
        """The deferred copies, in a background thread.  Device-to-host copies are queued in
        groups of about :data:`FEED_BYTES`, one in flight at a time: a synchronous transfer
        the training step makes meanwhile (an ``.item()`` in a model's forward, a ``.cpu()``)
        waits until the link is idle, so a queue kept full would hold it until the whole
        state is copied; between two groups it goes through."""
        _copy_all(cpu)
        if not gpu:
            return
        assert self._stream is not None
        with torch.cuda.device(gpu[0][1].device), torch.cuda.stream(self._stream):
            queued = 0
            for dst, src in gpu:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self._stream)  # the source's memory stays until copied
                queued += src.numel()
                if queued >= FEED_BYTES:
                    group = torch.cuda.Event()
                    group.record(self._stream)
                    group.synchronize()  # the link goes idle: a waiting transfer passes
                    queued = 0
            event = torch.cuda.Event()
            event.record(self._stream)
        staged.event = event

    def close(self) -> None:
        if self._copier is not None:
            self._copier.shutdown(wait=True)
        self.pool.clear()


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for dst, src in pairs:
        dst.copy_(src)  # torch releases the GIL for the copy: training goes on meanwhile
