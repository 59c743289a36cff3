"""The GPU path of the codec (kernels/planes.cu, kernels/quant.cu, kernels/huffman.cu), with the same
output bytes as the CPU references in :mod:`fmstore.codec.planes` and :mod:`fmstore.codec.quant`."""

from __future__ import annotations

import struct

import numpy as np
import torch

from ..errors import FmstoreError


def _lib(name: str = "planes"):  # noqa: ANN202 - a ctypes library
    from kernels import load

    return load(name)


def _check(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" or t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{what}: expected a flat contiguous uint8 CUDA tensor")


def _run(rc: int, what: str) -> None:
    if rc != 0:
        raise FmstoreError(f"{what} kernel failed to launch (cudaError {rc})")


def split(data: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Byte planes of flat uint8 ``data`` on the GPU (plane 0 first), like ``planes.split``."""
    _check(data, "split")
    if width < 1 or data.numel() % width:
        raise ValueError(f"{data.numel()} bytes are not a whole number of {width}-byte elements")
    out = torch.empty_like(data) if out is None else out
    if data.numel():
        stream = torch.cuda.current_stream(data.device).cuda_stream
        _run(
            _lib().fmstore_split(data.data_ptr(), out.data_ptr(), data.numel() // width, width, stream),
            "split",
        )
    return out


def merge(planes: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`split`."""
    _check(planes, "merge")
    if width < 1 or planes.numel() % width:
        raise ValueError(f"{planes.numel()} bytes are not a whole number of {width}-byte elements")
    out = torch.empty_like(planes) if out is None else out
    if planes.numel():
        stream = torch.cuda.current_stream(planes.device).cuda_stream
        _run(
            _lib().fmstore_merge(planes.data_ptr(), out.data_ptr(), planes.numel() // width, width, stream),
            "merge",
        )
    return out


def xor(data: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bytewise ``data ^ base`` on the GPU."""
    _check(data, "xor")
    _check(base, "xor")
    if data.numel() != base.numel():
        raise ValueError(f"XOR delta needs equal sizes, got {data.numel()} and {base.numel()} bytes")
    out = torch.empty_like(data) if out is None else out
    if data.numel():
        stream = torch.cuda.current_stream(data.device).cuda_stream
        _run(
            _lib().fmstore_xor(data.data_ptr(), base.data_ptr(), out.data_ptr(), data.numel(), stream), "xor"
        )
    return out


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


def _rows(nbytes: int, width: int, blobs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' segment and chunk rows (see kernels/huffman.cu) for ``nbytes`` of
    ``width``-byte elements; ``blobs`` gives each segment's (blob offset, blob length)."""
    from . import huffman

    segs, chunks = [], []
    for s, ((a, b), (off, length)) in enumerate(zip(huffman.segments(nbytes), blobs)):
        n = (b - a) // width
        per_plane = -(-n // huffman.CHUNK)
        segs.append([a, b - a, len(chunks), per_plane * width, off, length, per_plane, 0])
        for local, (p, c0, m) in enumerate(huffman._chunks(n, width)):
            chunks.append([a + p * n + c0, m, s, local, p, 0])
    return np.array(segs, dtype=np.int64).reshape(-1, 8), np.array(chunks, dtype=np.int64).reshape(-1, 6)


class _Encoder:
    """Encodes every segment of a tensor (huffman.segments) in one launch of each kernel,
    each segment's blob at its own worst-case offset in a device arena, its length into a
    device array."""

    def __init__(self, data: torch.Tensor, width: int, base: torch.Tensor | None) -> None:
        from . import huffman

        _check(data, "huffman encode")
        if width not in huffman.WIDTHS or data.numel() % width:
            raise ValueError(f"{data.numel()} bytes are not a whole number of {width}-byte elements")
        self.lib = lib = _lib("huffman")
        self.data = xor(data, base) if base is not None else data
        self.width, self.flags = width, 1 if base is not None else 0
        n = data.numel()
        self.segs = huffman.segments(n)
        self.caps = [int(lib.fmstore_huff_max_bytes(b - a, width)) for a, b in self.segs]
        self.at = [sum(self.caps[:i]) for i in range(len(self.caps))]
        self.seg_rows, chunk_rows = _rows(n, width, list(zip(self.at, self.caps)))
        dev = data.device
        rows = torch.from_numpy(np.concatenate([self.seg_rows.reshape(-1), chunk_rows.reshape(-1)]))
        self.rows = rows.to(dev, non_blocking=False)
        self.nchunks = len(chunk_rows)
        self.arena = torch.empty(sum(self.caps), dtype=torch.uint8, device=dev)
        need = int(lib.fmstore_huff_scratch_bytes(n, self.nchunks))
        self.scratch = torch.empty(need, dtype=torch.uint8, device=dev)
        self.sizes = torch.empty(len(self.segs), dtype=torch.int64, device=dev)
        self.stream = torch.cuda.current_stream(dev)

    def launch(self) -> None:
        nseg = len(self.segs)
        _run(
            self.lib.fmstore_huff_encode(
                self.data.data_ptr(), self.width, self.flags, self.rows.data_ptr(), self.seg_rows.ctypes.data,
                nseg, self.rows.data_ptr() + 8 * self.seg_rows.size, self.nchunks, self.arena.data_ptr(),
                self.sizes.data_ptr(), self.scratch.data_ptr(), self.stream.cuda_stream,
            ),
            "huffman encode",
        )  # fmt: skip

    @staticmethod
    def directory(sizes: list[int]) -> torch.Tensor:
        from . import huffman

        head = huffman.STREAM_MAGIC + struct.pack(f"<I{len(sizes)}Q", len(sizes), *sizes)
        return torch.frombuffer(bytearray(head), dtype=torch.uint8)


def huff_encode(data: torch.Tensor, width: int, *, base: torch.Tensor | None = None) -> torch.Tensor:
    """The FMHS stream of flat uint8 CUDA ``data`` as a CUDA tensor, encoded on the GPU
    without a host round trip of the data (one small read of the segment lengths).  Its
    bytes equal :func:`fmstore.codec.huffman.encode`'s on the same input."""
    enc = _Encoder(data, width, base)
    enc.launch()
    sizes = enc.sizes.tolist()  # waits for the encode
    head = enc.directory(sizes)
    out = torch.empty(head.numel() + sum(sizes), dtype=torch.uint8, device=data.device)
    out[: head.numel()].copy_(head)
    at = head.numel()
    for i, size in enumerate(sizes):
        out[at : at + size].copy_(enc.arena[enc.at[i] : enc.at[i] + size])
        at += size
    return out


def huff_encode_to_host(
    data: torch.Tensor, width: int, *, base: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Encode CUDA ``data`` on the GPU into host memory (``out``: a pinned uint8 buffer of at
    least :func:`huff_host_bytes`, else one is allocated); returns the view of ``out`` that
    holds the FMHS stream, once its bytes have landed.  Only the encoded bytes cross PCIe."""
    enc = _Encoder(data, width, base)
    n = len(enc.segs)
    head_bytes = 8 + 8 * n
    if out is None:
        out = torch.empty(head_bytes + sum(enc.caps), dtype=torch.uint8, pin_memory=True)
    enc.launch()
    sizes = enc.sizes.tolist()  # waits for the encode (tens of microseconds for MBs)
    at = head_bytes
    for i, size in enumerate(sizes):
        out[at : at + size].copy_(enc.arena[enc.at[i] : enc.at[i] + size], non_blocking=True)
        at += size
    out[:head_bytes].copy_(enc.directory(sizes))
    enc.stream.synchronize()
    return out[:at]


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
    base: torch.Tensor | None = None,
    name: str = "",
) -> torch.Tensor:
    """Decode an FMHS CUDA ``stream`` into flat uint8 CUDA ``out`` on the GPU; waits for the
    kernels and raises :class:`~fmstore.codec.CodecError` naming the first damaged chunk."""
    from . import huffman
    from .chain import CodecError

    _check(stream, "huffman decode")
    _check(out, "huffman decode")
    where = f"tensor {name!r}: " if name else ""
    nbytes = out.numel()
    head = huffman.directory_bytes(nbytes)
    directory = huffman.read_directory(
        stream[:head].cpu().numpy(), nbytes, name, total=stream.numel()
    )  # one small read: where each segment's blob starts
    lib = _lib("huffman")
    seg_rows, chunk_rows = _rows(nbytes, width, [(at, size) for _, _, at, size in directory])
    rows = torch.from_numpy(np.concatenate([seg_rows.reshape(-1), chunk_rows.reshape(-1)])).to(out.device)
    planes = torch.empty(nbytes if width > 1 else 0, dtype=torch.uint8, device=out.device)
    err = torch.zeros(2 * len(directory), dtype=torch.int32, device=out.device)
    _run(
        lib.fmstore_huff_decode(
            stream.data_ptr(), width, rows.data_ptr(), seg_rows.ctypes.data, len(seg_rows),
            rows.data_ptr() + 8 * seg_rows.size, len(chunk_rows), out.data_ptr(), planes.data_ptr(),
            err.data_ptr(), torch.cuda.current_stream(out.device).cuda_stream,
        ),
        "huffman decode",
    )  # fmt: skip
    codes = err.view(-1, 2).tolist()
    for i, (code, chunk) in enumerate(codes):
        if code:
            a, b = directory[i][:2]
            per_plane = -(-((b - a) // width) // huffman.CHUNK)
            plane = f" (plane {chunk // per_plane})" if chunk >= 0 else ""
            raise CodecError(
                f"{where}segment {i}, chunk {chunk}{plane} does not decode: {_HUFF_ERRORS.get(code, code)}"
            )
    if base is not None:
        xor(out, base, out=out)
    return out
