"""Byte-plane split and merge, and XOR delta: the reversible transforms before entropy coding.

A float's exponent lives in its top byte; grouping byte ``i`` of every element together
("plane" ``i``) turns one hard-to-compress stream into an exponent plane with a skewed
byte distribution (compresses ~2.8x on trained weights) and mantissa planes that are close
to random (stored raw).  The XOR of a tensor with the same tensor in an earlier snapshot is
mostly zero bits where the weights barely moved.  Both are exact on any bytes.
"""

from __future__ import annotations

import numpy as np
import torch


def split(data: torch.Tensor, width: int) -> torch.Tensor:
    """Flat uint8 ``data`` (elements of ``width`` bytes) as ``width`` planes, plane 0 first."""
    _check(data, width)
    if width == 1 or data.numel() == 0:
        return data.clone()
    rows = data.numpy().reshape(-1, width)
    out = np.empty((width, rows.shape[0]), dtype=np.uint8)
    for i in range(width):  # one strided pass per plane: numpy copies these at memory speed
        out[i] = rows[:, i]
    return torch.from_numpy(out.reshape(-1))


def merge(planes: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`split`, written into ``out`` (flat uint8) when given."""
    _check(planes, width)
    if out is None:
        out = torch.empty_like(planes)
    if width == 1 or planes.numel() == 0:
        out.copy_(planes)
        return out
    src = planes.numpy().reshape(width, -1)
    dst = out.numpy()
    rows = dst.reshape(-1, width)
    for i in range(width):
        rows[:, i] = src[i]
    return out


def xor(data: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bytewise ``data ^ base`` (its own inverse: ``xor(xor(a, b), b) == a``)."""
    if data.numel() != base.numel():
        raise ValueError(f"XOR delta needs equal sizes, got {data.numel()} and {base.numel()} bytes")
    if out is None:
        out = torch.empty_like(data)
    a, b, o = data.numpy(), base.numpy(), out.numpy()
    n8 = a.size // 8 * 8  # 8 bytes at a time where the buffers allow it
    if n8 and all(x.ctypes.data % 8 == 0 for x in (a, b, o)):
        np.bitwise_xor(a[:n8].view(np.uint64), b[:n8].view(np.uint64), out=o[:n8].view(np.uint64))
        np.bitwise_xor(a[n8:], b[n8:], out=o[n8:])
    else:
        np.bitwise_xor(a, b, out=o)
    return out


def _check(data: torch.Tensor, width: int) -> None:
    if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous() or data.device.type != "cpu":
        raise ValueError("expected a flat contiguous uint8 CPU tensor")
    if width < 1 or data.numel() % width:
        raise ValueError(f"{data.numel()} bytes are not a whole number of {width}-byte elements")
