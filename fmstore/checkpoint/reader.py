"""Read regions of a committed snapshot's tensors: plan the byte ranges, read, decode, verify.

A request names a tensor of the manifest, the region of the global tensor it wants (offsets, and
the destination's shape) and where the values go (a CPU or CUDA tensor, a view of a larger one
or a DTensor's local shard).  Every saved shard that overlaps the region is read: where the
overlap is a run of whole rows only those bytes, rounded out to the checksum chunks covering
them; encoded shards whole, then decoded.  Every byte read is checked against the manifest's
checksums before it reaches its destination.  Each shard file is first checked once (its real
size, and its safetensors header's entries against the manifest's byte ranges, tensor names,
dtypes and shapes), so no buffer is allocated for bytes the file does not hold, and a manifest
whose names or dtypes were permuted does not load other values.  The checkpointer's load, the torch
DCP reader and serving all read through here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np
import torch

from ..blob import as_memoryview, dtype_from_name
from ..codec import registry
from ..codec.registry import Codec
from ..errors import ChecksumError, CorruptBlobError, FmstoreError
from ..gcpause import paused_gc
from ..storage import Storage
from ..tiers.host import BufferPool
from .manifest import Manifest, ManifestError, Meeting, Shard, TensorEntry, numel
from .manifest_check import ByFile
from .shardfile import check_shard_file
from .sharding import plan_read
from .shardtable import ChunkRef

#: Shards of one region from which a load plans with array arithmetic (:func:`_plan_rows`):
#: for a few, numpy's cost per call is more than the loop's per shard.
COLUMNS_FROM = 16
#: Shard files whose headers a reader of an object store checks at once.
CHECKERS = 16


@dataclass
class Region:
    """Read tensor ``name``'s values at ``offsets`` (of the global tensor) into ``dest``."""

    name: str
    offsets: tuple[int, ...]
    dest: torch.Tensor


