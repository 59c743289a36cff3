"""One writer per checkpoint root: the lease a writing job's coordinator holds on it.

Two jobs saving to one root would pair one job's manifest with the other's shards, and one
job's retention would delete the files the other's incremental snapshots reference.  So the
first save of a job claims the root, and a second job is refused before it writes anything
(:class:`WriterConflictError`, naming the holder).  How the claim is held:

- **Local disks**: a POSIX record lock on ``<root>/writer.lease`` (``fcntl.lockf``).  The
  kernel releases it when the holder dies, so a killed job's restart takes over at once;
  forked children (data-loader workers) do not inherit it.  Over NFS it relies on the
  server's lock manager.
- **S3**: an object ``<root>/writer.lease`` created with a conditional PUT
  (``If-None-Match: *``) and renewed every ``ttl / 4`` with ``If-Match`` on its ETag.  A
  holder that stops renewing for ``ttl`` seconds (killed, or cut off) is taken over; a
  holder that is alive renews, and that is how a claimant tells the two apart (by its own
  clock, not the holder's).  A holder that loses its lease (a renewal refused) stops
  committing: its next commit raises :class:`WriterConflictError`.
- **Other fsspec back ends** (no atomic conditional write reachable through fsspec): the
  lease is written, read back and checked, which narrows the race but cannot close it.

Within one process the holders are also kept in a table (a POSIX lock cannot tell two of a
process's descriptors apart, and an S3 claimant would otherwise wait for a renewal to see
one), so a second writer of the process is refused at once.  A lease whose owner was dropped
without ``close()`` (a notebook re-running ``ck = Checkpointer(root)``) is *orphaned*: its
owner's finalizer releases it once the saves it promised are committed, and a claimant of
this process waits for that instead of being refused.

Shard files carry the writer's id in their names and a manifest is created, never
replaced, so even a race the lease cannot see (the fallback above) never touches a
committed snapshot: the second commit of a step fails.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import FmstoreError, StorageError, WriterConflictError
from ..storage import Storage

LEASE = "writer.lease"

#: Seconds an S3 lease stays valid without a renewal.
DEFAULT_TTL = 60.0

#: The leases this process holds, by root: (st_dev, st_ino) of a local lease file (POSIX
#: locks are per process, so the kernel would let a second descriptor "take" it), the URL of
#: any other.
_held_here: dict[tuple[int, int] | str, WriterLease] = {}
_held_lock = threading.Lock()
#: Seconds a claimant waits for an orphaned lease of this process quietly before saying so.
NOTICE_S = 2.0


def _describe(body: dict[str, Any], now: float | None = None) -> str:
    age = "" if now is None else f", renewed {max(0.0, now - float(body.get('renewed', now))):.0f} s ago"
    return (
        f"writer {str(body.get('id', '?'))[:8]} (host {body.get('host', '?')!r}, pid {body.get('pid', '?')}, "
        f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(body.get('since', 0))))}{age})"
    )


class WriterLease:
    """The claim of one writer (``owner``, its session id) on ``storage``'s root."""

    def __init__(
        self,
        storage: Storage,
        owner: str,
        *,
        ttl: float = DEFAULT_TTL,
        remove: Callable[[str | None], None] | None = None,
    ) -> None:
        """``remove(tag)``: deletes the lease object at release (its version ``tag`` where the
        store has conditional requests, else None): the root's owner,
        :class:`~fmstore.checkpoint.snapshots.Snapshots`, passes it; without it the object is
        left to expire."""
        self.storage = storage
        self._remove = remove
        self.owner = owner
        self.ttl = ttl
        self._since = time.time()
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        self._tag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._body_text = ""  # what this holder wrote last (names it to claimants of this process)
        self._here: tuple[int, int] | str | None = None  # its key in _held_here while held
        self._orphaned = False  # its owner is gone; released once the owner's saves are done
        self._released = threading.Event()

    def _body(self) -> bytes:
        body = {
            "id": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": self._since,
            "renewed": time.time(),
            "ttl": self.ttl,
        }
        raw = json.dumps(body).encode()
        self._body_text = raw.decode()
        return raw

    @property
    def held(self) -> bool:
        return self._fd is not None or self._tag is not None

    # ------------------------------------------------------------------ acquire

    def acquire(self) -> None:
        """Claim the root, or raise :class:`WriterConflictError` naming the holder.  An S3
        holder that has not renewed is waited for up to ``ttl`` seconds, then taken over."""
        if self.held:
            return
        self._stop = threading.Event()  # a lease released before may be claimed again
        self._released = threading.Event()
        self._lost = None
        self._orphaned = False
        try:
            if self.storage.local:
                self._acquire_local()
            else:
                self._refuse_held_here(self.storage.url)
                if self.storage.conditional:
                    self._acquire_conditional()
                else:
                    self._acquire_fallback()
                with _held_lock:
                    self._here = self.storage.url
                    _held_here.setdefault(self.storage.url, self)
        except FmstoreError:
            raise
        except OSError as e:  # e.g. a read-only root
            raise StorageError.of(
                e, f"cannot claim checkpoint root {self.storage.url!r} for writing: {e.strerror or e}"
            ) from e

    def _conflict(self, body: dict[str, Any], how: str) -> WriterConflictError:
        return WriterConflictError(
            f"checkpoint root {self.storage.url!r} is being written by {_describe(body, time.time())}; {how}. "
            "Two writers on one root would corrupt each other's snapshots: stop the other job, "
            "or save to another root"
        )

    def _holder_here(self, key: tuple[int, int] | str) -> threading.Event | None:
        """Under ``_held_lock``: None if no other lease of this process holds ``key``; the event
        of its release if it is orphaned (to wait for, without the lock); else refuse."""
        holder = _held_here.get(key)
        if holder is None or holder is self:
            return None
        if holder._orphaned:
            return holder._released
        raise self._conflict(
            _parse(holder._body_text.encode()),
            "it is another Checkpointer of this process (or DCP writer), still open: close() it first",
        )

    def _refuse_held_here(self, key: tuple[int, int] | str) -> None:
        """Refuse a root another lease of this process holds; wait for one that is orphaned."""
        while True:
            with _held_lock:
                released = self._holder_here(key)
            if released is None:
                return
            _wait_orphan(released, self.storage.url)

    def _acquire_local(self) -> None:
        path = self.storage.path(LEASE)
        while True:
            with _held_lock:
                try:
                    st = os.stat(path)
                    # (checked before opening: closing any descriptor of the file would drop
                    # this process's POSIX lock on it)
                    released = self._holder_here((st.st_dev, st.st_ino))
                except FileNotFoundError:
                    released = None
                if released is None:
                    self._lock_local(path)
                    return
            _wait_orphan(released, self.storage.url)  # a dropped writer's saves finish first

    def _lock_local(self, path: str) -> None:
        """Under ``_held_lock``, no other lease of this process holding the file: lock it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise self._conflict(
                    _parse(os.pread(fd, 4096, 0)), "it holds the lock on its writer.lease"
                ) from None
            body = self._body()
            os.ftruncate(fd, 0)
            os.pwrite(fd, body, 0)
            st = os.fstat(fd)
            self._key = (st.st_dev, st.st_ino)
            self._here = self._key
            _held_here[self._key] = self
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _acquire_conditional(self) -> None:
        deadline = None
        seen: str | None = None
        delay = 0.5
        while True:
            try:
                self._tag = self.storage.put_if(LEASE, self._body(), None)
                break
            except FileExistsError:
                pass
            try:
                raw, tag = self.storage.read_tagged(LEASE)
            except FileNotFoundError:  # released meanwhile: try to create it again
                continue
            body = _parse(raw)
            if _dead_here(body) or (seen == tag and deadline is not None and time.monotonic() > deadline):
                try:  # stale: take it over, unless someone else was quicker
                    self._tag = self.storage.put_if(LEASE, self._body(), tag)
                    break
                except FileExistsError:
                    seen, deadline = None, None
                    continue
            if seen is not None and tag != seen:
                raise self._conflict(body, "it renewed its lease while this job waited")
            if seen is None:
                seen = tag
                deadline = time.monotonic() + float(body.get("ttl", self.ttl))
            time.sleep(delay)  # the holder renews every ttl/4: a live one shows itself soon
            delay = min(delay * 1.5, max(0.5, self.ttl / 8))
        self._start_renewing()

    def _acquire_fallback(self) -> None:
        try:
            body = _parse(self.storage.read_bytes(LEASE))
            if body.get("id") != self.owner and not _dead_here(body):
                age = time.time() - float(body.get("renewed", 0))
                if age < float(body.get("ttl", self.ttl)):
                    raise self._conflict(body, "its lease has not expired")
        except FileNotFoundError:
            pass
        self.storage.write(LEASE, [self._body()])
        back = _parse(self.storage.read_bytes(LEASE))  # one read: the body compared is the one named
        if back.get("id") != self.owner:
            raise self._conflict(back, "it claimed the root at the same time")
        self._tag = "fallback"
        self._start_renewing()

    # ------------------------------------------------------------------ hold

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, name="fmstore-lease", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl / 4):
            try:
                if self.storage.conditional:
                    assert self._tag is not None
                    self._tag = self.storage.put_if(LEASE, self._body(), self._tag)
                else:
                    self.storage.write(LEASE, [self._body()])
                last_ok = time.monotonic()
            except FileExistsError:
                self._lost = "another writer took over its lease"
                return
            except Exception:  # noqa: BLE001 - storage down: retry; past the ttl it is lost
                if time.monotonic() - last_ok > self.ttl:
                    self._lost = f"its lease was not renewed for {self.ttl:.0f} s (storage unreachable)"
                    return

    def check(self) -> None:
        """Before a commit or a deletion: raise if this writer no longer holds the root."""
        if self._lost is not None:
            raise WriterConflictError(
                f"this writer no longer holds checkpoint root {self.storage.url!r}: {self._lost}; "
                "nothing more is committed or deleted there"
            )

    def orphan(self) -> None:
        """Its owner was dropped without closing: claimants of this process wait for its
        release (which follows the owner's last commit) instead of being refused."""
        self._orphaned = True

    def release(self) -> None:
        """Give the root up (idempotent; safe from any thread, the renewer's included)."""
        self._stop.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join()
        try:
            self._give_up()
        finally:
            with _held_lock:
                if self._here is not None and _held_here.get(self._here) is self:
                    del _held_here[self._here]
                self._here = None
            self._released.set()

    def _give_up(self) -> None:
        if self._fd is not None:
            # Closed under the table's lock: a claimant of this process opening the file
            # meanwhile would have its lock dropped by this close (POSIX locks are per process).
            with _held_lock:
                os.close(self._fd)  # releases the lock (the file stays: deleting it would race a claimant)
                self._fd = None
        elif self._tag is not None:
            tag, self._tag = self._tag, None
            if self._lost is None and self._remove is not None:
                try:
                    if self.storage.conditional:
                        self._remove(tag)
                    elif _parse(self.storage.read_bytes(LEASE)).get("id") == self.owner:
                        self._remove(None)
                except Exception:  # noqa: BLE001 - it expires by itself
                    pass


def _wait_orphan(released: threading.Event, url: str) -> None:
    """Wait for a dropped writer of this process to finish its saves and release ``url``."""
    if not released.wait(NOTICE_S):
        print(
            f"fmstore: waiting for a dropped Checkpointer's saves to {url!r} to finish before claiming it ...",
            file=sys.stderr,
            flush=True,
        )
        released.wait()


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _dead_here(body: dict[str, Any]) -> bool:
    """A holder on this host whose process is gone (a killed job restarted on its node)."""
    if body.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(body.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return False
