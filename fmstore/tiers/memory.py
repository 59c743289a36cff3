"""Shared machinery of the in-memory tiers (device HBM and host RAM): slots with reader counts.

A stored blob lives in a flat uint8 buffer.  Readers copy out of it without holding the tier
lock, so a buffer is handed back to its allocator only when it is both removed and unread.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable

import torch

from ..blob import BlobInfo, Value, as_bytes_tensor, from_bytes_tensor
from ..errors import BlobNotFoundError
from .base import Tier


class _Slot:
    __slots__ = ("buf", "info", "release", "readers", "dropped")

    def __init__(self, buf: torch.Tensor, info: BlobInfo, release: Callable[[], None]) -> None:
        self.buf = buf
        self.info = info
        self.release = release
        self.readers = 0
        self.dropped = False


class MemoryTier(Tier):
    """Base of :class:`DeviceTier` and :class:`HostTier`: blobs kept as buffers in memory."""

    def __init__(self, *, capacity: int | str | None = None, name: str | None = None) -> None:
        super().__init__(capacity=capacity, name=name)
        self._slots: dict[str, _Slot] = {}
        self._slot_lock = threading.Lock()

    #: Device on which ``get`` returns tensors.
    out_device: torch.device = torch.device("cpu")

    @abstractmethod
    def _alloc(self, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
        """A uint8 buffer of at least ``nbytes`` and the callback that gives it back."""

    def _write(self, key: str, value: Value, info: BlobInfo) -> None:
        src = as_bytes_tensor(value)
        buf, release = self._alloc(info.nbytes)
        try:
            buf = buf[: info.nbytes]
            # Blocking copy: a device-to-host copy is complete when copy_ returns, and a copy
            # on the device is ordered before later work the caller queues on its stream.
            buf.copy_(src)
        except BaseException:
            release()
            raise
        with self._slot_lock:
            old = self._slots.get(key)
            self._slots[key] = _Slot(buf, info, release)
        if old is not None:
            self._drop(old)

    def _pin(self, key: str) -> _Slot:
        with self._slot_lock:
            slot = self._slots.get(key)
            if slot is None:
                raise BlobNotFoundError(key, f"tier {self.name!r}")
            slot.readers += 1
            return slot

    def _unpin(self, slot: _Slot) -> None:
        with self._slot_lock:
            slot.readers -= 1
            done = slot.dropped and slot.readers == 0
        if done:
            slot.release()

    def _drop(self, slot: _Slot) -> None:
        with self._slot_lock:
            slot.dropped = True
            done = slot.readers == 0
        if done:
            slot.release()

    def _read(self, key: str, device: torch.device | None = None) -> tuple[Value, BlobInfo]:
        slot = self._pin(key)
        try:
            info = slot.info
            if info.is_bytes:
                return slot.buf.cpu().numpy().tobytes(), info
            out = torch.empty(info.nbytes, dtype=torch.uint8, device=device or self.out_device)
            out.copy_(slot.buf)
            return from_bytes_tensor(out, info), info
        finally:
            self._unpin(slot)

    def _stat(self, key: str) -> BlobInfo:
        with self._slot_lock:
            slot = self._slots.get(key)
            if slot is None:
                raise BlobNotFoundError(key, f"tier {self.name!r}")
            return slot.info

    def _remove(self, key: str) -> None:
        with self._slot_lock:
            slot = self._slots.pop(key, None)
        if slot is None:
            raise BlobNotFoundError(key, f"tier {self.name!r}")
        self._drop(slot)

    def take(self, key: str) -> tuple[Value, Callable[[], None]]:
        """Remove ``key`` and hand over its buffer itself (no copy); call the callback when done."""
        with self._slot_lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                raise BlobNotFoundError(key, f"tier {self.name!r}")
            slot.readers += 1  # the taker counts as a reader until it is done
            slot.dropped = True
        with self._lock:
            self._used -= self._sizes.pop(key, 0)
        return from_bytes_tensor(slot.buf, slot.info), lambda: self._unpin(slot)

    def close(self) -> None:
        with self._slot_lock:
            slots = list(self._slots.values())
            self._slots.clear()
        with self._lock:
            self._sizes.clear()
            self._used = 0
        for slot in slots:
            self._drop(slot)
