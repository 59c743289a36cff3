"""The host-memory level of a multi-level policy: the newest snapshots, kept as staged.

A save's staged buffers (pinned with CUDA) are the snapshot: keeping them instead of
returning them to the pool makes a restore a memory copy, with no storage read and no
checksum to verify.  Only this process, with the same sharding as at save, can restore from
here; anything else falls back to a durable level.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .sharding import check_target, dtensor_region, is_dtensor
from .staging import Staged


@dataclass
class MemoryItem:
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]


@dataclass
class MemorySnapshot:
    step: int
    staged: Staged  # every local tensor of this rank, including replicas it does not write
    items: dict[str, MemoryItem]
    tree: dict[str, Any]


#: The host-memory level's name in listings (``Checkpointer.where``, ``level_names()``,
#: ``steps(level=...)``, ``load(level=...)``); exported as ``fmstore.checkpoint.HOST``.
HOST = "host"


class MemoryLevel:
    """The newest ``keep`` snapshots; older ones give their buffers back to the pool."""

    name = HOST

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._snaps: OrderedDict[int, MemorySnapshot] = OrderedDict()
        self._lock = threading.Lock()

    def steps(self) -> list[int]:
        with self._lock:
            return sorted(self._snaps)

    def get(self, step: int) -> MemorySnapshot | None:
        with self._lock:
            return self._snaps.get(step)

    def add(self, snap: MemorySnapshot) -> None:
        """Keep ``snap`` (it holds a reference to its staged buffers) and drop the oldest beyond
        ``keep``; a dropped snapshot's buffers go back to the pool once a persist still writing
        from them is done too (the staged copy is reference counted)."""
        with self._lock:
            self._snaps[snap.step] = snap
            doomed = []
            while len(self._snaps) > self.keep:
                doomed.append(self._snaps.popitem(last=False)[1])
        for old in doomed:
            old.staged.release()

    def drop(self, step: int) -> bool:
        """Forget ``step``; whether it was here."""
        with self._lock:
            snap = self._snaps.pop(step, None)
        if snap is None:
            return False
        snap.staged.release()
        return True

    def clear(self) -> None:
        with self._lock:
            doomed = list(self._snaps.values())
            self._snaps.clear()
        for old in doomed:
            old.staged.release()


def restore(
    snap: MemorySnapshot, targets: dict[str, torch.Tensor], device: Any, names: set[str] | None = None
) -> dict[str, torch.Tensor] | None:
    """Copy a memory snapshot (only ``names``, if given) into ``targets`` (or new tensors);
    None if its pieces do not fit the targets' sharding (nothing is written then)."""
    snap.staged.wait()  # a save(block=False) may still be copying into it
    plan = []
    out: dict[str, torch.Tensor] = {}
    by_name = {st.name: st for st in snap.staged.tensors}
    for name, item in snap.items.items():
        if names is not None and name not in names:
            continue
        st = by_name[name]
        target = targets.get(name)
        check_target(name, snap.step, st.dtype, item.global_shape, target)
        if target is not None and is_dtensor(target):
            dest, offsets, _ = dtensor_region(target, name)
            if offsets != item.offsets or tuple(dest.shape) != st.shape:
                return None
            out[name] = target
        else:
            if any(item.offsets) or st.shape != item.global_shape:
                return None  # this rank holds a shard; the target wants the whole tensor
            dest = (
                target
                if target is not None
                else torch.empty(st.shape, dtype=st.dtype, device=device or "cpu")
            )
            out[name] = dest
        plan.append((dest, st))
    cuda = False
    for dest, st in plan:
        if st.nbytes:
            src = st.data.view(st.dtype).view(st.shape)
            dest.copy_(src, non_blocking=dest.device.type == "cuda")
            cuda |= dest.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    return out
