"""Checkpointer: async snapshots of training state, committed atomically by one manifest.

``save`` stages the state's tensors into pooled host memory (all training waits for) and
returns a :class:`SaveHandle`; a background thread checksums the staged bytes, writes the
tensors that changed since the previous snapshot into one safetensors shard file, then
writes ``manifest.json`` (the commit), then applies retention.  Unchanged tensors are
referenced in the previous snapshot's files, not written again.  ``load`` restores the
latest (or a given) committed snapshot, verifying every checksum.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..blob import SAFETENSORS_CODES, as_memoryview, dtype_from_name, dtype_name
from ..errors import CorruptBlobError, FmstoreError
from .manifest import (
    CHUNK_SIZE,
    MANIFEST,
    Manifest,
    ManifestError,
    Shard,
    TensorEntry,
    parse_step_dir,
    step_dir,
)
from .sharding import Piece, dtensor_region, intersect, is_dtensor, pieces_to_save, plan_read
from .staging import Staged, Stager
from .storage import SnapshotStorage
from .tree import flatten, unflatten


class SnapshotNotFoundError(FmstoreError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class ChecksumError(CorruptBlobError):
    """Bytes read back do not match the checksum recorded when they were saved."""


class LoadMismatchError(FmstoreError, ValueError):
    """A snapshot tensor does not fit the target tensor it is loaded into (dtype or shape)."""


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
    """A committed snapshot, as ``SaveHandle.wait`` and ``Checkpointer.snapshots`` give it."""

    step: int
    path: str
    nbytes: int  # bytes of tensor data in the snapshot
    bytes_written: int  # bytes this save wrote (shard files + manifest); less when incremental
    tensors: int
    tensors_written: int


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
        root: a directory or fsspec URL (``s3://bucket/run1``, ``file://``, ``memory://``).
        storage_options: passed to fsspec untouched (credentials, endpoint).
        keep_last: keep only the newest N committed snapshots (bytes that a kept snapshot
            references are never deleted).
        process_group: the ranks that save together; default: the default group when
            ``torch.distributed`` is initialized, else this process alone.  Every rank writes
            its own shard file; rank 0 commits the manifest once all ranks have reported.
        incremental: reference unchanged tensors in earlier snapshots instead of rewriting.
        compression, policy: reserved for the codec and the multi-level policy; only their
            defaults (None) are supported so far.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        compression: Any = None,
        keep_last: int | None = None,
        policy: Any = None,
        process_group: Any = None,
        incremental: bool = True,
        io_threads: int = 8,
        timeout: float = 1800.0,
    ) -> None:
        for arg, value in (("compression", compression), ("policy", policy)):
            if value is not None:
                raise NotImplementedError(f"Checkpointer({arg}=...) is not supported yet; leave it None")
        if keep_last is not None and keep_last < 1:
            raise FmstoreError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.storage = SnapshotStorage(root, storage_options, io_threads=io_threads)
        self.keep_last = keep_last
        self.incremental = incremental
        self.timeout = timeout
        self.rank, self.world_size = _rank_and_world(process_group)
        self._stager = Stager()
        self._persist = ThreadPoolExecutor(1, thread_name_prefix="fmstore-persist")
        self._hash_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fmstore-hash")
        self._last: SaveHandle | None = None
        self._last_manifest: Manifest | None = None
        self._closed = False

    # ------------------------------------------------------------------ listing

    def steps(self) -> list[int]:
        """Committed steps, oldest first (a snapshot without its manifest does not exist)."""
        out = []
        for name in self.storage.list_dir():
            step = parse_step_dir(name)
            if step is not None and self.storage.exists(f"{name}/{MANIFEST}"):
                out.append(step)
        return sorted(out)

    def manifest(self, step: int | None = None) -> Manifest:
        """The manifest of ``step`` (default: the latest committed one)."""
        if step is None:
            steps = self.steps()
            if not steps:
                raise SnapshotNotFoundError(f"no committed snapshot under {self.storage.url!r}")
            step = steps[-1]
        rel = f"{step_dir(step)}/{MANIFEST}"
        try:
            raw = self.storage.read_bytes(rel)
        except FileNotFoundError:
            raise SnapshotNotFoundError(
                f"no committed snapshot for step {step} under {self.storage.url!r} (have {self.steps()})"
            ) from None
        return Manifest.from_json(raw, where=f"{self.storage.url}/{rel}")

    # ------------------------------------------------------------------ save

    def save(
        self, step: int, state: Any, *, block: bool = True, meta: dict[str, Any] | None = None
    ) -> SaveHandle:
        """Snapshot ``state`` as ``step``: returns once its tensors are staged in host memory.

        Call it on every rank of the process group with the same ``step``.  With
        ``block=False`` it returns as soon as the device-to-host copies are queued; call
        ``handle.wait_staged()`` before changing the tensors (e.g. before the next optimizer
        step).  Errors of the background persist surface on ``handle.wait()`` and on the next
        ``save``.
        """
        if self._closed:
            raise FmstoreError("the checkpointer is closed")
        rel_dir = step_dir(step)
        t0 = time.perf_counter()
        tensors, tree = flatten(state)
        pieces = pieces_to_save(tensors, self.rank, self.world_size)
        prev = self._last
        if prev is not None:
            self._last = None  # its error is raised once, here (or on its own wait())
            prev.wait()  # one persist at a time keeps memory bounded
        if self.storage.exists(f"{rel_dir}/{MANIFEST}"):
            raise FmstoreError(
                f"step {step} is already committed under {self.storage.url!r}; it is never overwritten"
            )
        staged = self._stager.stage({p.name: p.local for p in pieces})
        if block:
            staged.wait()
        stall = time.perf_counter() - t0
        job = _SaveJob(step, staged, pieces, sorted(tensors), tree, dict(meta or {}))
        future = self._persist.submit(self._persist_job, job)
        handle = SaveHandle(step, future, staged, stall)
        future.add_done_callback(
            lambda f: setattr(handle, "persist_seconds", time.perf_counter() - t0 - stall)
        )
        self._last = handle
        return handle

    def _persist_job(self, job: _SaveJob) -> SnapshotInfo:
        rel_dir = step_dir(job.step)
        try:
            job.staged.wait()
            base = self._base_manifest()
            entries: dict[str, TensorEntry] = {}
            to_write = []
            # Hash on its own threads while the file is written: only a tensor the base
            # snapshot might already hold has to wait for its digest before the write.
            digests = [self._hash_pool.submit(digest_all, [st.data]) for st in job.staged.tensors]
            for st, piece, fut in zip(job.staged.tensors, job.pieces, digests):
                shard = Shard(list(piece.offsets), list(st.shape), "", 0, 0, "", [], CHUNK_SIZE, [])
                if base is not None and _may_match(base, piece, st.dtype):
                    shard.checksum, shard.chunks = fut.result()[0]
                    old = _same_shard(base, piece, st.dtype, shard)
                    if old is not None:  # unchanged: point at the bytes already stored
                        entries[piece.name] = TensorEntry(
                            dtype_name(st.dtype), list(piece.global_shape), [old]
                        )
                        continue
                to_write.append((st, piece, shard, fut))
            files: dict[str, int] = {}
            written = 0
            if to_write:
                rel = f"{rel_dir}/shard-r{self.rank:05d}.safetensors"
                header, spans = _shard_header([st for st, *_ in to_write])
                segments: list[memoryview | bytes] = [header]
                segments += [memoryview(st.data.numpy()) for st, *_ in to_write if st.nbytes]
                size = self.storage.write(rel, segments)
                files[rel] = size
                written += size
                for (st, piece, shard, fut), (begin, end) in zip(to_write, spans):
                    shard.checksum, shard.chunks = fut.result()[0]
                    shard.file, shard.begin, shard.end = rel, begin, end
                    entries[piece.name] = TensorEntry(dtype_name(st.dtype), list(piece.global_shape), [shard])
        except BaseException as e:
            if self.world_size > 1:  # tell the coordinator instead of leaving it waiting
                self._report(rel_dir, {"error": f"rank {self.rank}: {type(e).__name__}: {e}"})
            job.staged.release()
            raise
        job.staged.release()
        if self.world_size > 1:
            self._report(
                rel_dir,
                {
                    "error": None,
                    "names": job.names,
                    "files": files,
                    "entries": {n: asdict(e) for n, e in entries.items()},
                },
            )
            if self.rank != 0:
                self._wait_for_commit(rel_dir)
                self._last_manifest = None
                return self._info(job, rel_dir, written, len(entries), len(to_write))
            entries, files = self._merge_reports(rel_dir, job.step)
        manifest = Manifest(
            step=job.step,
            world_size=self.world_size,
            tensors=entries,
            tree=job.tree,
            files=files,
            meta=job.meta,
        )
        raw = manifest.to_json()
        self.storage.write(f"{rel_dir}/{MANIFEST}", [raw])  # the commit
        written += len(raw)
        self._last_manifest = manifest
        if self.world_size > 1:
            for r in range(self.world_size):
                self.storage.delete(f"{rel_dir}/rank-{r:05d}.json")
        if self.keep_last is not None:
            self._apply_retention()
        return self._info(job, rel_dir, written, len(entries), len(to_write))

    def _info(
        self, job: _SaveJob, rel_dir: str, written: int, tensors: int, tensors_written: int
    ) -> SnapshotInfo:
        return SnapshotInfo(
            step=job.step,
            path=f"{self.storage.url.rstrip('/')}/{rel_dir}",
            nbytes=job.staged.nbytes,
            bytes_written=written,
            tensors=tensors,
            tensors_written=tensors_written,
        )

    # ------------------------------------------------------------------ coordination (no collectives:
    # the persist runs in a background thread, where a collective could deadlock the training
    # thread's own; ranks meet through small files in the snapshot directory instead)

    def _report(self, rel_dir: str, body: dict[str, Any]) -> None:
        self.storage.write(f"{rel_dir}/rank-{self.rank:05d}.json", [json.dumps(body).encode()])

    def _poll(self, what: str, ready: Any) -> Any:
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            out = ready()
            if out is not None:
                return out
            if time.monotonic() > deadline:
                raise FmstoreError(f"timed out after {self.timeout:.0f} s waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _merge_reports(self, rel_dir: str, step: int) -> tuple[dict[str, TensorEntry], dict[str, int]]:
        """Coordinator: wait for every rank's report, then merge them into one tensor table."""
        reports: dict[int, dict[str, Any]] = {}

        def all_in() -> dict[int, dict[str, Any]] | None:
            for r in range(self.world_size):
                if r not in reports and self.storage.exists(f"{rel_dir}/rank-{r:05d}.json"):
                    reports[r] = json.loads(self.storage.read_bytes(f"{rel_dir}/rank-{r:05d}.json"))
            return reports if len(reports) == self.world_size else None

        self._poll(f"all {self.world_size} ranks to report step {step}", all_in)
        failed = [rep["error"] for rep in reports.values() if rep.get("error")]
        if failed:
            self.storage.write(f"{rel_dir}/aborted.json", [json.dumps({"errors": failed}).encode()])
            raise FmstoreError(f"step {step} not committed: {'; '.join(failed)}")
        entries: dict[str, TensorEntry] = {}
        files: dict[str, int] = {}
        names: set[str] = set()
        for r in sorted(reports):
            rep = reports[r]
            names |= set(rep["names"])
            files.update(rep["files"])
            for name, e in rep["entries"].items():
                shards = [Shard(**sh) for sh in e["shards"]]
                have = entries.get(name)
                if have is None:
                    entries[name] = TensorEntry(e["dtype"], e["shape"], shards)
                elif have.dtype != e["dtype"] or have.shape != e["shape"]:
                    raise FmstoreError(
                        f"step {step}: ranks disagree on tensor {name!r}: {have.dtype} {have.shape} "
                        f"vs {e['dtype']} {e['shape']} (rank {r})"
                    )
                else:
                    boxes = {(tuple(s.offsets), tuple(s.lengths)) for s in have.shards}
                    have.shards += [s for s in shards if (tuple(s.offsets), tuple(s.lengths)) not in boxes]
        for name in sorted(names):
            entry = entries.get(name)
            covered = sum(_numel(s.lengths) for s in entry.shards) if entry else 0
            if entry is None or covered != _numel(entry.shape):
                raise FmstoreError(
                    f"step {step} not committed: tensor {name!r} is not fully saved "
                    f"({covered} of {_numel(entry.shape) if entry else '?'} elements); a plain tensor must "
                    "exist on every rank (it is taken to be replicated), a sharded one must be a DTensor"
                )
        return entries, files

    def _wait_for_commit(self, rel_dir: str) -> None:
        def committed() -> bool | None:
            if self.storage.exists(f"{rel_dir}/{MANIFEST}"):
                return True
            if self.storage.exists(f"{rel_dir}/aborted.json"):
                body = json.loads(self.storage.read_bytes(f"{rel_dir}/aborted.json"))
                raise FmstoreError(f"{rel_dir} not committed: {'; '.join(body['errors'])}")
            return None

        self._poll(f"rank 0 to commit {rel_dir}", committed)

    def _base_manifest(self) -> Manifest | None:
        """The snapshot an incremental save references: the newest committed one."""
        if not self.incremental:
            return None
        if self._last_manifest is not None:
            return self._last_manifest
        try:
            return self.manifest()
        except SnapshotNotFoundError:
            return None

    # ------------------------------------------------------------------ retention

    def _apply_retention(self) -> None:
        steps = self.steps()
        assert self.keep_last is not None
        drop, keep = steps[: -self.keep_last], steps[-self.keep_last :]
        for step in drop:  # uncommit first: from here on the snapshot does not exist
            self.storage.delete(f"{step_dir(step)}/{MANIFEST}")
        self.gc(keep_steps=keep)

    def gc(self, *, keep_steps: list[int] | None = None) -> list[str]:
        """Delete files that no committed snapshot references, in directories older than
        the newest committed snapshot (newer ones may still be being written).  Returns
        what was deleted."""
        keep = self.steps() if keep_steps is None else keep_steps
        if not keep:
            return []
        referenced: set[str] = set()
        for step in keep:
            referenced |= self.manifest(step).referenced_files()
        deleted = []
        for name in self.storage.list_dir():
            step = parse_step_dir(name)
            if step is None or step in keep or step >= keep[-1]:
                continue
            files = [f"{name}/{f}" for f in self.storage.list_dir(name)]
            doomed = [f for f in files if f not in referenced]
            if len(doomed) == len(files):
                self.storage.delete_dir(name)
            else:
                for f in doomed:
                    self.storage.delete(f)
            deleted += doomed
        return deleted

    # ------------------------------------------------------------------ load

    def load(
        self, state: Any = None, step: int | None = None, *, device: str | torch.device | None = None
    ) -> Any:
        """Restore a committed snapshot (default: the latest), on any number of ranks.

        With ``state`` given, its tensors are filled in place (dtype and global shape must
        match); a DTensor target gets exactly its local shard, read from whichever saved
        shards overlap it, so a snapshot saved on 4 ranks loads on 1, 2 or 3.  The restored
        state is returned (plain values such as step counters come from the snapshot).
        Without ``state`` a new state of whole tensors is built on ``device`` (default CPU).
        """
        self._wait_last(raise_error=False)  # a failed save is its handle's (and the next save's) to report
        manifest = self.manifest(step)
        targets: dict[str, torch.Tensor] = flatten(state)[0] if state is not None else {}
        plan = _LoadPlan()
        try:
            self._plan_and_read(manifest, targets, plan, device)
        finally:
            for release in plan.releases:
                release()
        return unflatten(manifest.tree, plan.out)

    def _plan_and_read(
        self, manifest: Manifest, targets: dict[str, torch.Tensor], plan: _LoadPlan, device: Any
    ) -> None:
        """Plan which saved bytes each target needs, read them, verify them, place them."""
        for name, entry in manifest.tensors.items():
            dtype = dtype_from_name(entry.dtype)
            gshape = tuple(entry.shape)
            itemsize = torch.empty(0, dtype=dtype).element_size()
            target = targets.get(name)
            if target is not None and (target.dtype != dtype or tuple(target.shape) != gshape):
                raise LoadMismatchError(
                    f"tensor {name!r}: snapshot step {manifest.step} has {entry.dtype} {list(gshape)}, "
                    f"the target is {dtype_name(target.dtype)} {list(target.shape)}"
                )
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
            if dest.device.type == "cpu" and dest.is_contiguous():
                host = dest
            else:  # read into a pooled (pinned, with CUDA) buffer, then one copy to the device
                nbytes = _numel(region_len) * itemsize
                raw, release = self._stager.pool.acquire(nbytes)
                plan.releases.append(release)
                host = raw[:nbytes].view(dtype).view(region_len)
                plan.finals.append((host, dest))
            covered = 0
            for shard in entry.shards:
                if shard.codec:
                    raise FmstoreError(f"tensor {name!r}: encoded shards load in a later version")
                ov = intersect(region_off, region_len, tuple(shard.offsets), tuple(shard.lengths))
                if ov is None:
                    continue
                covered += _numel(ov[1])
                if shard.end - shard.begin != _numel(shard.lengths) * itemsize:
                    raise ManifestError(
                        f"tensor {name!r}: {shard.end - shard.begin} bytes recorded in {shard.file!r}"
                    )
                whole = tuple(shard.offsets) == region_off and tuple(shard.lengths) == region_len
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
            if covered != _numel(region_len):
                raise FmstoreError(
                    f"snapshot step {manifest.step}: tensor {name!r}: saved shards cover {covered} of the "
                    f"{_numel(region_len)} elements needed here"
                )
        for file, ranges in plan.reads.items():
            try:
                self.storage.read_ranges(file, ranges)
            except FileNotFoundError:
                raise CorruptBlobError(
                    f"snapshot step {manifest.step}: shard file {file!r} is missing"
                ) from None
            except CorruptBlobError as e:
                raise CorruptBlobError(f"snapshot step {manifest.step}: shard file {file!r}: {e}") from None
        _verify_all(plan.checks, manifest.step, self.storage.pool)
        for dest, block in plan.copies:
            dest.copy_(block)
        for host, dest in plan.finals:
            dest.copy_(host, non_blocking=True)
        if plan.finals and torch.cuda.is_available():
            torch.cuda.synchronize()  # before the pooled buffers go back to the pool

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
        """Wait for the save in flight, then free the pinned pool and threads."""
        if self._closed:
            return
        try:
            self._wait_last()
        finally:
            self._closed = True
            self._persist.shutdown(wait=True)
            self._hash_pool.shutdown(wait=True)
            self._stager.pool.clear()
            self.storage.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.storage.url!r}, rank={self.rank}/{self.world_size})"


