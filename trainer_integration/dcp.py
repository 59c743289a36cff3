"""A torch.distributed.checkpoint (DCP) storage backend: ``dcp.save`` / ``dcp.async_save`` /
``dcp.load`` (torchtitan, FSDP2 training loops) write and read ordinary fmstore snapshots.

DCP plans *what* each rank saves (its DTensor shards, one copy of replicated values); these
classes decide *how* the bytes reach storage, with fmstore's machinery: a root that is a path
or any fsspec URL, checksums, codecs, references to unchanged bytes of the previous snapshot
(incremental) and the atomic commit of one ``manifest.json``.  A snapshot written here is the
same as one ``Checkpointer.save`` writes: ``Checkpointer(root).load()`` returns the nested
state dict, and the reader also loads snapshots that ``Checkpointer.save`` wrote.

Non-tensor values are stored as JSON in the manifest's tree, never as the pickle DCP's
planner makes of them: the writer takes the objects themselves from the planner.  ``bytes``
and ``io.BytesIO`` values (torchtitan keeps some state so) are stored as opaque bytes: a raw
``uint8`` tensor in the rank's shard file, checksummed like any tensor, marked in the
manifest's ``meta["dcp"]["bytes"]``; fmstore never interprets them.  On load the reader gives
DCP's planner the value as it was saved (``bytes``, or an ``io.BytesIO`` at its saved
position): DCP's ``load_bytes`` contract is the pickle its save planner made of the value
(``DefaultLoadPlanner.load_bytes`` calls ``torch.load(weights_only=False)`` on it), so the
reader hands it ``torch.save(value)`` of that ``bytes``/``BytesIO`` object, made here, now.
What is unpickled is that wrapper, never bytes read from storage: stored bytes that are
themselves a pickle (torchtitan's ``BytesIO``) come back as bytes, for the owner to decode.

Usage::

    import torch.distributed.checkpoint as dcp
    from fmstore.integrations.dcp import FmstoreStorageReader, FmstoreStorageWriter

    dcp.save(state, storage_writer=FmstoreStorageWriter("s3://bucket/run1"))          # next step
    dcp.save(state, checkpoint_id="s3://bucket/run1/step-0000000100",
             storage_writer=FmstoreStorageWriter("s3://bucket/run1"))                 # step 100
    dcp.load(state, storage_reader=FmstoreStorageReader("s3://bucket/run1"))          # latest
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import re
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

try:  # the version torch's FileSystemWriter records in the Metadata it returns and saves
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
except ImportError:  # pragma: no cover - a torch before 2.5 records none
    CURRENT_DCP_VERSION = None  # type: ignore[assignment]

from fmstore.checkpoint import (
    DEFAULT_TTL,
    BufferPool,
    Manifest,
    Part,
    Region,
    SnapshotReader,
    Snapshots,
    SnapshotWriter,
    check_save_options,
    step_dir,
    tensor_names,
)
from fmstore.errors import ConfigError, FmstoreError, LoadMismatchError, ManifestError, UnsupportedValueError
from fmstore.storage import Storage

__all__ = ["FmstoreStorageWriter", "FmstoreStorageReader", "parse_checkpoint_id"]

#: The manifest's ``meta`` key under which a DCP save records what DCP knows of it.
META_KEY = "dcp"
#: A checkpoint id names one snapshot: ``<root>/step-<N>``.  Fewer than ten digits are taken
#: too (torchtitan names its folders ``step-100``); the snapshot directory always has ten.
_ID = re.compile(r"^(?:(?P<root>.*)/)?step-(?P<step>\d{1,10})$")
_LAYER = "dcp"


def parse_checkpoint_id(checkpoint_id: str | os.PathLike[str]) -> tuple[str, int]:
    """(root, step) of a checkpoint id ``<root>/step-NNNNNNNNNN`` (a path or URL); anything
    else is a :class:`ConfigError` naming it."""
    text = os.fspath(checkpoint_id)
    m = _ID.match(text.rstrip("/")) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(
            f"checkpoint_id {checkpoint_id!r} does not name an fmstore snapshot: expected "
            "'<root>/step-NNNNNNNNNN' (a path or URL), e.g. 's3://bucket/run1/step-0000000100'"
        )
    return m.group("root") or ".", int(m.group("step"))


def _valid_id(checkpoint_id: str | os.PathLike[str]) -> bool:
    try:
        parse_checkpoint_id(checkpoint_id)
    except (ConfigError, TypeError):
        return False
    return True


def _check_step(step: Any) -> int | None:
    if step is not None:
        step_dir(step)  # an int in range, or an FmstoreError naming it
    return step


@dataclass(frozen=True)
class _PlanData:
    """What the coordinator tells each rank in its plan's ``storage_data``."""

    step: int
    rank: int
    names: dict[str, str]  # fqn -> fmstore tensor name, for this rank's tensor and BYTE_IO items
    writer: str = ""  # this save's id, in its shard files' names (unique: two savers never collide)