@dataclass
class ReadPlan:
    reads: dict[str, list[tuple[int, memoryview]]] = field(default_factory=dict)  # file -> ranges
    # chunks to verify: (tensor, shard, the bytes read, where they start in the shard)
    checks: list[tuple[str, Shard | ChunkRef, torch.Tensor | memoryview, int]] = field(default_factory=list)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dest view, block)
    decodes: list[tuple[str, Shard, Codec, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    finals: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (host, dest)
    releases: list[Any] = field(default_factory=list)  # pooled buffers to give back


class SnapshotReader:
    """Reads regions of one committed snapshot (its manifest, the files under its root)."""

    def __init__(
        self,
        storage: Storage,
        manifest: Manifest,
        *,
        pool: BufferPool | None = None,
    ) -> None:
        """``pool``: host buffers (pinned, with CUDA) for data bound for a GPU or a view."""
        self.storage = storage
        self.manifest = manifest
        self.pool = pool or BufferPool(pinned=False)
        self._lock = threading.Lock()
        self._checked: set[str] = set()  # shard files whose size and header were checked
        self._by_file: ByFile | None = None

    def read(self, regions: list[Region]) -> None:
        """Fill every region's destination; a damaged or missing byte raises, naming the
        tensor and file (nothing is placed in a destination before its bytes are verified)."""
        found = find_overlaps(self.manifest, regions)
        self.check_all(files_of(found))  # before the plan allocates buffers for the ranges
        plan = ReadPlan()
        try:
            plan_regions(self.manifest, regions, self.pool, plan, found)
            self._run(plan)
        finally:
            for release in plan.releases:
                release()

    def check_files(self, names: Iterable[str]) -> None:
        """:meth:`check_file` every file holding a shard of tensors ``names``: what a caller
        does before it allocates whole tensors for them."""
        self.check_all(set().union(*(e.files() for n in names if (e := self.manifest.tensors.get(n)))))

    def check_all(self, files: Iterable[str]) -> None:
        """:meth:`check_file` each of ``files``; on an object store several at once (each
        check is a size query and a read: a whole load of a 1,024-rank snapshot checks 1,024
        files, a minute one after the other at 30 ms a request).  The first failing file, in
        name order, raises."""
        todo = sorted(set(files) - self._checked)
        if self.storage.local or len(todo) < 2:
            for file in todo:
                self.check_file(file)
            return
        # Threads of their own (the storage's I/O pool runs the reads these checks make), each
        # a run of the files in name order: the first run to fail has the first bad file.
        n = min(CHECKERS, len(todo))
        runs = [todo[len(todo) * i // n : len(todo) * (i + 1) // n] for i in range(n)]
        with ThreadPoolExecutor(n, thread_name_prefix="fmstore-check") as ex:
            for _ in ex.map(lambda run: [self.check_file(f) for f in run], runs):
                pass

    def check_file(self, file: str) -> None:
        """That shard file ``file`` holds the byte range of every shard the manifest puts
        there, by its real size (a manifest records the sizes of its own files only) and by
        its safetensors header: an entry at each shard's byte range, named for its tensor,
        with its dtype and shape.  Once per file and reader: one size query and one small
        read; a mismatch is a :class:`CorruptBlobError` naming file and tensor."""
        with self._lock:
            if file in self._checked:
                return
            if self._by_file is None:  # every shard of the table, by file, once
                self._by_file = self.manifest.shards_by_file()
            with paused_gc():
                shards = self._by_file.rows(file) or self._by_file.get(file, [])
        try:
            m = self.manifest
            check_shard_file(self.storage, file, shards, m.step, m.headers.get(file) if m.sealed else None)
        except FileNotFoundError:
            raise CorruptBlobError(
                f"snapshot step {self.manifest.step}: shard file {file!r} is missing", file=file
            ) from None
        with self._lock:
            self._checked.add(file)

    # ------------------------------------------------------------------ running

    def _run(self, plan: ReadPlan) -> None:
        step, storage = self.manifest.step, self.storage
        for file, ranges in plan.reads.items():
            try:
                storage.read_ranges(file, ranges)
            except FileNotFoundError:
                raise CorruptBlobError(
                    f"snapshot step {step}: shard file {file!r} is missing", file=file
                ) from None
            except CorruptBlobError as e:
                raise CorruptBlobError(f"snapshot step {step}: shard file {file!r}: {e}", file=file) from None
        for name, shard, codec, blob, out in plan.decodes:
            dtype = dtype_from_name(self.manifest.tensors[name].dtype)
            try:
                if codec.checksum == "stream":  # the stream's chunk checks, against the manifest's
                    if codec.digest(blob.numpy(), out.numel(), name) != shard.checksum:
                        raise ChecksumError(
                            f"snapshot step {step}: tensor {name!r} in {shard.file!r} does not match its "
                            "checksum (its chunk checks differ from the manifest's)",
                            name,
                            shard.file,
                        )
                codec.decode(blob, out, dtype=dtype, name=name, pool=storage.pool)
            except ChecksumError:
                raise
            except CorruptBlobError as e:
                raise CorruptBlobError(
                    f"snapshot step {step}: shard file {shard.file!r}: {e}", file=shard.file
                ) from None
        verify_all(plan.checks, step, storage.pool)
        for dest, block in plan.copies:
            dest.copy_(block)
        for host, dest in plan.finals:
            dest.copy_(host, non_blocking=dest.device.type == "cuda")
        if plan.finals and torch.cuda.is_available():
            torch.cuda.synchronize()  # before the pooled buffers go back to the pool


Overlaps = list[tuple[Shard, tuple[int, ...], tuple[int, ...], bool]]


def find_overlaps(manifest: Manifest, regions: list[Region]) -> list[Overlaps | Meeting | None]:
    """For each region, the saved shards it meets: a :class:`.manifest.Meeting` (columns) for a
    tensor of a shard table, else :func:`.sharding.overlaps`' list; None for a tensor the
    manifest does not have (the plan says so)."""
    out: list[Overlaps | Meeting | None] = []
    for r in regions:
        entry = manifest.tensors.get(r.name)
        if entry is None:
            out.append(None)
        elif entry.table is not None:
            out.append(entry.meeting(tuple(r.offsets), tuple(r.dest.shape)))
        else:
            out.append(entry.overlaps(tuple(r.offsets), tuple(r.dest.shape)))
    return out


def files_of(found: list[Overlaps | Meeting | None]) -> set[str]:
    """The shard files holding the overlaps :func:`find_overlaps` found."""
    out: set[str] = set()
    for shards in found:
        if isinstance(shards, Meeting):
            out |= shards.files()
        elif shards:
            out.update(s.file for s, _, _, _ in shards)
    return out


def plan_regions(
    manifest: Manifest,
    regions: list[Region],
    pool: BufferPool,
    plan: ReadPlan | None = None,
    found: list[Overlaps | Meeting | None] | None = None,
) -> ReadPlan:
    """What reading ``regions`` of ``manifest``'s snapshot takes: the byte ranges of each file,
    the decodes, the chunk checks and the copies into the destinations.  A pure function of
    the manifest and the regions (no I/O; pooled buffers are taken for data bound for a GPU,
    and listed in the plan's ``releases``).  ``found``: :func:`find_overlaps` of the regions,
    where the caller has it already."""
    plan = plan if plan is not None else ReadPlan()
    with paused_gc():  # a whole load plans an object or two per shard: 1 M for 512 k shards
        for i, r in enumerate(regions):
            _plan(manifest, r, pool, plan, found[i] if found is not None else None)
    return plan


def _plan(
    manifest: Manifest, r: Region, pool: BufferPool, plan: ReadPlan, found: Overlaps | Meeting | None
) -> None:
    step = manifest.step
    entry = manifest.tensors.get(r.name)
    if entry is None:
        raise FmstoreError(f"snapshot step {step} has no tensor {r.name!r}")
    dtype = dtype_from_name(entry.dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    dest, region_off = r.dest, tuple(r.offsets)
    region_len = tuple(dest.shape)
    gpu_codec = _decodes_on_gpu(r.name, entry, dest, region_off)
    if gpu_codec is not None:
        # One shard for the whole of a CUDA destination, in a codec that decodes there:
        # its coded bytes go up (from pinned memory) and decode in place, rather than
        # decoding on the CPU and copying the raw bytes up.
        (shard,) = entry.shards
        blob, release = pool.acquire(shard.end - shard.begin)
        plan.releases.append(release)
        blob = blob[: shard.end - shard.begin]
        plan.reads.setdefault(shard.file, []).append((shard.begin, memoryview(blob.numpy())))
        plan.decodes.append((r.name, shard, gpu_codec, blob, dest.reshape(-1).view(torch.uint8)))
        return
    if dest.device.type == "cpu" and dest.is_contiguous():
        host = dest
    else:  # read into a pooled (pinned, with CUDA) buffer, then one copy to the destination
        nbytes = numel(region_len) * itemsize
        raw, release = pool.acquire(nbytes)
        plan.releases.append(release)
        host = raw[:nbytes].view(dtype).view(region_len)
        plan.finals.append((host, dest))
    covered = 0
    row_bytes = prod(region_len[1:]) * itemsize
    host_bytes: memoryview | None = None  # host's bytes, for reads straight into it
    if found is None:
        found = entry.overlaps(region_off, region_len)
    reads, checks = plan.reads, plan.checks
    if isinstance(found, Meeting):  # the common cases from the columns; the rest shard by shard
        if len(found.rows) >= COLUMNS_FROM:
            covered, found = _plan_rows(r.name, found, host, region_off, region_len, itemsize, plan)
        else:
            found = found.overlaps()
    for shard, ov_off, ov_len, rows in found:
        ov = (ov_off, ov_len)
        covered += prod(ov_len)
        if rows:  # the same columns: whole iff the same rows
            whole = shard.offsets[0] == region_off[0] and shard.lengths[0] == region_len[0]
        else:
            whole = tuple(shard.offsets) == region_off and tuple(shard.lengths) == region_len
        if shard.codec:
            _plan_encoded(r.name, shard, host, whole, ov, region_off, dtype, itemsize, plan)
            continue
        stored = shard.end - shard.begin
        if stored != prod(shard.lengths) * itemsize:
            raise ManifestError(f"tensor {r.name!r}: {stored} bytes recorded in {shard.file!r}")
        if whole:  # the common case: straight into the destination's memory
            buf = host.reshape(-1).view(torch.uint8)
            if buf.numel():
                plan.reads.setdefault(shard.file, []).append((shard.begin, memoryview(buf.numpy())))
            plan.checks.append((r.name, shard, buf, 0))
            continue
        cs = shard.chunk_size or stored
        if rows:
            # Whole rows of the shard that are whole rows of the destination too (a resharded
            # dim-0 load: a saved rank's slice inside this rank's): where they begin and end on
            # checksum chunk boundaries, they are read straight into the destination's memory
            # and checked there, like a whole shard, with no buffer and no copy.
            start = (ov_off[0] - shard.offsets[0]) * row_bytes
            end = start + ov_len[0] * row_bytes
            if start % cs == 0 and (end % cs == 0 or end == stored):
                if host_bytes is None:
                    host_bytes = memoryview(host.reshape(-1).view(torch.uint8).numpy())
                at = (ov_off[0] - region_off[0]) * row_bytes
                view = host_bytes[at : at + end - start]
                in_file = reads.get(shard.file)
                if in_file is None:
                    reads[shard.file] = [(shard.begin + start, view)]
                else:
                    in_file.append((shard.begin + start, view))
                checks.append((r.name, shard, view, start))
                continue
        rp = plan_read(tuple(shard.offsets), tuple(shard.lengths), ov_off, ov_len, itemsize)
        a0 = rp.start // cs * cs
        a1 = min(stored, -(-rp.end // cs) * cs)
        buf = torch.empty(a1 - a0, dtype=torch.uint8)
        plan.reads.setdefault(shard.file, []).append((shard.begin + a0, memoryview(buf.numpy())))
        plan.checks.append((r.name, shard, buf, a0))
        block = buf[rp.start - a0 : rp.end - a0].view(dtype).view(rp.view_shape)[rp.slices]
        dslices = tuple(slice(o - b, o - b + n) for o, b, n in zip(ov_off, region_off, ov_len))
        plan.copies.append((host[dslices] if dslices else host, block))
    if covered != numel(region_len):
        raise FmstoreError(
            f"snapshot step {step}: tensor {r.name!r}: saved shards cover {covered} of the "
            f"{numel(region_len)} elements needed here"
        )


def _plan_rows(
    name: str,
    met: Meeting,
    host: torch.Tensor,
    region_off: tuple[int, ...],
    region_len: tuple[int, ...],
    itemsize: int,
    plan: ReadPlan,
) -> tuple[int, Overlaps]:
    """What :func:`_plan`'s loop does for a raw shard whose overlap is the whole region or a
    run of whole rows on checksum-chunk boundaries (a whole or a dim-0 resharded load: nearly
    every shard), from the table's columns at once; Shard objects are made for the checks
    only.  Returns the elements those rows cover and the other rows, for the loop."""
    t, rows, nd = met.table, met.rows, met.ndim
    size = t.size[rows]
    lengths = t.lengths[rows, :nd]
    raw = t.codec[rows] == 0  # (codecs[0] is the raw [])
    bad = raw & (size != lengths.prod(axis=1) * itemsize)
    if bad.any():
        i = int(rows[np.argmax(bad)])
        raise ManifestError(
            f"tensor {name!r}: {int(t.size[i])} bytes recorded in {t.files[int(t.file[i])]!r}"
        )
    offsets = t.offsets[rows, :nd]
    if nd:
        r_off, r_len = np.asarray(region_off, np.int64), np.asarray(region_len, np.int64)
        whole = np.where(
            met.same,
            (offsets[:, 0] == r_off[0]) & (lengths[:, 0] == r_len[0]),
            ((offsets == r_off) & (lengths == r_len)).all(axis=1),
        )
        row_bytes = prod(region_len[1:]) * itemsize
        start = (met.off[:, 0] - offsets[:, 0]) * row_bytes
        end = start + met.len[:, 0] * row_bytes
        at = (met.off[:, 0] - r_off[0]) * row_bytes
        cs = np.where(t.chunk_size[rows] > 0, t.chunk_size[rows], np.maximum(size, 1))
        aligned = met.same & (start % cs == 0) & ((end % cs == 0) | (end == size))
        fast = raw & (whole | aligned)
        start, at, nbytes = (
            np.where(whole, 0, start),
            np.where(whole, 0, at),
            np.where(whole, size, end - start),
        )
    else:  # a 0-d tensor: the one shard is the whole region
        fast = raw
        start = at = np.zeros(len(rows), np.int64)
        nbytes = size
    covered = int(met.len[fast].prod(axis=1).sum())
    if fast.any():
        host_bytes = memoryview(host.reshape(-1).view(torch.uint8).numpy())
        reads, checks = plan.reads, plan.checks
        shards = t.refs(rows[fast])  # (a chunk check's view of each: no Shard object made)
        pos = (t.begin[rows[fast]] + start[fast]).tolist()
        for shard, p, s, a, n in zip(
            shards, pos, start[fast].tolist(), at[fast].tolist(), nbytes[fast].tolist()
        ):
            view = host_bytes[a : a + n]
            if n:
                in_file = reads.get(shard.file)
                if in_file is None:
                    reads[shard.file] = [(p, view)]
                else:
                    in_file.append((p, view))
            checks.append((name, shard, view, s))
    return covered, met.overlaps(~fast) if not fast.all() else []


def _plan_encoded(
    name: str,
    shard: Shard,
    host: torch.Tensor,
    whole: bool,
    ov: tuple[tuple[int, ...], tuple[int, ...]],
    region_off: tuple[int, ...],
    dtype: torch.dtype,
    itemsize: int,
    plan: ReadPlan,
) -> None:
    """An encoded shard is read whole and decoded: into the destination when it is the
    whole region, else into a buffer the overlap is copied from."""
    codec = _codec(name, shard, itemsize)
    blob = torch.empty(shard.end - shard.begin, dtype=torch.uint8)
    plan.reads.setdefault(shard.file, []).append((shard.begin, memoryview(blob.numpy())))
    n = numel(shard.lengths) * itemsize
    out = host.reshape(-1).view(torch.uint8) if whole else torch.empty(n, dtype=torch.uint8)
    plan.decodes.append((name, shard, codec, blob, out))
    if codec.checksum == "chunks":  # "stream": the decoder checks every chunk itself
        plan.checks.append((name, shard, out, 0))
    if not whole:
        rp = plan_read(tuple(shard.offsets), tuple(shard.lengths), ov[0], ov[1], itemsize)
        block = out[rp.start : rp.end].view(dtype).view(rp.view_shape)[rp.slices]
        dslices = tuple(slice(o - r, o - r + k) for o, r, k in zip(ov[0], region_off, ov[1]))
        plan.copies.append((host[dslices] if dslices else host, block))


def verify_all(
    checks: list[tuple[str, Shard | ChunkRef, torch.Tensor | memoryview, int]],
    step: int,
    pool: Executor | None,
) -> None:
    """Check every chunk read back (in parallel); a mismatch names the tensor, file and chunk."""
    import xxhash

    jobs = []
    for name, shard, buf, start in checks:
        cs = shard.chunk_size
        if not cs:
            raise ManifestError(f"snapshot step {step}: tensor {name!r} has no chunk checksums")
        mv = as_memoryview(buf)
        digests = shard.chunks  # (once a shard: a ChunkRef splits its digests when asked)
        for i, a in enumerate(range(0, len(mv), cs)):
            jobs.append((name, shard, digests, start // cs + i, start + a, mv[a : a + cs]))
    pieces = [j[5] for j in jobs]
    hashes = (
        list(pool.map(xxhash.xxh3_128_hexdigest, pieces))
        if pool
        else [xxhash.xxh3_128_hexdigest(m) for m in pieces]
    )
    for (name, shard, digests, index, offset, mv), h in zip(jobs, hashes):
        if index >= len(digests) or h != digests[index]:
            raise ChecksumError(
                f"snapshot step {step}: tensor {name!r} in {shard.file!r} does not match its checksum "
                f"(chunk {index}, bytes {shard.begin + offset}..{shard.begin + offset + len(mv)})",
                name,
                shard.file,
                index,
            )


def _codec(name: str, shard: Shard, itemsize: int) -> Codec:
    """The codec of an encoded shard (the manifest checked it when it was read)."""
    try:
        codec = registry.get(shard.codec[0], f"tensor {name!r} in {shard.file!r}")
        codec.check(itemsize, f"tensor {name!r} in {shard.file!r}")
    except registry.CodecConfigError as e:
        raise ManifestError(str(e)) from None
    return codec


def _decodes_on_gpu(
    name: str, entry: TensorEntry, dest: torch.Tensor, region_off: tuple[int, ...]
) -> Codec | None:
    """The codec to decode straight into CUDA ``dest`` with, where one shard covers it and
    its codec decodes on a GPU here."""
    if entry.nshards != 1 or dest.device.type != "cuda" or not entry.shards[0].codec:
        return None
    shard = entry.shards[0]
    if not dest.is_contiguous() or dest.numel() == 0:
        return None
    if tuple(shard.offsets) != region_off or tuple(shard.lengths) != tuple(dest.shape):
        return None
    codec = _codec(name, shard, dest.element_size())
    if "cuda" not in codec.devices:
        return None
    from ..codec import gpu

    return codec if gpu.kernels_load() else None
