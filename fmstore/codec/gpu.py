"""The GPU path of the codec's transforms (kernels/planes.cu, kernels/quant.cu), with the same
output bytes as the CPU references in :mod:`fmstore.codec.planes` and :mod:`fmstore.codec.quant`."""

from __future__ import annotations

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