@dataclass(frozen=True)
class _ResultData:
    """A WriteResult's ``storage_data``: a saved shard, or a non-tensor value as a tree node."""

    step: int
    rank: int
    name: str | None = None
    shard: dict[str, Any] | None = None
    value: Any = None  # a JSON value (a copy of it)
    is_value: bool = False  # value is set (it may be None)
    files: dict[str, int] = field(default_factory=dict)  # on a rank's first result: its shard file
    blob: dict[str, Any] | None = None  # a bytes/BytesIO value stored as this uint8 shard: its kind


class _Resources:
    """What a writer or reader opens lazily and never pickles: the storage, the save pipeline
    (a :class:`SnapshotWriter`: its thread pools and pinned staging pool) and the read pool."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None, io_threads: int) -> None:
        self.root = root
        self.storage = Storage(root, storage_options, io_threads=io_threads)
        self.io_threads = io_threads
        self._writer: SnapshotWriter | None = None
        self._pool: BufferPool | None = None

    def writer(self, compression: str | None, codec: str, quantize: tuple[str, ...]) -> SnapshotWriter:
        if self._writer is None:
            self._writer = SnapshotWriter(
                self.storage,
                compression=compression,
                codec=codec,
                quantize=quantize,
                io_threads=self.io_threads,
                name=_LAYER,
            )
        return self._writer

    @property
    def read_pool(self) -> BufferPool:
        if self._pool is None:
            self._pool = BufferPool(pinned=torch.cuda.is_available())
        return self._pool

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._pool is not None:
            self._pool.clear()
        self.storage.close()


class _Base:
    """The root/step bookkeeping and lazily opened resources a writer and a reader share.
    Only configuration is pickled (DCP's PROCESS async save pickles the writer)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        step: int | None,
        storage_options: dict[str, Any] | None,
        io_threads: int,
    ) -> None:
        self._root0, self._step0 = os.fspath(root), _check_step(step)
        self.root, self.step = self._root0, self._step0
        self.storage_options = storage_options
        self.io_threads = io_threads
        self.rank = 0
        self._res: _Resources | None = None
        self._lock = threading.Lock()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new save/load begins: ``checkpoint_id`` (``<root>/step-NNNNNNNNNN``) names its root
        and step; without one, those given to the constructor."""
        if checkpoint_id:
            self.root, self.step = parse_checkpoint_id(checkpoint_id)
        else:
            self.root, self.step = self._root0, self._step0

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` names an fmstore snapshot (``<root>/step-NNNNNNNNNN``)."""
        return _valid_id(checkpoint_id)

    @property
    def checkpoint_id(self) -> str:
        """The snapshot this object points at (its root when the step is not decided yet)."""
        return self._id_of(self.step)

    def _id_of(self, step: int | None) -> str:
        """``<root>/step-NNNNNNNNNN`` (as the snapshot directory is named), or the root for None."""
        if step is None:
            return self.root
        return f"{self.root.rstrip('/')}/{step_dir(step)}"

    def _resources(self) -> _Resources:
        with self._lock:
            if self._res is not None and self._res.root != self.root:  # reset to another root
                self._res.close()
                self._res = None
            if self._res is None:
                self._res = _Resources(self.root, self.storage_options, self.io_threads)
            return self._res

    def close(self) -> None:
        """Release the storage, thread pools and staging buffers (reopened on next use)."""
        with self._lock:
            res, self._res = self._res, None
        if res is not None:
            res.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_res"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # the URL only: storage_options may hold credentials
        return f"{type(self).__name__}({self.checkpoint_id!r})"


