"""Copy a run of a shard's elements (in row-major order) into the shard's region of a tensor.

A streamed piece of a saved shard is a flat run of its elements; the shard's place in the
whole tensor is a strided view of it (a column block, for a shard split along dimension 1).
:func:`copy_range` writes the run into the view as whole slabs of the leading dimension where
it can (one ``copy_`` each) and recurses into the partial slabs at its two ends only, so a
piece costs at most two partial copies per dimension, whatever its alignment.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import torch


def copy_range(view: torch.Tensor, src: torch.Tensor, first: int, *, non_blocking: bool) -> None:
    """Copy flat ``src`` into elements ``first .. first + len(src)`` of ``view`` counted in
    row-major order (``view.reshape(-1)[first:...] = src`` without the reshape's copy)."""
    n = src.numel()
    if not n:
        return
    if view.is_contiguous():
        view.view(-1)[first : first + n].copy_(src, non_blocking=non_blocking)
        return
    inner = prod(view.shape[1:])
    row, skip = divmod(first, inner)
    at = 0
    if skip:  # the rest of a partial leading slab
        take = min(n, inner - skip)
        copy_range(view[row], src[:take], skip, non_blocking=non_blocking)
        at, row = take, row + 1
    full = (n - at) // inner
    if full:
        block = src[at : at + full * inner].view(full, *view.shape[1:])
        view[row : row + full].copy_(block, non_blocking=non_blocking)
        at, row = at + full * inner, row + full
    if at < n:  # the start of a partial slab
        copy_range(view[row], src[at:], 0, non_blocking=non_blocking)


def place(
    view: torch.Tensor, start: int, piece: torch.Tensor, stream: Callable[[torch.device], torch.cuda.Stream]
) -> None:
    """Copy ``piece`` (flat uint8 host bytes of a shard from byte ``start``, verified) into its
    place in ``view`` (the shard's region of the destination); returns once ``piece`` may be
    reused.  On CUDA the copy is non-blocking on ``stream(device)`` (a side stream of the
    calling thread), and waited for by its event: the host buffer goes back to the ring only
    once the copy has read it, while other threads' reads and copies go on."""
    src = piece.view(view.dtype)
    first = start // view.element_size()
    if view.device.type != "cuda":
        copy_range(view, src, first, non_blocking=False)
        return
    s = stream(view.device)
    with torch.cuda.stream(s):
        copy_range(view, src, first, non_blocking=True)
        done = torch.cuda.Event()
        done.record(s)
    done.synchronize()
