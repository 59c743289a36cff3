"""The load side of a checkpointer: which copy of a step, which keys, which byte regions,
then read and restore.

:class:`SnapshotLoader` picks the copy (host memory when it fits the targets' sharding, else
the fastest durable level whose manifest reads, the next one when a copy is damaged), checks
the target's keys against the snapshot's before anything is read, plans each target tensor's
region (a DTensor gets exactly its local shard, from whichever saved shards overlap it), reads
and verifies them (:class:`~fmstore.checkpoint.reader.SnapshotReader`) and restores Stateful
objects.  A load of the latest step that loses a race with another process's retention loads
the newer latest one.  It never refers to the checkpointer (a dropped one is freed by
reference counting alone).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..blob import dtype_from_name
from ..errors import (
    ConfigError,
    CorruptBlobError,
    LoadMismatchError,
    ManifestError,
    SnapshotDeletedError,
    SnapshotNotFoundError,
    StateKeysError,
)
from ..jobs import BackgroundJobs
from ..tiers.host import BufferPool
from . import stateful
from .host_level import HOST, MemoryLevel, MemorySnapshot, restore
from .level import SnapshotLevel
from .manifest import Manifest
from .reader import Region, SnapshotReader
from .sharding import check_target, dtensor_region, is_dtensor
from .tree import compare, flatten, subtree, tensor_leaves, unflatten

__all__ = ["SnapshotLoader", "where_text", "slot_text"]


def where_text(levels: list[SnapshotLevel]) -> str:
    return " or ".join(repr(lvl.url) for lvl in levels) or "no durable level"


class SnapshotLoader:
    """Loads a checkpointer's snapshots: its durable ``levels`` (fastest first), its host
    ``memory`` level, reading through ``pool``'s buffers, after waiting for ``persists``."""

    def __init__(
        self,
        *,
        rank: int,
        levels: list[SnapshotLevel],
        memory: MemoryLevel | None,
        pool: BufferPool,
        persists: BackgroundJobs,
    ) -> None:
        self.rank = rank
        self.levels = levels
        self.memory = memory
        self.pool = pool
        self.persists = persists

    def level_names(self) -> list[str]:
        return ([HOST] if self.memory is not None else []) + [lvl.name for lvl in self.levels]

    def levels_of(self, level: str | None) -> list[SnapshotLevel]:
        """The durable levels ``level`` names (None: all); an unknown name is a ConfigError."""
        if level is None:
            return self.levels
        found = [lvl for lvl in self.levels if lvl.name == level]
        if not found and (level != HOST or self.memory is None):
            raise ConfigError(f"no checkpoint level {level!r}; have {self.level_names()}")
        return found

    def steps(self, level: str | None = None) -> list[int]:
        out: set[int] = set()
        if self.memory is not None and level in (None, HOST):
            out.update(self.memory.steps())
        for lvl in self.levels_of(level):
            out.update(lvl.steps())
        return sorted(out)

    def where(self, step: int) -> list[str]:
        out = [HOST] if self.memory is not None and self.memory.get(step) is not None else []
        return out + [lvl.name for lvl in self.levels if lvl.committed(step)]

    def manifest(self, step: int | None, level: str | None) -> Manifest:
        levels = self.levels_of(level)
        if step is None:
            steps = sorted({s for lvl in levels for s in lvl.steps()})
            if not steps:
                raise SnapshotNotFoundError(f"no committed snapshot under {where_text(levels)}")
            step = steps[-1]
        for lvl in levels:
            if lvl.committed(step):
                return lvl.manifest(step)
        raise SnapshotNotFoundError(
            f"no committed snapshot for step {step} under {where_text(levels)} (have {self.steps(level)})"
        )

    def load(self, state: Any, step: int | None, device: Any, level: str | None, strict: bool) -> Any:
        for attempt in range(RETENTION_RETRIES):
            try:
                return self._load_once(state, step, device, level, strict)
            except SnapshotDeletedError:
                if step is not None or attempt + 1 == RETENTION_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def _load_once(self, state: Any, step: int | None, device: Any, level: str | None, strict: bool) -> Any:
        levels = self.levels_of(level)
        snap = None
        listed = False  # whether the step is the newest one listed (vs. one asked for)
        if self.memory is not None and level in (None, HOST):
            mem_steps = self.memory.steps()
            want = step if step is not None else (mem_steps[-1] if mem_steps else None)
            snap = self.memory.get(want) if want is not None else None
            if snap is None and level == HOST:
                raise SnapshotNotFoundError(f"step {step} is not in host memory (have {mem_steps})")
            if snap is not None:
                step = want
        if snap is None:
            self.persists.wait()  # a failed save is its handle's (and the next save's) to report
            if step is None:
                listed = True
                have = sorted({s for lvl in levels for s in lvl.steps()})
                if not have:
                    raise SnapshotNotFoundError(f"no committed snapshot under {where_text(levels)}")
                step = have[-1]
        holders = [lvl for lvl in levels if lvl.committed(step)] if level != HOST else []
        if snap is None and not holders and listed:
            raise SnapshotDeletedError(f"step {step} was deleted (retention) after it was listed")
        if snap is None and not holders:
            raise SnapshotNotFoundError(
                f"no committed snapshot for step {step} under {where_text(levels)} (have {self.steps(level)})"
            )
        # The snapshot exists: only now are fresh optimizers given state to fill (where it has some).
        prepared = None
        read: dict[SnapshotLevel, Manifest] = {}  # each manifest read once a load (13 MB at 1,024 ranks)
        if state is not None:
            saved = snap.tree if snap is not None else _first_tree(holders, step, read)
            prepared = stateful.for_load(state, lambda path: subtree(saved, path, self.rank))
        try:
            out = self._restore(snap, holders, step, prepared, device, level, strict, read)
        except BaseException:
            if prepared is not None:
                stateful.undo_init(prepared)
            raise
        if prepared is None:
            return out

        def missing(slot: stateful.Slot) -> None:
            warnings.warn(
                f"snapshot step {step} has no state for {slot_text(slot)}; it is left as it is", stacklevel=5
            )

        return stateful.restore(out, prepared.slots, strict, missing)

    def _restore(
        self,
        snap: MemorySnapshot | None,
        holders: list[SnapshotLevel],
        step: int,
        prepared: stateful.Prepared | None,
        device: Any,
        level: str | None,
        strict: bool,
        read: dict[SnapshotLevel, Manifest],
    ) -> Any:
        """``read``: the manifests the load has read already, by level."""
        targets: dict[str, torch.Tensor] = {}
        target_tree = None
        if prepared is not None:
            targets, target_tree, _ = flatten(prepared.state, self.rank)
        opaque = [s.path for s in prepared.slots] if prepared is not None else []
        if snap is not None:
            names = self._check_keys(step, snap.tree, target_tree, opaque, strict)
            out = restore(snap, targets, device, names)
            if out is not None:
                return unflatten(snap.tree, out, self.rank)
            if level == HOST:
                raise LoadMismatchError(
                    f"step {step} in host memory was saved with another sharding than the targets'"
                )
            if not holders:
                raise SnapshotNotFoundError(
                    f"step {step} is in host memory with another sharding, and in no durable level"
                )
            self.persists.wait()
        for i, lvl in enumerate(holders):
            try:
                manifest = read.pop(lvl, None) or lvl.manifest(step)
                names = self._check_keys(step, manifest.tree, target_tree, opaque, strict)
                return self._load_from(lvl, manifest, targets, names, device)
            except (CorruptBlobError, ManifestError, SnapshotNotFoundError) as e:
                # A manifest failing validation is damage too; a step that is no longer
                # committed was deleted meanwhile (retention), which is not damage.
                deleted = not lvl.committed(step)
                if i + 1 == len(holders):
                    if deleted:
                        raise _deleted_while_loading(lvl, step) from e
                    raise
                if deleted:
                    continue
                warnings.warn(
                    f"step {step} on level {lvl.name!r} is damaged ({e}); restoring it from {holders[i + 1].name!r}",
                    stacklevel=4,
                )
        raise AssertionError("unreachable")

    def _check_keys(
        self,
        step: int,
        saved: dict[str, Any],
        target: dict[str, Any] | None,
        opaque: list[tuple[Any, ...]],
        strict: bool,
    ) -> set[str] | None:
        """The snapshot tensors to load (None: all), after the strict key check."""
        if target is None:
            return None
        if strict:
            missing, unexpected = compare(saved, target, self.rank, opaque)
            if missing or unexpected:
                raise _keys_error(step, missing, unexpected)
        wanted = tensor_leaves(target, self.rank)
        return {name for path, name in tensor_leaves(saved, self.rank).items() if path in wanted}

    def _load_from(
        self,
        lvl: SnapshotLevel,
        manifest: Manifest,
        targets: dict[str, torch.Tensor],
        names: set[str] | None,
        device: Any,
    ) -> Any:
        regions: list[Region] = []
        out: dict[str, torch.Tensor] = {}
        reader = SnapshotReader(lvl.storage, manifest, pool=self.pool)
        # The files of the tensors allocated here whole, checked against their real sizes
        # before the allocation (a manifest records the sizes of its own files only).
        reader.check_files(n for n in manifest.tensors if (names is None or n in names) and n not in targets)
        for name, entry in manifest.tensors.items():
            if names is not None and name not in names:
                continue
            dtype = dtype_from_name(entry.dtype)
            gshape = tuple(entry.shape)
            target = targets.get(name)
            check_target(name, manifest.step, dtype, gshape, target)
            if target is not None and is_dtensor(target):
                dest, offsets, _ = dtensor_region(target, name)
            else:
                dest = (
                    target if target is not None else torch.empty(gshape, dtype=dtype, device=device or "cpu")
                )
                offsets = (0,) * len(gshape)
            out[name] = target if target is not None else dest
            regions.append(Region(name, offsets, dest))
        reader.read(regions)
        return unflatten(manifest.tree, out, self.rank)


