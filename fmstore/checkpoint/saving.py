"""The save side of a checkpointer: stage -> items -> persist.

:class:`SavePipeline` stages a rank's pieces of the state into pooled, pinned host memory
(encoding large CUDA tensors on their GPU first where the codec says so), then a background
persist (:class:`~fmstore.jobs.BackgroundJobs`, one thread) turns the staged copy into write
items (checksums, codec chains) and writes them to each durable level the step goes to,
concurrently, each committed by its own manifest.  It bounds what is in flight
(``max_persists``) and pins ahead the buffers the steady state holds at once.  It never refers
to the checkpointer (a dropped one is freed by reference counting alone).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch

from ..codec import huffman, registry
from ..errors import CapacityError, FmstoreError, WaitTimeoutError
from ..gcpause import paused_gc
from ..jobs import BackgroundJobs, Job
from . import overlap, stateful
from .host_level import HOST, MemoryItem, MemoryLevel, MemorySnapshot
from .level import SnapshotLevel, Written
from .sharding import Piece, pieces_to_save
from .staging import Staged, Stager
from .writing import ItemBuilder, completed

#: CUDA tensors smaller than this are staged raw and compressed by the CPU chain in the
#: background: launching a GPU encode costs about 0.1 ms of host time per tensor, more than
#: copying a few MiB raw (a model's biases and norms would otherwise add up to a long stall).
GPU_ENCODE_MIN_BYTES = 4 << 20
__all__ = ["SavePipeline", "SaveHandle", "SnapshotInfo", "SaveJob", "GPU_ENCODE_MIN_BYTES"]


@dataclass
class SnapshotInfo:
    """A committed snapshot, as ``SaveHandle.wait`` gives it."""

    step: int
    path: str  # in the fastest durable level that took it ("host" if none did)
    nbytes: int  # bytes of tensor data this rank staged
    bytes_written: int  # bytes this save wrote, all levels (shard files + manifest); less when incremental
    tensors: int
    tensors_written: int  # in the first durable level
    levels: list[str] = field(default_factory=list)  # where it is committed, fastest first


class SaveHandle:
    """Returned by :meth:`Checkpointer.save` once staging is done (or queued: ``block=False``);
    persisting goes on in the background."""

    def __init__(self, step: int, job: Job[SnapshotInfo], staged: Staged | None, stall_s: float) -> None:
        self.step = step
        self._job = job  # its error reaches a caller once (wait, the next save, close)
        self._staged = staged
        self.stall_seconds = stall_s  # time save() blocked the caller
        self.persist_seconds: float | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this rank staged (waits until the staging has listed them)."""
        return self._staged.nbytes if self._staged is not None else 0

    def done(self) -> bool:
        return self._job.done()

    def wait(self, timeout: float | None = None) -> SnapshotInfo:
        """Block until the snapshot is committed; returns its info or raises the save's error."""
        try:
            return self._job.result(timeout)
        except FutureTimeout:
            raise WaitTimeoutError(f"step {self.step} not committed after {timeout} s") from None

    def wait_staged(self) -> None:
        """Block until the device-to-host copies are done (only needed with ``block=False``)."""
        if self._staged is not None:
            self._staged.wait()

    def __repr__(self) -> str:
        state = (
            "committed"
            if self.done() and not self._job.future.exception()
            else ("failed" if self.done() else "persisting")
        )
        return f"SaveHandle(step={self.step}, {state}, stall={self.stall_seconds:.3f}s, bytes={self.nbytes})"


