"""Python's cyclic garbage collector paused while fmstore builds a save's bookkeeping.

A save allocates a few Python objects per tensor (thousands for a transformer and its
optimizer), all freed by reference counting soon after.  But every 700 allocations start a
young-generation collection, and one that runs in the middle of a save moves what is alive at
that moment into an older generation; after enough of that, the collector runs a full
collection, which scans every object of the process while holding the GIL.  In a
transformers training process that is ~400 k objects and 150-300 ms, during which training
stops (bench/RESULTS.md, issue 10: one such stall every 15-25 steps with a snapshot every
step, none without).  With the collector paused for the save's duration, reference counting
frees those objects before any collection sees them.

The pause is process-wide (``gc.disable``) and nests; the collector is enabled again only if
it was enabled when the outermost pause began, so a program that runs with ``gc.disable()``
stays that way.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_resume = False  # whether the outermost pause found the collector enabled


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection (in any thread) inside the ``with`` block."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