#: Loads of the latest snapshot that lose a race with retention, before giving up.
RETENTION_RETRIES = 5


def _deleted_while_loading(lvl: SnapshotLevel, step: int) -> SnapshotDeletedError:
    return SnapshotDeletedError(
        f"step {step} was deleted while it was being loaded from {lvl.url!r} "
        "(retention: keep_last of the process writing there)"
    )


def _first_tree(
    holders: list[SnapshotLevel], step: int, read: dict[SnapshotLevel, Manifest]
) -> dict[str, Any]:
    """The state tree of ``step`` from the first level whose manifest reads (kept in ``read``
    for the load); a damaged one is skipped here as the load skips it (which warns), the last
    one's error is raised."""
    for i, lvl in enumerate(holders):
        try:
            read[lvl] = lvl.manifest(step)
            return read[lvl].tree
        except (CorruptBlobError, ManifestError, SnapshotNotFoundError) as e:
            if i + 1 == len(holders):
                if not lvl.committed(step):
                    raise _deleted_while_loading(lvl, step) from e
                raise
    raise AssertionError("unreachable")


def _keys_error(step: int, missing: list[str], unexpected: list[str]) -> StateKeysError:
    hint = ""
    if any("/state/" in k for k in unexpected):
        hint = (
            "; an optimizer's state_dict() is empty until its first step: put the optimizer itself in "
            "the state (it is restored through load_state_dict)"
        )
    hint += "; pass strict=False to load the keys both have"
    return StateKeysError.of(step, missing, unexpected, hint)


def slot_text(slot: stateful.Slot) -> str:
    path = "/".join(str(k) for k in slot.path) or "<root>"
    return f"{path!r} ({type(slot.obj).__name__})"
