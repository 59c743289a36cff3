"""Checkpointer: async snapshots of training state, committed atomically by one manifest.

``save`` stages the state's tensors into pooled host memory (all training waits for) and
returns a :class:`SaveHandle`; a background thread checksums the staged bytes and writes
the snapshot to each durable level the policy picks for its step (in parallel, from the
staged copy), each committed by its own ``manifest.json``; with ``Policy(host_memory=N)``
the staged copy itself is kept as the newest snapshot.  Unchanged tensors are referenced in
a level's previous snapshot, not written again.  ``load`` restores the latest (or a given)
committed snapshot from the fastest level holding it, verifying every checksum read.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import exiting
from ..blob import dtype_from_name
from ..codec import huffman, registry
from ..errors import (
    CapacityError,
    ConfigError,
    CorruptBlobError,
    FmstoreError,
    SnapshotDeletedError,
    StateKeysError,
    WaitTimeoutError,
)
from ..gcpause import paused_gc
from ..storage import Storage
from ..store import TieredStore
from . import overlap, stateful
from .lease import DEFAULT_TTL, WriterConflictError
from .level import SnapshotLevel, SnapshotNotFoundError, Written
from .manifest import Manifest, ManifestError, step_dir
from .memory import HOST, MemoryItem, MemoryLevel, MemorySnapshot, restore
from .policy import Policy, resolve
from .reader import ChecksumError, Region, SnapshotReader
from .sharding import LoadMismatchError, Piece, check_target, dtensor_region, is_dtensor, pieces_to_save
from .staging import Staged, Stager
from .tree import compare, flatten, subtree, tensor_leaves, unflatten
from .writing import MOMENTS, ItemBuilder, completed

#: CUDA tensors smaller than this are staged raw and compressed by the CPU chain in the
#: background: launching a GPU encode costs about 0.1 ms of host time per tensor, more than
#: copying a few MiB raw (a model's biases and norms would otherwise add up to a long stall).
GPU_ENCODE_MIN_BYTES = 4 << 20
#: ``compression=`` values: None (raw) or the lossless chain.
COMPRESSION: dict[str | None, str | None] = {None: None, "lossless": "lossless"}

__all__ = [
    "Checkpointer",
    "SaveHandle",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "ChecksumError",
    "LoadMismatchError",
    "StateKeysError",
    "MOMENTS",
]


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

    def __init__(
        self, step: int, future: Future[SnapshotInfo], staged: Staged | None, stall_s: float
    ) -> None:
        self.step = step
        self._future = future
        self._staged = staged
        self.stall_seconds = stall_s  # time save() blocked the caller
        self.persist_seconds: float | None = None
        self._reported = False  # its error reached the caller once (wait, the next save, close)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this rank staged (waits until the staging has listed them)."""
        return self._staged.nbytes if self._staged is not None else 0

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> SnapshotInfo:
        """Block until the snapshot is committed; returns its info or raises the save's error."""
        try:
            error = self._future.exception(timeout)
        except FutureTimeout:
            raise WaitTimeoutError(f"step {self.step} not committed after {timeout} s") from None
        if error is not None:
            self._reported = True
            raise error
        return self._future.result()

    def wait_staged(self) -> None:
        """Block until the device-to-host copies are done (only needed with ``block=False``)."""
        if self._staged is not None:
            self._staged.wait()

    def _unreported_error(self) -> BaseException | None:
        """The save's error if it failed and no caller has seen it yet (then it counts as seen)."""
        if not self._future.done() or self._reported:
            return None
        error = self._future.exception()
        if error is not None:
            self._reported = True
        return error

    def __repr__(self) -> str:
        state = (
            "committed"
            if self.done() and not self._future.exception()
            else ("failed" if self.done() else "persisting")
        )
        return f"SaveHandle(step={self.step}, {state}, stall={self.stall_seconds:.3f}s, bytes={self.nbytes})"


