"""The process group a checkpointer saves with: ranks, a job id every rank shares, and the
claim of the roots' writer leases that every rank learns the outcome of."""

from __future__ import annotations

from typing import Any

from ..errors import FmstoreError, WriterConflictError
from .level import SnapshotLevel

__all__ = ["claim", "rank_and_world", "session_token"]


def claim(levels: list[SnapshotLevel], rank: int, world_size: int, process_group: Any) -> None:
    """Claim the durable levels' roots before a job's first write to any of them: rank 0
    takes each root's writer lease and the other ranks learn the outcome, so that a second
    job on a root is refused on every rank before any of them writes."""
    error: FmstoreError | None = None
    if rank == 0:
        for lvl in levels:
            try:
                lvl.claim()
            except FmstoreError as e:
                error = e
                break
    if world_size > 1:
        import torch.distributed as dist

        pg = process_group
        box = [None if error is None else str(error)] if rank == 0 else [None]
        src = 0 if pg is None else dist.get_global_rank(pg, 0)
        dist.broadcast_object_list(box, src=src, group=pg)
        if error is None and box[0] is not None:
            error = WriterConflictError(f"rank 0 could not claim the checkpoint roots: {box[0]}")
    if error is not None:
        for lvl in levels:
            lvl.snapshots.release(forget=True)
        raise error


def session_token(process_group: Any) -> str:
    """A token rank 0 draws and every rank of the group receives (one object broadcast, when the
    checkpointer is made: all ranks make theirs together, as they save together)."""
    import uuid

    import torch.distributed as dist

    src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
    box = [uuid.uuid4().hex if dist.get_rank(process_group) == 0 else None]
    dist.broadcast_object_list(box, src=src, group=process_group)
    return str(box[0])


def rank_and_world(process_group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)
