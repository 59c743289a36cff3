"""Byte-plane split and merge: the reversible transform before entropy coding.

A float's exponent lives in its top byte; grouping byte ``i`` of every element together
("plane" ``i``) turns one hard-to-compress stream into an exponent plane with a skewed
byte distribution (compresses ~2.8x on trained weights) and mantissa planes that are close
to random (stored raw).  It is exact on any bytes.
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


def _check(data: torch.Tensor, width: int) -> None:
    if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous() or data.device.type != "cpu":
        raise ValueError("expected a flat contiguous uint8 CPU tensor")
    if width < 1 or data.numel() % width:
        raise ValueError(f"{data.numel()} bytes are not a whole number of {width}-byte elements")
