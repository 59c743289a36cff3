"""Read regions of a committed snapshot's tensors: plan the byte ranges, read, decode, verify.

A request names a tensor of the manifest, the region of the global tensor it wants (offsets, and
the destination's shape) and where the values go (a CPU or CUDA tensor, a view of a larger one
or a DTensor's local shard).  Every saved shard that overlaps the region is read: where the
overlap is a run of whole rows only those bytes, rounded out to the checksum chunks covering
them; encoded shards whole, then decoded.  Every byte read is checked against the manifest's
checksums before it reaches its destination.  The checkpointer's load, the torch DCP reader
and serving all read through here.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..blob import as_bytes_tensor, as_memoryview, dtype_from_name
from ..codec import decode, huffman
from ..codec.quant import BLOCK as QUANT_BLOCK
from ..codec.quant import dequantize as dequantize_int8
from ..errors import CorruptBlobError, FmstoreError
from ..tiers.host import BufferPool
from .level import numel
from .manifest import Manifest, ManifestError, Shard
from .sharding import intersect, plan_read
from .storage import SnapshotStorage

#: The manifest's codec for blockwise int8 (absmax per 256 values).
QUANT_CODEC = "int8-absmax256"


class ChecksumError(CorruptBlobError):
    """Bytes read back do not match the checksum recorded when they were saved.  ``tensor``,
    ``file`` and ``chunk`` (the index of the checksum chunk, None for a whole-stream check)
    say where."""

    def __init__(
        self, message: str, tensor: str | None = None, file: str | None = None, chunk: int | None = None
    ) -> None:
        super().__init__(message)
        self.tensor, self.file, self.chunk = tensor, file, chunk


@dataclass
class Region:
    """Read tensor ``name``'s values at ``offsets`` (of the global tensor) into ``dest``."""

    name: str
    offsets: tuple[int, ...]
    dest: torch.Tensor