class FmstoreStorageWriter(_Base, StorageWriter):
    """Writes what ``dcp.save`` / ``dcp.async_save`` plan as one fmstore snapshot under ``root``.

    Parameters:
        root: a directory or fsspec URL (``s3://bucket/run1``); a ``checkpoint_id`` of the form
            ``<root>/step-NNNNNNNNNN`` given to ``dcp.save`` overrides it and ``step``.
        step: the snapshot's step; None: the step after the newest committed one (decided by
            the coordinator, so all ranks agree; 0 for an empty root).  Then wait for an
            ``async_save`` before starting the next, which would otherwise pick the same step.
        storage_options: passed to fsspec untouched.
        compression: None (raw) or ``"lossless"``; ``codec``: ``"zstd"`` (byte planes + zstd;
            also ``"planes-zstd"``, or ``"auto"``: every tensor is encoded on the CPU here)
            or ``"huffman"`` / ``"fmhs"`` (FMHS on the CPU reference: slow, for checks).
        quantize: tensor-name patterns (``fsdp/optim/state/*/exp_avg``, :data:`MOMENTS`) stored
            lossily as blockwise int8, as in :class:`~fmstore.Checkpointer`.
        incremental: tensors whose bytes did not change since the newest committed snapshot
            are referenced there instead of written again.
        lease_ttl: seconds an S3 writer lease stays valid unrenewed (see ``Checkpointer``).

    One job writes a root at a time (see :mod:`fmstore.checkpoint.lease`).  The coordinator
    claims the root's writer lease in ``prepare_global_plan``, before any rank writes: while
    another job holds it (a ``Checkpointer`` saving there, another DCP save), the save fails on
    every rank with a :class:`~fmstore.WriterConflictError` naming the holder (DCP hands it to
    each rank inside its ``CheckpointException``), and nothing is written.  The lease is held
    for one save, plan to commit, and released by ``finish`` (or a failed ``write_data`` on the
    coordinator, the next save's ``reset``, ``close()``, or the writer being garbage-collected):
    what a snapshot references (its base for ``incremental``) is chosen after the claim, so
    nobody deletes it meanwhile, and the same job's next save, through this writer or a new
    one, claims it again.  Hold no lease between saves: a job that saves through DCP and
    through a ``Checkpointer`` to one root is two writers.

    Each rank writes one shard file; the coordinator commits ``manifest.json`` in ``finish``,
    so a failure anywhere before leaves no committed snapshot.  A step that is committed
    already is never overwritten (an :class:`FmstoreError`).  Non-tensor values must be JSON
    (None, bool, int, float, str in dicts/lists/tuples), ``bytes`` or ``io.BytesIO`` (stored
    as opaque bytes, see the module doc; ``Checkpointer.load`` gives them as a uint8 tensor);
    anything else is refused with an :class:`UnsupportedValueError` naming its key.  A
    ``ShardedTensor`` with several chunks on one rank is saved as one shard per chunk.
    ``dcp.save`` returns the Metadata with ``version`` and ``storage_meta`` filled as torch's
    ``FileSystemWriter`` fills them; its ``checkpoint_id`` names the step written.  With
    ``enable_plan_caching=True`` the planner reuses old plans: give each save its step
    (``checkpoint_id`` or ``step``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        step: int | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        compression: str | None = None,
        codec: str = "zstd",
        quantize: tuple[str, ...] | list[str] | str = (),
        incremental: bool = True,
        io_threads: int = 8,
        lease_ttl: float = DEFAULT_TTL,
    ) -> None:
        super().__init__(root, step, storage_options, io_threads)
        # The values and aliases Checkpointer takes (a ConfigError otherwise).
        self.compression, self.codec = check_save_options(compression, codec)
        self.quantize = (quantize,) if isinstance(quantize, str) else tuple(quantize)
        self.incremental = incremental
        self.is_coordinator = True
        self._planned_step: int | None = None
        self._save_id = uuid.uuid4().hex
        self.lease_ttl = lease_ttl
        self._lease: Snapshots | None = None  # the coordinator's claim on the root, from plan to commit
        self._lease_finalizer: weakref.finalize | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        # A new save: a lease an earlier one left held (it failed on another rank, so finish
        # never ran) is given up; the coordinator claims the root again when it plans.
        self._release_lease()
        super().reset(checkpoint_id)
        self._save_id = uuid.uuid4().hex
        self._planned_step = None  # the last save's: this one's is picked when it plans

    def _claim(self, owner: str) -> None:
        """Coordinator: take the root's writer lease, or raise WriterConflictError naming its holder."""
        if self._lease is None:
            lease = Snapshots(self._resources().storage, writer=owner, lease_ttl=self.lease_ttl)
            # A writer dropped mid-save (no finish, no close) gives the root up when collected;
            # the finalizer holds the lease, not the writer.
            self._lease_finalizer = weakref.finalize(self, lease.release)
            self._lease_finalizer.atexit = False  # the kernel drops a dead process's local lock
            self._lease = lease
        self._lease.claim()

    def _release_lease(self) -> None:
        lease, self._lease = self._lease, None
        finalizer, self._lease_finalizer = self._lease_finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if lease is not None:
            lease.release()

    def close(self) -> None:
        """Release the writer lease (if a failed save left it held), storage, pools and buffers."""
        self._release_lease()
        super().close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_lease"] = None  # a lease is this process's (DCP's PROCESS async save pickles the writer)
        state["_lease_finalizer"] = None
        return state

    def storage_meta(self) -> StorageMeta | None:
        """As torch's FileSystemWriter: this save's id and the checkpoint id it writes, which
        names the step (``<root>/step-NNNNNNNNNN``, valid for ``dcp.load(checkpoint_id=...)``)
        once known: given, or picked by the coordinator in ``prepare_global_plan``.  Asked
        before planning (for the planner) with no step given, it is the root."""
        step = self.step if self.step is not None else self._planned_step
        return StorageMeta(checkpoint_id=self._id_of(step), save_id=self._save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if not kwargs.get("use_collectives", True) and dist.is_initialized() and dist.get_world_size() > 1:
            # Then every rank would "finish" alone and commit a manifest of its own part.
            raise ConfigError(
                "FmstoreStorageWriter commits one manifest for all ranks; dcp.save(use_collectives=False) "
                "is not supported on several ranks"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: claim the root, decide the step (one for all ranks) and the tensors'
        fmstore names.  A refused claim fails the save on every rank before any writes."""
        writer = uuid.uuid4().hex
        self._claim(writer)
        try:
            return self._plan(plans, writer)
        except BaseException:
            self._release_lease()  # this save ends here, on every rank
            raise

    def _plan(self, plans: list[SavePlan], writer: str) -> list[SavePlan]:
        snapshots = Snapshots(self._resources().storage)
        steps = snapshots.steps()
        step = self.step if self.step is not None else (steps[-1] + 1 if steps else 0)
        snapshots.begin(step)
        mappings: dict[str, Any] = {}
        for p in plans:
            mappings.update(_mappings(p.planner_data))
        shapes = [
            (item.index.fqn, _placeholder(item.tensor_data.size, item.tensor_data.properties.dtype))
            for p in plans
            for item in p.items
            if item.type != WriteItemType.BYTE_IO and item.tensor_data is not None
        ]
        names = _names(shapes, mappings)
        # A BYTE_IO value may be bytes the rank stores as a uint8 tensor (only that rank sees
        # the object): each gets the name it would have as a tensor; JSON values ignore theirs.
        values = [
            (item.index.fqn, _BLOB) for p in plans for item in p.items if item.type == WriteItemType.BYTE_IO
        ]
        if values:
            with_values = _names(shapes + values, mappings)
            names.update({fqn: with_values[fqn] for fqn, _ in values})
        self._planned_step = step
        return [
            dataclasses.replace(
                p,
                storage_data=_PlanData(
                    step,
                    i,
                    {it.index.fqn: names[it.index.fqn] for it in p.items if it.index.fqn in names},
                    writer,
                ),
            )
            for i, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items: its tensors into one shard file, its values as JSON."""
        try:
            return self._write_data(plan, planner)
        except BaseException:
            self._release_lease()  # the coordinator's save is over: DCP calls no finish now
            raise

    def _write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        info = plan.storage_data
        if not isinstance(info, _PlanData):
            raise FmstoreError(
                "FmstoreStorageWriter.write_data got a plan its prepare_global_plan did not see; "
                "save through torch.distributed.checkpoint.save / async_save"
            )
        step = self.step if self.step is not None else info.step
        results: list[WriteResult] = []
        chunks: list[_Chunk] = []
        for item in plan.items:
            fqn = item.index.fqn
            name = info.names.get(fqn)
            if item.type == WriteItemType.BYTE_IO:
                obj = _lookup_object(planner, item)
                blob = _blob(obj)
                if blob is None:
                    value = _json_value(fqn, obj)
                    results.append(
                        WriteResult(item.index, 0, _ResultData(step, info.rank, value=value, is_value=True))
                    )
                    continue
                if name is None:
                    raise FmstoreError(
                        f"value {fqn!r} is not in the plan the coordinator made for rank {info.rank}"
                    )
                data, kind = blob
                chunks.append(_Chunk(name, item, data, (data.numel(),), (0,), kind))
                continue
            if name is None or item.tensor_data is None:
                raise FmstoreError(
                    f"tensor {fqn!r} is not in the plan the coordinator made for rank {info.rank}"
                )
            data = planner.resolve_data(item)
            if not isinstance(data, torch.Tensor):
                raise FmstoreError(f"the planner resolved tensor {fqn!r} to a {type(data).__name__}")
            data = data.detach()
            if tuple(data.shape) != tuple(item.tensor_data.chunk.sizes):
                raise FmstoreError(
                    f"tensor {fqn!r}: the planner gave shape {list(data.shape)} for a chunk of "
                    f"{list(item.tensor_data.chunk.sizes)}"
                )
            td = item.tensor_data
            chunks.append(_Chunk(name, item, data, tuple(td.size), tuple(td.chunk.offsets)))
        results += self._write_tensors(step, info, chunks)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_tensors(self, step: int, info: _PlanData, chunks: list[_Chunk]) -> list[WriteResult]:
        """Write this rank's chunks into its shard file, through the save pipeline (a
        :class:`SnapshotWriter`; incremental: its base is the newest step before).  A tensor of
        which the rank holds several chunks (a ShardedTensor with several local shards) is
        recorded as several shards, as the ranks' pieces of one tensor are."""
        writer = self._resources().writer(self.compression, self.codec, self.quantize)
        written = writer.write(
            step,
            [Part(c.name, c.data, c.global_shape, c.offsets) for c in chunks],
            rank=info.rank,
            writer=info.writer or None,
            incremental=self.incremental,
        )
        out = []
        for i, c in enumerate(chunks):
            data = _ResultData(
                step,
                info.rank,
                name=c.name,
                shard=written.shards[i],
                files=written.files if i == 0 else {},
                blob=c.blob,
            )
            out.append(WriteResult(c.item.index, written.nbytes(i), data))
        return out

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: merge every rank's results into the manifest and commit it; then (or on
        failure) release the root's writer lease."""
        try:
            self._finish(metadata, results)
        finally:
            self._release_lease()

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        datas = [r.storage_data for rank_results in results for r in rank_results]
        if any(not isinstance(d, _ResultData) for d in datas):
            raise FmstoreError("FmstoreStorageWriter.finish got results another storage writer made")
        steps = {d.step for d in datas} or {self.step if self.step is not None else self._planned_step}
        if len(steps) != 1 or None in steps:
            raise FmstoreError(
                f"the ranks wrote different steps {sorted(map(str, steps))}; nothing is committed"
            )
        (step,) = steps
        assert step is not None
        by_fqn: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        values: dict[str, Any] = {}
        blobs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # fqn -> a bytes value's shard and kind
        files: dict[str, int] = {}
        for rank_results in results:
            for r in rank_results:
                d = r.storage_data
                files.update(d.files)
                if d.is_value:
                    values[r.index.fqn] = d.value
                elif d.blob is not None:
                    blobs[r.index.fqn] = (d.shard, d.blob)
                else:
                    by_fqn.setdefault(r.index.fqn, (d.name, []))[1].append(d.shard)
        mappings = _mappings(metadata.planner_data)
        nested: dict[str, Any] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                _, shards = by_fqn.get(fqn, ("", []))
                saved = {tuple(s["offsets"]) for s in shards}
                if saved != {tuple(c.offsets) for c in md.chunks}:
                    raise FmstoreError(
                        f"step {step} not committed: not every chunk of tensor {fqn!r} was written"
                    )
                set_element(nested, _path(fqn, mappings), _placeholder(md.size, md.properties.dtype))
            elif fqn in blobs:  # bytes: a uint8 tensor in the tree, marked as bytes in meta
                set_element(nested, _path(fqn, mappings), _placeholder(blobs[fqn][0]["lengths"], torch.uint8))
            else:
                if fqn not in values:
                    raise FmstoreError(f"step {step} not committed: no rank wrote value {fqn!r}")
                set_element(nested, _path(fqn, mappings), copy.deepcopy(values[fqn]))
        leaves = tensor_names(nested)
        shards_of: dict[str, list[dict[str, Any]]] = {}  # tensor name -> its shards, for the commit
        fqns: dict[str, str | None] = {}
        marked: dict[str, dict[str, Any]] = {}  # tensor name -> the kind of bytes value it holds
        for fqn, md in metadata.state_dict_metadata.items():
            name = by_fqn[fqn][0] if isinstance(md, TensorStorageMetadata) else None
            if name is not None:
                if leaves.get(_path(fqn, mappings)) != name:
                    raise FmstoreError(f"step {step} not committed: tensor {fqn!r} was written as {name!r}")
                shards_of[name] = by_fqn[fqn][1]
            if fqn in blobs:
                # Named as the tree names it (the shard file's entry name is only a label).
                name = leaves[_path(fqn, mappings)]
                shard, kind = blobs[fqn]
                shards_of[name] = [shard]
                marked[name] = kind
            fqns[fqn] = name
        # As torch's FileSystemWriter.finish: the Metadata dcp.save returns (and this snapshot
        # records) carries the DCP version and the storage meta, whose checkpoint_id names the
        # step even where the coordinator picked it, so it can be handed to dcp.load.
        metadata.version = CURRENT_DCP_VERSION
        sm = metadata.storage_meta = StorageMeta(checkpoint_id=self._id_of(step), save_id=self._save_id)
        info: dict[str, Any] = {
            "fqns": fqns,  # DCP's flattened keys -> tensor names (None: a value in the tree)
            "storage_meta": {"checkpoint_id": sm.checkpoint_id, "save_id": sm.save_id},
            "version": metadata.version,
        }
        if marked:
            info["bytes"] = marked
        meta = {META_KEY: info}
        if self._lease is not None:
            self._lease.check()  # an S3 lease lost meanwhile (not renewed for a ttl): no commit
        writer = self._resources().writer(self.compression, self.codec, self.quantize)
        writer.commit(step, nested, shards_of, files, meta, world_size=len(results))
        self._save_id = uuid.uuid4().hex  # the next save is another one


class FmstoreStorageReader(_Base, StorageReader):
    """Reads a committed fmstore snapshot (written by DCP through :class:`FmstoreStorageWriter`
    or by ``Checkpointer.save``) for ``dcp.load``.

    ``step`` None: the newest committed snapshot at ``read_metadata`` (pass ``step`` or a
    ``checkpoint_id`` when ranks might see different newest ones).  Every byte read is checked
    against the manifest's checksums (a damaged shard raises :class:`ChecksumError` naming the
    tensor); tensors go straight into the planner's targets, CPU or CUDA, resharded as DCP
    plans.  Non-tensor values come from the manifest's JSON tree.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        step: int | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        io_threads: int = 8,
    ) -> None:
        super().__init__(root, step, storage_options, io_threads)
        self._view: _View | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        self._view = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        manifest = Snapshots(self._resources().storage).manifest(self.step)
        self._view = view = _view_of(manifest, rank)
        info = manifest.meta.get(META_KEY, {})
        sm = info.get("storage_meta", {})
        saved_id = sm.get("checkpoint_id")
        if not (isinstance(saved_id, str) and _valid_id(saved_id)):
            # Not recorded (a Checkpointer's snapshot), or the root an older writer recorded
            # when its coordinator picked the step: the id of the snapshot read here.
            saved_id = self._id_of(manifest.step)
        md = Metadata(
            state_dict_metadata=view.metadata,
            planner_data=view.mappings,
            storage_meta=StorageMeta(
                checkpoint_id=saved_id,
                save_id=sm.get("save_id"),
                load_id=uuid.uuid4().hex,
            ),
        )
        md.version = info.get("version")
        return md

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fill the plan's tensors with one checked read of all their regions; hand the values
        to the planner."""
        view = self._view
        if view is None:
            raise FmstoreError("FmstoreStorageReader.read_data before read_metadata; load through dcp.load")
        regions: list[Region] = []
        casts: list[tuple[torch.Tensor, torch.Tensor]] = []
        commits: list[tuple[ReadItem, torch.Tensor]] = []
        blobs: list[tuple[ReadItem, torch.Tensor, dict[str, Any]]] = []
        for item in plan.items:
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO and fqn in view.blobs:
                name, kind = view.blobs[fqn]
                buf = torch.empty(tuple(view.manifest.tensors[name].shape), dtype=torch.uint8)
                regions.append(Region(name, (0,), buf))  # checked against its checksums like a tensor
                blobs.append((item, buf, kind))
                continue
            if item.type == LoadItemType.BYTE_IO:
                if fqn not in view.values:
                    raise FmstoreError(f"snapshot step {view.manifest.step} has no value {fqn!r}")
                # DCP's planner torch.loads what it is given: these bytes are a pickle made here,
                # now, of a value decoded from the manifest's JSON, never bytes read from storage.
                buf = io.BytesIO()
                torch.save(view.values[fqn], buf)
                buf.seek(0)
                planner.load_bytes(item, buf)
                continue
            name = view.names.get(fqn)
            if name is None:
                raise FmstoreError(f"snapshot step {view.manifest.step} has no tensor {fqn!r}")
            dest = planner.resolve_tensor(item).detach()
            if tuple(dest.shape) != tuple(item.lengths):
                raise LoadMismatchError(
                    f"tensor {fqn!r}: the planner's target has shape {list(dest.shape)} for a read of "
                    f"{list(item.lengths)}"
                )
            offsets = tuple(int(a) + int(b) for a, b in zip(item.storage_index.offset, item.storage_offsets))
            saved = view.manifest.tensors[name].torch_dtype
            if dest.dtype != saved:  # DCP converts on load (copy_): read as saved, then convert
                tmp = torch.empty(tuple(dest.shape), dtype=saved)
                casts.append((dest, tmp))
                regions.append(Region(name, offsets, tmp))
            else:
                regions.append(Region(name, offsets, dest))
            commits.append((item, dest))
        res = self._resources()
        SnapshotReader(res.storage, view.manifest, pool=res.read_pool).read(regions)
        for dest, tmp in casts:
            dest.copy_(tmp)
        for item, dest in commits:
            planner.commit_tensor(item, dest)
        for item, buf, kind in blobs:
            data = buf.numpy().tobytes()
            value: bytes | io.BytesIO = data
            if kind["type"] == "BytesIO":
                value = io.BytesIO(data)
                value.seek(kind.get("pos", 0))
            # DCP's load_bytes takes the pickle its save planner made of the value (and
            # torch.loads it): this one is made here of the bytes object, so what DCP unpickles
            # is our wrapper; the stored bytes are never unpickled, only copied.
            wrapped = io.BytesIO()
            torch.save(value, wrapped)
            wrapped.seek(0)
            planner.load_bytes(item, wrapped)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


# ---------------------------------------------------------------------- helpers

#: The placeholder a BYTE_IO value stands for while the coordinator names what ranks write.
_BLOB = torch.empty(0, dtype=torch.uint8, device="meta")
#: The bytes values stored as opaque bytes, by the kind recorded for them in the manifest.
_BLOB_KINDS = {"bytes": bytes, "BytesIO": io.BytesIO}


@dataclass
class _Chunk:
    """One piece of a tensor (or a bytes value as uint8) this rank writes."""

    name: str  # the tensor's fmstore name
    item: WriteItem
    data: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    blob: dict[str, Any] | None = None  # a bytes value: its kind (see _blob)


def _blob(obj: Any) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """A ``bytes`` or ``io.BytesIO`` value as a uint8 tensor of its bytes (a copy: the caller's
    buffer may change after the save) and its kind (a BytesIO's position too); None for any
    other value.  Only these exact types: a subclass may carry state that bytes do not hold."""
    if type(obj) is bytes:
        data, kind = obj, {"type": "bytes"}
    elif type(obj) is io.BytesIO:
        data, kind = obj.getvalue(), {"type": "BytesIO", "pos": obj.tell()}
    else:
        return None
    if not data:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8), kind
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), kind


