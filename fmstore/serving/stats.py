"""The figures of a serving load, and the host-memory budget of its coded tensors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class LoadStats:
    """What one streaming load did (``StreamingLoader.stats``, or ``load_state_dict(stats=)``)."""

    step: int = -1
    tensors: int = 0
    bytes: int = 0  # the tensors' bytes placed on the device
    read_bytes: int = 0  # bytes read from storage (a chunk larger than a slot is read twice)
    pieces: int = 0  # ring slots filled
    ring_bytes: int = 0  # the ring's limit
    slot_bytes: int = 0
    slots: int = 0
    peak_ring_bytes: int = 0  # the most ring bytes in use at once: <= ring_bytes
    peak_staging_bytes: int = 0  # the most host bytes coded tensors held at once (outside the ring)
    seconds: float = 0.0
    # With a remote root: bytes read from it (headers included, with a cache); with a cache,
    # the reads served from it and their bytes (a cache's background fills are not counted).
    remote_bytes_read: int = 0
    cache_hits: int = 0
    cache_bytes_read: int = 0

    @property
    def throughput(self) -> float:
        """Bytes placed per second."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class StagingBudget:
    """Host bytes for coded tensors (read whole, decoded): a tensor is admitted while the
    staged ones fit ``limit``, and alone when it does not (so a tensor larger than the limit
    still loads, one at a time); :attr:`peak` is the most held at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()