class Checkpointer:
    """Async, incremental, crash-safe, sharded snapshots of training state under ``root``.

    Parameters:
        root: a directory or fsspec URL (``s3://bucket/run1``, ``file://``, ``memory://``), or
            a :class:`TieredStore`: snapshots then live in its durable tiers (fastest is the
            root level, the others further levels) and, if it has a memory tier, the newest
            one is kept in host memory.
        storage_options: passed to fsspec untouched (credentials, endpoint).
        keep_last: keep only the newest N committed snapshots in the root level (bytes that
            a kept snapshot references are never deleted).
        policy: a :class:`Policy`: snapshots kept in host memory, how often the root takes
            one, and further levels (e.g. object storage every 1000 steps).  Default: every
            snapshot to ``root``.
        process_group: the ranks that save together; default: the default group when
            ``torch.distributed`` is initialized, else this process alone.  Every rank writes
            its own shard file; rank 0 commits the manifest once all ranks have reported.
        no_dist: save and load as this process alone even when ``torch.distributed`` is
            initialized (e.g. rank 0 of a DDP job, whose state is the same on every rank).
        incremental: reference unchanged tensors in earlier snapshots instead of rewriting.
        quantize: glob patterns of tensor names (as flattened: ``optim/state/0/exp_avg``) to
            store lossily as blockwise int8 (absmax per 256 values; float tensors only), e.g.
            :data:`MOMENTS` for Adam's moments.  Never applied unless asked; the manifest
            records it (codec ``int8-absmax``) and a load gives the dequantized values.
        compression: ``"lossless"`` encodes each written tensor with a codec chain; the
            manifest records the chain and load decodes.  Default None: stored raw.
        codec: which lossless chain.  ``"auto"`` (default): a CUDA tensor of at least
            :data:`GPU_ENCODE_MIN_BYTES` (4 MiB) is encoded on its GPU before the
            device-to-host copy (byte planes + per-chunk Huffman, the FMHS stream of
            ``kernels/huffman.cu``), so fewer bytes cross PCIe; a CPU tensor, a smaller one, or
            any when the kernels cannot be built, gets the CPU chain (byte planes + per-chunk
            zstd) in the background persist.  ``"planes-zstd"``: always the CPU chain.
            ``"fmhs"``: always FMHS (on the CPU reference for CPU tensors: slow, for
            checks).  (``"zstd"`` and ``"huffman"``, the earlier names, are still accepted.)  With a host-memory level the raw copy is staged (a restore needs it),
            and the CPU chain runs in the background.  The GPU encode needs transient GPU
            memory of about twice the largest tensor; if it fails (out of memory, say), those
            tensors are staged raw, with a warning.
        max_persists: durable persists (writing or waiting to) that saves may leave behind them;
            a save to a durable level waits for the oldest beyond that.  A save kept only in
            host memory never waits for one.  Each holds its staged copy of the state.
        when_busy: what a save for a durable level does while ``max_persists`` persists are
            still in flight.  ``"wait"`` (default) waits for the oldest: every step the policy
            names is written, and storage I/O is time-bounded (a stuck S3 request fails in
            about a minute), so the wait is too.  ``"skip"``: the step goes to no durable level
            (a warning says so; a host-memory level still keeps it), so training never waits
            on storage.  Single process only; a save with ``levels=`` given always waits.
        lease_ttl: one job writes a root at a time.  Its first save claims each durable
            root (a lock on local disks, released by the kernel if the job dies; on S3 a
            lease object renewed every ``lease_ttl / 4`` seconds), and a second job's save,
            ``delete()`` or ``gc()`` raises :class:`WriterConflictError` naming the holder
            before writing anything.  An S3 lease that goes ``lease_ttl`` seconds (default
            60) without renewal, its holder killed, is taken over.  Loading never claims.

    State values may be Stateful (``state_dict()`` / ``load_state_dict()``: modules,
    optimizers, LR schedulers, :class:`RNGState`): see :meth:`save` and :meth:`load`.  A save
    in flight when the interpreter exits (no ``close()``) is finished first; see
    :mod:`fmstore.exiting`.

    ``close()`` (or leaving a ``with`` block) releases the roots' writer leases.  A checkpointer
    dropped without it (``del ck``, a notebook cell run again) is closed when it is
    garbage-collected (by reference counting alone: nothing of it refers back to it): its saves
    still in flight are committed first, then the leases are released, and a new checkpointer
    of this process on the same root waits for that instead of being refused (what a save
    returned has promised is never lost).  An error of such a save, with no caller left to
    raise it to, is printed on stderr.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | TieredStore,
        *,
        storage_options: dict[str, Any] | None = None,
        compression: Any = None,
        keep_last: int | None = None,
        policy: Policy | None = None,
        process_group: Any = None,
        no_dist: bool = False,
        incremental: bool = True,
        quantize: Sequence[str] | str = (),
        io_threads: int = 8,
        timeout: float = 1800.0,
        codec: str = "auto",
        max_persists: int = 1,
        when_busy: str = "wait",
        lease_ttl: float = DEFAULT_TTL,
    ) -> None:
        self.codec = codec = registry.choose(codec)  # names and aliases: the registry's
        if compression not in COMPRESSION:
            raise ConfigError(
                f"compression must be one of {sorted(COMPRESSION, key=str)}, got {compression!r}"
            )
        self.compression = COMPRESSION[compression]
        if isinstance(quantize, str):
            quantize = (quantize,)
        self.quantize = tuple(quantize)
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ConfigError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
        if not isinstance(max_persists, int) or isinstance(max_persists, bool) or max_persists < 1:
            raise ConfigError(f"max_persists must be an int >= 1, got {max_persists!r}")
        self.max_persists = max_persists
        if when_busy not in ("wait", "skip"):
            raise ConfigError(f"when_busy must be 'wait' or 'skip', got {when_busy!r}")
        self.when_busy = when_busy
        host_memory, specs = resolve(root, storage_options, keep_last, policy)
        self.rank, self.world_size = (0, 1) if no_dist else _rank_and_world(process_group)
        if when_busy == "skip" and self.world_size > 1:  # the ranks would have to skip alike
            raise ConfigError("when_busy='skip' is for a single process; with several ranks use 'wait'")
        # This job's id, the same on every rank: it names the job's shard files and its save
        # attempts (saves are called in the same order everywhere), so what a killed earlier
        # job or another writer left in a step's directory is never taken for this job's.
        self._session = _session_token(process_group) if self.world_size > 1 else uuid.uuid4().hex
        self._process_group = process_group
        self._claimed = False
        self.levels = [
            SnapshotLevel(
                spec.name,
                Storage(spec.url, spec.storage_options, io_threads=io_threads, fs=spec.fs),
                every=spec.every,
                keep_last=spec.keep_last,
                rank=self.rank,
                world_size=self.world_size,
                incremental=incremental,
                timeout=timeout,
                writer=self._session,
                lease_ttl=lease_ttl,
            )
            for spec in specs
        ]
        self.memory = MemoryLevel(host_memory) if host_memory else None
        self.storage = self.levels[0].storage  # the root level's files
        self.keep_last = keep_last
        self.incremental = incremental
        self.timeout = timeout
        self._stager = Stager()
        self._reserved_for: list[int] | None = None  # the buffer sizes the pool was last reserved for
        self._reserving = threading.Lock()  # a reserve runs in save() or in the feeder thread
        self._persist = ThreadPoolExecutor(1, thread_name_prefix="fmstore-persist")
        self._hash_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fmstore-hash")
        # Its own threads: an encode is asked for from level threads and fans out chunks.
        self._codec_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fmstore-codec")
        self._items = ItemBuilder(
            compression=self.compression,
            codec=codec,
            quantize=self.quantize,
            hash_pool=self._hash_pool,
            codec_pool=self._codec_pool,
        )
        self._level_pool = (
            ThreadPoolExecutor(len(self.levels), thread_name_prefix="fmstore-level")
            if len(self.levels) > 1
            else None
        )
        self._last: SaveHandle | None = None
        self._persists = _Persists(self.storage.url)  # durable persists in flight, their errors
        self._deleting = threading.Lock()  # a delete and the start of a save exclude each other
        self._saves = 0
        self._closed = False
        overlap.install()  # block=False saves make the next optimizer step wait for their copies
        # A save in flight at exit is finished, not lost (the tracker, not self: it outlives a
        # dropped checkpointer until its persists are done).
        exiting.register(self._persists)
        # What close() frees, freed too when this object is dropped unclosed.  Nothing here
        # refers to self (the persists run a function of their job, the stager's callbacks are
        # weak), so reference counting alone frees a dropped checkpointer and this runs.
        pools = [self._persist, self._hash_pool, self._codec_pool, self._level_pool]
        self._owned = _Owned(
            self._persists, self.levels, self.memory, self._stager, [p for p in pools if p is not None]
        )
        self._finalizer = weakref.finalize(self, _dropped, self._owned)
        self._finalizer.atexit = False  # at exit the kernel drops local locks; exiting drains persists

    # ------------------------------------------------------------------ listing

    def level_names(self) -> list[str]:
        """Where snapshots can live, fastest first ("host", host memory, first when kept there)."""
        return ([HOST] if self.memory is not None else []) + [lvl.name for lvl in self.levels]

    def _levels(self, level: str | None) -> list[SnapshotLevel]:
        if level is None:
            return self.levels
        found = [lvl for lvl in self.levels if lvl.name == level]
        if not found and (level != HOST or self.memory is None):
            raise ConfigError(f"no checkpoint level {level!r}; have {self.level_names()}")
        return found

    def steps(self, level: str | None = None) -> list[int]:
        """Committed steps, oldest first, in ``level`` or in any level (a snapshot without its
        manifest does not exist; one kept only in host memory exists for this process)."""
        out: set[int] = set()
        if self.memory is not None and level in (None, HOST):
            out.update(self.memory.steps())
        for lvl in self._levels(level):
            out.update(lvl.steps())
        return sorted(out)

    def latest(self, level: str | None = None) -> int | None:
        """The newest committed step, or None if there is none."""
        steps = self.steps(level)
        return steps[-1] if steps else None

    def where(self, step: int) -> list[str]:
        """The levels holding a committed copy of ``step``, fastest first."""
        out = [HOST] if self.memory is not None and self.memory.get(step) is not None else []
        return out + [lvl.name for lvl in self.levels if lvl.committed(step)]

    def manifest(self, step: int | None = None, *, level: str | None = None) -> Manifest:
        """The manifest of ``step`` (default: the latest) from the fastest durable level holding it."""
        levels = self._levels(level)
        if step is None:
            steps = sorted({s for lvl in levels for s in lvl.steps()})
            if not steps:
                raise SnapshotNotFoundError(f"no committed snapshot under {self._where_text(levels)}")
            step = steps[-1]
        for lvl in levels:
            if lvl.committed(step):
                return lvl.manifest(step)
        raise SnapshotNotFoundError(
            f"no committed snapshot for step {step} under {self._where_text(levels)} (have {self.steps(level)})"
        )

    @staticmethod
    def _where_text(levels: list[SnapshotLevel]) -> str:
        return " or ".join(repr(lvl.url) for lvl in levels) or "no durable level"

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        state: Any,
        *,
        block: bool = True,
        meta: dict[str, Any] | None = None,
        levels: Sequence[str] | str | None = None,
    ) -> SaveHandle:
        """Snapshot ``state`` as ``step``: returns once its tensors are staged in host memory.

        Call it on every rank of the process group with the same ``step``.  A Stateful value
        in ``state`` (a module, an optimizer, an LR scheduler, :class:`RNGState`, anything
        with ``state_dict()`` and ``load_state_dict()``) is saved through ``state_dict()``.

        With ``block=False`` it returns while the parameters' and optimizer states' copies are
        still running (everything else, e.g. a module's buffers, is copied first), so they
        overlap the next forward and backward pass: the next ``optimizer.step()`` of any torch
        optimizer waits for them before it changes the parameters (a global step pre-hook;
        with a closure, after the closure).  Tensors changed by anything other than an
        optimizer step must not change before ``handle.wait_staged()``.

        ``levels`` ("all" or level names) writes to those durable levels whatever their
        ``every`` (e.g. the last snapshot of a run).  Errors of the background persist surface
        on ``handle.wait()``, or else once on the next ``save`` (which saves its own step
        first, then raises the earlier error with a note saying so) or ``close``.
        """
        if self._closed:
            raise FmstoreError("the checkpointer is closed")
        step_dir(step)  # checks the step
        with paused_gc():  # its objects are freed by refcount before a collection promotes them
            handle = self._save(step, state, block, meta, levels)
        # An earlier persist's error nobody has seen: this step is saved all the same, then the
        # error is raised (once) here.
        earlier = self._persists.pop_unreported()
        if earlier is not None:
            earlier.add_note(
                f"fmstore: this is the error of an earlier save, raised once; save({step}) itself "
                "went ahead (Checkpointer.wait() waits for it)"
            )
            raise earlier
        return handle

    def _save(
        self,
        step: int,
        state: Any,
        block: bool,
        meta: dict[str, Any] | None,
        levels: Sequence[str] | str | None,
    ) -> SaveHandle:
        t0 = time.perf_counter()
        with self._deleting:  # a delete in progress may remove the files this save would reference
            pass
        self._collect_unreported()
        prepared = stateful.for_save(state)
        tensors, tree, local = flatten(prepared.state, self.rank)
        targets = self._targets(step, levels)
        if targets and levels is None and self.when_busy == "skip" and self._busy():
            warnings.warn(
                f"fmstore: step {step} is not written to {[lvl.name for lvl in targets]}: "
                f"{self.max_persists} persist(s) of earlier steps still running (when_busy='skip')"
                + ("; it is kept in host memory" if self.memory is not None else ""),
                stacklevel=3,
            )
            targets = []
        if not targets and self.memory is None:  # no level takes this step: nothing to stage
            info = SnapshotInfo(step, "", 0, 0, len(tensors), 0, [])
            handle = SaveHandle(step, completed(info), None, time.perf_counter() - t0)
            self._last = handle
            return handle
        pieces = self._pieces(tensors, local)
        if targets:
            if not self._claimed:
                self._claim()
            self._make_room()  # at most max_persists durable persists, so memory stays bounded
        for lvl in targets:
            if lvl.committed(step):
                raise FmstoreError(
                    f"step {step} is already committed under {lvl.url!r}; it is never overwritten"
                )
        if self.memory is not None and self.memory.get(step) is not None:
            raise FmstoreError(f"step {step} is already committed in host memory; it is never overwritten")
        gpu_encode = (
            self._gpu_encode
            if self.compression and self.memory is None and registry.encodes_on_gpu(self.codec)
            else None
        )
        deferred = None
        if not block:
            guarded = stateful.guarded_tensors(prepared.slots) | overlap.guarded_pointers()
            deferred = {p.name for p in pieces if p.local.numel() and p.local.data_ptr() in guarded}
        # Weakly bound: a staging still copying must not keep a dropped checkpointer alive.
        staged = self._stager.stage(
            {p.name: p.local for p in pieces},
            _weakly(gpu_encode) if gpu_encode is not None else None,
            deferred,
            _weakly(self._reserve),
        )
        kept = None
        if self.memory is not None:
            items = {p.name: MemoryItem(p.global_shape, p.offsets) for p in pieces}
            # Committed in memory: restorable from here on (a restore first waits for the
            # copies that block=False leaves in flight).
            kept = MemorySnapshot(step, staged.retain(), items, tree)
            self.memory.add(kept)
        if block:
            staged.wait()
        elif not staged.done():
            overlap.defer_until_staged(staged.wait)
        stall = time.perf_counter() - t0
        if not targets:  # host memory only: committed already, nothing to persist
            staged.release()  # the memory level holds its own reference
            nbytes = sum(p.local.numel() * p.local.element_size() for p in pieces)
            info = SnapshotInfo(step, HOST, nbytes, 0, len(pieces), 0, [HOST])
            handle = SaveHandle(step, completed(info), staged, stall)
            self._last = handle
            return handle
        self._saves += 1
        token = f"{self._session}:{self._saves}"
        job = _SaveJob(
            step, staged, pieces, sorted(tensors), tree, dict(meta or {}), targets, kept is not None, token
        )
        # A function of the job, not a bound method: a dropped checkpointer's persist must not
        # keep it alive (its finalizer waits for the persist, then releases the leases).
        future = self._persist.submit(_persist_job, job, self._items, self._level_pool)
        handle = SaveHandle(step, future, staged, stall)
        future.add_done_callback(
            lambda f: setattr(handle, "persist_seconds", time.perf_counter() - t0 - stall)
        )
        self._persists.add(handle)
        self._last = handle
        return handle

    def _collect_unreported(self) -> None:
        self._persists.collect()

    def _pieces(self, tensors: dict[str, Any], local: Any) -> list[Piece]:
        """What this rank saves of each tensor (replicated ones too when host memory keeps them)."""
        return pieces_to_save(
            tensors, self.rank, self.world_size, replicas=self.memory is not None, rank_local=local
        )

    def reserve(self, state: Any) -> int:
        """Pin now the host memory that saves of ``state`` will hold at once in the steady state
        (the staging buffers, and those of each persist in flight and snapshot kept in host
        memory), which the first save would otherwise pin while training runs: gigabytes of
        ``cudaHostAlloc`` stall the training's CUDA calls for seconds.  Call it before the first
        save, once ``state`` has its final shapes (after the first optimizer step: Adam's moments
        exist from then on).  Copies the state once into the pool, writes nothing.  Returns the
        bytes the pool holds."""
        prepared = stateful.for_save(state)
        tensors, _, local = flatten(prepared.state, self.rank)
        pieces = self._pieces(tensors, local)
        staged = self._stager.stage({p.name: p.local for p in pieces}, None, None, self._reserve)
        try:
            staged.wait()
        finally:
            staged.release()
        return self._stager.pool.reserved

    def _reserve(self, staged: Staged) -> None:
        """Pin now the host buffers that saves will hold at once in the steady state: the
        snapshots kept in host memory, the one being staged, and the durable persists in flight
        (each holds its snapshot's buffers until written).  Otherwise the pool grows at the
        first durable save, seconds of pinning in the middle of training."""
        with self._reserving:  # called by save(), or by the feeder thread (Stager.stage's on_listed)
            sizes = sorted(staged.sizes)
            if sizes == self._reserved_for:
                return
            self._reserved_for = sizes
            self._reserve_sets(sizes)

    def _reserve_sets(self, sizes: list[int]) -> None:
        sets = self._sets_held()
        try:
            self._stager.pool.reserve(sizes, sets)
        except CapacityError as e:  # this save is staged; later ones pin as they go
            warnings.warn(
                f"fmstore: could not pin ahead the host memory of {sets} snapshots ({e}); "
                "saves will allocate it when first needed",
                stacklevel=3,
            )

    def _sets_held(self) -> int:
        """How many snapshots' host buffers saves hold at once at most: those kept in host
        memory, the one being staged, and the durable persists in flight (each holds its
        buffers until written).  Without host memory a save stages only once fewer than
        ``max_persists`` persists run (``_make_room``; ``when_busy="skip"`` stages nothing
        then), so the one being staged is one of them: ``max_persists`` sets.  A save kept in
        host memory only stages while up to ``max_persists`` persist."""
        if self.memory is None:
            return self.max_persists if self.levels else 1
        return self.memory.keep + 1 + (self.max_persists if self.levels else 0)

    def _busy(self) -> bool:
        """Whether ``max_persists`` durable persists are still in flight."""
        return len(self._persists.running()) >= self.max_persists

    def _make_room(self) -> None:
        while True:
            pending = self._persists.running()
            if len(pending) < self.max_persists:
                return
            wait_futures([pending[0]._future])

    def _gpu_encode(self, name: str, t: torch.Tensor) -> int | None:
        """The element width to encode ``t`` with on its GPU before staging, or None."""
        width = t.element_size()
        if t.numel() * width < GPU_ENCODE_MIN_BYTES or width not in huffman.WIDTHS:
            return None
        if self._items.quantizes(name, t.dtype):
            return None
        from ..codec import gpu

        return width if gpu.kernels_load() else None

    def _targets(self, step: int, levels: Sequence[str] | str | None) -> list[SnapshotLevel]:
        if levels == "all":
            return list(self.levels)
        if levels is None:
            return [lvl for lvl in self.levels if lvl.takes(step)]
        names = [levels] if isinstance(levels, str) else list(levels)
        wanted = set(names)
        for name in names:
            self._levels(name)  # unknown names are an error
        return [lvl for lvl in self.levels if lvl.takes(step) or lvl.name in wanted]

    # ------------------------------------------------------------------ retention

    def _claim(self) -> None:
        """Claim the durable levels' roots before this job's first write to any of them: rank 0
        takes each root's writer lease and the other ranks learn the outcome, so that a second
        job on a root is refused on every rank before any of them writes."""
        error: FmstoreError | None = None
        if self.rank == 0:
            for lvl in self.levels:
                try:
                    lvl.claim()
                except FmstoreError as e:
                    error = e
                    break
        if self.world_size > 1:
            import torch.distributed as dist

            pg = self._process_group
            box = [None if error is None else str(error)] if self.rank == 0 else [None]
            src = 0 if pg is None else dist.get_global_rank(pg, 0)
            dist.broadcast_object_list(box, src=src, group=pg)
            if error is None and box[0] is not None:
                error = WriterConflictError(f"rank 0 could not claim the checkpoint roots: {box[0]}")
        if error is not None:
            for lvl in self.levels:
                lvl.snapshots.release(forget=True)
            raise error
        self._claimed = True

    def gc(self, *, keep_steps: list[int] | None = None, level: str | None = None) -> list[str]:
        """Delete files that no committed snapshot references, in every durable level (or
        ``level``), in directories older than its newest committed snapshot (newer ones may
        still be being written).  Returns what was deleted.  Deletes only as the root's writer
        (claims it like a save; :class:`WriterConflictError` if another job writes there)."""
        self._wait_all()
        deleted = []
        for lvl in self._levels(level):
            if self.rank == 0:
                lvl.claim()
            deleted += lvl.snapshots.gc(keep_steps=keep_steps)
        return deleted

    def delete(self, step: int, *, level: str | None = None) -> None:
        """Remove committed snapshot ``step`` from every level (or ``level``) holding it: its
        manifest first (from then on it does not exist), then the files no other committed
        snapshot references.  Waits for saves in flight, which may reference its files; a save
        called meanwhile waits for the delete."""
        with self._deleting:
            self._delete(step, level)

    def _delete(self, step: int, level: str | None) -> None:
        self._wait_all()
        found = False
        if self.memory is not None and level in (None, HOST):
            found |= self.memory.drop(step)
        for lvl in self._levels(level) if level != HOST else []:
            if lvl.committed(step):
                if self.rank == 0:
                    lvl.claim()
                lvl.drop(step)
                found = True
        if not found:
            raise SnapshotNotFoundError(f"no committed snapshot for step {step} in {self.level_names()}")

    # ------------------------------------------------------------------ load

    def load(
        self,
        state: Any = None,
        step: int | None = None,
        *,
        device: str | torch.device | None = None,
        level: str | None = None,
        strict: bool = True,
    ) -> Any:
        """Restore a committed snapshot (default: the latest) from the fastest level holding it.

        With ``state`` given, it is restored in place: its tensors are filled (dtype and global
        shape must match; a DTensor target gets exactly its local shard, read from whichever
        saved shards overlap it, so a snapshot saved on 4 ranks loads on 1, 2 or 3), and each
        Stateful value gets ``load_state_dict()`` (a fresh optimizer first gets its state
        created, so it is filled in place too).  Strict by default: a key of the target that the
        snapshot lacks, or one of the snapshot that the target lacks, raises
        :class:`StateKeysError` naming them, before anything is read; ``strict=False`` loads the
        keys both have and leaves the others.  The restored state is returned (plain values
        such as step counters come from the snapshot, Stateful objects are themselves).

        Without ``state`` a new state of whole tensors is built on ``device`` (default CPU).
        A copy in host memory serves only the sharding it was saved with; a damaged copy on
        one durable level is skipped (with a warning) for the next level holding the step.
        A load of the latest snapshot that loses a race with another process's retention (the
        step is deleted while it is read) loads the newer latest one instead.
        """
        for attempt in range(RETENTION_RETRIES):
            try:
                return self._load_once(state, step, device, level, strict)
            except SnapshotDeletedError:
                if step is not None or attempt + 1 == RETENTION_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def _load_once(self, state: Any, step: int | None, device: Any, level: str | None, strict: bool) -> Any:
        levels = self._levels(level)
        snap = None
        listed = False  # whether the step is the newest one listed (vs. one asked for)
        if self.memory is not None and level in (None, HOST):
            mem_steps = self.memory.steps()
            want = step if step is not None else (mem_steps[-1] if mem_steps else None)
            snap = self.memory.get(want) if want is not None else None
            if snap is None and level == HOST:
                raise SnapshotNotFoundError(f"step {step} is not in host memory (have {mem_steps})")
            if snap is not None:
                step = want
        if snap is None:
            self._wait_all(raise_error=False)  # a failed save is its handle's (and the next save's) to report
            if step is None:
                listed = True
                have = sorted({s for lvl in levels for s in lvl.steps()})
                if not have:
                    raise SnapshotNotFoundError(f"no committed snapshot under {self._where_text(levels)}")
                step = have[-1]
        holders = [lvl for lvl in levels if lvl.committed(step)] if level != HOST else []
        if snap is None and not holders and listed:
            raise SnapshotDeletedError(f"step {step} was deleted (retention) after it was listed")
        if snap is None and not holders:
            raise SnapshotNotFoundError(
                f"no committed snapshot for step {step} under {self._where_text(levels)} (have {self.steps(level)})"
            )
        # The snapshot exists: only now are fresh optimizers given state to fill (where it has some).
        prepared = None
        if state is not None:
            saved = snap.tree if snap is not None else _first_tree(holders, step)
            prepared = stateful.for_load(state, lambda path: subtree(saved, path, self.rank))
        try:
            out = self._restore(snap, holders, step, prepared, device, level, strict)
        except BaseException:
            if prepared is not None:
                stateful.undo_init(prepared)
            raise
        if prepared is None:
            return out

        def missing(slot: stateful.Slot) -> None:
            warnings.warn(
                f"snapshot step {step} has no state for {slot_text(slot)}; it is left as it is", stacklevel=4
            )

        return stateful.restore(out, prepared.slots, strict, missing)

    def _restore(
        self,
        snap: MemorySnapshot | None,
        holders: list[SnapshotLevel],
        step: int,
        prepared: stateful.Prepared | None,
        device: Any,
        level: str | None,
        strict: bool,
    ) -> Any:
        targets: dict[str, torch.Tensor] = {}
        target_tree = None
        if prepared is not None:
            targets, target_tree, _ = flatten(prepared.state, self.rank)
        opaque = [s.path for s in prepared.slots] if prepared is not None else []
        if snap is not None:
            names = self._check_keys(step, snap.tree, target_tree, opaque, strict)
            out = restore(snap, targets, device, names)
            if out is not None:
                return unflatten(snap.tree, out, self.rank)
            if level == HOST:
                raise LoadMismatchError(
                    f"step {step} in host memory was saved with another sharding than the targets'"
                )
            if not holders:
                raise SnapshotNotFoundError(
                    f"step {step} is in host memory with another sharding, and in no durable level"
                )
            self._wait_all(raise_error=False)
        for i, lvl in enumerate(holders):
            try:
                manifest = lvl.manifest(step)
                names = self._check_keys(step, manifest.tree, target_tree, opaque, strict)
                return self._load_from(lvl, manifest, targets, names, device)
            except (CorruptBlobError, ManifestError, SnapshotNotFoundError) as e:
                # A manifest failing validation is damage too; a step that is no longer
                # committed was deleted meanwhile (retention), which is not damage.
                deleted = not lvl.committed(step)
                if i + 1 == len(holders):
                    if deleted:
                        raise _deleted_while_loading(lvl, step) from e
                    raise
                if deleted:
                    continue
                warnings.warn(
                    f"step {step} on level {lvl.name!r} is damaged ({e}); restoring it from {holders[i + 1].name!r}",
                    stacklevel=3,
                )
        raise AssertionError("unreachable")

    def _check_keys(
        self,
        step: int,
        saved: dict[str, Any],
        target: dict[str, Any] | None,
        opaque: list[tuple[Any, ...]],
        strict: bool,
    ) -> set[str] | None:
        """The snapshot tensors to load (None: all), after the strict key check."""
        if target is None:
            return None
        if strict:
            missing, unexpected = compare(saved, target, self.rank, opaque)
            if missing or unexpected:
                raise StateKeysError(_keys_message(step, missing, unexpected), missing, unexpected)
        wanted = tensor_leaves(target, self.rank)
        return {name for path, name in tensor_leaves(saved, self.rank).items() if path in wanted}

    def _load_from(
        self,
        lvl: SnapshotLevel,
        manifest: Manifest,
        targets: dict[str, torch.Tensor],
        names: set[str] | None,
        device: Any,
    ) -> Any:
        regions: list[Region] = []
        out: dict[str, torch.Tensor] = {}
        reader = SnapshotReader(lvl.storage, manifest, pool=self._stager.pool)
        # The files of the tensors allocated here whole, checked against their real sizes
        # before the allocation (a manifest records the sizes of its own files only).
        reader.check_files(n for n in manifest.tensors if (names is None or n in names) and n not in targets)
        for name, entry in manifest.tensors.items():
            if names is not None and name not in names:
                continue
            dtype = dtype_from_name(entry.dtype)
            gshape = tuple(entry.shape)
            target = targets.get(name)
            check_target(name, manifest.step, dtype, gshape, target)
            if target is not None and is_dtensor(target):
                dest, offsets, _ = dtensor_region(target, name)
            else:
                dest = (
                    target if target is not None else torch.empty(gshape, dtype=dtype, device=device or "cpu")
                )
                offsets = (0,) * len(gshape)
            out[name] = target if target is not None else dest
            regions.append(Region(name, offsets, dest))
        reader.read(regions)
        return unflatten(manifest.tree, out, self.rank)

    # ------------------------------------------------------------------ lifecycle

    def _wait_all(self, *, raise_error: bool = False, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout`` s) for every durable persist in flight, raising the first
        unseen error if asked; whether they are all done."""
        return self._persists.wait(raise_error=raise_error, timeout=timeout)

    def wait(self) -> SnapshotInfo | None:
        """Wait for the saves in flight; raises the first error no caller has seen, else returns
        the info of the latest save."""
        self._wait_all(raise_error=True)
        last = self._last
        if last is None:
            return None
        return last.wait()

    def close(self) -> None:
        """Wait for the saves in flight, then free the pinned pool, snapshots in memory, threads.
        Raises a save's error that no caller has seen yet."""
        if self._closed:
            return
        try:
            self._wait_all(raise_error=True)
        finally:
            self._closed = True
            self._finalizer.detach()  # closed here: nothing is left for a drop to do
            exiting.unregister(self._persists)
            self._owned.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.storage.url!r}, levels={self.level_names()}, rank={self.rank}/{self.world_size})"


