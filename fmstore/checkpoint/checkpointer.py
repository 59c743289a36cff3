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
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch

from ..blob import as_bytes_tensor, as_memoryview, dtype_from_name
from ..codec import Encoded, decode, encode, huffman
from ..codec.quant import BLOCK as QUANT_BLOCK
from ..codec.quant import dequantize as dequantize_int8
from ..codec.quant import quantize as quantize_int8
from ..errors import ConfigError, CorruptBlobError, FmstoreError
from ..store import TieredStore
from .level import SnapshotLevel, SnapshotNotFoundError, WriteItem, Written, numel
from .manifest import CHUNK_SIZE, Manifest, ManifestError, Shard, step_dir
from .memory import HOST, MemoryItem, MemoryLevel, MemorySnapshot, restore
from .policy import Policy, resolve
from .sharding import (
    LoadMismatchError,
    Piece,
    check_target,
    dtensor_region,
    intersect,
    is_dtensor,
    pieces_to_save,
    plan_read,
)
from .staging import Staged, Stager
from .storage import SnapshotStorage
from .tree import flatten, unflatten

#: ``quantize=`` patterns for Adam's (and AdamW's) moments in an optimizer's state_dict.
MOMENTS = ("*/exp_avg", "*/exp_avg_sq")
#: The manifest's codec for blockwise int8 (absmax per 256 values).
QUANT_CODEC = "int8-absmax256"
_QUANTIZABLE = (torch.float32, torch.bfloat16, torch.float16)
#: CUDA tensors smaller than this are staged raw and compressed by the CPU chain in the
#: background: launching a GPU encode costs about 0.1 ms of host time per tensor, more than
#: copying a few MiB raw (a model's biases and norms would otherwise add up to a long stall).
GPU_ENCODE_MIN_BYTES = 4 << 20
#: ``compression=`` values: None (raw) or the lossless chain.
COMPRESSION: dict[str | None, str | None] = {None: None, "lossless": "lossless"}
#: ``codec=`` values: which lossless chain (see ``Checkpointer``).
CODECS = ("auto", "zstd", "huffman")

__all__ = [
    "Checkpointer",
    "SaveHandle",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "ChecksumError",
    "LoadMismatchError",
]


class ChecksumError(CorruptBlobError):
    """Bytes read back do not match the checksum recorded when they were saved."""


def digest_all(
    buffers: list[torch.Tensor], pool: Executor | None = None, chunk_size: int = CHUNK_SIZE
) -> list[tuple[str, list[str]]]:
    """(checksum, per-chunk xxh3_128 digests) for each flat uint8 CPU tensor.

    xxHash's xxh3 runs at ~7 GB/s a core and releases the GIL, so the chunks of all
    tensors are hashed in parallel on ``pool``.  A checksum hashes the chunk digests: two
    byte strings have equal checksums exactly when all their chunks match.
    """
    import xxhash

    views = [as_memoryview(b) for b in buffers]
    jobs = [(i, v[a : a + chunk_size]) for i, v in enumerate(views) for a in range(0, len(v), chunk_size)]
    pieces = [m for _, m in jobs]
    hashes = (
        list(pool.map(xxhash.xxh3_128_hexdigest, pieces))
        if pool
        else [xxhash.xxh3_128_hexdigest(m) for m in pieces]
    )
    chunks: list[list[str]] = [[] for _ in buffers]
    for (i, _), h in zip(jobs, hashes):
        chunks[i].append(h)
    return [("xxh3_128:" + xxhash.xxh3_128_hexdigest("".join(c).encode()), c) for c in chunks]