@dataclass
class _Plan:
    reads: dict[str, list[tuple[int, memoryview]]] = field(default_factory=dict)  # file -> ranges
    checks: list[tuple[str, Shard, torch.Tensor, int]] = field(default_factory=list)  # chunks to verify
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dest view, block)
    decodes: list[tuple[str, Shard, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    finals: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (host, dest)
    releases: list[Any] = field(default_factory=list)  # pooled buffers to give back


class SnapshotReader:
    """Reads regions of one committed snapshot (its manifest, the files under its root)."""

    def __init__(
        self,
        storage: SnapshotStorage,
        manifest: Manifest,
        *,
        pool: BufferPool | None = None,
        gpu_decodes: Callable[[], bool] = lambda: False,
    ) -> None:
        """``pool``: host buffers (pinned, with CUDA) for data bound for a GPU or a view;
        ``gpu_decodes()``: whether FMHS shards may be decoded on the GPU."""
        self.storage = storage
        self.manifest = manifest
        self.pool = pool or BufferPool(pinned=False)
        self._gpu_decodes = gpu_decodes

    def read(self, regions: list[Region]) -> None:
        """Fill every region's destination; a damaged or missing byte raises, naming the
        tensor and file (nothing is placed in a destination before its bytes are verified)."""
        plan = _Plan()
        try:
            for r in regions:
                self._plan(r, plan)
            self._run(plan)
        finally:
            for release in plan.releases:
                release()

    # ------------------------------------------------------------------ planning

    def _plan(self, r: Region, plan: _Plan) -> None:
        step = self.manifest.step
        entry = self.manifest.tensors.get(r.name)
        if entry is None:
            raise FmstoreError(f"snapshot step {step} has no tensor {r.name!r}")
        dtype = dtype_from_name(entry.dtype)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        dest, region_off = r.dest, tuple(r.offsets)
        region_len = tuple(dest.shape)
        if self._decodes_on_gpu(entry.shards, dest, region_off):
            # One FMHS shard for the whole of a CUDA destination: its coded bytes go up
            # (from pinned memory) and decode in place, rather than decoding on the GPU,
            # copying the raw bytes down and up again.
            (shard,) = entry.shards
            blob, release = self.pool.acquire(shard.end - shard.begin)
            plan.releases.append(release)
            blob = blob[: shard.end - shard.begin]
            plan.reads.setdefault(shard.file, []).append((shard.begin, memoryview(blob.numpy())))
            plan.decodes.append((r.name, shard, blob, dest.reshape(-1).view(torch.uint8)))
            return
        if dest.device.type == "cpu" and dest.is_contiguous():
            host = dest
        else:  # read into a pooled (pinned, with CUDA) buffer, then one copy to the destination
            nbytes = numel(region_len) * itemsize
            raw, release = self.pool.acquire(nbytes)
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
                self._plan_encoded(r.name, shard, host, whole, ov, region_off, dtype, itemsize, plan)
                continue
            if shard.end - shard.begin != numel(shard.lengths) * itemsize:
                raise ManifestError(
                    f"tensor {r.name!r}: {shard.end - shard.begin} bytes recorded in {shard.file!r}"
                )
            if whole:  # the common case: straight into the destination's memory
                buf = host.reshape(-1).view(torch.uint8)
                if buf.numel():
                    plan.reads.setdefault(shard.file, []).append((shard.begin, memoryview(buf.numpy())))
                plan.checks.append((r.name, shard, buf, 0))
                continue
            rp = plan_read(tuple(shard.offsets), tuple(shard.lengths), ov[0], ov[1], itemsize)
            cs = shard.chunk_size or (shard.end - shard.begin)
            a0 = rp.start // cs * cs
            a1 = min(shard.end - shard.begin, -(-rp.end // cs) * cs)
            buf = torch.empty(a1 - a0, dtype=torch.uint8)
            plan.reads.setdefault(shard.file, []).append((shard.begin + a0, memoryview(buf.numpy())))
            plan.checks.append((r.name, shard, buf, a0))
            block = buf[rp.start - a0 : rp.end - a0].view(dtype).view(rp.view_shape)[rp.slices]
            dslices = tuple(slice(o - b, o - b + n) for o, b, n in zip(ov[0], region_off, ov[1]))
            plan.copies.append((host[dslices] if dslices else host, block))
        if covered != numel(region_len):
            raise FmstoreError(
                f"snapshot step {step}: tensor {r.name!r}: saved shards cover {covered} of the "
                f"{numel(region_len)} elements needed here"
            )

    def _decodes_on_gpu(self, shards: list[Shard], dest: torch.Tensor, region_off: tuple[int, ...]) -> bool:
        if len(shards) != 1 or not shards[0].codec or shards[0].codec[-1] != "huff":
            return False
        shard = shards[0]
        if dest.device.type != "cuda" or not dest.is_contiguous() or dest.numel() == 0:
            return False
        if tuple(shard.offsets) != region_off or tuple(shard.lengths) != tuple(dest.shape):
            return False
        return self._gpu_decodes()

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
        plan: _Plan,
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

    # ------------------------------------------------------------------ running

    def _run(self, plan: _Plan) -> None:
        step, storage = self.manifest.step, self.storage
        for file, ranges in plan.reads.items():
            try:
                storage.read_ranges(file, ranges)
            except FileNotFoundError:
                raise _in_file(
                    CorruptBlobError(f"snapshot step {step}: shard file {file!r} is missing"), file
                ) from None
            except CorruptBlobError as e:
                raise _in_file(
                    CorruptBlobError(f"snapshot step {step}: shard file {file!r}: {e}"), file
                ) from None
        for name, shard, blob, out in plan.decodes:
            try:
                if shard.codec == [QUANT_CODEC]:
                    _dequantize_into(blob, out, self.manifest.tensors[name].dtype, name)
                    continue
                if shard.codec[-1] == "huff":
                    _decode_fmhs(blob, out, shard, name, step, storage.pool)
                    continue
                decode(memoryview(blob.numpy()), out, pool=storage.pool, name=name)
            except CorruptBlobError as e:
                raise _in_file(
                    CorruptBlobError(f"snapshot step {step}: shard file {shard.file!r}: {e}"), shard.file
                ) from None
        verify_all(plan.checks, step, storage.pool)
        for dest, block in plan.copies:
            dest.copy_(block)
        for host, dest in plan.finals:
            dest.copy_(host, non_blocking=dest.device.type == "cuda")
        if plan.finals and torch.cuda.is_available():
            torch.cuda.synchronize()  # before the pooled buffers go back to the pool


def _in_file(e: CorruptBlobError, file: str) -> CorruptBlobError:
    e.file = file  # type: ignore[attr-defined]  # which file, for a verify report
    return e


def verify_all(checks: list[tuple[str, Shard, torch.Tensor, int]], step: int, pool: Executor | None) -> None:
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
                f"(chunk {index}, bytes {shard.begin + offset}..{shard.begin + offset + len(mv)})",
                name,
                shard.file,
                index,
            )


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
            "(its chunk checks differ from the manifest's)",
            name,
            shard.file,
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
