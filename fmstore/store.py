"""TieredStore: one key space over ordered tiers (fastest first) with LRU placement.

A key has one authoritative copy, in the slowest tier that holds it, and any number of
cached copies in faster tiers.  ``put`` writes to the fastest tier with room, making room by
demoting least-recently-used entries down the chain; an entry with a copy further down is
simply dropped, one without is moved.  Moves out of memory tiers run in the background,
their buffers handed over without a copy and bounded by ``max_inflight`` bytes; reads of a
key in flight are served from that buffer.  ``get`` reads from the fastest tier holding the
key and, if ``promote`` is set, copies it up.  With ``write_back=True`` every put is also
copied to the last (durable) tier in the background; ``flush()`` waits for all of it.

Concurrency: one store lock guards the bookkeeping (never held during I/O); a per-key lock
orders the writes of one key.  A thread holding one key's lock only ever *tries* to take
another's (for eviction), so no two threads can wait on each other.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

import torch

from .blob import BlobInfo, Value, describe
from .errors import BlobNotFoundError, CapacityError, ConfigError, FmstoreError, WaitTimeoutError
from .jobs import BackgroundJobs, Job
from .keys import check_key
from .tiers.base import Tier
from .units import format_size, parse_size


@dataclass
class _Move:
    """A value taken out of a memory tier, on its way down."""

    value: Value
    release: Callable[[], None]
    nbytes: int
    accounted: bool = True  # still counted in the store's in-flight bytes


@dataclass
class _Entry:
    info: BlobInfo | None  # None until known (keys found in durable tiers at start)
    version: int = 0
    holders: set[int] = field(default_factory=set)  # tiers with a complete current copy
    move: _Move | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class PrefetchHandle:
    """Waitable result of :meth:`TieredStore.prefetch`."""

    def __init__(self, futures: list[Future[None]]) -> None:
        self.futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every key is promoted; re-raises the first error."""
        finished, pending = wait(self.futures, timeout=timeout)
        if pending:
            raise WaitTimeoutError(f"prefetch of {len(self.futures)} keys not done after {timeout} s")
        for f in self.futures:
            f.result()