@dataclass
class _SaveJob:
    step: int
    staged: Staged
    pieces: list[Piece]
    names: list[str]
    tree: dict[str, Any]
    meta: dict[str, Any]
    levels: list[SnapshotLevel]  # durable levels that take this step
    in_memory: bool  # a host-memory copy was kept too
    token: str  # this save attempt, the same on every rank


def _persist_job(job: _SaveJob, builder: ItemBuilder, level_pool: ThreadPoolExecutor | None) -> SnapshotInfo:
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


class _Persists:
    """A checkpointer's durable persists in flight, oldest first, and the errors of finished
    ones that no caller has seen yet (each is raised once).  Apart from the checkpointer, which
    it never refers to: the exit drain and a dropped checkpointer's finalizer wait on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._inflight: list[SaveHandle] = []
        self._unreported: list[BaseException] = []

    def add(self, handle: SaveHandle) -> None:
        with self._lock:
            self._inflight.append(handle)

    def collect(self) -> None:
        """Keep the errors of finished persists nobody has seen yet; forget finished ones."""
        with self._lock:
            # One look at each handle: one that finishes meanwhile stays for the next call
            # (asking done() twice could drop it unreported).
            done = [h for h in self._inflight if h.done()]
            self._inflight = [h for h in self._inflight if h not in done]
            self._unreported += [e for e in (h._unreported_error() for h in done) if e is not None]

    def running(self) -> list[SaveHandle]:
        """The persists still running (after collecting the finished ones), oldest first."""
        self.collect()
        with self._lock:
            return list(self._inflight)

    def pop_unreported(self) -> BaseException | None:
        with self._lock:
            return self._unreported.pop(0) if self._unreported else None

    def wait(self, *, raise_error: bool = False, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout`` s) for every persist in flight, raising the first unseen
        error if asked; whether they are all done."""
        with self._lock:
            pending = list(self._inflight)
        _, not_done = wait_futures([h._future for h in pending], timeout=timeout)
        if not_done:
            return False
        if raise_error:
            self.collect()
            error = self.pop_unreported()
            if error is not None:
                raise error
        return True

    def _exit_pending(self) -> str | None:
        with self._lock:
            pending = [h for h in self._inflight if not h.done()]
        if not pending:
            return None
        steps = ", ".join(str(h.step) for h in pending)
        return f"the commit of step {steps} to {self.url!r}"

    def _exit_wait(self, timeout: float | None) -> bool:
        return self.wait(raise_error=True, timeout=timeout)


