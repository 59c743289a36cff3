"""The GPU path of the codec (kernels/planes.cu, kernels/quant.cu, kernels/huffman.cu), with the same
output bytes as the CPU references in :mod:`fmstore.codec.planes` and :mod:`fmstore.codec.quant`."""

from __future__ import annotations

import functools
import time

import numpy as np
import torch

from ..errors import FmstoreError


def _lib(name: str = "planes"):  # noqa: ANN202 - a ctypes library
    from .kernels import load

    return load(name)


_kernels_load: bool | None = None


def kernels_load() -> bool:
    """Whether the GPU codec can run here: CUDA present and its kernels built and loaded
    (tried once per process; a warning says why not)."""
    global _kernels_load
    if _kernels_load is None:
        if not torch.cuda.is_available():
            _kernels_load = False
            return False
        from .kernels import KernelBuildError

        try:
            _lib("huffman")
            _kernels_load = True
        except (KernelBuildError, OSError) as e:  # no nvcc, a failed build: the CPU codec works
            import warnings

            warnings.warn(f"fmstore: GPU codec unavailable, (de)compressing on the CPU: {e}", stacklevel=3)
            _kernels_load = False
    return _kernels_load


def _check(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" or t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{what}: expected a flat contiguous uint8 CUDA tensor")


def _run(rc: int, what: str) -> None:
    if rc != 0:
        raise FmstoreError(f"{what} kernel failed to launch (cudaError {rc})")


