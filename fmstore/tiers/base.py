"""The one small interface every storage tier implements, and the bookkeeping they share."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch

from ..blob import BlobInfo, Value, describe
from ..errors import BlobNotFoundError, CapacityError
from ..keys import check_key
from ..units import format_size, parse_size


class Tier(ABC):
    """A named store of blobs (tensors or bytes) with a capacity and an honest ``used`` figure.

    Subclasses implement ``_write``, ``_read``, ``_remove``, ``_stat`` and ``_scan``;
    this class checks keys and capacity and keeps the index of sizes used for ``used``.
    Every tier is safe to call from several threads.
    """

    #: Short kind name used in default tier names and stats ("device", "host", ...).
    kind: str = "tier"
    #: Whether data outlives the process (files, objects) or not (device, host memory).
    durable: bool = False

    def __init__(self, *, capacity: int | str | None = None, name: str | None = None) -> None:
        self.capacity: int | None = parse_size(capacity, what="capacity")
        self.name: str = name or self.kind
        self._lock = threading.RLock()
        self._sizes: dict[str, int] = {}  # key -> bytes it takes in this tier
        self._used = 0
        self._reserved = 0  # room promised to writes in progress
        self.bytes_written = 0
        self.bytes_read = 0

    # ------------------------------------------------------------------ public API

    @property
    def used(self) -> int:
        """Bytes this tier's blobs take (for files and objects, header included)."""
        return self._used

    def footprint(self, info: BlobInfo) -> int:
        """Bytes a blob described by ``info`` would take in this tier."""
        return info.nbytes

    def fits(self, info: BlobInfo) -> bool:
        """Whether a blob of this size could ever be stored here (ignoring what is stored now)."""
        return self.capacity is None or self.footprint(info) <= self.capacity

    def free_for(self, key: str) -> int | None:
        """Bytes available for ``key`` (its current copy counts as free); ``None``: unlimited."""
        if self.capacity is None:
            return None
        with self._lock:
            return self.capacity - self._used - self._reserved + self._sizes.get(key, 0)

    def put(self, key: str, value: Value) -> BlobInfo:
        """Store ``value`` under ``key`` (replacing any blob there); returns what was stored.

        Raises :class:`CapacityError` if the tier has no room; it never evicts on its own.
        """
        check_key(key)
        info = describe(value, key=key)
        need = self.footprint(info)
        if self.capacity is not None and need > self.capacity:
            raise CapacityError(
                f"{key!r} needs {format_size(need)} but tier {self.name!r} holds at most "
                f"{format_size(self.capacity)}"
            )
        with self._lock:
            if self.capacity is not None:
                free = self.capacity - self._used - self._reserved + self._sizes.get(key, 0)
                if need > free:
                    raise CapacityError(
                        f"no room for {key!r} ({format_size(need)}) in tier {self.name!r}: "
                        f"{format_size(self._used + self._reserved)} of "
                        f"{format_size(self.capacity)} used or being written"
                    )
            # Reserve the room now so concurrent puts cannot both take it.
            self._reserved += need
        try:
            self._write(key, value, info)
        except BaseException:
            with self._lock:
                self._reserved -= need
                self._resync(key)
            raise
        with self._lock:
            self._reserved -= need
            self._account(key, need)
            self.bytes_written += info.nbytes
        return info

    def get(self, key: str, *, device: str | torch.device | None = None) -> Value:
        """The blob under ``key``, bit-exact, as a new tensor (or ``bytes``) the caller owns.

        ``device`` puts a tensor there (memory tiers copy straight from their buffer, e.g.
        pinned host memory to the GPU at full speed); by default tensors come back on the
        tier's own device (CPU for all but :class:`DeviceTier`).
        """
        check_key(key)
        dev = torch.device(device) if device is not None else None
        value, info = self._read(key, dev)
        if dev is not None and isinstance(value, torch.Tensor) and value.device != dev:
            value = value.to(dev)
        with self._lock:
            self.bytes_read += info.nbytes
        return value

    def stat(self, key: str) -> BlobInfo:
        """Kind, dtype, shape and size of a stored blob, without reading its data."""
        check_key(key)
        return self._stat(key)

    def delete(self, key: str, *, missing_ok: bool = False) -> None:
        """Remove ``key``; a missing key raises :class:`BlobNotFoundError` unless ``missing_ok``."""
        check_key(key)
        try:
            self._remove(key)
        except BlobNotFoundError:
            if not missing_ok:
                raise
        with self._lock:
            self._used -= self._sizes.pop(key, 0)

    def take(self, key: str) -> tuple[Value, Callable[[], None]]:
        """Remove ``key`` and hand its value over, plus a callback to run once done with it.

        Memory tiers override this to hand over their buffer without a copy; the callback
        then gives the buffer back to the tier's pool.
        """
        value = self.get(key)
        self.delete(key)
        return value, _noop

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with ``prefix``."""
        with self._lock:
            return sorted(k for k in self._sizes if k.startswith(prefix))

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._sizes

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def size_of(self, key: str) -> int:
        """Bytes ``key`` takes in this tier (0 if absent)."""
        with self._lock:
            return self._sizes.get(key, 0)

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "name": self.name,
                "kind": self.kind,
                "used": self._used,
                "capacity": self.capacity,
                "entries": len(self._sizes),
                "bytes_written": self.bytes_written,
                "bytes_read": self.bytes_read,
            }

    def refresh(self) -> None:
        """Re-read what the tier holds (durable tiers: to see blobs other processes wrote)."""
        with self._lock:
            self._sizes.clear()
            self._used = 0
            self._load_index()

    def close(self) -> None:  # noqa: B027 - optional hook, most tiers hold nothing to release
        """Release resources (thread pools, buffers); stored durable data stays."""

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, used={format_size(self._used)}, "
            f"capacity={format_size(self.capacity)})"
        )

    # ------------------------------------------------------------------ for subclasses

    def _account(self, key: str, size: int) -> None:
        """Record that ``key`` takes ``size`` bytes (caller holds ``_lock``)."""
        self._used += size - self._sizes.get(key, 0)
        self._sizes[key] = size

    def _resync(self, key: str) -> None:
        """After a failed write, make the index say what the tier really holds for ``key``."""
        self._used -= self._sizes.pop(key, 0)
        size = self._probe(key)
        if size is not None:
            self._account(key, size)

    def _load_index(self) -> None:
        """Fill the size index from what the tier already holds (durable tiers, at start)."""
        with self._lock:
            for key, size in self._scan():
                self._account(key, size)

    @abstractmethod
    def _write(self, key: str, value: Value, info: BlobInfo) -> None: ...

    @abstractmethod
    def _read(self, key: str, device: torch.device | None = None) -> tuple[Value, BlobInfo]:
        """Read ``key``; may place a tensor on ``device`` directly (``get`` moves it if not)."""

    @abstractmethod
    def _stat(self, key: str) -> BlobInfo: ...

    @abstractmethod
    def _remove(self, key: str) -> None:
        """Delete the stored blob; raise :class:`BlobNotFoundError` if there is none."""

    def _probe(self, key: str) -> int | None:
        """Size of what is stored for ``key`` right now, or ``None`` (after a failed write)."""
        return None

    def _scan(self) -> Iterator[tuple[str, int]]:
        """(key, size) of every blob already stored when the tier opens."""
        return iter(())


def _noop() -> None:
    return None