class SavePipeline:
    """Stages and persists the saves of one rank to ``levels`` (fastest first), keeping the
    newest in ``memory`` if given.  ``close()`` waits for the persists and frees the threads
    and the pinned pool."""

    def __init__(
        self,
        *,
        levels: list[SnapshotLevel],
        memory: MemoryLevel | None,
        rank: int,
        world_size: int,
        compression: str | None,
        codec: str,
        quantize: tuple[str, ...],
        io_threads: int,
        max_persists: int,
        session: str,
        claim: Callable[[], None],
    ) -> None:
        self.levels = levels
        self.memory = memory
        self.rank = rank
        self.world_size = world_size
        self.compression = compression
        self.codec = codec
        self.max_persists = max_persists
        self.session = session  # this job's id, the same on every rank
        self._claim = claim  # takes the roots' writer leases, before the first durable write
        self._claimed = False
        self._saves = 0
        self.stager = Stager()
        self.reserved_for: list[int] | None = None  # the buffer sizes the pool was last reserved for
        self._reserving = threading.Lock()  # a reserve runs in a save or in the feeder thread
        # Durable persists in flight, their errors raised once; finished at exit, not lost.
        self.persists = BackgroundJobs(f"the commit of step {{}} to {levels[0].url!r}", thread_name="fmstore-persist")
        self._hash_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fmstore-hash")
        # Its own threads: an encode is asked for from level threads and fans out chunks.
        self._codec_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fmstore-codec")
        self.items = ItemBuilder(
            compression=compression,
            codec=codec,
            quantize=quantize,
            hash_pool=self._hash_pool,
            codec_pool=self._codec_pool,
        )
        self._level_pool = (
            ThreadPoolExecutor(len(levels), thread_name_prefix="fmstore-level") if len(levels) > 1 else None
        )

    def pieces(self, tensors: dict[str, Any], local: Any) -> list[Piece]:
        """What this rank saves of each tensor (replicated ones too when host memory keeps them)."""
        return pieces_to_save(
            tensors, self.rank, self.world_size, replicas=self.memory is not None, rank_local=local
        )

    def save(
        self,
        step: int,
        tensors: dict[str, Any],
        tree: dict[str, Any],
        local: Any,
        slots: list[stateful.Slot],
        targets: list[SnapshotLevel],
        block: bool,
        meta: dict[str, Any] | None,
        t0: float,
    ) -> SaveHandle:
        """Stage a flattened state as ``step``, keep it in host memory if there is such a level,
        and persist it to ``targets`` (none: host memory only); its handle."""
        pieces = self.pieces(tensors, local)
        if targets:
            if not self._claimed:
                self._claim()
                self._claimed = True
            self.make_room()  # at most max_persists durable persists, so memory stays bounded
        for lvl in targets:
            if lvl.committed(step):
                raise FmstoreError(f"step {step} is already committed under {lvl.url!r}; it is never overwritten")
        if self.memory is not None and self.memory.get(step) is not None:
            raise FmstoreError(f"step {step} is already committed in host memory; it is never overwritten")
        staged = self.stage(pieces, slots, block)
        if self.memory is not None:
            items = {p.name: MemoryItem(p.global_shape, p.offsets) for p in pieces}
            # Committed in memory: restorable from here on (a restore first waits for the
            # copies that block=False leaves in flight).
            self.memory.add(MemorySnapshot(step, staged.retain(), items, tree))
        if block:
            staged.wait()
        elif not staged.done():
            overlap.defer_until_staged(staged.wait)
        stall = time.perf_counter() - t0
        if not targets:  # host memory only: committed already, nothing to persist
            staged.release()  # the memory level holds its own reference
            nbytes = sum(p.local.numel() * p.local.element_size() for p in pieces)
            info = SnapshotInfo(step, HOST, nbytes, 0, len(pieces), 0, [HOST])
            return SaveHandle(step, Job(completed(info)), staged, stall)
        self._saves += 1
        token = f"{self.session}:{self._saves}"  # this save attempt, the same on every rank
        names = sorted(tensors)
        job = SaveJob(step, staged, pieces, names, tree, dict(meta or {}), targets, self.memory is not None, token)
        return self.persist(job, t0, stall)

    def targets(
        self, step: int, which: Sequence[str] | str | None, levels_of: Callable[[str], list[SnapshotLevel]]
    ) -> list[SnapshotLevel]:
        """The durable levels ``step`` goes to: those whose ``every`` takes it, and those
        ``which`` names ("all", or names checked by ``levels_of``)."""
        if which == "all":
            return list(self.levels)
        names = [] if which is None else [which] if isinstance(which, str) else list(which)
        for name in names:
            levels_of(name)  # unknown names are an error
        return [lvl for lvl in self.levels if lvl.takes(step) or lvl.name in names]

    def drop(self, step: int, level: str | None, levels_of: Callable[[str | None], list[SnapshotLevel]]) -> bool:
        """Remove committed ``step`` from host memory and the durable levels (or ``level``)
        holding it, as the roots' writer; whether any held it."""
        found = False
        if self.memory is not None and level in (None, HOST):
            found |= self.memory.drop(step)
        for lvl in levels_of(level) if level != HOST else []:
            if lvl.committed(step):
                if self.rank == 0:
                    lvl.claim()
                lvl.drop(step)
                found = True
        return found

    def stage(
        self, pieces: list[Piece], slots: list[stateful.Slot] | None, block: bool, *, gpu_encode: bool = True
    ) -> Staged:
        """Copy ``pieces`` into host buffers.  ``block=False``: the copies of tensors an optimizer
        step will change (``slots``' and the overlap guard's) run behind the caller's next work.
        ``gpu_encode=False``: every tensor is staged raw (encoded on the CPU when written)."""
        encode = (
            self._gpu_encode
            if gpu_encode and self.compression and self.memory is None and registry.encodes_on_gpu(self.codec)
            else None
        )
        deferred = None
        if not block:
            guarded = stateful.guarded_tensors(slots or []) | overlap.guarded_pointers()
            deferred = {p.name for p in pieces if p.local.numel() and p.local.data_ptr() in guarded}
        return self.stager.stage({p.name: p.local for p in pieces}, encode, deferred, self._reserve)

    def persist(self, job: SaveJob, t0: float, stall: float) -> SaveHandle:
        """Write ``job`` to its levels in the background; its handle."""
        # A function of the job, not a bound method of the checkpointer: a dropped
        # checkpointer's persist must not keep it alive (its finalizer waits for the persist).
        task = self.persists.submit(
            persist_job, job, self.items, self._level_pool, label=str(job.step)
        )
        handle = SaveHandle(job.step, task, job.staged, stall)
        task.future.add_done_callback(
            lambda f: setattr(handle, "persist_seconds", time.perf_counter() - t0 - stall)
        )
        return handle

    def reserve(self, pieces: list[Piece]) -> int:
        """Pin now the buffers saves of ``pieces`` hold at once in the steady state (copies them
        once, writes nothing); the bytes the pool holds."""
        staged = self.stager.stage({p.name: p.local for p in pieces}, None, None, self._reserve)
        try:
            staged.wait()
        finally:
            staged.release()
        return self.stager.pool.reserved

    def _reserve(self, staged: Staged) -> None:
        """Pin now the host buffers that saves will hold at once in the steady state: the
        snapshots kept in host memory, the one being staged, and the durable persists in flight
        (each holds its snapshot's buffers until written).  Otherwise the pool grows at the
        first durable save, seconds of pinning in the middle of training."""
        with self._reserving:  # called by a save, or by the feeder thread (Stager.stage's on_listed)
            sizes = sorted(staged.sizes)
            if sizes == self.reserved_for:
                return
            self.reserved_for = sizes
            sets = self.sets_held()
            try:
                self.stager.pool.reserve(sizes, sets)
            except CapacityError as e:  # this save is staged; later ones pin as they go
                warnings.warn(
                    f"fmstore: could not pin ahead the host memory of {sets} snapshots ({e}); "
                    "saves will allocate it when first needed",
                    stacklevel=3,
                )

    def sets_held(self) -> int:
        """How many snapshots' host buffers saves hold at once at most: those kept in host
        memory, the one being staged, and the durable persists in flight (each holds its
        buffers until written).  Without host memory a save stages only once fewer than
        ``max_persists`` persists run (:meth:`make_room`; ``when_busy="skip"`` stages nothing
        then), so the one being staged is one of them: ``max_persists`` sets.  A save kept in
        host memory only stages while up to ``max_persists`` persist."""
        if self.memory is None:
            return self.max_persists if self.levels else 1
        return self.memory.keep + 1 + (self.max_persists if self.levels else 0)

    def busy(self) -> bool:
        """Whether ``max_persists`` durable persists are still in flight."""
        return len(self.persists.running()) >= self.max_persists

    def make_room(self) -> None:
        """Wait until fewer than ``max_persists`` persists are in flight (memory stays bounded)."""
        while True:
            running = self.persists.running()
            if len(running) < self.max_persists:
                return
            wait_futures([running[0].future])

    def _gpu_encode(self, name: str, t: torch.Tensor) -> int | None:
        """The element width to encode ``t`` with on its GPU before staging, or None."""
        width = t.element_size()
        if t.numel() * width < GPU_ENCODE_MIN_BYTES or width not in huffman.WIDTHS:
            return None
        if self.items.quantizes(name, t.dtype):
            return None
        from ..codec import gpu

        return width if gpu.kernels_load() else None

    def close(self) -> None:
        """Wait for the persists, stop the threads, drop the snapshots kept in host memory, then
        free the pinned pool (their buffers are idle only once they are dropped)."""
        self.persists.close()
        for pool in (self._hash_pool, self._codec_pool, self._level_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        if self.memory is not None:
            self.memory.clear()
        self.stager.close()


@dataclass
class SaveJob:
    step: int
    staged: Staged
    pieces: list[Piece]
    names: list[str]
    tree: dict[str, Any]
    meta: dict[str, Any]
    levels: list[SnapshotLevel]  # durable levels that take this step
    in_memory: bool  # a host-memory copy was kept too
    token: str  # this save attempt, the same on every rank


def persist_job(job: SaveJob, builder: ItemBuilder, level_pool: ThreadPoolExecutor | None) -> SnapshotInfo:
    """Write a staged save to its durable levels (the persist thread's work)."""
    try:
        job.staged.wait()
        with paused_gc():
            items = builder.items(job.staged.tensors, job.pieces)
        args = (job.step, items, job.names, job.tree, job.meta, job.token)
        if level_pool is None or len(job.levels) == 1:
            runs = [_run(job.levels[0].write, *args)]
        else:  # each level from the staged copy, concurrently: S3 does not wait for NVMe
            runs = [
                f.result()
                for f in [level_pool.submit(_run, lvl.write, *args) for lvl in job.levels]
            ]
        results = list(zip(job.levels, runs))
    finally:
        job.staged.release()  # the host-memory level, if any, holds its own reference
    ok = [(lvl, r) for lvl, r in results if isinstance(r, Written)]
    failed = [(lvl, r) for lvl, r in results if isinstance(r, BaseException)]
    if failed:
        if len(results) == 1:
            raise failed[0][1]
        done = ", ".join(repr(lvl.name) for lvl, _ in ok) or "no durable level"
        why = "; ".join(f"{lvl.name!r}: {type(e).__name__}: {e}" for lvl, e in failed)
        raise FmstoreError(f"step {job.step} committed to {done} but not to: {why}") from failed[0][1]
    first = ok[0][1]
    return SnapshotInfo(
        step=job.step,
        path=ok[0][0].path_of(job.step),
        nbytes=job.staged.nbytes,
        bytes_written=sum(r.bytes_written for _, r in ok),
        tensors=first.tensors,
        tensors_written=first.tensors_written,
        levels=([HOST] if job.in_memory else []) + [lvl.name for lvl, _ in ok],
    )


def _run(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised (one level failing must not hide the others)."""
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 - handed back to the caller, who re-raises
        return e


