"""What a checkpointer frees at ``close()``, and the finalizer that frees it when a
checkpointer is dropped unclosed (its saves in flight are committed first)."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

from .level import SnapshotLevel
from .saving import SavePipeline

__all__ = ["Owned", "dropped"]


@dataclass
class Owned:
    """What a checkpointer frees at close: never refers to the checkpointer, so that a dropped
    one is freed by reference counting and its finalizer (:func:`dropped`) can still free this."""

    pipeline: SavePipeline
    levels: list[SnapshotLevel]

    def close(self) -> None:
        """Free the threads, the pinned pool, the snapshots in memory; release the leases."""
        self.pipeline.close()  # the snapshots in host memory too
        for lvl in self.levels:
            lvl.close()


def dropped(owned: Owned) -> None:
    """Finalizer of a checkpointer garbage-collected without ``close()``.

    Its leases are marked orphaned at once, so that a new checkpointer of this process on the
    same root waits for them rather than being refused; its saves in flight are committed
    (a returned save is a promise), then everything is freed and the leases released.  That
    is done here on the main thread (``del ck`` in a script or notebook: the root is free
    when ``del`` returns), else on a thread of its own: there may be saves to wait for, and a
    collection runs finalizers on whichever thread it happens on, one of the pools' own (which
    cannot join itself) or fsspec's event loop (which cannot wait for itself)."""
    for lvl in owned.levels:
        lvl.snapshots.orphan()
    if owned.pipeline.persists.running() or threading.current_thread() is not threading.main_thread():
        threading.Thread(target=_close_dropped, args=(owned,), name="fmstore-release", daemon=True).start()
    else:
        _close_dropped(owned)


def _close_dropped(owned: Owned) -> None:
    try:
        persists = owned.pipeline.persists
        persists.wait()
        for error in persists.pop_errors():  # no caller is left to raise it to
            print(
                f"fmstore: a save of a Checkpointer dropped without close() failed "
                f"({owned.levels[0].url!r}): {type(error).__name__}: {error}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        owned.close()


