"""Opt-in lossy stage: blockwise int8 quantization (absmax per block) for optimizer moments.

Each block of ``block`` float32 values is stored as int8 codes plus one float32 scale,
``scale = absmax / 127`` and ``code = rint(x / scale)`` (round half to even, IEEE division),
so 4 bytes become 1 + 4/block.  The GPU kernel (kernels/quant.cu) computes the same
expressions in the same order and gives identical bytes.  Never applied to weights unless
the caller asks; the manifest records it.
"""

from __future__ import annotations

import torch

BLOCK = 256


def quantize(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scales) of a flat float32 tensor, one scale per ``block`` values."""
    if x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError("quantize takes a flat float32 tensor")
    n = x.numel()
    nblocks = -(-n // block)
    padded = torch.zeros(nblocks * block, dtype=torch.float32, device=x.device)
    padded[:n] = x
    blocks = padded.view(nblocks, block)
    scales = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block: codes 0
    codes = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.view(-1)[:n].clone(), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float32 values back from :func:`quantize`'s output."""
    n = codes.numel()
    nblocks = scales.numel()
    padded = torch.zeros(nblocks * block, dtype=torch.int8, device=codes.device)
    padded[:n] = codes
    out = padded.view(nblocks, block).to(torch.float32) * scales[:, None]
    return out.view(-1)[:n].clone()