class TieredStore:
    """Blobs over ``tiers`` (fastest first), placed, promoted and demoted by recency of use.

    Parameters:
        tiers: the tiers, fastest first (e.g. device, host, local, object).
        promote: where ``get`` copies a key read from a slower tier: ``True`` (the fastest
            tier), ``False`` (never), or a tier's index or name.
        write_back: also copy every put to the last tier in the background (so evictions
            from faster tiers never need to move data, and the data is durable after ``flush``).
        max_inflight: bytes of values the background may hold while moving them down.
        workers: background threads.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        promote: bool | int | str = True,
        write_back: bool = False,
        max_inflight: int | str = "1GiB",
        workers: int = 4,
    ) -> None:
        self.tiers: list[Tier] = list(tiers)
        if not self.tiers:
            raise ConfigError("TieredStore needs at least one tier")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"tier names must be unique, got {names}; pass name=... to tell them apart")
        self.promote_to = self._promote_target(promote)
        self.write_back = write_back
        self.max_inflight = parse_size(max_inflight, what="max_inflight") or 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._lru: list[OrderedDict[str, None]] = [OrderedDict() for _ in self.tiers]
        self._inflight = 0
        self._moved_in = [0] * len(self.tiers)
        self._moved_out = [0] * len(self.tiers)
        # Write-back and demotions: their errors are raised once, by flush() or the next put/get;
        # what is in flight at exit is finished, not lost.
        self._jobs = BackgroundJobs(
            f"background move(s) of a TieredStore ({', '.join(names)})",
            workers=max(1, workers),
            thread_name="fmstore-store",
        )
        self._closed = False
        # Adopt what durable tiers already hold (a store reopened after a restart).
        for i, tier in enumerate(self.tiers):
            for key in tier.list():
                entry = self._entries.setdefault(key, _Entry(info=None))
                entry.holders.add(i)
                self._lru[i][key] = None

    # ------------------------------------------------------------------ public API

    def put(self, key: str, value: Value) -> None:
        """Store ``value`` in the fastest tier with room (demoting LRU entries to make it)."""
        check_key(key)
        info = describe(value, key=key)
        self._raise_errors()
        target = self._first_fitting(info, 0, key)
        entry = self._entry_for_write(key)
        with entry.lock:
            with self._lock:
                # An older value of this key moving down in the background stops counting
                # against the in-flight budget now (its job waits for this key's lock, so
                # waiting on the budget here could wait on ourselves); it stays readable
                # until the new value is in place, so a failed put loses nothing.
                self._unaccount(entry.move)
            try:
                for attempt in range(3):
                    self._make_room(target, info, key, background=False)
                    try:
                        self.tiers[target].put(key, value)
                        break
                    except CapacityError:
                        if attempt == 2:  # concurrent writers keep taking the room we make
                            raise
            except BaseException:
                with self._lock:
                    if not entry.holders and entry.move is None and self._entries.get(key) is entry:
                        del self._entries[key]  # a new key that never got stored
                raise
            with self._lock:
                entry.version += 1
                version = entry.version
                entry.move = None  # superseded: its job finds the version changed
                stale = entry.holders - {target}
                entry.holders = {target}
                entry.info = info
                self._moved_in[target] += info.nbytes
                self._touch(target, key)
                for j in stale:
                    self._lru[j].pop(key, None)
            # Stale copies must go now: a durable tier reopened later would serve them.
            for j in stale:
                self.tiers[j].delete(key, missing_ok=True)
        if self.write_back and target != len(self.tiers) - 1:
            self._reserve_inflight(info.nbytes)
            self._submit(self._write_back_job, key, version, info.nbytes)

    def get(
        self, key: str, *, promote: bool | None = None, device: str | torch.device | None = None
    ) -> Value:
        """The value of ``key``, bit-exact, from the fastest tier that holds it.

        ``promote`` overrides the store's promotion setting for this read; ``device`` places
        a tensor there (e.g. ``"cuda"``: pinned host memory is copied straight to the GPU).
        """
        check_key(key)
        for _attempt in range(8):
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    raise BlobNotFoundError(key, "the tiered store")
                move = entry.move
                version = entry.version
                source = min(entry.holders) if entry.holders else None
            if move is not None and (source is None or source > 0):
                value = _copy(move.value)
                return value.to(device) if device is not None and isinstance(value, torch.Tensor) else value
            if source is None:
                time.sleep(0.001)  # between tiers mid-move; look again
                continue
            try:
                value = self.tiers[source].get(key, device=device)
            except BlobNotFoundError:
                time.sleep(0.001)  # moved or replaced while we looked; look again
                continue
            nbytes = (entry.info or describe(value, key=key)).nbytes
            with self._lock:
                self._moved_out[source] += nbytes
                self._touch(source, key)
            if promote is None:
                target = self.promote_to
            else:
                target = (self.promote_to or 0) if promote else None
            if target is not None and source > target:
                self._promote(key, entry, version, value, target, background=False)
            return value
        raise FmstoreError(f"{key!r} kept moving between tiers while being read; try again")

    def where(self, key: str) -> list[str]:
        """Names of the tiers that hold a copy of ``key`` (fastest first; ``[]`` if unknown).

        A key being moved down in the background is listed as ``"in-flight"``.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return []
            names = [self.tiers[i].name for i in sorted(entry.holders)]
            if entry.move is not None:
                names.append("in-flight")
            return names

    def prefetch(self, keys: Iterable[str], *, to: int | str | None = None) -> PrefetchHandle:
        """Start copying ``keys`` into tier ``to`` (default: the promotion target or tier 0)."""
        target = self._tier_index(to) if to is not None else (self.promote_to or 0)
        futures = []
        for key in keys:
            check_key(key)
            # A failed prefetch is the handle's to report, not flush()'s.
            futures.append(self._submit(self._prefetch_job, key, target, record=False).future)
        return PrefetchHandle(futures)

    def flush(self) -> None:
        """Wait until all background demotion and write-back is done; re-raise its errors."""
        self._wait_pending(None)

    def delete(self, key: str) -> None:
        """Remove ``key`` from every tier."""
        check_key(key)
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            raise BlobNotFoundError(key, "the tiered store")
        with entry.lock:
            with self._lock:
                holders = set(entry.holders)
                entry.holders.clear()
                entry.version += 1
                self._unaccount(entry.move)
                entry.move = None
                for i in holders:
                    self._lru[i].pop(key, None)
                if self._entries.get(key) is entry:
                    del self._entries[key]
            for i in holders:
                self.tiers[i].delete(key, missing_ok=True)

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def stats(self) -> dict[str, object]:
        """Per tier: used, capacity, entries and bytes moved in/out; plus the background state."""
        with self._lock:
            tiers = []
            for i, t in enumerate(self.tiers):
                s = t.stats()
                s["moved_in"] = self._moved_in[i]
                s["moved_out"] = self._moved_out[i]
                tiers.append(s)
            return {
                "tiers": tiers,
                "inflight_bytes": self._inflight,
                "max_inflight": self.max_inflight,
                "pending": len(self._jobs.running()),
                "keys": len(self._entries),
            }

    def close(self, *, flush: bool = True) -> None:
        """Flush (re-raising background errors), stop the background threads, close the tiers.

        ``flush=False`` skips the flush and drops background errors (after a failure already
        handled); values still held in memory are then lost.
        """
        if self._closed:
            return
        try:
            if flush:
                self.flush()
        finally:
            self._closed = True
            self._jobs.close()
            for t in self.tiers:
                t.close()

    def _wait_pending(self, timeout: float | None) -> bool:
        """Wait (up to ``timeout`` s) for the background moves, new ones included; once none is
        left, re-raise their errors.  Whether none is left."""
        if not self._jobs.wait(timeout):
            return False
        self._raise_errors()
        return True

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ placement

    def _promote_target(self, promote: bool | int | str) -> int | None:
        if promote is True:
            return 0
        if promote is False or promote is None:
            return None
        return self._tier_index(promote)

    def _tier_index(self, which: int | str) -> int:
        if isinstance(which, int) and not isinstance(which, bool):
            if 0 <= which < len(self.tiers):
                return which
            raise ConfigError(f"tier index {which} out of range (0..{len(self.tiers) - 1})")
        for i, t in enumerate(self.tiers):
            if t.name == which:
                return i
        raise ConfigError(f"no tier named {which!r}; tiers are {[t.name for t in self.tiers]}")

    def _first_fitting(self, info: BlobInfo, start: int, key: str) -> int:
        for i in range(start, len(self.tiers)):
            if self.tiers[i].fits(info):
                return i
        caps = ", ".join(f"{t.name}={format_size(t.capacity)}" for t in self.tiers[start:])
        raise CapacityError(f"{key!r} ({format_size(info.nbytes)}) is larger than every tier ({caps})")

    def _touch(self, i: int, key: str) -> None:
        lru = self._lru[i]
        lru[key] = None
        lru.move_to_end(key)

    def _entry_for_write(self, key: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(info=None)
            return entry

    def _make_room(self, i: int, info: BlobInfo, key: str, *, background: bool) -> None:
        """Evict LRU entries from tier ``i`` until ``info`` fits there (key's lock held)."""
        tier = self.tiers[i]
        need = tier.footprint(info)
        busy_rounds = 0
        while True:
            free = tier.free_for(key)
            if free is None or free >= need:
                return
            victim = self._lock_victim(i, key)
            if victim is None:
                busy_rounds += 1
                if busy_rounds > 2000:  # ~2 s of every candidate being busy
                    raise CapacityError(
                        f"cannot make room for {key!r} ({format_size(need)}) in tier {tier.name!r}: "
                        f"{format_size(tier.used)} of {format_size(tier.capacity)} used by entries "
                        "that are all in use"
                    )
                time.sleep(0.001)
                continue
            vkey, ventry = victim
            try:
                self._evict(vkey, ventry, i, background=background)
            finally:
                ventry.lock.release()

    def _lock_victim(self, i: int, exclude: str) -> tuple[str, _Entry] | None:
        """The least recently used key of tier ``i`` whose lock could be taken (held on return)."""
        with self._lock:
            candidates = [k for k in self._lru[i] if k != exclude]
            entries = [(k, self._entries.get(k)) for k in candidates]
        for k, e in entries:
            if e is not None and e.lock.acquire(blocking=False):
                with self._lock:
                    if i in e.holders and self._entries.get(k) is e:
                        return k, e
                e.lock.release()
        return None

    def _evict(self, key: str, entry: _Entry, i: int, *, background: bool) -> None:
        """Take ``key`` out of tier ``i``, moving it down first if no lower copy exists."""
        tier = self.tiers[i]
        with self._lock:
            has_lower = any(j > i for j in entry.holders) or entry.move is not None
        if has_lower:
            with self._lock:
                entry.holders.discard(i)
                self._lru[i].pop(key, None)
            tier.delete(key, missing_ok=True)
            return
        info = entry.info or tier.stat(key)
        entry.info = info
        dest = self._first_fitting(info, i + 1, key) if i + 1 < len(self.tiers) else None
        if dest is None:
            raise CapacityError(
                f"tier {tier.name!r} is full and {key!r} has no slower tier to move to; "
                "add a tier or raise the capacity"
            )
        if not background and not tier.durable:
            # Hand the buffer to a background job: the caller does not wait for slow I/O.
            self._reserve_inflight(info.nbytes)
            try:
                value, release = tier.take(key)
            except BaseException:
                self._release_inflight(info.nbytes)
                raise
            move = _Move(value, release, info.nbytes)
            with self._lock:
                entry.holders.discard(i)
                entry.move = move
                self._lru[i].pop(key, None)
                self._moved_out[i] += info.nbytes
                version = entry.version
            self._submit(self._demote_job, key, entry, version, move, dest)
            return
        # In a background job (or from a durable tier): move it now, inline.
        value = tier.get(key)
        self._make_room(dest, info, key, background=True)
        self.tiers[dest].put(key, value)
        with self._lock:
            entry.holders.add(dest)
            self._touch(dest, key)
            self._moved_out[i] += info.nbytes
            self._moved_in[dest] += info.nbytes
            entry.holders.discard(i)
            self._lru[i].pop(key, None)
        tier.delete(key, missing_ok=True)

    def _promote(
        self, key: str, entry: _Entry, version: int, value: Value, target: int, *, background: bool
    ) -> None:
        info = entry.info or describe(value, key=key)
        target = next((j for j in range(target, len(self.tiers)) if self.tiers[j].fits(info)), None)
        if target is None:
            return
        if not entry.lock.acquire(blocking=background):
            return  # someone is writing this key; a cache copy is not worth waiting for
        try:
            with self._lock:
                if entry.version != version or self._entries.get(key) is not entry:
                    return
                if entry.holders and min(entry.holders) <= target:
                    return
            try:
                self._make_room(target, info, key, background=background)
            except CapacityError:
                return  # nothing can be evicted right now; the read itself succeeded
            self.tiers[target].put(key, value)
            with self._lock:
                entry.holders.add(target)
                entry.info = info
                self._touch(target, key)
                self._moved_in[target] += info.nbytes
        finally:
            entry.lock.release()

    # ------------------------------------------------------------------ background

    def _submit(self, fn: Callable[..., None], *args: object, record: bool = True) -> Job[None]:
        if self._closed:
            raise FmstoreError("the tiered store is closed")
        return self._jobs.submit(fn, *args, record=record)

    def _raise_errors(self) -> None:
        errors = self._jobs.pop_errors()
        if errors:
            raise FmstoreError(
                f"background tier movement failed ({len(errors)} error(s)): {errors[0]}"
            ) from errors[0]

    def _reserve_inflight(self, nbytes: int) -> None:
        with self._cond:
            while self._inflight and self._inflight + nbytes > self.max_inflight:
                if self._jobs.failed():
                    break  # a failed move holds its bytes; do not wait for it forever
                self._cond.wait(0.1)
            self._inflight += nbytes

    def _release_inflight(self, nbytes: int) -> None:
        with self._cond:
            self._inflight -= nbytes
            self._cond.notify_all()

    def _unaccount(self, move: _Move | None) -> None:
        """Stop counting ``move`` in the in-flight bytes (store lock held)."""
        if move is not None and move.accounted:
            move.accounted = False
            self._inflight -= move.nbytes
            self._cond.notify_all()

    def _demote_job(self, key: str, entry: _Entry, version: int, move: _Move, dest: int) -> None:
        ok = False
        try:
            with entry.lock:
                with self._lock:
                    if entry.version != version or entry.move is not move:
                        ok = True  # superseded: nothing to write
                        return
                info = entry.info or describe(move.value, key=key)
                self._make_room(dest, info, key, background=True)
                self.tiers[dest].put(key, move.value)
                with self._lock:
                    entry.holders.add(dest)
                    entry.move = None
                    self._touch(dest, key)
                    self._moved_in[dest] += move.nbytes
                ok = True
        finally:
            if ok:  # on failure the value stays in memory, readable, and flush() reports it
                move.release()
                with self._lock:
                    self._unaccount(move)

    def _write_back_job(self, key: str, version: int, nbytes: int) -> None:
        last = len(self.tiers) - 1
        try:
            with self._lock:
                entry = self._entries.get(key)
            if entry is None:
                return
            with entry.lock:
                with self._lock:
                    if entry.version != version or last in entry.holders or not entry.holders:
                        return
                    source = min(entry.holders)
                value = self.tiers[source].get(key)
                info = entry.info or describe(value, key=key)
                self._make_room(last, info, key, background=True)
                self.tiers[last].put(key, value)
                with self._lock:
                    entry.holders.add(last)
                    self._touch(last, key)
                    self._moved_out[source] += nbytes
                    self._moved_in[last] += nbytes
        finally:
            self._release_inflight(nbytes)

    def _prefetch_job(self, key: str, target: int) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise BlobNotFoundError(key, "the tiered store")
            if entry.holders and min(entry.holders) <= target:
                return
            version = entry.version
            move = entry.move
        value = _copy(move.value) if move is not None else self.get(key, promote=False)
        self._promote(key, entry, version, value, target, background=True)


def _copy(value: Value) -> Value:
    return value if isinstance(value, bytes) else value.clone()
