"""Streaming load of a committed snapshot's tensors onto a device, for serving processes.

A serving process wants one thing from a checkpoint root: the model's weights on its device,
fast, without holding the model in host memory on the way.  :func:`load_state_dict` (and the
:class:`StreamingLoader` behind it) opens the newest committed snapshot of a root (a directory
or a URL such as ``s3://bucket/run``; or ``step``), picks its tensors (all, or the subtree under
``prefix``: ``"model"`` gives the model's state-dict names) and streams their bytes:

- **Raw shards** are cut into pieces of whole checksum chunks that fit a slot of a bounded ring
  of reusable host buffers (:class:`~fmstore.serving.ring.HostRing`, pinned when a destination
  is on a GPU).  ``threads`` pieces are read at once; each is verified against the manifest's
  chunk digests (the reader's own check) *before* it is copied to its destination, then copied
  (on CUDA: non-blocking, on a side stream, the slot given back once the copy's event has
  fired).  A chunk larger than a slot (a ring much smaller than the 16 MiB chunks) is read
  twice: once to check it piece by piece, once to place it, so no unverified byte ever reaches a
  destination.  Shards saved by several ranks (FSDP/DCP-style, any dimension) land in their
  region of the whole tensor: the load reshards to one process.
- **Coded shards** (``compression="lossless"``) are read whole and decoded by the checkpoint
  reader (:class:`~fmstore.checkpoint.SnapshotReader`): on the GPU, in place, where the codec has
  a GPU decoder (FMHS, with the kernels built), else on the CPU.  A coded tensor needs its
  coded bytes (plus its decoded bytes, for a destination that is not a contiguous CPU tensor)
  in host memory at once: coded tensors are admitted while their staging fits ``ring_bytes``,
  and one at a time beyond that, so their staging stays under ``max(ring_bytes, the largest
  coded tensor's need)`` (:attr:`LoadStats.peak_staging_bytes`).

Host memory is bounded by the ring (:attr:`LoadStats.peak_ring_bytes` <= ``ring_bytes``), not
by the model.  With ``into=`` (a module or a dict of tensors) the keys are checked strictly and
every shape and dtype before anything is read, and the tensors are filled in place (``copy_``,
whatever device they are on).  No returned tensor aliases a ring buffer.  A failed load may
leave ``into`` partly filled with verified bytes of the snapshot; the damaged piece itself is
never copied (raw shards; a coded shard decodes into a contiguous CPU target before its check).

With a remote root and ``cache=`` (a local directory), shard files are kept on local disk and a
second start reads them there, every piece still verified (:mod:`fmstore.serving.cache`).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from ..checkpoint import BufferPool, Region, Root, SnapshotReader, verify_all
from ..errors import ChecksumError, ConfigError, CorruptBlobError
from ..store import TieredStore
from ..units import parse_size
from .cache import CachedFiles, guarded, is_remote, open_cache
from .copying import place
from .planning import Job, plan_jobs
from .ring import HostRing
from .selection import Target, check_targets, select
from .stats import LoadStats, StagingBudget

__all__ = ["LoadStats", "StreamingLoader", "load_state_dict"]


class _Aborted(Exception):
    """A job stopped because another one failed (that one's error is raised)."""


class StreamingLoader:
    """One committed snapshot of a root, opened for streaming loads (see the module docstring).

    ``with StreamingLoader(root, ring_bytes="256MiB") as ld: sd = ld.load(prefix="model",
    device="cuda")``; ``ld.stats`` is the last load's :class:`LoadStats`."""

    def __init__(
        self,
        root_or_url: str | os.PathLike[str],
        step: int | None = None,
        *,
        ring_bytes: int | str = "512MiB",
        threads: int = 8,
        storage_options: dict[str, Any] | None = None,
        cache: str | os.PathLike[str] | TieredStore | None = None,
        cache_bytes: int | str | None = None,
    ) -> None:
        limit = parse_size(ring_bytes, what="ring_bytes")
        if limit is None:
            raise ConfigError("ring_bytes must be a size (a ring bounds the host memory of a load)")
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self.ring_bytes = limit
        self.threads = threads
        self.root = Root(root_or_url, storage_options)
        self.cache: CachedFiles | None = None
        try:
            self.snapshot = self.root.snapshot(step)
            if cache is not None and is_remote(self.root.storage):  # a local root: no copy
                store, owned = open_cache(cache, cache_bytes)
                endpoint = (storage_options or {}).get("endpoint_url")
                self.cache = CachedFiles(
                    self.root.storage, self.snapshot.manifest, store, owned=owned, endpoint=endpoint
                )
        except BaseException:
            self.root.close()
            raise
        self.manifest = self.snapshot.manifest
        # With a cache, shard files are read through it (from the cache where it holds them).
        self.storage: Any = self.cache or self.root.storage
        self.stats = LoadStats(step=self.manifest.step)
        # The checkpoint reader checks each shard file once (size, safetensors header) and
        # decodes coded shards; its pool holds the coded bytes bound for a GPU decode.
        self._reader = SnapshotReader(self.storage, self.manifest, pool=BufferPool(pinned=False))
        self._lock = threading.Lock()

    @property
    def step(self) -> int:
        return self.manifest.step

    # ------------------------------------------------------------------ names

    def names(self, prefix: str | None = None) -> dict[str, str]:
        """{key: snapshot tensor name} of the tensors a load gives (:func:`.selection.select`)."""
        return select(self.manifest, prefix)

    # ------------------------------------------------------------------ load

    def load(
        self,
        *,
        device: str | torch.device = "cpu",
        into: Target | None = None,
        prefix: str | None = None,
    ) -> dict[str, torch.Tensor] | torch.nn.Module:
        """The tensors (``{key: tensor}`` on ``device``), or ``into`` filled in place."""
        t0 = time.perf_counter()
        names = self.names(prefix)
        targets = check_targets(self.manifest, into, names, prefix)
        files = sorted({s.file for n in names.values() for s in self.manifest.tensors[n].shards})
        cache = self.cache
        before = (cache.hits, cache.cache_bytes, cache.remote_bytes) if cache else (0, 0, 0)
        if cache is not None:
            cache.want(files)  # fills of the files it lacks, in the background
        # Every file's real size and safetensors header against the manifest, before anything
        # is allocated for its tensors.
        for file in files:
            guarded(cache, lambda f=file: self._reader.check_file(f))
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        dests: dict[str, torch.Tensor] = {}
        for key, name in names.items():
            entry = self.manifest.tensors[name]
            if targets is not None:
                dests[key] = targets[key]
            else:
                dests[key] = torch.empty(tuple(entry.shape), dtype=entry.torch_dtype, device=dev)
        jobs = plan_jobs(self.manifest, self.ring_bytes, self.threads, names, dests, fresh=targets is None)
        to_gpu = any(d.device.type == "cuda" for d in dests.values())
        ring = HostRing(self.ring_bytes, self.threads, pinned=to_gpu and torch.cuda.is_available())
        self.stats = LoadStats(
            step=self.step,
            tensors=len(names),
            bytes=sum(d.numel() * d.element_size() for d in dests.values()),
            ring_bytes=self.ring_bytes,
            slot_bytes=ring.slot_bytes,
            slots=ring.slots,
        )
        try:
            self._run(jobs, ring, to_gpu)
        finally:
            ring.close()
            self.stats.peak_ring_bytes = ring.peak_bytes
            if cache is not None:
                st = self.stats
                st.cache_hits, st.cache_bytes_read, st.remote_bytes_read = (
                    now - was for now, was in zip((cache.hits, cache.cache_bytes, cache.remote_bytes), before)
                )
            elif is_remote(self.root.storage):
                self.stats.remote_bytes_read = self.stats.read_bytes
            self.stats.seconds = time.perf_counter() - t0
        if isinstance(into, torch.nn.Module):
            return into
        if into is not None:
            return into
        return dests

    def _run(self, jobs: list[Job], ring: HostRing, to_gpu: bool) -> None:
        abort = threading.Event()
        local = threading.local()
        start: torch.cuda.Event | None = None
        if to_gpu:
            # Side streams start after the work queued so far on the caller's stream (a target
            # may still be being written by it).
            start = torch.cuda.Event()
            start.record()
        staging = StagingBudget(self.ring_bytes)

        def stream(device: torch.device) -> torch.cuda.Stream:
            streams = getattr(local, "streams", None)
            if streams is None:
                streams = local.streams = {}
            s = streams.get(device)
            if s is None:
                s = streams[device] = torch.cuda.Stream(device)
                if start is not None:
                    s.wait_event(start)
            return s

        def run(job: Job) -> None:
            if abort.is_set():
                raise _Aborted()
            if job.shard is None:
                guarded(self.cache, lambda: self._coded(job, staging))
            else:  # a piece from the cache that fails its check is read again, remotely
                guarded(self.cache, lambda: self._raw(job, ring, abort, stream))

        with ThreadPoolExecutor(self.threads, thread_name_prefix="fmstore-serve") as pool:
            futures: list[Future[None]] = [pool.submit(run, j) for j in jobs]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                abort.set()
                for f in pending:
                    f.cancel()
                wait(pending)
        self.stats.peak_staging_bytes = staging.peak
        errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
        real = [e for e in errors if not isinstance(e, _Aborted)]
        if real:
            raise real[0]
        if errors:
            raise errors[0]  # type: ignore[misc]

    # ------------------------------------------------------------------ pieces

    def _raw(self, job: Job, ring: HostRing, abort: threading.Event, stream: Any) -> None:
        shard = job.shard
        assert shard is not None
        cs = shard.chunk_size
        if job.direct:  # into the new tensor's own memory, checked there
            flat = job.view.reshape(-1).view(torch.uint8)
            piece = flat[job.start : job.start + job.nbytes]
            self._read(job, job.start, piece)
            verify_all([(job.name, shard, piece, job.start)], self.step, None)
            return
        if job.nbytes <= ring.slot_bytes:  # whole chunks in one slot: check, then place
            buf = self._acquire(ring, abort)
            try:
                piece = buf[: job.nbytes]
                self._read(job, job.start, piece)
                verify_all([(job.name, shard, piece, job.start)], self.step, None)
                place(job.view, job.start, piece, stream)
            finally:
                ring.release(buf)
            return
        # One chunk larger than a slot: its digest needs all of it, so it is read and hashed
        # piece by piece first, then read again and placed (and hashed again: a file changed
        # between the two passes is caught too).
        import xxhash

        index = job.start // cs
        want = shard.chunks[index] if index < len(shard.chunks) else None
        for copying in (False, True):
            h = xxhash.xxh3_128()
            for a in range(job.start, job.start + job.nbytes, ring.slot_bytes):
                buf = self._acquire(ring, abort)
                try:
                    piece = buf[: min(ring.slot_bytes, job.start + job.nbytes - a)]
                    self._read(job, a, piece)
                    h.update(memoryview(piece.numpy()))
                    if copying:
                        place(job.view, a, piece, stream)
                finally:
                    ring.release(buf)
            if h.hexdigest() != want:
                raise ChecksumError(
                    f"snapshot step {self.step}: tensor {job.name!r} in {shard.file!r} does not match its "
                    f"checksum (chunk {index}, bytes {shard.begin + job.start}.."
                    f"{shard.begin + job.start + job.nbytes})",
                    job.name,
                    shard.file,
                    index,
                )

    def _acquire(self, ring: HostRing, abort: threading.Event) -> torch.Tensor:
        try:
            buf = ring.acquire(abort)
        except RuntimeError:
            raise _Aborted() from None
        with self._lock:
            self.stats.pieces += 1
        return buf

    def _read(self, job: Job, start: int, piece: torch.Tensor) -> None:
        shard = job.shard
        assert shard is not None
        at = f"snapshot step {self.step}: tensor {job.name!r} in shard file {shard.file!r}"
        try:
            self.storage.read_ranges(shard.file, [(shard.begin + start, memoryview(piece.numpy()))])
        except FileNotFoundError:
            raise CorruptBlobError(f"{at}: the file is missing", file=shard.file) from None
        except CorruptBlobError as e:
            raise CorruptBlobError(f"{at}: {e}", file=shard.file) from None
        with self._lock:
            self.stats.read_bytes += piece.numel()

    def _coded(self, job: Job, staging: StagingBudget) -> None:
        """A coded tensor, whole, through the checkpoint reader (GPU decode where it can)."""
        dest = job.view
        entry = self.manifest.tensors[job.name]
        need = sum(s.end - s.begin for s in entry.shards)
        if dest.device.type != "cpu" or not dest.is_contiguous() or len(entry.shards) > 1:
            need += dest.numel() * dest.element_size()  # decoded on the host, then copied
        with staging.hold(need):
            self._reader.read([Region(job.name, (0,) * dest.dim(), dest)])
        with self._lock:
            self.stats.read_bytes += sum(s.end - s.begin for s in entry.shards)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Wait for the cache's fills (if any), close the cache (if opened here) and the root."""
        try:
            if self.cache is not None:
                self.cache.close()
        finally:
            self.root.close()

    def __enter__(self) -> StreamingLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StreamingLoader({self.snapshot.url!r})"


def load_state_dict(
    root_or_url: str | os.PathLike[str],
    step: int | None = None,
    *,
    device: str | torch.device = "cpu",
    into: Target | None = None,
    prefix: str | None = None,
    ring_bytes: int | str = "512MiB",
    threads: int = 8,
    storage_options: dict[str, Any] | None = None,
    stats: LoadStats | None = None,
    cache: str | os.PathLike[str] | TieredStore | None = None,
    cache_bytes: int | str | None = None,
) -> dict[str, torch.Tensor] | torch.nn.Module:
    """The tensors of the newest committed snapshot under ``root_or_url`` (or of ``step``), on
    ``device``, streamed through a ring of ``ring_bytes`` host buffers by ``threads`` threads
    (see the module docstring).  ``prefix="model"``: the tensors saved under ``"model"``, keyed
    by the module's state-dict names.  ``into``: a module or dict of tensors filled in place
    (and returned).  ``stats``: a :class:`LoadStats` filled with the load's figures.  ``cache``:
    a directory (or a one-:class:`~fmstore.LocalTier` :class:`~fmstore.TieredStore`) where a
    remote root's shard files are kept, up to ``cache_bytes``, so a second start reads them
    locally (:mod:`fmstore.serving.cache`); ignored for a local root."""
    with StreamingLoader(
        root_or_url,
        step,
        ring_bytes=ring_bytes,
        threads=threads,
        storage_options=storage_options,
        cache=cache,
        cache_bytes=cache_bytes,
    ) as loader:
        try:
            return loader.load(device=device, into=into, prefix=prefix)
        finally:
            if stats is not None:
                stats.__dict__.update(loader.stats.__dict__)