def _mappings(planner_data: Any) -> dict[str, tuple[Any, ...]]:
    """DefaultSavePlanner's flatten mapping (flattened key -> path in the nested state dict);
    another planner's data is ignored (the flat keys are then the paths)."""
    if not isinstance(planner_data, dict):
        return {}
    return {
        k: tuple(v)
        for k, v in planner_data.items()
        if isinstance(k, str) and isinstance(v, (tuple, list)) and v
    }


def _path(fqn: str, mappings: dict[str, tuple[Any, ...]]) -> tuple[Any, ...]:
    return mappings.get(fqn, (fqn,))


def _placeholder(size: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(size), dtype=dtype, device="meta")


def _names(shapes: list[tuple[str, torch.Tensor]], mappings: dict[str, tuple[Any, ...]]) -> dict[str, str]:
    """fqn -> the name ``Checkpointer.save`` gives the tensor at that path of the nested state."""
    nested: dict[str, Any] = {}
    for fqn, placeholder in shapes:
        set_element(nested, _path(fqn, mappings), placeholder)
    leaves = tensor_names(nested)
    return {fqn: leaves[_path(fqn, mappings)] for fqn, _ in shapes}


def _lookup_object(planner: SavePlanner, item: WriteItem) -> Any:
    """The non-tensor value itself (DefaultSavePlanner's ``resolve_data`` would pickle it)."""
    lookup = getattr(planner, "lookup_object", None)
    if lookup is None:
        raise FmstoreError(
            f"cannot save value {item.index.fqn!r}: {type(planner).__name__} has no lookup_object(), and "
            "FmstoreStorageWriter stores values as JSON, not as the pickle resolve_data() makes; use "
            "DefaultSavePlanner or a subclass of it"
        )
    return lookup(item.index)