def _planes(fn: str, data: torch.Tensor, width: int, out: torch.Tensor | None) -> torch.Tensor:
    """Run ``fmstore_split`` or ``fmstore_merge`` (same arguments) on flat uint8 ``data``."""
    what = fn.removeprefix("fmstore_")
    _check(data, what)
    if width < 1 or data.numel() % width:
        raise ValueError(f"{data.numel()} bytes are not a whole number of {width}-byte elements")
    out = torch.empty_like(data) if out is None else out
    if data.numel():
        stream = torch.cuda.current_stream(data.device).cuda_stream
        _run(getattr(_lib(), fn)(data.data_ptr(), out.data_ptr(), data.numel() // width, width, stream), what)
    return out


def split(data: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Byte planes of flat uint8 ``data`` on the GPU (plane 0 first), like ``planes.split``."""
    return _planes("fmstore_split", data, width, out)


def merge(planes: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`split`."""
    return _planes("fmstore_merge", planes, width, out)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise int8 codes and scales of flat float32 CUDA ``x``, like ``quant.quantize``."""
    from .quant import BLOCK

    if x.device.type != "cuda" or x.dtype != torch.float32 or x.dim() != 1 or not x.is_contiguous():
        raise ValueError("quantize: expected a flat contiguous float32 CUDA tensor")
    codes = torch.empty(x.numel(), dtype=torch.int8, device=x.device)
    scales = torch.empty(-(-x.numel() // BLOCK), dtype=torch.float32, device=x.device)
    if x.numel():
        stream = torch.cuda.current_stream(x.device).cuda_stream
        lib = _lib("quant")
        _run(
            lib.fmstore_quantize(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), x.numel(), stream),
            "quantize",
        )
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values back from :func:`quantize`'s output."""
    out = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    if codes.numel():
        stream = torch.cuda.current_stream(codes.device).cuda_stream
        lib = _lib("quant")
        _run(
            lib.fmstore_dequantize(
                codes.data_ptr(), scales.data_ptr(), out.data_ptr(), codes.numel(), stream
            ),
            "dequantize",
        )
    return out


# ---------------------------------------------------------------- the FMH1 chain (huffman.cu)

_HUFF_ERRORS = {
    1: "its payload lies outside the blob (truncated?)",
    2: "raw size disagrees with its length",
    3: "bad code table",
    4: "sizes disagree",
    5: "a sub-block is damaged",
    6: "unknown mode",
    7: "check mismatch (damaged)",
    8: "the segment's header is damaged",
}


_ROWS: dict[tuple[int, int, int], tuple[np.ndarray, torch.Tensor, int]] = {}


def _rows(nbytes: int, width: int, device: torch.device) -> tuple[np.ndarray, torch.Tensor, int]:
    """The kernels' segment and chunk rows (see kernels/huffman.cu) for ``nbytes`` of
    ``width``-byte elements: (segment rows on the host, both on the device, chunk count).
    Cached: a checkpoint encodes tensors of the same sizes at every save."""
    from . import huffman

    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = (nbytes, width, -1 if index is None else index)
    hit = _ROWS.get(key)
    if hit is not None:
        return hit
    segs, chunks = [], []
    total = 0
    for s, (a, b) in enumerate(huffman.segments(nbytes)):
        n = (b - a) // width
        per_plane = -(-n // huffman.CHUNK)
        segs.append([a, b - a, total, per_plane * width, 0, 0, per_plane, 0])
        local = np.arange(per_plane * width, dtype=np.int64)
        plane, first = local // per_plane, (local % per_plane) * huffman.CHUNK
        rows = np.zeros((len(local), 6), dtype=np.int64)
        rows[:, 0] = a + plane * n + first
        rows[:, 1] = np.minimum(huffman.CHUNK, n - first)
        rows[:, 2], rows[:, 3], rows[:, 4] = s, local, plane
        chunks.append(rows)
        total += len(local)
    seg_rows = np.array(segs, dtype=np.int64).reshape(-1, 8)
    chunk_rows = np.concatenate(chunks) if chunks else np.zeros((0, 6), dtype=np.int64)
    both = torch.from_numpy(np.concatenate([seg_rows.reshape(-1), chunk_rows.reshape(-1)])).to(device)
    if len(_ROWS) > 256:
        _ROWS.clear()
    _ROWS[key] = (seg_rows, both, total)
    return _ROWS[key]


class _Encoder:
    """Encodes every segment of a tensor (huffman.segments) in one launch of each kernel,
    straight into a device buffer laid out as the whole FMHS stream."""

    def __init__(self, data: torch.Tensor, width: int, scratch: torch.Tensor | None = None) -> None:
        from . import huffman

        _check(data, "huffman encode")
        if width not in huffman.WIDTHS or data.numel() % width:
            raise ValueError(f"{data.numel()} bytes are not a whole number of {width}-byte elements")
        self.lib = _lib("huffman")
        self.data = data
        self.width = width
        n = data.numel()
        self.seg_rows, self.rows, self.nchunks = _rows(n, width, data.device)
        self.capacity = huff_host_bytes(n, width)
        dev = data.device
        self.out = torch.empty(self.capacity, dtype=torch.uint8, device=dev)
        need = scratch_bytes(n, width)
        # Encodes on one stream run one after another, so they can share one scratch buffer.
        self.scratch = (
            scratch
            if scratch is not None and scratch.numel() >= need
            else torch.empty(need, dtype=torch.uint8, device=dev)
        )
        self.total = torch.empty(1, dtype=torch.int64, device=dev)
        self.stream = torch.cuda.current_stream(dev)

    def launch(self, first: int = 0, end: int | None = None, *, total: torch.Tensor | None = None) -> None:
        """Encode segments [first, end); ``total`` (default ``self.total``; may be pinned host
        memory) then holds where the last one ends."""
        nseg = len(self.seg_rows)
        total = self.total if total is None else total
        _run(
            self.lib.fmstore_huff_encode(
                self.data.data_ptr(), self.width, self.rows.data_ptr(), self.seg_rows.ctypes.data,
                nseg, first, nseg if end is None else end, self.rows.data_ptr() + 8 * self.seg_rows.size,
                self.nchunks, self.out.data_ptr(), total.data_ptr(), self.scratch.data_ptr(),
                self.stream.cuda_stream,
            ),
            "huffman encode",
        )  # fmt: skip


def huff_encode(data: torch.Tensor, width: int) -> torch.Tensor:
    """The FMHS stream of flat uint8 CUDA ``data`` as a CUDA tensor, encoded on the GPU
    without a host round trip of the data (one 8-byte read of its length).  Its bytes equal
    :func:`fmstore.codec.huffman.encode`'s on the same input."""
    enc = _Encoder(data, width)
    enc.launch()
    return enc.out[: int(enc.total.item())]


_copy_streams: dict[int, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _copy_streams:
        _copy_streams[index] = torch.cuda.Stream(device=index)
    return _copy_streams[index]


@functools.lru_cache(maxsize=1024)
def scratch_bytes(nbytes: int, width: int) -> int:
    """Device scratch an encode of ``nbytes`` needs (planes, histograms, tables)."""
    from . import huffman

    segs = huffman.segments(nbytes)
    nchunks = sum(width * -(-((b - a) // width) // huffman.CHUNK) for a, b in segs)
    return int(_lib("huffman").fmstore_huff_scratch_bytes(nbytes, nchunks, len(segs)))


#: Input bytes per unit of the encode/copy pipeline: big enough to fill the GPU, small
#: enough that the copy engine starts early and the encode hides behind copies.
GROUP_BYTES = 64 << 20
#: The pipeline's first unit is smaller: its encode is the one not hidden behind a copy.  Each
#: later unit may be twice the one before (up to GROUP_BYTES): the GPU encodes about three
#: times faster than PCIe carries the result, so a unit's encode still hides behind the copy of
#: the one before, latency included.
FIRST_GROUP_BYTES = 16 << 20


def _units(jobs: list[torch.Tensor], group_bytes: int, first_bytes: int) -> list[tuple[int, int, int]]:
    """(job, first segment, end segment) of each pipeline unit, in order: segments of one
    tensor, as many as fit the unit's target size (at least one)."""
    from . import huffman

    units: list[tuple[int, int, int]] = []
    target = first_bytes
    for j, data in enumerate(jobs):
        segs = huffman.segments(data.numel())
        first, acc = 0, 0
        for i, (a, b) in enumerate(segs):
            acc += b - a
            last = i == len(segs) - 1
            if last or acc + (segs[i + 1][1] - segs[i + 1][0]) > target:
                units.append((j, first, i + 1))
                first, acc = i + 1, 0
                target = min(group_bytes, 2 * target)
        if not segs:
            units.append((j, 0, 0))
    return units


def huff_encode_many_to_host(
    jobs: list[tuple[torch.Tensor, int, torch.Tensor | None]],
    *,
    group_bytes: int = GROUP_BYTES,
    first_bytes: int = FIRST_GROUP_BYTES,
) -> list[torch.Tensor]:
    """Encode several CUDA tensors (``(flat uint8 data, element width, pinned out or None)``)
    into host memory; returns each one's FMHS stream (a view of its ``out``), all landed.

    A pipeline over groups of segments (at most ``group_bytes`` of input each, the first
    ``first_bytes``, growing between; a tensor's segments never mixed with another's): while one group's blobs
    are copied to the host on a side stream, the next group encodes, so only the first group's
    encode is not hidden behind the copy engine, the bottleneck.  Each group's end in the
    stream is written by the chain into pinned memory before its last kernels run, so the host
    queues the group's copy behind them without waiting for the chain, and the copy engine
    never idles between groups.  Encodes share one scratch buffer."""
    if not jobs:
        return []
    dev = jobs[0][0].device
    compute = torch.cuda.current_stream(dev)
    copy = _copy_stream(dev)
    copy.wait_stream(compute)  # outputs may still be read by the caller's earlier copies
    scratch = torch.empty(
        max(scratch_bytes(d.numel(), w) for d, w, _ in jobs), dtype=torch.uint8, device=dev
    )
    units = _units([d for d, _, _ in jobs], group_bytes, first_bytes)
    ends = torch.full((len(units),), -1, dtype=torch.int64, pin_memory=True)
    ends_np = ends.numpy()  # read as the kernels write it (mapped pinned memory)
    encoders: dict[int, _Encoder] = {}
    outs: list[torch.Tensor | None] = [None] * len(jobs)
    results: list[torch.Tensor | None] = [None] * len(jobs)
    events: list[torch.cuda.Event] = []

    def launch(k: int) -> None:
        j, s0, s1 = units[k]
        if s0 == 0:
            data, width, out = jobs[j]
            enc = encoders[j] = _Encoder(data, width, scratch)
            outs[j] = (
                out if out is not None else torch.empty(enc.capacity, dtype=torch.uint8, pin_memory=True)
            )
        encoders[j].launch(s0, s1, total=ends[k:])
        events.append(torch.cuda.Event())
        events[-1].record(compute)

    def landed(k: int) -> int:
        spins = 0
        while ends_np[k] < 0:
            spins += 1
            if spins % 64 == 0:
                if events[k].query() and ends_np[k] < 0:
                    raise FmstoreError(
                        "huffman encode: the kernels finished without writing the stream's length"
                    )
                time.sleep(0)  # let other threads run
        return int(ends_np[k])

    # Group 0 is launched alone: its copy is queued as soon as its length lands, before the
    # host spends time launching the next groups (their encode hides behind that copy).
    launch(0)
    launched = 1
    start = 0
    for k, (j, s0, s1) in enumerate(units):
        end = landed(k)  # known once the group's layout ran, before its bytes are written
        enc, out = encoders[j], outs[j]
        assert out is not None
        nseg = len(enc.seg_rows)
        head = 8 + 8 * nseg
        if s0 == 0:
            start = head
        copy.wait_event(events[k])
        with torch.cuda.stream(copy):
            if s0 == 0 and s1 == nseg:  # the whole stream in one group: one copy
                out[:end].copy_(enc.out[:end], non_blocking=True)
            else:
                out[start:end].copy_(enc.out[start:end], non_blocking=True)
                if s1 == nseg:  # the directory last: each group filled in its own entries
                    out[:head].copy_(enc.out[:head], non_blocking=True)
            if s1 == nseg:
                enc.out.record_stream(copy)  # freed only after these copies ran
                results[j] = out[: max(end, head)]
                del encoders[j]
        start = end
        while launched < min(k + 3, len(units)):  # keep two groups ahead of the copies
            launch(launched)
            launched += 1
    copy.synchronize()
    return [r for r in results if r is not None]


def huff_encode_to_host(data: torch.Tensor, width: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Encode CUDA ``data`` on the GPU into host memory (``out``: a pinned uint8 buffer of at
    least :func:`huff_host_bytes`, else one is allocated); returns the view of ``out`` that
    holds the FMHS stream, once its bytes have landed.  Only the encoded bytes cross PCIe;
    copies overlap the encode (see :func:`huff_encode_many_to_host`)."""
    (stream,) = huff_encode_many_to_host([(data, width, out)])
    return stream


@functools.lru_cache(maxsize=1024)
def huff_host_bytes(nbytes: int, width: int) -> int:
    """The most bytes :func:`huff_encode_to_host` can write for ``nbytes`` of input."""
    from . import huffman

    lib = _lib("huffman")
    segs = huffman.segments(nbytes)
    return 8 + 8 * len(segs) + sum(int(lib.fmstore_huff_max_bytes(b - a, width)) for a, b in segs)


def huff_decode(
    stream: torch.Tensor,
    out: torch.Tensor,
    width: int,
    *,
    name: str = "",
) -> torch.Tensor:
    """Decode an FMHS CUDA ``stream`` into flat uint8 CUDA ``out`` on the GPU; waits for the
    kernels and raises :class:`~fmstore.codec.CodecError` naming the first damaged chunk."""
    from . import huffman
    from .chain import CodecError

    _check(stream, "huffman decode")
    _check(out, "huffman decode")
    if width not in huffman.WIDTHS or out.numel() % width:
        raise ValueError(f"{out.numel()} bytes are not a whole number of {width}-byte elements")
    where = f"tensor {name!r}: " if name else ""
    nbytes = out.numel()
    seg_rows, rows, nchunks = _rows(nbytes, width, out.device)
    nseg = len(seg_rows)
    lib = _lib("huffman")
    planes = torch.empty(nbytes if width > 1 else 0, dtype=torch.uint8, device=out.device)
    err = torch.empty(2 * nseg + 2, dtype=torch.int32, device=out.device)
    seg_arrays = torch.empty(2 * nseg, dtype=torch.int64, device=out.device)
    if nseg == 0:
        huffman.read_directory(stream.cpu().numpy(), 0, name)
        return out
    _run(
        lib.fmstore_huff_decode(
            stream.data_ptr(), stream.numel(), width, rows.data_ptr(), seg_rows.ctypes.data, nseg,
            rows.data_ptr() + 8 * seg_rows.size, nchunks, out.data_ptr(), planes.data_ptr(), err.data_ptr(),
            seg_arrays.data_ptr(), torch.cuda.current_stream(out.device).cuda_stream,
        ),
        "huffman decode",
    )  # fmt: skip
    codes = err.view(-1, 2).tolist()  # waits for the decode
    if codes[-1][0]:
        raise CodecError(f"{where}the FMHS stream's directory is damaged or the stream is truncated")
    for i, (code, chunk) in enumerate(codes[:-1]):
        if code:
            per_plane = int(seg_rows[i, 6])
            plane = f" (plane {chunk // per_plane})" if chunk >= 0 else ""
            raise CodecError(
                f"{where}segment {i}, chunk {chunk}{plane} does not decode: {_HUFF_ERRORS.get(code, code)}"
            )
    return out
