"""Which piece of each tensor a rank saves, and which saved bytes a rank needs on load.

A DTensor (FSDP2, tensor parallel) contributes its local shard, placed in the global tensor
by its offsets; of replicas (mesh dimensions with a ``Replicate`` placement) only the one at
coordinate 0 writes, so replicated bytes are stored once.  A plain tensor is taken to be the
same on every rank (like torch DCP does) and is written by one rank, chosen by its name.

On load, a target region (a DTensor's local shard, or the whole tensor) is intersected with
every saved shard; where the overlap is a run of whole rows (the common dim-0 sharding) only
those bytes are read, rounded out to the checksum chunks that cover them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch

from ..blob import dtype_name
from ..errors import FmstoreError, LoadMismatchError


@dataclass
class Piece:
    """The part of one tensor this rank writes."""

    name: str
    local: torch.Tensor  # a plain tensor holding the piece
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    writes: bool = True  # False: another rank writes these bytes (a replica)


def check_target(
    name: str, step: int, dtype: torch.dtype, shape: tuple[int, ...], target: torch.Tensor | None
) -> None:
    """Raise :class:`LoadMismatchError` if ``target`` is not a ``dtype`` tensor of global ``shape``."""
    if target is not None and (target.dtype != dtype or tuple(target.shape) != tuple(shape)):
        raise LoadMismatchError(
            f"tensor {name!r}: snapshot step {step} has {dtype_name(dtype)} {list(shape)}, "
            f"the target is {dtype_name(target.dtype)} {list(target.shape)}"
        )


_DTENSOR: Any = None  # the DTensor class, looked up once (this runs per tensor per save)


def is_dtensor(t: torch.Tensor) -> bool:
    global _DTENSOR
    if type(t) is torch.Tensor:
        return False
    if _DTENSOR is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch without distributed
            return False
        _DTENSOR = DTensor
    return isinstance(t, _DTENSOR)


def dtensor_region(t: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """(local tensor, global offsets, whether this rank is the replica that writes it)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(p.is_partial() for p in t.placements):
        raise FmstoreError(f"tensor {name!r} has a Partial placement; reduce it before saving")
    local = t.to_local()
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    coord = t.device_mesh.get_coordinate()
    primary = coord is not None and all(coord[d] == 0 for d, p in enumerate(t.placements) if not p.is_shard())
    return local, tuple(int(o) for o in offsets), primary


def owner_of(name: str, world: int) -> int:
    """The rank that writes a replicated plain tensor: stable across runs and ranks."""
    return zlib.crc32(name.encode()) % world


def pieces_to_save(
    tensors: dict[str, torch.Tensor],
    rank: int,
    world: int,
    *,
    replicas: bool = False,
    rank_local: set[str] | frozenset[str] = frozenset(),
) -> list[Piece]:
    """The pieces this rank writes; with ``replicas``, also those another rank writes
    (marked ``writes=False``: a host-memory snapshot keeps all of a rank's local state).
    ``rank_local`` names tensors only this rank holds (per-rank state): it writes them itself."""
    out = []
    for name, t in tensors.items():
        if name in rank_local:
            out.append(Piece(name, t, tuple(t.shape), (0,) * t.dim(), True))
        elif is_dtensor(t):
            local, offsets, primary = dtensor_region(t, name)
            if primary or replicas:
                out.append(Piece(name, local, tuple(t.shape), offsets, primary))
        else:
            mine = owner_of(name, world) == rank
            if mine or replicas:
                out.append(Piece(name, t, tuple(t.shape), (0,) * t.dim(), mine))
    return out


def intersect(
    a_off: tuple[int, ...], a_len: tuple[int, ...], b_off: tuple[int, ...], b_len: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The overlap of two boxes (offsets, lengths), or None if they do not meet."""
    off, ln = [], []
    for ao, al, bo, bl in zip(a_off, a_len, b_off, b_len):
        lo, hi = max(ao, bo), min(ao + al, bo + bl)
        if hi <= lo:
            return None
        off.append(lo)
        ln.append(hi - lo)
    return tuple(off), tuple(ln)


def overlaps(
    shards: Sequence[Any], off: tuple[int, ...], ln: tuple[int, ...]
) -> list[tuple[Any, tuple[int, ...], tuple[int, ...], bool]]:
    """(shard, overlap offsets, overlap lengths, rows) of each of ``shards`` (anything with
    ``offsets`` and ``lengths``) that meets the box ``off``/``ln``, in their order; ``rows``:
    the shard has the box's extent in every dimension but the first, so the overlap is a run
    of whole rows of both (contiguous in each).

    A load asks this of every saved shard of each tensor it reads, a shard per saved rank, so
    it is cheap where it can be: one comparison on the first dimension sets aside a shard of
    other rows, and one of the box's columns (the common dim-0 sharding) needs no more."""
    n = len(off)
    if n == 0:
        found = ((s, intersect(off, ln, tuple(s.offsets), tuple(s.lengths))) for s in shards)
        return [(s, ov[0], ov[1], False) for s, ov in found if ov is not None]
    lo, hi = off[0], off[0] + ln[0]
    inner_off, inner_ln = list(off[1:]), list(ln[1:])
    inner_empty = 0 in inner_ln
    c_off, c_len = (off[1], ln[1]) if n == 2 else (None, None)  # a matrix's columns, compared as ints
    out = []
    append = out.append
    for s in shards:
        so, sl = s.offsets, s.lengths
        if len(so) == n and len(sl) == n:
            a = so[0]
            b = a + sl[0]
            if a >= hi or b <= lo:
                continue
            if n == 1:
                same_inner = True
            elif n == 2:
                same_inner = so[1] == c_off and sl[1] == c_len
            else:
                same_inner = so[1:] == inner_off and sl[1:] == inner_ln
            if same_inner:
                r0 = a if a > lo else lo
                r1 = b if b < hi else hi
                if r1 > r0 and not inner_empty:
                    append((s, (r0, *inner_off), (r1 - r0, *inner_ln), True))
                continue
        ov = intersect(off, ln, tuple(so), tuple(sl))
        if ov is not None:
            append((s, ov[0], ov[1], False))
    return out


@dataclass
class ReadPlan:
    """Bytes ``[start, end)`` of a saved shard (relative to its start) hold the overlap; once
    read into a buffer, ``view_shape`` rows of which ``slices`` select the overlap."""

    start: int
    end: int
    view_shape: tuple[int, ...]
    slices: tuple[slice, ...]


def plan_read(
    shard_off: tuple[int, ...],
    shard_len: tuple[int, ...],
    over_off: tuple[int, ...],
    over_len: tuple[int, ...],
    itemsize: int,
) -> ReadPlan:
    if not shard_len:  # 0-d
        return ReadPlan(0, itemsize, (), ())
    inner = prod(shard_len[1:]) * itemsize
    rel = [o - s for o, s in zip(over_off, shard_off)]
    rows_only = all(over_len[d] == shard_len[d] for d in range(1, len(shard_len)))
    if rows_only:  # whole rows: read just them
        r0, r1 = rel[0], rel[0] + over_len[0]
        return ReadPlan(
            r0 * inner, r1 * inner, (over_len[0], *shard_len[1:]), tuple(slice(None) for _ in shard_len)
        )
    slices = tuple(slice(r, r + n) for r, n in zip(rel, over_len))
    return ReadPlan(0, shard_len[0] * inner, tuple(shard_len), slices)
