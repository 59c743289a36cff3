"""A local (NVMe) cache of a remote snapshot's shard files, for a serving load's second start.

With a remote root (``s3://...``, any URL that is not a local directory) and ``cache=`` (a
directory, or a :class:`~fmstore.TieredStore` of one :class:`~fmstore.LocalTier`), a
:class:`~fmstore.serving.StreamingLoader` reads every shard file through :class:`CachedFiles`:

- A file the cache holds is read from its blob there, by ranges (the blob is the file's bytes
  after the tier's own header), so a second start reads nothing but the manifest remotely.
- A file it does not hold is read remotely, as without a cache, and queued for a *fill*: one
  background thread reads the whole file remotely (a second read of its bytes, while the pieces
  stream) and puts it in the cache, making room by evicting the least recently used files
  (recency: the blob files' mtimes, touched on each use).  The loader's ``close`` waits for the
  fills; a failed fill is a warning, never an error of the load.
- Every piece is still verified against the manifest by the loader.  A piece from the cache
  that fails (checksum, size, header, a missing blob) has its file dropped from the cache
  (:meth:`CachedFiles.drop`, with a warning), read remotely from then on, and refilled.

Keys are ``<root id>/<step dir>/<manifest id>/<file name>``: the root id hashes the root URL
(and endpoint), the manifest id the step's creation time and file table (of the step directory
holding the file: an incremental snapshot's older files are keyed by their own step's
manifest, read once, so they are shared with that step), so a step directory that were
rewritten would not be served the old files.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from ..blob import describe
from ..checkpoint import Manifest, parse_step_dir, read_manifest, step_dir
from ..errors import ConfigError, CorruptBlobError, FmstoreError
from ..storage import LocalStorage, Storage
from ..store import TieredStore
from ..tiers import LocalTier

__all__ = ["CachedFiles", "guarded", "is_remote", "open_cache"]

T = TypeVar("T")


def open_cache(
    cache: str | os.PathLike[str] | TieredStore, cache_bytes: int | str | None
) -> tuple[TieredStore, bool]:
    """(the cache's store, whether the loader owns it and closes it)."""
    if isinstance(cache, TieredStore):
        if len(cache.tiers) != 1 or not isinstance(cache.tiers[0], LocalTier):
            raise ConfigError("a cache store must have one tier, a LocalTier (the files are read by ranges)")
        if cache_bytes is not None:
            raise ConfigError("cache_bytes is for a cache directory; a store has its tier's capacity")
        return cache, False
    return TieredStore([LocalTier(cache, capacity=cache_bytes, name="serving-cache")]), True


def _hash(*parts: object) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(repr(parts).encode())


class CachedFiles:
    """The remote ``storage``'s shard files, read from the cache where it holds them (see the
    module docstring).  Stands in for the storage in the loader and its checkpoint reader."""

    def __init__(
        self,
        storage: Storage,
        manifest: Manifest,
        store: TieredStore,
        *,
        owned: bool,
        endpoint: object = None,
    ) -> None:
        self.remote = storage
        self.store = store
        self.owned = owned
        self.tier: LocalTier = store.tiers[0]  # type: ignore[assignment]
        self.manifest = manifest
        self.root_id = _hash(storage.url.rstrip("/"), endpoint)[:16]
        self._lock = threading.Lock()
        # step directory -> the id of its manifest (None: unknown, its files are not cached)
        self._ids: dict[str, str | None] = {step_dir(manifest.step): _manifest_id(manifest)}
        self._open: dict[str, tuple[str, int] | None] = {}  # file -> (blob file, data offset) or None
        self._ever: set[str] = set()  # files served from the cache at some point
        self._warned: set[str] = set()
        self._queued: set[str] = set()
        self._fills: list[Future[None]] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fmstore-serve-cache")
        self.hits = 0
        self.cache_bytes = 0
        self.remote_bytes = 0
        self.filled_bytes = 0

    def key(self, file: str) -> str | None:
        """``<root id>/<step dir>/<its manifest's id>/<name>``; None: ``file`` is not cached
        (the manifest of the older step directory an incremental snapshot's file is in could
        not be read)."""
        folder, _, name = file.rpartition("/")
        with self._lock:
            known = folder in self._ids
            mid = self._ids.get(folder)
        if not known:
            step = parse_step_dir(folder)
            try:
                mid = _manifest_id(read_manifest(self.remote, step)) if step is not None else None
            except (OSError, FmstoreError):
                mid = None
            with self._lock:
                self._ids[folder] = mid
        return None if mid is None else f"{self.root_id}/{folder}/{mid}/{name}"

    # ------------------------------------------------------------------ the storage's reads

    def __getattr__(self, name: str) -> Any:  # pool, url, ...: the remote storage's
        return getattr(self.remote, name)

    def size(self, file: str) -> int:
        where = self._where(file)
        if where is None:
            return self.remote.size(file)
        rel, offset = where
        return self.tier.storage.size(rel) - offset

    def read_ranges(self, file: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        n = sum(len(mv) for _, mv in ranges)
        where = self._where(file)
        if where is None:
            self.remote.read_ranges(file, ranges)
            with self._lock:
                self.remote_bytes += n
            return
        rel, offset = where
        self.tier.storage.read_ranges(rel, [(offset + a, mv) for a, mv in ranges])
        with self._lock:
            self.hits += 1
            self.cache_bytes += n

    def from_cache(self, file: str) -> bool:
        """Whether ``file`` was read from the cache at some point (an error of it may be the
        cache's: :meth:`drop` it and read it again)."""
        with self._lock:
            return file in self._ever

    def _where(self, file: str) -> tuple[str, int] | None:
        with self._lock:
            if file in self._open:
                return self._open[file]
        key = self.key(file)
        where = None
        if key is not None and key in self.store:
            try:
                rel, offset, info = self.tier.extent(key)
                want = self.manifest.files.get(file)
                if info.dtype != torch.uint8 or (want is not None and info.nbytes != want):
                    raise CorruptBlobError(f"{info.nbytes} bytes cached, the manifest says {want}")
                where = (rel, offset)
                os.utime(self.tier.path_of(key))  # recently used: evicted last
            except (OSError, FmstoreError) as e:
                self.drop(file, e)
                return None
        with self._lock:
            self._open.setdefault(file, where)
            if self._open[file] is not None:
                self._ever.add(file)
            return self._open[file]

    # ------------------------------------------------------------------ fills and drops

    def want(self, files: Sequence[str]) -> None:
        """Queue a fill of each of ``files`` the cache does not hold."""
        for file in files:
            if self._where(file) is None:
                self._fill_later(file)

    def drop(self, file: str, error: BaseException) -> None:
        """``file``'s cached copy failed (``error``): read it remotely from now on, remove the
        copy and refill it.  Warns once per file."""
        with self._lock:
            self._open[file] = None
            first = file not in self._warned
            self._warned.add(file)
        if first:
            warnings.warn(
                f"serving cache: dropped {file!r} of {self.remote.url!r} from {self.tier.root!r} "
                f"({error}); reading it from the root",
                RuntimeWarning,
                stacklevel=2,
            )
        key = self.key(file)
        try:
            if key is not None:
                self.store.delete(key)
        except FmstoreError:
            pass  # not there (any more)
        self._fill_later(file)

    def _fill_later(self, file: str) -> None:
        with self._lock:
            if file in self._queued:
                return
            self._queued.add(file)
            self._fills.append(self._pool.submit(self._fill, file))

    def _fill(self, file: str) -> None:
        key = self.key(file)
        if key is None:
            return
        size = self.remote.size(file)
        want = self.manifest.files.get(file)
        if want is not None and size != want:
            raise CorruptBlobError(f"{file!r} has {size} bytes, the manifest says {want}")
        buf = torch.empty(size, dtype=torch.uint8)
        if size:
            self.remote.read_ranges(file, [(0, memoryview(buf.numpy()))])
        if not self._make_room(key, buf):
            return
        self.store.put(key, buf)
        with self._lock:
            self.filled_bytes += size

    def _make_room(self, key: str, buf: torch.Tensor) -> bool:
        """Evict the least recently used blobs until ``buf`` fits; False if it never could."""
        tier = self.tier
        if tier.capacity is None:
            return True
        need = tier.footprint(describe(buf, key=key))
        if need > tier.capacity:
            return False
        tier.refresh()  # what other processes sharing the directory wrote
        with self._lock:
            open_files = [f for f, w in self._open.items() if w is not None]
        busy = {self.key(f) for f in open_files}  # (key() takes the lock itself)
        while (tier.free_for(key) or 0) < need:
            victims = [k for k in tier.list() if k != key and k not in busy]
            if not victims:
                return False
            victim = min(victims, key=lambda k: _mtime(tier.path_of(k)))
            try:
                self.store.delete(victim)
            except FmstoreError:
                tier.delete(victim, missing_ok=True)  # another process's: not in the store's index
        return True

    def wait(self) -> None:
        """Wait for the fills; a failed one is a warning (the cache is an optimisation)."""
        with self._lock:
            fills, self._fills = self._fills, []
        for f in fills:
            e = f.exception()
            if e is not None:
                warnings.warn(
                    f"serving cache: a fill from {self.remote.url!r} failed: {e}", RuntimeWarning, 2
                )

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
            if self.owned:
                self.store.close()


def _manifest_id(m: Manifest) -> str:
    """Changes if the step directory were written again (its creation time, its files)."""
    return _hash(m.step, m.created, m.world_size, sorted(m.files.items()))[:16]


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def is_remote(storage: Storage) -> bool:
    return not isinstance(storage, LocalStorage)


def guarded(cache: CachedFiles | None, fn: Callable[[], T]) -> T:
    """``fn()``; where it fails on damaged bytes of a file read from the cache, that file is
    dropped from the cache (:meth:`CachedFiles.drop`) and ``fn`` runs again (remotely for it)."""
    retried: set[str] = set()
    while True:
        try:
            return fn()
        except CorruptBlobError as e:  # a ChecksumError too
            file = getattr(e, "file", None)
            if cache is None or file is None or file in retried or not cache.from_cache(file):
                raise
            retried.add(file)
            cache.drop(file, e)
