"""One snapshot written in parts, for integrations that bring the ranks' results together
themselves (the DCP writer: DCP's own collectives carry them to its coordinator).

Each rank writes its pieces of the state's tensors into its shard file with
:meth:`SnapshotWriter.write` and hands the coordinator the shard records it gets back; the
coordinator commits the manifest naming them all with :meth:`SnapshotWriter.commit`.  Staging,
checksums, codecs (``quantize`` too), incremental references to the previous snapshot and
the commit are the save pipeline's (:class:`~fmstore.checkpoint.saving.SavePipeline`,
:class:`~fmstore.checkpoint.level.SnapshotLevel`): a snapshot written so is the same as one
``Checkpointer.save`` writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..blob import as_bytes_tensor, dtype_name
from ..errors import FmstoreError
from ..storage import Storage
from .level import SnapshotLevel
from .manifest import Shard, TensorEntry
from .saving import SavePipeline
from .sharding import Piece
from .staging import Staged, StagedTensor
from .tree import flatten, tensor_leaves, unique_name

__all__ = ["Part", "PartsWritten", "SnapshotWriter", "tensor_names"]


@dataclass
class Part:
    """One piece of a tensor a rank writes: ``data``, at ``offsets`` of the tensor named
    ``name`` in the snapshot (as :func:`tensor_names` names it), of shape ``global_shape``."""

    name: str
    data: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]


@dataclass
class PartsWritten:
    """What :meth:`SnapshotWriter.write` wrote: each part's shard record (plain JSON-able
    dicts, in the parts' order, for :meth:`SnapshotWriter.commit`) and the files it wrote
    (path under the root -> size)."""

    shards: list[dict[str, Any]]
    files: dict[str, int]

    def nbytes(self, i: int) -> int:
        """The bytes part ``i`` takes in its file (coded size when compressed)."""
        return int(self.shards[i]["end"]) - int(self.shards[i]["begin"])


def tensor_names(state: Any) -> dict[tuple[Any, ...], str]:
    """Path in the nested ``state`` -> the name ``Checkpointer.save`` gives the tensor there
    (tensors may be meta-device placeholders).  A value that is neither a tensor nor JSON is
    an :class:`~fmstore.errors.UnsupportedValueError` naming its path."""
    _, tree, _ = flatten(state)
    return tensor_leaves(tree)


class SnapshotWriter:
    """Writes snapshots under the root ``storage`` opens, a rank's parts at a time, then one
    commit.  ``compression``/``codec``/``quantize`` as :class:`~fmstore.Checkpointer`'s
    (checked already: :func:`~fmstore.checkpoint.check_save_options`).  It claims no writer
    lease: the caller holds the root's (:class:`~fmstore.checkpoint.Snapshots`)."""

    def __init__(
        self,
        storage: Storage,
        *,
        compression: str | None = None,
        codec: str = "planes-zstd",
        quantize: tuple[str, ...] = (),
        io_threads: int = 8,
        name: str = "dcp",
    ) -> None:
        self.storage = storage
        self.name = name  # the level's name in errors
        self.compression = compression
        self.codec = codec
        self.quantize = tuple(quantize)
        self.io_threads = io_threads
        self._pipeline: SavePipeline | None = None  # its threads and pinned pool, on first write

    @property
    def pipeline(self) -> SavePipeline:
        if self._pipeline is None:
            self._pipeline = SavePipeline(
                levels=[SnapshotLevel(self.name, self.storage)],
                memory=None,
                rank=0,
                world_size=1,
                compression=self.compression,
                codec=self.codec,
                quantize=self.quantize,
                io_threads=self.io_threads,
                max_persists=1,
                session="",
                claim=lambda: None,  # the caller holds the root's lease
            )
        return self._pipeline

    def write(
        self, step: int, parts: list[Part], *, rank: int = 0, writer: str | None = None, incremental: bool = True
    ) -> PartsWritten:
        """Write this rank's ``parts`` of ``step`` into its shard file (nothing is committed);
        ``writer``: this save's id, the same on every rank, in its files' names.  A tensor of
        which the rank writes several parts gets a shard per part (in the shard file, whose
        entries need distinct names, each is an entry named ``<name>@[offsets]``).  With
        ``incremental`` a part whose bytes the newest committed snapshot before ``step`` holds
        is referenced there instead of written (only whole tensors' shards, found by name)."""
        level = SnapshotLevel(self.name, self.storage, rank=rank, incremental=incremental, writer=writer)
        level.snapshots.begin(step)  # a committed step is never overwritten
        if not parts:
            return PartsWritten([], {})
        count: dict[str, int] = {}
        for p in parts:
            count[p.name] = count.get(p.name, 0) + 1
        taken = set(count)
        keys: list[str] = []  # each part's entry name in the shard file
        for p in parts:
            key = p.name
            if count[p.name] > 1:
                key = unique_name(f"{p.name}@[{','.join(map(str, p.offsets))}]", taken)
                taken.add(key)
            keys.append(key)
        staged, held = self._stage({key: p.data for key, p in zip(keys, parts)})
        try:
            # Codec choice (``quantize`` patterns) goes by the tensor's own name; the shard file
            # then keys each part by its entry name.
            pieces = [Piece(p.name, p.data, tuple(p.global_shape), tuple(p.offsets), True) for p in parts]
            items = self.pipeline.items.items([staged[key] for key in keys], pieces)
            for it, key in zip(items, keys):
                if key != it.piece.name:
                    it.piece = dataclasses.replace(it.piece, name=key)
            local = level.write_local(step, items)
        finally:
            if held is not None:
                held.release()
        return PartsWritten([asdict(local.entries[key].shards[0]) for key in keys], local.files)

    def _stage(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, StagedTensor], Staged | None]:
        """Host bytes of each tensor: CPU tensors as they are (a contiguous copy only for a
        non-contiguous view: the caller waits for the write, so they cannot change meanwhile),
        device tensors through the pipeline's pinned staging pool (the Staged to release once
        written; encoded on the CPU, as CPU tensors are)."""
        out: dict[str, StagedTensor] = {}
        device: list[Piece] = []
        for name, t in tensors.items():
            t = t.detach()
            if t.device.type == "cpu":
                out[name] = StagedTensor(name, t.dtype, tuple(t.shape), as_bytes_tensor(t))
            else:
                device.append(Piece(name, t, tuple(t.shape), (0,) * t.dim()))
        if not device:
            return out, None
        staged = self.pipeline.stage(device, None, True, gpu_encode=False)
        try:
            staged.wait()
        except BaseException:
            staged.release()
            raise
        out.update({st.name: st for st in staged.tensors})
        return out, staged

    def commit(
        self,
        step: int,
        state: Any,
        shards: dict[str, list[dict[str, Any]]],
        files: dict[str, int],
        meta: dict[str, Any],
        *,
        world_size: int,
    ) -> None:
        """Commit ``step``: its manifest, with the tree of the nested ``state`` (its tensors
        meta-device placeholders of each tensor's dtype and global shape, named as
        :func:`tensor_names` names them), the shard records the ranks' :meth:`write` gave
        (tensor name -> its shards), every rank's ``files`` and ``meta``.  A tensor of the
        state without shards is an :class:`~fmstore.errors.FmstoreError`; nothing is committed."""
        tensors, tree, _ = flatten(state)
        entries: dict[str, TensorEntry] = {}
        for name, t in tensors.items():
            got = shards.get(name)
            if not got:
                raise FmstoreError(f"step {step} not committed: no rank wrote tensor {name!r}")
            entries[name] = TensorEntry(dtype_name(t.dtype), list(t.shape), [Shard(**s) for s in got])
        level = SnapshotLevel(self.name, self.storage)
        level.snapshots.begin(step)
        level.commit(step, entries, files, tree, meta, world_size=world_size)

    def close(self) -> None:
        """Stop the pipeline's threads and free its pinned pool (the storage stays open)."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.close()