@dataclass
class _LoadPlan:
    out: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> tensor to return
    reads: dict[str, list[tuple[int, memoryview]]] = field(default_factory=dict)  # file -> ranges
    checks: list[tuple[str, Shard, torch.Tensor, int]] = field(default_factory=list)  # chunks to verify
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dest view, block)
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


def _rank_and_world(process_group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _may_match(base: Manifest, piece: Piece, dtype: torch.dtype) -> bool:
    """Whether the base snapshot has a shard that could hold this piece unchanged."""
    old = base.tensors.get(piece.name)
    return (
        old is not None
        and old.dtype == dtype_name(dtype)
        and tuple(old.shape) == tuple(piece.global_shape)
        and any(s.offsets == list(piece.offsets) and not s.codec for s in old.shards)
    )


def _same_shard(base: Manifest, piece: Piece, dtype: torch.dtype, new: Shard) -> Shard | None:
    """The stored shard of the base snapshot holding exactly these bytes, if there is one."""
    old = base.tensors.get(piece.name)
    if old is None or old.dtype != dtype_name(dtype) or tuple(old.shape) != tuple(piece.global_shape):
        return None
    for s in old.shards:
        if (
            s.offsets == new.offsets
            and s.lengths == new.lengths
            and s.checksum == new.checksum
            and not s.codec
        ):
            return s
    return None


def _shard_header(items: list[Any]) -> tuple[bytes, list[tuple[int, int]]]:
    """A safetensors header for the tensors to write, and each one's byte range in the file."""
    body: dict[str, Any] = {"__metadata__": {"format": "fmstore.shard", "fmstore": "1"}}
    pos = 0
    spans = []
    for st in items:
        code = SAFETENSORS_CODES.get(st.dtype)  # others are stored as U8; the manifest has the dtype
        shape = list(st.shape) if code else [st.nbytes]
        body[st.name] = {"dtype": code or "U8", "shape": shape, "data_offsets": [pos, pos + st.nbytes]}
        spans.append((pos, pos + st.nbytes))
        pos += st.nbytes
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    hlen = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, [(a + hlen, b + hlen) for a, b in spans]
