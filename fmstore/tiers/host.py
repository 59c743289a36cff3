"""HostTier: blobs in host RAM, from a reusable pool of pinned buffers when CUDA is present.

Pinned (page-locked) memory is what lets device<->host copies run at full PCIe speed and
asynchronously, but ``cudaHostAlloc`` is slow and fragments; the pool allocates each size
class once and hands buffers out again, so steady-state training never pins new memory.

The pool pins plain allocations in place (``cudaHostRegister``) rather than through torch's
pinned allocator: that one rounds every block up to a power of two (up to twice the memory
pinned) and faults the pages in while holding the CUDA driver's lock, which stalls the
training's CUDA calls meanwhile; here the pages are faulted in first, by torch's intra-op
threads, and several buffers are registered at once.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import CapacityError, ConfigError
from ..units import format_size
from .memory import MemoryTier


def size_class(nbytes: int) -> int:
    """Round up to at most 1/8 above ``nbytes`` (min 512 B), so similar sizes share buffers."""
    if nbytes <= 512:
        return 512
    step = 1 << max(9, nbytes.bit_length() - 4)
    return -(-nbytes // step) * step


class BufferPool:
    """Flat uint8 host buffers, pinned or not, recycled by size class.

    ``limit`` caps the bytes the pool keeps allocated: idle buffers are freed to make room
    before a new one is allocated.  Buffers in use may exceed it (the tier's capacity check,
    not the pool, decides what is stored).
    """

    #: The bytes a buffer for ``nbytes`` takes: ``nbytes`` rounded up to its size class (at
    #: most 1/8 above it, at least 512 B), what ``acquire`` and ``reserve`` count.
    size_class = staticmethod(size_class)

    def __init__(self, *, pinned: bool, limit: int | None = None) -> None:
        self.pinned = pinned
        self.limit = limit
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.reserved = 0  # bytes allocated, in use or idle
        self.idle = 0
        self.allocations = 0  # how many buffers were ever allocated (reuse shows as few)
        self._count: dict[int, int] = {}  # buffers allocated per size class, in use or idle

    def acquire(self, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
        cls = size_class(nbytes)
        with self._lock:
            bucket = self._free.get(cls)
            if bucket:
                buf = bucket.pop()
                self.idle -= cls
                return buf, lambda: self._release(buf)
            self._account(cls)
        buf = self._allocate(cls)
        return buf, lambda: self._release(buf)

    def reserve(self, sizes: list[int], sets: int) -> int:
        """Allocate ahead what ``sets`` buffers of each of ``sizes`` held at once would need,
        so the buffers are pinned now rather than when that many are first in use (pinning
        gigabytes takes seconds and stalls CUDA calls meanwhile).  Returns the bytes allocated."""
        want: dict[int, int] = {}
        for n in sizes:
            cls = size_class(n)
            want[cls] = want.get(cls, 0) + sets
        todo: list[int] = []
        with self._lock:
            for cls, n in want.items():
                for _ in range(n - self._count.get(cls, 0)):
                    if self.limit is not None and self.reserved + cls > self.limit:
                        break  # the limit decides: no idle buffer is freed for a reserve
                    self._account(cls)
                    todo.append(cls)
        if not todo:
            return 0
        # Several at once: one buffer's pages fault in while another's registration runs.
        with ThreadPoolExecutor(min(4, len(todo)), thread_name_prefix="fmstore-pin") as pool:
            futures = [pool.submit(self._allocate, cls) for cls in todo]
        added, error = 0, None
        for f in futures:
            try:
                buf = f.result()
            except CapacityError as e:  # _allocate took it off the count
                error = e
                continue
            self._release(buf)
            added += buf.numel()
        if error is not None:
            raise error
        return added

    def _account(self, cls: int) -> None:
        """Count a buffer about to be allocated (lock held)."""
        if self.limit is not None and self.reserved + cls > self.limit:
            self._trim(self.reserved + cls - self.limit)
        self.reserved += cls
        self.allocations += 1
        self._count[cls] = self._count.get(cls, 0) + 1

    def _allocate(self, cls: int) -> torch.Tensor:
        try:
            if self.pinned:
                buf = _registered(cls)
                if buf is not None:
                    return buf
            return torch.empty(cls, dtype=torch.uint8, pin_memory=self.pinned)
        except RuntimeError as e:
            with self._lock:
                self.reserved -= cls
                self._count[cls] -= 1
            raise CapacityError(f"cannot allocate {format_size(cls)} of host memory: {e}") from None

    def _release(self, buf: torch.Tensor) -> None:
        cls = buf.numel()
        with self._lock:
            self._free.setdefault(cls, []).append(buf)
            self.idle += cls
            if self.limit is not None and self.reserved > self.limit:
                self._trim(self.reserved - self.limit)

    def _trim(self, want: int) -> None:
        """Free idle buffers, largest first, until ``want`` bytes are freed (lock held)."""
        for cls in sorted(self._free, reverse=True):
            bucket = self._free[cls]
            while bucket and want > 0:
                bucket.pop()
                self.reserved -= cls
                self._count[cls] -= 1
                self.idle -= cls
                want -= cls
            if not bucket:
                del self._free[cls]
            if want <= 0:
                return

    def clear(self) -> None:
        with self._lock:
            self._trim(self.idle)


def _registered(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of plain host memory page-locked in place with ``cudaHostRegister``, or None
    where CUDA refuses (the caller then uses torch's pinned allocator).  Unregistered when the
    buffer object is collected: views of it that live on stay valid, as pageable memory."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.zero_()  # fault the pages in on the intra-op threads, outside the driver's lock
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)) != 0:
        return None
    weakref.finalize(buf, _unregister, buf.data_ptr(), os.getpid())
    return buf


def _unregister(ptr: int, pid: int) -> None:
    if os.getpid() == pid:  # a forked child has no CUDA context of its parent's
        try:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:  # interpreter shutdown: the process's pinning ends with it
            pass


class HostTier(MemoryTier):
    """Blobs in host memory up to ``capacity`` bytes.

    ``pinned=None`` pins when CUDA is available (so copies to and from the GPU are fast) and
    uses plain memory otherwise; ``True``/``False`` force it.  ``get`` returns a new CPU tensor.
    """

    kind = "host"

    def __init__(
        self,
        capacity: int | str | None = None,
        *,
        pinned: bool | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(capacity=capacity, name=name)
        if pinned is None:
            pinned = torch.cuda.is_available()
        if pinned and not torch.cuda.is_available():
            raise ConfigError("HostTier(pinned=True) needs CUDA; pass pinned=None or False")
        self.pinned = pinned
        self.pool = BufferPool(pinned=pinned, limit=self.capacity)

    def _alloc(self, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
        return self.pool.acquire(nbytes)

    def stats(self) -> dict[str, object]:
        out = super().stats()
        out.update(
            pinned=self.pinned, pool_reserved=self.pool.reserved, pool_allocations=self.pool.allocations
        )
        return out

    def close(self) -> None:
        super().close()
        self.pool.clear()
