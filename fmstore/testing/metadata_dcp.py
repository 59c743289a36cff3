"""torch DCP's counterpart of the metadata bench (issue 30, point 5): for the job of
:class:`fmstore.testing.metadata.Job`, the save and load metadata work of
``torch.distributed.checkpoint`` (``DefaultSavePlanner``, ``FileSystemWriter``,
``DefaultLoadPlanner``), through torch's own functions, without a process group or tensor data.
``bench/metadata_scale.py`` times it beside fmstore's; ``tests/test_metadata_scale.py`` checks it.

What is built (untimed) and what is run (timed by the bench):

- the ranks' local ``SavePlan``s, as ``create_default_local_save_plan`` makes them for a state
  of DTensors (``Shard(0)`` over a 1-D mesh of every rank): a ``SHARD`` write item per sharded
  tensor on every rank, its chunk from torch's ``_compute_local_shape_and_global_offset`` (what
  ``DTensor.__create_write_items__`` calls), empty slices included (they all sit at offset
  ``shape[0]``, so DCP's dedup keeps one of them); a ``TENSOR`` item for each step scalar on
  every rank (DCP writes plain tensors from every rank and dedups them at the coordinator);
  each rank's RNG tensors as ``TENSOR`` items under rank-named keys (DCP has no per-rank node).
  ``planner_data`` is each rank's flatten mapping, as ``DefaultSavePlanner.set_up_planner``
  leaves it.  The plans share objects as the coordinator's unpickled copies do (only an
  item's index and chunk offsets), so the pickled metadata has the real size;
- :func:`global_plan`: ``DefaultSavePlanner().create_global_plan`` (``dedup_save_plans``,
  ``create_default_global_save_plan``, the merge of the mappings, ``_validate_global_plan``);
- :func:`write_results`: what each rank's ``FileSystemWriter.write_data`` returns (one file
  ``__{rank}_0.distcp`` per rank, items back to back), as gathered;
- :func:`finish`: ``FileSystemWriter.finish`` without the file: ``storage_data`` (a
  ``_StorageInfo`` per ``MetadataIndex``), ``storage_meta``, version, ``pickle.dumps``;
- :func:`read`: ``pickle.loads`` of those bytes (what ``FileSystemReader.read_metadata`` does;
  no validation);
- :func:`load_plan`: ``create_default_local_load_plan`` for one rank of a
  :class:`~fmstore.testing.metadata.Target`, its sharded tensors given as :class:`LocalShard`
  (a stand-in for a DTensor: its global ``size()`` and ``__create_chunk_list__``, which, as a
  DTensor's does, computes its chunk with ``_compute_local_shape_and_global_offset`` each call),
  plain tensors as meta tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner, create_default_local_load_plan
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from fmstore.testing.metadata import Job, Spec, Target

__all__ = [
    "LocalShard",
    "job_specs",
    "save_plans",
    "global_plan",
    "write_results",
    "finish",
    "read",
    "load_state_dict",
    "load_plan",
]


def job_specs(job: Job) -> tuple[list[Spec], list[Spec]]:
    """(the tensors every rank has: sharded and step scalars, rank 0's own RNG tensors)."""
    specs = list(job.specs(0).values())
    return [s for s in specs if s.kind != "rank"], [s for s in specs if s.kind == "rank"]


def _rank_spec(s: Spec, rank: int) -> Spec:
    """Rank 0's RNG tensor ``s`` as rank ``rank``'s (its name is ``rng/rank-0/<part>``)."""
    return dataclasses.replace(s, name=f"rng/rank-{rank}/{s.name.split('/', 2)[2]}")


@functools.cache
def _save_chunk(shape: tuple[int, ...], world: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # (sizes, offsets) of a Shard(0) DTensor's local chunk on a 1-D mesh; cached because the
    # job has a dozen shapes and torch's function costs ~40 us a call (building the plans is
    # not what is timed).
    return _compute_local_shape_and_global_offset(shape, (world,), [rank], [Shard(0)])


def _tensor_item(
    fqn: str, s: Spec, kind: WriteItemType, sizes: Sequence[int], offsets: Sequence[int]
) -> WriteItem:
    # The item _create_write_items_for_dtensor / _create_write_item_for_tensor make (offsets
    # shared by the index and the chunk, as there); TensorProperties of a plain strided tensor.
    off = torch.Size(offsets)
    return WriteItem(
        index=MetadataIndex(fqn, off),
        type=kind,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=off, sizes=torch.Size(sizes)),
            properties=TensorProperties(dtype=s.dtype),
            size=torch.Size(s.shape),
        ),
    )


def local_save_plan(job: Job, rank: int, common: list[Spec], own: list[Spec]) -> SavePlan:
    """Rank ``rank``'s plan as ``DefaultSavePlanner.create_local_plan`` returns it."""
    items = []
    for s in common:
        if s.kind == "sharded":
            sizes, offsets = _save_chunk(s.shape, job.world, rank)
            items.append(_tensor_item(s.name, s, WriteItemType.SHARD, sizes, offsets))
        else:  # every rank writes the plain tensors; the coordinator's dedup keeps one
            items.append(_tensor_item(s.name, s, WriteItemType.TENSOR, s.shape, (0,) * len(s.shape)))
    for s in (_rank_spec(s, rank) for s in own):
        items.append(_tensor_item(s.name, s, WriteItemType.TENSOR, s.shape, (0,) * len(s.shape)))
    mappings = {it.index.fqn: tuple(it.index.fqn.split("/")) for it in items}
    return SavePlan(items, planner_data=mappings)


