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

import functools
import os
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import (
    ChecksumError,
    ConfigError,
    FmstoreError,
    LoadMismatchError,
    SnapshotNotFoundError,
    StateKeysError,
)
from ..gcpause import paused_gc
from ..jobs import Job
from ..store import TieredStore
from . import overlap, stateful
from .closing import Owned, dropped
from .group import claim, rank_and_world, session_token
from .host_level import MemoryLevel
from .lease import DEFAULT_TTL
from .level import SnapshotLevel, open_levels
from .loading import SnapshotLoader
from .manifest import Manifest, step_dir
from .options import COMPRESSION, check_limits, check_save_options  # noqa: F401
from .policy import Policy, resolve
from .saving import GPU_ENCODE_MIN_BYTES, SaveHandle, SavePipeline, SnapshotInfo  # noqa: F401
from .tree import flatten
from .writing import MOMENTS, completed

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
        self.compression, self.codec = check_save_options(compression, codec)  # aliases: the registry's
        codec = self.codec
        check_limits(keep_last, max_persists, when_busy)
        self.max_persists, self.when_busy = max_persists, when_busy
        self.quantize = (quantize,) if isinstance(quantize, str) else tuple(quantize)
        host_memory, specs = resolve(root, storage_options, keep_last, policy)
        self.rank, self.world_size = (0, 1) if no_dist else rank_and_world(process_group)
        if when_busy == "skip" and self.world_size > 1:  # the ranks would have to skip alike
            raise ConfigError("when_busy='skip' is for a single process; with several ranks use 'wait'")
        # This job's id, the same on every rank: it names the job's shard files and its save
        # attempts (saves are called in the same order everywhere), so what a killed earlier
        # job or another writer left in a step's directory is never taken for this job's.
        self._session = session_token(process_group) if self.world_size > 1 else uuid.uuid4().hex
        self.levels = open_levels(
            specs, io_threads=io_threads, rank=self.rank, world_size=self.world_size, incremental=incremental,
            timeout=timeout, writer=self._session, lease_ttl=lease_ttl,
        )  # fmt: skip
        self.memory = MemoryLevel(host_memory) if host_memory else None
        self.storage = self.levels[0].storage  # the root level's files
        self.keep_last = keep_last
        self.incremental = incremental
        self.timeout = timeout
        # The save side (stage -> items -> persist) and the load side (copy -> keys -> regions
        # -> read -> restore); neither refers to self.
        claim_roots = functools.partial(claim, self.levels, self.rank, self.world_size, process_group)
        self._pipeline = pipeline = SavePipeline(
            levels=self.levels, memory=self.memory, rank=self.rank, world_size=self.world_size,
            compression=self.compression, codec=codec, quantize=self.quantize, io_threads=io_threads,
            max_persists=max_persists, session=self._session, claim=claim_roots,
        )  # fmt: skip
        self._loader = SnapshotLoader(
            rank=self.rank, levels=self.levels, memory=self.memory, pool=pipeline.stager.pool, persists=pipeline.persists
        )  # fmt: skip
        self._last: SaveHandle | None = None
        self._exclusive = threading.Lock()  # a delete and the staging of a save exclude each other
        self._closed = False
        overlap.install()  # block=False saves make the next optimizer step wait for their copies
        # What close() frees, freed too when this object is dropped unclosed.  Nothing here
        # refers to self (the persists run a function of their job, the stager's callbacks are
        # weak), so reference counting alone frees a dropped checkpointer and this runs.
        self._owned = Owned(self._pipeline, self.levels)
        self._finalizer = weakref.finalize(self, dropped, self._owned)
        self._finalizer.atexit = False  # at exit the kernel drops local locks; exiting drains persists

    # ------------------------------------------------------------------ listing

    def level_names(self) -> list[str]:
        """Where snapshots can live, fastest first ("host", host memory, first when kept there)."""
        return self._loader.level_names()

    def _levels(self, level: str | None) -> list[SnapshotLevel]:
        return self._loader.levels_of(level)

    def steps(self, level: str | None = None) -> list[int]:
        """Committed steps, oldest first, in ``level`` or in any level (a snapshot without its
        manifest does not exist; one kept only in host memory exists for this process)."""
        return self._loader.steps(level)

    def latest(self, level: str | None = None) -> int | None:
        """The newest committed step, or None if there is none."""
        steps = self.steps(level)
        return steps[-1] if steps else None

    def where(self, step: int) -> list[str]:
        """The levels holding a committed copy of ``step``, fastest first."""
        return self._loader.where(step)

    def manifest(self, step: int | None = None, *, level: str | None = None) -> Manifest:
        """The manifest of ``step`` (default: the latest) from the fastest durable level holding it."""
        return self._loader.manifest(step, level)

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
        # A delete removes files a save may reference: the two exclude each other.  Objects are
        # freed by refcount before a collection would promote them.
        with self._exclusive, paused_gc():
            self._last = handle = self._save(step, state, block, meta, levels)
        # An earlier persist's error nobody has seen: this step is saved all the same, then the
        # error is raised (once) here.
        for earlier in self._pipeline.persists.pop_errors(1):
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
        pipeline = self._pipeline
        pipeline.persists.collect()
        prepared = stateful.for_save(state)
        tensors, tree, local = flatten(prepared.state, self.rank)
        targets = pipeline.targets(step, levels, self._levels)
        if targets and levels is None and self.when_busy == "skip" and pipeline.busy():
            warnings.warn(
                f"fmstore: step {step} is not written to {[lvl.name for lvl in targets]}: "
                f"{self.max_persists} persist(s) of earlier steps still running (when_busy='skip')"
                + ("; it is kept in host memory" if self.memory is not None else ""),
                stacklevel=3,
            )
            targets = []
        if not targets and self.memory is None:  # no level takes this step: nothing to stage
            info = SnapshotInfo(step, "", 0, 0, len(tensors), 0, [])
            return SaveHandle(step, Job(completed(info)), None, time.perf_counter() - t0)
        return pipeline.save(step, tensors, tree, local, prepared.slots, targets, block, meta, t0)

    def reserve(self, state: Any) -> int:
        """Pin now the host memory that saves of ``state`` will hold at once in the steady state
        (the staging buffers, and those of each persist in flight and snapshot kept in host
        memory), which the first save would otherwise pin while training runs: gigabytes of
        pinning stall the training's CUDA calls.  Call it before the first save, once ``state``
        has its final shapes (after the first optimizer step: Adam's moments exist from then
        on).  Copies the state once into the pool, writes nothing.  Returns the bytes the pool
        holds."""
        tensors, _, local = flatten(stateful.for_save(state).state, self.rank)
        return self._pipeline.reserve(self._pipeline.pieces(tensors, local))

    # ------------------------------------------------------------------ retention

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
        with self._exclusive:
            self._wait_all()
            if not self._pipeline.drop(step, level, self._levels):
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
        return self._loader.load(state, step, device, level, strict)

    # ------------------------------------------------------------------ lifecycle

    def _wait_all(self, *, raise_error: bool = False, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout`` s) for every durable persist in flight, raising the first
        unseen error if asked; whether they are all done."""
        return self._pipeline.persists.wait(timeout, raise_error=raise_error)

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
            self._owned.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.storage.url!r}, levels={self.level_names()}, rank={self.rank}/{self.world_size})"


