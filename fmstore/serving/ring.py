"""A bounded ring of reusable host buffers (slots) that a streaming load reads through.

The ring owns at most ``ring_bytes`` of host memory, cut into equal slots (pinned when CUDA is
available, from a :class:`~fmstore.tiers.host.BufferPool` capped at ``ring_bytes``).  A reader
takes a slot, fills it, hands its bytes on (a copy to the destination, possibly asynchronous on
a GPU stream) and gives it back; a reader that finds every slot in use waits.  So the host
memory of a load is bounded by the ring, not by the model, and the ring's high-water mark
(:attr:`HostRing.peak_bytes`) shows it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..tiers import BufferPool
from ..units import format_size

#: The smallest slot (the pool's smallest size class) and the largest one worth having: bigger
#: pieces do not read faster, and smaller slots mean more of them in flight.
MIN_SLOT, MAX_SLOT = 512, 64 << 20


def slot_size(ring_bytes: int, threads: int) -> int:
    """The slot size for a ring of ``ring_bytes`` read by ``threads`` threads: a power of two
    (a pool size class of its own, so a slot takes exactly its size), small enough that every
    thread can hold two slots (one being read while the other's copy drains)."""
    if ring_bytes < 2 * MIN_SLOT:
        raise ConfigError(f"ring_bytes={ring_bytes}: a ring needs at least {2 * MIN_SLOT} bytes (two slots)")
    want = max(MIN_SLOT, ring_bytes // max(2, 2 * threads))
    return min(MAX_SLOT, 1 << (want.bit_length() - 1))


class HostRing:
    """``ring_bytes`` of host buffers in equal slots; :meth:`acquire` blocks while all are in use."""

    def __init__(self, ring_bytes: int, threads: int, *, pinned: bool) -> None:
        self.limit = ring_bytes
        self.slot_bytes = slot_size(ring_bytes, threads)
        self.slots = ring_bytes // self.slot_bytes
        self.pool = BufferPool(pinned=pinned, limit=ring_bytes)
        self._cond = threading.Condition()
        self._free: list[torch.Tensor] = []
        self._releases: list[Callable[[], None]] = []  # the pool's, for every slot allocated
        self._in_use = 0
        self.peak_bytes = 0  # the most slot bytes in use at once
        self.closed = False

    @property
    def allocated_bytes(self) -> int:
        return len(self._releases) * self.slot_bytes

    def acquire(self, abort: threading.Event | None = None) -> torch.Tensor:
        """A free slot (a flat uint8 CPU tensor of :attr:`slot_bytes`), allocated on first need;
        waits while every slot is in use.  ``abort`` set: stop waiting (raises RuntimeError:
        the load has failed elsewhere and its error is being raised)."""
        with self._cond:
            while True:
                if self.closed:
                    raise RuntimeError("the ring is closed")
                if self._free:
                    buf = self._free.pop()
                    break
                if len(self._releases) < self.slots:
                    # Count it before allocating outside the lock (pinning is slow).
                    self._releases.append(_pending)
                    at = len(self._releases) - 1
                    buf = None
                    break
                if abort is not None and abort.is_set():
                    raise RuntimeError("load aborted")
                self._cond.wait(0.1)
            self._in_use += 1
            self.peak_bytes = max(self.peak_bytes, self._in_use * self.slot_bytes)
        if buf is None:
            try:
                raw, release = self.pool.acquire(self.slot_bytes)
            except BaseException:
                with self._cond:
                    self._releases[at] = _noop
                    self.slots -= 1  # that slot cannot be had; the others still can
                    self._in_use -= 1
                    self._cond.notify_all()
                raise
            with self._cond:
                self._releases[at] = release
            buf = raw[: self.slot_bytes]
        return buf

    def release(self, buf: torch.Tensor) -> None:
        """Give ``buf`` back (its bytes are no longer read by anything, a pending GPU copy
        included: the caller waited for the copy's event)."""
        with self._cond:
            self._free.append(buf)
            self._in_use -= 1
            self._cond.notify()

    def close(self) -> None:
        """Give every slot back to the pool and free the pool's buffers."""
        with self._cond:
            self.closed = True
            releases, self._releases, self._free = self._releases, [], []
            self._cond.notify_all()
        for release in releases:
            release()
        self.pool.clear()

    def __repr__(self) -> str:
        return f"HostRing({self.slots} x {format_size(self.slot_bytes)}, peak {format_size(self.peak_bytes)})"


def _pending() -> None:  # a slot being allocated: nothing to give back yet
    pass


_noop = _pending