def _verify_all(checks: list[tuple[str, Shard, torch.Tensor, int]], step: int, pool: Executor | None) -> None:
    """Check every chunk read back (in parallel); a mismatch names the tensor, file and chunk."""
    import xxhash

    jobs = []
    for name, shard, buf, start in checks:
        cs = shard.chunk_size
        if not cs:
            raise ManifestError(f"snapshot step {step}: tensor {name!r} has no chunk checksums")
        mv = as_memoryview(buf)
        for i, a in enumerate(range(0, len(mv), cs)):
            jobs.append((name, shard, start // cs + i, start + a, mv[a : a + cs]))
    pieces = [j[4] for j in jobs]
    hashes = (
        list(pool.map(xxhash.xxh3_128_hexdigest, pieces))
        if pool
        else [xxhash.xxh3_128_hexdigest(m) for m in pieces]
    )
    for (name, shard, index, offset, mv), h in zip(jobs, hashes):
        if index >= len(shard.chunks) or h != shard.chunks[index]:
            raise ChecksumError(
                f"snapshot step {step}: tensor {name!r} in {shard.file!r} does not match its checksum "
                f"(chunk {index}, bytes {shard.begin + offset}..{shard.begin + offset + len(mv)})"
            )


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
    """Returned by :meth:`Checkpointer.save` once staging is done; persisting goes on."""

    def __init__(self, step: int, future: Future[SnapshotInfo], staged: Staged, stall_s: float) -> None:
        self.step = step
        self._future = future
        self._staged = staged
        self.stall_seconds = stall_s  # time save() blocked the caller
        self.nbytes = staged.nbytes
        self.persist_seconds: float | None = None

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> SnapshotInfo:
        """Block until the snapshot is committed; returns its info or raises the save's error."""
        return self._future.result(timeout)

    def wait_staged(self) -> None:
        """Block until the device-to-host copies are done (only needed with ``block=False``)."""
        self._staged.wait()

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
        incremental: reference unchanged tensors in earlier snapshots instead of rewriting.
        quantize: glob patterns of tensor names (as flattened: ``optim/state/0/exp_avg``) to
            store lossily as blockwise int8 (absmax per 256 values; float tensors only), e.g.
            :data:`MOMENTS` for Adam's moments.  Never applied unless asked; the manifest
            records it (codec ``int8-absmax256``) and a load gives the dequantized values.
        compression: ``"lossless"`` encodes each written tensor with a codec chain; the
            manifest records the chain and load decodes.  Default None: stored raw.
        codec: which lossless chain.  ``"auto"`` (default): a CUDA tensor of at least
            :data:`GPU_ENCODE_MIN_BYTES` (4 MiB) is encoded on its GPU before the
            device-to-host copy (byte planes + per-chunk Huffman, the FMHS stream of
            ``kernels/huffman.cu``), so fewer bytes cross PCIe; a CPU tensor, a smaller one, or
            any when the kernels cannot be built, gets the CPU chain (byte planes + per-chunk
            zstd) in the background persist.  ``"zstd"``: always the CPU chain.
            ``"huffman"``: always FMHS (on the CPU reference for CPU tensors: slow, for
            checks).  With a host-memory level the raw copy is staged (a restore needs it),
            and the CPU chain runs in the background.  The GPU encode needs transient GPU
            memory of about twice the largest tensor; if it fails (out of memory, say), those
            tensors are staged raw, with a warning.
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
        incremental: bool = True,
        quantize: Sequence[str] | str = (),
        io_threads: int = 8,
        timeout: float = 1800.0,
        codec: str = "auto",
    ) -> None:
        if codec not in CODECS:
            raise ConfigError(f"codec must be one of {list(CODECS)}, got {codec!r}")
        self.codec = codec
        self._gpu_codec: bool | None = None  # whether the GPU kernels load; found on first use
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
        host_memory, specs = resolve(root, storage_options, keep_last, policy)
        self.rank, self.world_size = _rank_and_world(process_group)
        self.levels = [
            SnapshotLevel(
                spec.name,
                SnapshotStorage(spec.url, spec.storage_options, io_threads=io_threads, fs=spec.fs),
                every=spec.every,
                keep_last=spec.keep_last,
                rank=self.rank,
                world_size=self.world_size,
                incremental=incremental,
                timeout=timeout,
            )
            for spec in specs
        ]
        self.memory = MemoryLevel(host_memory) if host_memory else None
        self.storage = self.levels[0].storage  # the root level's files
        self.keep_last = keep_last
        self.incremental = incremental
        self.timeout = timeout
        self._stager = Stager()
        self._persist = ThreadPoolExecutor(1, thread_name_prefix="fmstore-persist")
        self._hash_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fmstore-hash")
        # Its own threads: an encode is asked for from level threads and fans out chunks.
        self._codec_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fmstore-codec")
        self._level_pool = (
            ThreadPoolExecutor(len(self.levels), thread_name_prefix="fmstore-level")
            if len(self.levels) > 1
            else None
        )
        self._last: SaveHandle | None = None
        self._closed = False

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

        Call it on every rank of the process group with the same ``step``.  With
        ``block=False`` it returns as soon as the device-to-host copies are queued; call
        ``handle.wait_staged()`` before changing the tensors (e.g. before the next optimizer
        step).  ``levels`` ("all" or level names) writes to those durable levels whatever
        their ``every`` (e.g. the last snapshot of a run).  Errors of the background persist
        surface on ``handle.wait()`` and on the next ``save``.
        """
        if self._closed:
            raise FmstoreError("the checkpointer is closed")
        step_dir(step)  # checks the step
        t0 = time.perf_counter()
        tensors, tree = flatten(state)
        pieces = pieces_to_save(tensors, self.rank, self.world_size, replicas=self.memory is not None)
        targets = self._targets(step, levels)
        prev = self._last
        if prev is not None:
            self._last = None  # its error is raised once, here (or on its own wait())
            prev.wait()  # one persist at a time keeps memory bounded
        for lvl in targets:
            if lvl.committed(step):
                raise FmstoreError(
                    f"step {step} is already committed under {lvl.url!r}; it is never overwritten"
                )
        if self.memory is not None and self.memory.get(step) is not None:
            raise FmstoreError(f"step {step} is already committed in host memory; it is never overwritten")
        gpu_encode = (
            self._gpu_encode if self.compression and self.memory is None and self.codec != "zstd" else None
        )
        staged = self._stager.stage({p.name: p.local for p in pieces}, gpu_encode)
        kept = None
        if self.memory is not None:
            items = {p.name: MemoryItem(p.global_shape, p.offsets) for p in pieces}
            kept = MemorySnapshot(step, staged, items, tree)
            # Committed in memory: restorable from here on (a restore first waits for the
            # copies that block=False leaves in flight).
            self.memory.add(kept)
        if block:
            staged.wait()
        stall = time.perf_counter() - t0
        job = _SaveJob(step, staged, pieces, sorted(tensors), tree, dict(meta or {}), targets, kept)
        future = self._persist.submit(self._persist_job, job)
        handle = SaveHandle(step, future, staged, stall)
        future.add_done_callback(
            lambda f: setattr(handle, "persist_seconds", time.perf_counter() - t0 - stall)
        )
        self._last = handle
        return handle

    def _quantizes(self, name: str, dtype: torch.dtype) -> bool:
        return (
            bool(self.quantize)
            and dtype in _QUANTIZABLE
            and any(fnmatchcase(name, pat) for pat in self.quantize)
        )

    def _encoder(self, st: Any) -> Encoded:
        """The codec chain for one staged tensor, its chunks spread over the hash pool."""
        return encode(st.data, torch.empty(0, dtype=st.dtype).element_size(), pool=self._codec_pool)

    def _gpu_encode(self, name: str, t: torch.Tensor) -> int | None:
        """The element width to encode ``t`` with on its GPU before staging, or None."""
        width = t.element_size()
        if t.numel() * width < GPU_ENCODE_MIN_BYTES or width not in huffman.WIDTHS:
            return None
        if self._quantizes(name, t.dtype):
            return None
        return width if self._gpu_codec_loads() else None

    def _gpu_codec_loads(self) -> bool:
        """Whether the GPU codec's kernels load here (tried once; a warning if they do not)."""
        if self._gpu_codec is None:
            try:
                from kernels import load

                load("huffman")
                self._gpu_codec = True
            except Exception as e:  # no nvcc, or a build failure: the CPU chain still works
                warnings.warn(
                    f"fmstore: GPU codec unavailable, (de)compressing on the CPU: {e}", stacklevel=4
                )
                self._gpu_codec = False
        return self._gpu_codec

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

    def _persist_job(self, job: _SaveJob) -> SnapshotInfo:
        in_memory = False
        try:
            in_memory = job.kept is not None  # its buffers belong to the memory level now
            job.staged.wait()
            results: list[tuple[SnapshotLevel, Written | BaseException]] = []
            if job.levels:
                writes = [(st, p) for st, p in zip(job.staged.tensors, job.pieces) if p.writes]
                items = []
                for st, p in writes:
                    if st.codec:  # encoded on the GPU while staging
                        enc = Encoded([memoryview(st.data.numpy())], list(st.codec))
                        digest = self._hash_pool.submit(_fmhs_digest, st.data, st.raw_nbytes, p.name)
                        items.append(WriteItem(st, p, digest, lambda _, e=enc: e))
                        continue
                    if self.compression and self.codec == "huffman" and st.nbytes:
                        enc = _huffman_cpu(st, self._codec_pool)
                        digest = _done(_fmhs_digest(enc.segments[0], st.nbytes, p.name))
                        items.append(WriteItem(st, p, digest, lambda _, e=enc: e))
                        continue
                    if self._quantizes(p.name, st.dtype):
                        # Lossy: the checksum is of the bytes a load will give back.
                        enc, digest = _quantized(st, self._hash_pool)
                        items.append(WriteItem(st, p, _done(digest), lambda _, e=enc: e))
                        continue
                    digest = self._hash_pool.submit(digest_all, [st.data])
                    items.append(WriteItem(st, p, digest, self._encoder if self.compression else None))
                args = (job.step, items, job.names, job.tree, job.meta)
                if self._level_pool is None or len(job.levels) == 1:
                    runs = [_run(job.levels[0].write, *args)]
                else:  # each level from the staged copy, concurrently: S3 does not wait for NVMe
                    runs = [
                        f.result()
                        for f in [self._level_pool.submit(_run, lvl.write, *args) for lvl in job.levels]
                    ]
                results = list(zip(job.levels, runs))
        finally:
            if not in_memory:
                job.staged.release()
        ok = [(lvl, r) for lvl, r in results if isinstance(r, Written)]
        failed = [(lvl, r) for lvl, r in results if isinstance(r, BaseException)]
        if failed:
            if len(results) == 1:
                raise failed[0][1]
            done = ", ".join(repr(lvl.name) for lvl, _ in ok) or "no durable level"
            why = "; ".join(f"{lvl.name!r}: {type(e).__name__}: {e}" for lvl, e in failed)
            raise FmstoreError(f"step {job.step} committed to {done} but not to: {why}") from failed[0][1]
        first = ok[0][1] if ok else None
        return SnapshotInfo(
            step=job.step,
            path=ok[0][0].path_of(job.step) if ok else HOST,
            nbytes=job.staged.nbytes,
            bytes_written=sum(r.bytes_written for _, r in ok),
            tensors=first.tensors if first else len(job.pieces),
            tensors_written=first.tensors_written if first else 0,
            levels=([HOST] if in_memory else []) + [lvl.name for lvl, _ in ok],
        )

    # ------------------------------------------------------------------ retention

    def gc(self, *, keep_steps: list[int] | None = None, level: str | None = None) -> list[str]:
        """Delete files that no committed snapshot references, in every durable level (or
        ``level``), in directories older than its newest committed snapshot (newer ones may
        still be being written).  Returns what was deleted."""
        self._wait_last(raise_error=False)
        deleted = []
        for lvl in self._levels(level):
            deleted += lvl.gc(keep_steps=keep_steps)
        return deleted

    # ------------------------------------------------------------------ load

    def load(
        self,
        state: Any = None,
        step: int | None = None,
        *,
        device: str | torch.device | None = None,
        level: str | None = None,
    ) -> Any:
        """Restore a committed snapshot (default: the latest) from the fastest level holding it.

        With ``state`` given, its tensors are filled in place (dtype and global shape must
        match); a DTensor target gets exactly its local shard, read from whichever saved
        shards overlap it, so a snapshot saved on 4 ranks loads on 1, 2 or 3.  The restored
        state is returned (plain values such as step counters come from the snapshot).
        Without ``state`` a new state of whole tensors is built on ``device`` (default CPU).
        A copy in host memory serves only the sharding it was saved with; a damaged copy on
        one durable level is skipped (with a warning) for the next level holding the step.
        """
        targets: dict[str, torch.Tensor] = flatten(state)[0] if state is not None else {}
        levels = self._levels(level)
        if self.memory is not None and level in (None, HOST):
            mem_steps = self.memory.steps()
            want = step if step is not None else (mem_steps[-1] if mem_steps else None)
            snap = self.memory.get(want) if want is not None else None
            if snap is not None:
                out = restore(snap, targets, device)
                if out is not None:
                    return unflatten(snap.tree, out)
                if level == HOST:
                    raise LoadMismatchError(
                        f"step {want} in host memory was saved with another sharding than the targets'"
                    )
                step = want  # the same step from a durable level
            elif level == HOST:
                raise SnapshotNotFoundError(f"step {step} is not in host memory (have {mem_steps})")
        self._wait_last(raise_error=False)  # a failed save is its handle's (and the next save's) to report
        if step is None:
            have = sorted({s for lvl in levels for s in lvl.steps()})
            if not have:
                raise SnapshotNotFoundError(f"no committed snapshot under {self._where_text(levels)}")
            step = have[-1]
        holders = [lvl for lvl in levels if lvl.committed(step)]
        if not holders:
            raise SnapshotNotFoundError(
                f"no committed snapshot for step {step} under {self._where_text(levels)} (have {self.steps(level)})"
            )
        for i, lvl in enumerate(holders):
            try:
                return self._load_from(lvl, step, targets, device)
            except CorruptBlobError as e:
                if i + 1 == len(holders):
                    raise
                warnings.warn(
                    f"step {step} on level {lvl.name!r} is damaged ({e}); restoring it from {holders[i + 1].name!r}",
                    stacklevel=2,
                )
        raise AssertionError("unreachable")

    def _load_from(self, lvl: SnapshotLevel, step: int, targets: dict[str, torch.Tensor], device: Any) -> Any:
        manifest = lvl.manifest(step)
        plan = _LoadPlan()
        try:
            self._plan_and_read(lvl.storage, manifest, targets, plan, device)
        finally:
            for release in plan.releases:
                release()
        return unflatten(manifest.tree, plan.out)

    def _plan_and_read(
        self,
        storage: SnapshotStorage,
        manifest: Manifest,
        targets: dict[str, torch.Tensor],
        plan: _LoadPlan,
        device: Any,
    ) -> None:
        """Plan which saved bytes each target needs, read them, verify them, place them."""
        for name, entry in manifest.tensors.items():
            dtype = dtype_from_name(entry.dtype)
            gshape = tuple(entry.shape)
            itemsize = torch.empty(0, dtype=dtype).element_size()
            target = targets.get(name)
            check_target(name, manifest.step, dtype, gshape, target)
            if target is not None and is_dtensor(target):
                dest, region_off, _ = dtensor_region(target, name)
                plan.out[name] = target
            else:
                dest = (
                    target if target is not None else torch.empty(gshape, dtype=dtype, device=device or "cpu")
                )
                region_off = (0,) * len(gshape)
                plan.out[name] = dest
            region_len = tuple(dest.shape)
            if self._decodes_on_gpu(entry.shards, dest, region_off):
                # One FMHS shard for the whole of a CUDA destination: its coded bytes go up
                # (from pinned memory) and decode in place, rather than decoding on the GPU,
                # copying the raw bytes down and up again.
                (shard,) = entry.shards
                blob, release = self._stager.pool.acquire(shard.end - shard.begin)
                plan.releases.append(release)
                blob = blob[: shard.end - shard.begin]
                plan.reads.setdefault(shard.file, []).append((shard.begin, memoryview(blob.numpy())))
                plan.decodes.append((name, shard, blob, dest.reshape(-1).view(torch.uint8)))
                continue
            if dest.device.type == "cpu" and dest.is_contiguous():
                host = dest
            else:  # read into a pooled (pinned, with CUDA) buffer, then one copy to the device
                nbytes = numel(region_len) * itemsize
                raw, release = self._stager.pool.acquire(nbytes)
                plan.releases.append(release)
                host = raw[:nbytes].view(dtype).view(region_len)
                plan.finals.append((host, dest))
            covered = 0
            for shard in entry.shards:
                ov = intersect(region_off, region_len, tuple(shard.offsets), tuple(shard.lengths))
                if ov is None:
                    continue
                covered += numel(ov[1])
                whole = tuple(shard.offsets) == region_off and tuple(shard.lengths) == region_len
                if shard.codec:
                    self._plan_encoded(name, shard, host, whole, ov, region_off, dtype, itemsize, plan)
                    continue
                if shard.end - shard.begin != numel(shard.lengths) * itemsize:
                    raise ManifestError(
                        f"tensor {name!r}: {shard.end - shard.begin} bytes recorded in {shard.file!r}"
                    )
                if whole:  # the common case: straight into the destination's memory
                    buf = host.reshape(-1).view(torch.uint8)
                    if buf.numel():
                        plan.reads.setdefault(shard.file, []).append((shard.begin, memoryview(buf.numpy())))
                    plan.checks.append((name, shard, buf, 0))
                    continue
                rp = plan_read(tuple(shard.offsets), tuple(shard.lengths), ov[0], ov[1], itemsize)
                cs = shard.chunk_size or (shard.end - shard.begin)
                a0 = rp.start // cs * cs
                a1 = min(shard.end - shard.begin, -(-rp.end // cs) * cs)
                buf = torch.empty(a1 - a0, dtype=torch.uint8)
                plan.reads.setdefault(shard.file, []).append((shard.begin + a0, memoryview(buf.numpy())))
                plan.checks.append((name, shard, buf, a0))
                block = buf[rp.start - a0 : rp.end - a0].view(dtype).view(rp.view_shape)[rp.slices]
                dslices = tuple(slice(o - r, o - r + n) for o, r, n in zip(ov[0], region_off, ov[1]))
                plan.copies.append((host[dslices] if dslices else host, block))
            if covered != numel(region_len):
                raise FmstoreError(
                    f"snapshot step {manifest.step}: tensor {name!r}: saved shards cover {covered} of the "
                    f"{numel(region_len)} elements needed here"
                )
        for file, ranges in plan.reads.items():
            try:
                storage.read_ranges(file, ranges)
            except FileNotFoundError:
                raise CorruptBlobError(
                    f"snapshot step {manifest.step}: shard file {file!r} is missing"
                ) from None
            except CorruptBlobError as e:
                raise CorruptBlobError(f"snapshot step {manifest.step}: shard file {file!r}: {e}") from None
        for name, shard, blob, out in plan.decodes:
            try:
                if shard.codec == [QUANT_CODEC]:
                    _dequantize_into(blob, out, manifest.tensors[name].dtype, name)
                    continue
                if shard.codec[-1] == "huff":
                    _decode_fmhs(blob, out, shard, name, manifest.step, storage.pool)
                    continue
                decode(memoryview(blob.numpy()), out, pool=storage.pool, name=name)
            except CorruptBlobError as e:
                raise CorruptBlobError(
                    f"snapshot step {manifest.step}: shard file {shard.file!r}: {e}"
                ) from None
        _verify_all(plan.checks, manifest.step, storage.pool)
        for dest, block in plan.copies:
            dest.copy_(block)
        for host, dest in plan.finals:
            dest.copy_(host, non_blocking=True)
        if plan.finals and torch.cuda.is_available():
            torch.cuda.synchronize()  # before the pooled buffers go back to the pool

    def _decodes_on_gpu(self, shards: list[Shard], dest: torch.Tensor, region_off: tuple[int, ...]) -> bool:
        if len(shards) != 1 or not shards[0].codec or shards[0].codec[-1] != "huff":
            return False
        shard = shards[0]
        if dest.device.type != "cuda" or not dest.is_contiguous() or dest.numel() == 0:
            return False
        if tuple(shard.offsets) != region_off or tuple(shard.lengths) != tuple(dest.shape):
            return False
        return self._gpu_codec_loads()

    @staticmethod
    def _plan_encoded(
        name: str,
        shard: Shard,
        host: torch.Tensor,
        whole: bool,
        ov: tuple[tuple[int, ...], tuple[int, ...]],
        region_off: tuple[int, ...],
        dtype: torch.dtype,
        itemsize: int,
        plan: _LoadPlan,
    ) -> None:
        """An encoded shard is read whole and decoded: into the destination when it is the
        whole region, else into a buffer the overlap is copied from."""
        if shard.codec not in ([f"planes{itemsize}", "zstd"], [f"planes{itemsize}", "huff"], [QUANT_CODEC]):
            raise ManifestError(f"tensor {name!r} in {shard.file!r}: unknown codec chain {shard.codec}")
        blob = torch.empty(shard.end - shard.begin, dtype=torch.uint8)
        plan.reads.setdefault(shard.file, []).append((shard.begin, memoryview(blob.numpy())))
        n = numel(shard.lengths) * itemsize
        out = host.reshape(-1).view(torch.uint8) if whole else torch.empty(n, dtype=torch.uint8)
        plan.decodes.append((name, shard, blob, out))
        if shard.codec[-1] != "huff":  # an FMHS decode checks every chunk itself
            plan.checks.append((name, shard, out, 0))
        if not whole:
            rp = plan_read(tuple(shard.offsets), tuple(shard.lengths), ov[0], ov[1], itemsize)
            block = out[rp.start : rp.end].view(dtype).view(rp.view_shape)[rp.slices]
            dslices = tuple(slice(o - r, o - r + k) for o, r, k in zip(ov[0], region_off, ov[1]))
            plan.copies.append((host[dslices] if dslices else host, block))

    # ------------------------------------------------------------------ lifecycle

    def _wait_last(self, *, raise_error: bool = True) -> None:
        last = self._last
        if last is None:
            return
        if raise_error:
            last.wait()
        else:
            wait_futures([last._future])

    def wait(self) -> SnapshotInfo | None:
        """Wait for the save in flight, if any; re-raises its error."""
        last = self._last
        return last.wait() if last is not None else None

    def close(self) -> None:
        """Wait for the save in flight, then free the pinned pool, snapshots in memory, threads."""
        if self._closed:
            return
        try:
            self._wait_last()
        finally:
            self._closed = True
            self._persist.shutdown(wait=True)
            self._hash_pool.shutdown(wait=True)
            self._codec_pool.shutdown(wait=True)
            if self._level_pool is not None:
                self._level_pool.shutdown(wait=True)
            if self.memory is not None:
                self.memory.clear()
            self._stager.pool.clear()
            for lvl in self.levels:
                lvl.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.storage.url!r}, levels={self.level_names()}, rank={self.rank}/{self.world_size})"


@dataclass
class _LoadPlan:
    out: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> tensor to return
    reads: dict[str, list[tuple[int, memoryview]]] = field(default_factory=dict)  # file -> ranges
    checks: list[tuple[str, Shard, torch.Tensor, int]] = field(default_factory=list)  # chunks to verify
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dest view, block)
    decodes: list[tuple[str, Shard, torch.Tensor, torch.Tensor]] = field(
        default_factory=list
    )  # (.., blob, out)
    finals: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (host, device dest)
    releases: list[Any] = field(default_factory=list)  # pooled buffers to give back