@dataclass
class _Owned:
    """What a checkpointer frees at close: never refers to the checkpointer, so that a dropped
    one is freed by reference counting and its finalizer (:func:`_dropped`) can still free this."""

    persists: _Persists
    levels: list[SnapshotLevel]
    memory: MemoryLevel | None
    stager: Stager
    pools: list[ThreadPoolExecutor]

    def close(self) -> None:
        """Free the threads, the pinned pool, the snapshots in memory; release the leases."""
        for pool in self.pools:
            pool.shutdown(wait=True)
        if self.memory is not None:
            self.memory.clear()
        self.stager.close()
        for lvl in self.levels:
            lvl.close()


def _dropped(owned: _Owned) -> None:
    """Finalizer of a checkpointer garbage-collected without ``close()``.

    Its leases are marked orphaned at once, so that a new checkpointer of this process on the
    same root waits for them rather than being refused; its saves in flight are committed
    (a returned save is a promise), then everything is freed and the leases released.  That
    is done here on the main thread (``del ck`` in a script or notebook: the root is free
    when ``del`` returns), else on a thread of its own: there may be saves to wait for, and a
    collection runs finalizers on whichever thread it happens on, one of the pools' own (which
    cannot join itself) or fsspec's event loop (which cannot wait for itself)."""
    for lvl in owned.levels:
        lvl.snapshots.orphan()
    if owned.persists.running() or threading.current_thread() is not threading.main_thread():
        threading.Thread(target=_close_dropped, args=(owned,), name="fmstore-release", daemon=True).start()
    else:
        _close_dropped(owned)