def _json_value(fqn: str, obj: Any) -> Any:
    """A copy of a JSON value (tuples and non-finite floats kept: the commit stores it as the
    tree stores any value), or an :class:`UnsupportedValueError` naming ``fqn``."""
    try:
        tensors = tensor_names(obj)
    except UnsupportedValueError as e:
        raise UnsupportedValueError(
            f"cannot save DCP value {fqn!r}: {e} (bytes and io.BytesIO values are stored as opaque bytes)"
        ) from None
    if tensors:
        raise UnsupportedValueError(
            f"cannot save DCP value {fqn!r}: a {type(obj).__name__} holding tensors, which DCP saves as "
            "one pickled object; put the tensors in a dict or a list instead"
        )
    return copy.deepcopy(obj)  # the caller's object may change before the coordinator commits


@dataclass
class _View:
    """A snapshot as DCP sees it: flattened keys, their storage metadata, values and names."""

    manifest: Manifest
    metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata]
    mappings: dict[str, tuple[Any, ...]]
    names: dict[str, str]  # fqn -> tensor name
    values: dict[str, Any]  # fqn -> non-tensor value
    blobs: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # fqn -> bytes' tensor, kind


def _view_of(manifest: Manifest, rank: int) -> _View:
    """Rebuild the nested state with meta-tensor placeholders from the manifest's tree, then
    flatten it as DCP does: the keys are those DCP gave (or would give) the state."""
    placeholders: dict[str, torch.Tensor] = {}  # kept: their ids name them below
    names_by_id: dict[int, str] = {}

    def placeholder(name: str) -> torch.Tensor:
        entry = manifest.tensors[name]
        t = placeholders[name] = _placeholder(entry.shape, entry.torch_dtype)
        names_by_id[id(t)] = name
        return t

    # DCP knows no numpy arrays: they are tensors to it (and .numpy() of a placeholder fails)
    nested = manifest.state(rank=rank, tensor=placeholder, arrays_as_tensors=True)
    if not isinstance(nested, dict):
        nested = {"state": nested}  # DCP's state is a dict; a snapshot of another root gets a key
    flat, mappings = flatten_state_dict(nested)
    marked = _marked_bytes(manifest)
    metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    names: dict[str, str] = {}
    values: dict[str, Any] = {}
    blobs: dict[str, tuple[str, dict[str, Any]]] = {}
    for fqn, v in flat.items():
        name = names_by_id.get(id(v)) if isinstance(v, torch.Tensor) else None
        if name is None:
            metadata[fqn] = BytesStorageMetadata()
            values[fqn] = v
            continue
        if name in marked:  # a bytes value: DCP sees it as one
            metadata[fqn] = BytesStorageMetadata()
            blobs[fqn] = (name, marked[name])
            continue
        entry = manifest.tensors[name]
        names[fqn] = name
        metadata[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=entry.torch_dtype),
            size=torch.Size(entry.shape),
            chunks=[ChunkStorageMetadata(torch.Size(s.offsets), torch.Size(s.lengths)) for s in entry.shards],
        )
    return _View(manifest, metadata, {k: tuple(p) for k, p in mappings.items()}, names, values, blobs)


def _marked_bytes(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The manifest's bytes values (tensor name -> kind), checked: each a 1-d uint8 tensor
    of one shard, of a kind this reader knows, a BytesIO's position inside it; anything else
    is a :class:`ManifestError` naming the tensor (the manifest is read from storage)."""
    info = manifest.meta.get(META_KEY)
    marked = info.get("bytes", {}) if isinstance(info, dict) else {}
    where = f"snapshot step {manifest.step}"
    if not isinstance(marked, dict):
        raise ManifestError(f"{where}: meta {META_KEY}.bytes is not an object")
    for name, kind in marked.items():
        entry = manifest.tensors.get(name)
        if entry is None or entry.dtype != "uint8" or len(entry.shape) != 1 or len(entry.shards) != 1:
            raise ManifestError(f"{where}: bytes value {name!r} is not a 1-d uint8 tensor of one shard")
        if not isinstance(kind, dict) or kind.get("type") not in _BLOB_KINDS:
            raise ManifestError(f"{where}: bytes value {name!r} has unknown kind {kind!r}")
        pos = kind.get("pos", 0)
        if type(pos) is not int or not 0 <= pos <= entry.shape[0]:
            raise ManifestError(f"{where}: bytes value {name!r} has a bad position {pos!r}")
    return marked