@dataclass
class _SaveJob:
    step: int
    staged: Staged
    pieces: list[Piece]
    names: list[str]
    tree: dict[str, Any]
    meta: dict[str, Any]
    levels: list[SnapshotLevel]  # durable levels that take this step
    kept: MemorySnapshot | None  # the host-memory copy, when the policy keeps one


def _done(value: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f


def _fmhs_digest(stream: Any, nbytes: int, name: str) -> list[tuple[str, list[str]]]:
    """The manifest checksum of an FMHS-coded tensor (its chunk checks; no chunk digests)."""
    view = stream.numpy() if isinstance(stream, torch.Tensor) else np.frombuffer(stream, dtype=np.uint8)
    return [(huffman.stream_digest(view, nbytes, name), [])]


def _huffman_cpu(st: Any, pool: Executor) -> Encoded:
    width = torch.empty(0, dtype=st.dtype).element_size()
    return Encoded([huffman.encode(st.data, width, pool=pool)], [f"planes{width}", "huff"])


def _quantized(st: Any, pool: Executor) -> tuple[Encoded, list[tuple[str, list[str]]]]:
    """The int8 blob (codes, then float32 scales) of a staged float tensor, and the digest of
    the bytes its load will return."""
    x = st.data.view(st.dtype).to(torch.float32)
    codes, scales = quantize_int8(x)
    back = dequantize_int8(codes, scales).to(st.dtype)
    digest = digest_all([as_bytes_tensor(back)], pool)
    blob = [memoryview(codes.numpy()).cast("B"), memoryview(scales.numpy()).cast("B")]
    return Encoded(blob, [QUANT_CODEC]), digest


def _decode_fmhs(
    blob: torch.Tensor, out: torch.Tensor, shard: Shard, name: str, step: int, pool: Executor
) -> None:
    """Decode an FMHS-coded shard into ``out`` (host memory, or a CUDA tensor: decoded in
    place): on the GPU where the kernels load (the CPU reference otherwise); every chunk is
    checked, and the checks against the manifest."""
    width = int(shard.codec[0][len("planes") :])
    raw = blob.numpy()
    if huffman.stream_digest(raw, out.numel(), name) != shard.checksum:
        raise ChecksumError(
            f"snapshot step {step}: tensor {name!r} in {shard.file!r} does not match its checksum "
            "(its chunk checks differ from the manifest's)"
        )
    if out.device.type == "cuda":
        from ..codec import gpu as gpu_codec

        try:
            gpu_codec.huff_decode(blob.to(out.device, non_blocking=True), out, width, name=name)
            return
        except CorruptBlobError:
            raise
        except Exception:  # noqa: BLE001 - e.g. no GPU memory for the planes: the CPU reference
            host = torch.empty(out.numel(), dtype=torch.uint8)
            huffman.decode(raw, host, name=name, pool=pool)
            out.copy_(host)
            return
    if torch.cuda.is_available():
        try:
            from ..codec import gpu as gpu_codec

            dev = torch.empty(out.numel(), dtype=torch.uint8, device="cuda")
            gpu_codec.huff_decode(blob.to("cuda", non_blocking=False), dev, width, name=name)
            out.copy_(dev)
            return
        except CorruptBlobError:
            raise
        except Exception:  # noqa: BLE001 - no kernels here: the CPU reference decodes the same bytes
            pass
    huffman.decode(raw, out, name=name, pool=pool)


def _dequantize_into(blob: torch.Tensor, out: torch.Tensor, dtype: str, name: str) -> None:
    target = dtype_from_name(dtype)
    n = out.numel() // torch.empty(0, dtype=target).element_size()
    nblocks = -(-n // QUANT_BLOCK)
    if blob.numel() != n + 4 * nblocks:
        raise CorruptBlobError(
            f"tensor {name!r}: int8 blob of {blob.numel()} bytes, expected {n + 4 * nblocks}"
        )
    codes = blob[:n].view(torch.int8)
    scales = blob[n:].clone().view(torch.float32)  # at an offset of n bytes: not 4-byte aligned
    out.copy_(as_bytes_tensor(dequantize_int8(codes, scales).to(target)))


def _run(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised (one level failing must not hide the others)."""
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 - handed back to the caller, who re-raises
        return e


def _rank_and_world(process_group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)