def save_plans(job: Job) -> list[SavePlan]:
    """Every rank's local plan as the coordinator receives it.  (``gather_object`` unpickles a
    copy per rank; the plans built here already share no objects across items but the
    offsets of an item's index and chunk, which is what such a copy shares, so the
    round trip, 40% of building them, is left out.)"""
    common, own = job_specs(job)
    return [local_save_plan(job, r, common, own) for r in range(job.world)]


def global_plan(plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
    """The coordinator's planning: ``DefaultSavePlanner.create_global_plan`` (dedup, global plan,
    the merge of the flatten mappings, validation) on a fresh planner, as each save makes one."""
    return DefaultSavePlanner().create_global_plan(plans)


def _nbytes(item: WriteItem) -> int:
    td = item.tensor_data
    assert td is not None
    return td.chunk.sizes.numel() * torch.empty(0, dtype=td.properties.dtype).element_size()


def write_results(plans: list[SavePlan]) -> list[list[WriteResult]]:
    """What each rank's ``FileSystemWriter.write_data`` reports for its final plan: one file per
    rank, its items back to back (lengths: the raw bytes; DCP's default torch.save framing
    adds about a kilobyte an item, which does not change the metadata's size), gathered."""
    out = []
    for rank, plan in enumerate(plans):
        offset, results, path = 0, [], f"__{rank}_0.distcp"  # one path object a rank, as its writer has
        for item in plan.items:
            n = _nbytes(item)
            # A fresh index, and a fresh copy of its name: the coordinator gets each rank's
            # results through gather_object, copies sharing nothing with the metadata's chunks
            # nor with other ranks' (pickle memoizes shared objects: sharing would shrink the file).
            fqn = item.index.fqn.encode().decode()
            index = MetadataIndex(fqn, torch.Size(item.index.offset or ()), item.index.index)
            results.append(WriteResult(index, n, _StorageInfo(path, offset, n)))
            offset += n
        out.append(results)
    return out


def finish(metadata: Metadata, results: list[list[WriteResult]]) -> bytes:
    """``FileSystemWriter.finish``, into memory: the ``.metadata`` file's bytes."""
    md = dataclasses.replace(metadata, version=CURRENT_DCP_VERSION)
    storage_md = {}
    for wr_list in results:
        storage_md.update({wr.index: wr.storage_data for wr in wr_list})
    md.storage_data = storage_md
    md.storage_meta = StorageMeta(checkpoint_id="bench", save_id="bench-save")
    return pickle.dumps(md)


def read(raw: bytes) -> Metadata:
    """``FileSystemReader.read_metadata`` without the file: an unpickle, no validation."""
    return pickle.loads(raw)


class LocalShard:
    """A DTensor as load planning sees it: its global ``size()`` and its local chunk, computed
    from the mesh and placements on each call as ``DTensor.__create_chunk_list__`` does."""

    __slots__ = ("_size", "_mesh", "_coord", "_placements")

    def __init__(
        self, shape: tuple[int, ...], mesh: tuple[int, ...], coord: list[int], placements: list[Placement]
    ) -> None:
        self._size, self._mesh, self._coord, self._placements = torch.Size(shape), mesh, coord, placements

    def size(self) -> torch.Size:
        return self._size

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        sizes, offsets = _compute_local_shape_and_global_offset(
            self._size, self._mesh, self._coord, self._placements
        )
        return [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))]


def load_state_dict(job: Job, target: Target, rank: int) -> dict[str, Any]:
    """Rank ``rank`` of ``target``'s state dict to load into: its sharded tensors as DTensors
    (``Shard(0)`` on the first mesh dimension; matrices ``Shard(1)``, vectors replicated, on a
    second), one rank's whole tensors as meta tensors; the step scalars and its own RNG
    tensors as meta tensors (meta: no memory, and create_default_local_load_plan only asks
    their size)."""
    common, own = job_specs(job)
    coord, r = [], rank
    for d in reversed(target.mesh):
        coord.append(r % d)
        r //= d
    coord.reverse()
    out: dict[str, Any] = {}
    for s in common:
        if s.kind == "sharded" and target.world > 1:
            placements: list[Placement] = [
                Shard(dim) if dim < len(s.shape) else Replicate() for dim in range(len(target.mesh))
            ]
            out[s.name] = LocalShard(s.shape, target.mesh, coord, placements)
        else:
            out[s.name] = torch.empty(s.shape, dtype=s.dtype, device="meta")
    for s in (_rank_spec(s, rank) for s in own):
        out[s.name] = torch.empty(s.shape, dtype=s.dtype, device="meta")
    return out


def load_plan(state_dict: dict[str, Any], metadata: Metadata) -> LoadPlan:
    """``DefaultLoadPlanner.create_local_plan``'s work: its key check and
    ``create_default_local_load_plan`` (strict).  Its ``set_up_planner`` is left out: its
    flattening is a no-op on a flat state dict, and ``_init_state_dict`` would allocate the
    meta tensors."""
    # The check create_local_plan makes for checkpoint keys the state lacks (here the other
    # ranks' RNG tensors: it then looks for pre-2.4 key names, none of which match here).
    set(metadata.state_dict_metadata) - set(state_dict)
    return create_default_local_load_plan(state_dict, metadata, True)