def _close_dropped(owned: _Owned) -> None:
    try:
        owned.persists.wait()
        owned.persists.collect()
        while (error := owned.persists.pop_unreported()) is not None:  # no caller is left to raise it to
            print(
                f"fmstore: a save of a Checkpointer dropped without close() failed "
                f"({owned.persists.url!r}): {type(error).__name__}: {error}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        owned.close()


def _weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` bound weakly: a call after its object is gone does nothing (returns None)."""
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def call(*args: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args)

    return call


#: Loads of the latest snapshot that lose a race with retention, before giving up.
RETENTION_RETRIES = 5


def _deleted_while_loading(lvl: SnapshotLevel, step: int) -> SnapshotDeletedError:
    return SnapshotDeletedError(
        f"step {step} was deleted while it was being loaded from {lvl.url!r} "
        "(retention: keep_last of the process writing there)"
    )


def _first_tree(holders: list[SnapshotLevel], step: int) -> dict[str, Any]:
    """The state tree of ``step`` from the first level whose manifest reads; a damaged one is
    skipped here as the load skips it (which warns), the last one's error is raised."""
    for i, lvl in enumerate(holders):
        try:
            return lvl.manifest(step).tree
        except (CorruptBlobError, ManifestError, SnapshotNotFoundError) as e:
            if i + 1 == len(holders):
                if not lvl.committed(step):
                    raise _deleted_while_loading(lvl, step) from e
                raise
    raise AssertionError("unreachable")


def _keys_message(step: int, missing: list[str], unexpected: list[str], shown: int = 8) -> str:
    def some(keys: list[str]) -> str:
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        return ", ".join(repr(k) for k in keys[:shown]) + more

    parts = []
    if missing:
        parts.append(f"the target has {some(missing)}, which the snapshot lacks")
    if unexpected:
        parts.append(f"the snapshot has {some(unexpected)}, which the target lacks")
    hint = ""
    if any("/state/" in k for k in unexpected):
        hint = (
            "; an optimizer's state_dict() is empty until its first step: put the optimizer itself in "
            "the state (it is restored through load_state_dict)"
        )
    return f"snapshot step {step} does not fit the load target: {'; '.join(parts)}{hint}; pass strict=False to load the keys both have"


def slot_text(slot: stateful.Slot) -> str:
    path = "/".join(str(k) for k in slot.path) or "<root>"
    return f"{path!r} ({type(slot.obj).__name__})"


def _run(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised (one level failing must not hide the others)."""
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 - handed back to the caller, who re-raises
        return e


def _session_token(process_group: Any) -> str:
    """A token rank 0 draws and every rank of the group receives (one object broadcast, when the
    checkpointer is made: all ranks make theirs together, as they save together)."""
    import uuid

    import torch.distributed as dist

    src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
    box = [uuid.uuid4().hex if dist.get_rank(process_group) == 0 else None]
    dist.broadcast_object_list(box, src=src, group=process_group)
    return str(box[0])


def _rank_and_world(process_group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)
