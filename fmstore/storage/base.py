"""The one interface for named files under a root, which the tiers and snapshot levels share.

A :class:`Storage` holds files under one root, addressed by relative names ``"a/b/c"``.  A file
is written whole and becomes visible only once complete; it is read back whole, by byte
ranges, or (for files that may be replaced while read) through a :class:`Reader` of one
version.  Directories are the prefixes of files, as on an object store.  The
implementation is chosen once, by URL (``Storage(url, ...)``); every fault
below the interface becomes a :class:`StorageError` naming the file and the URL, here and
nowhere else.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from ..errors import FmstoreError, StorageError

T = TypeVar("T")

#: Packages whose exceptions are storage faults (an object store's client stack), not bugs.
CLIENT_PACKAGES = frozenset(
    {"botocore", "aiobotocore", "aiohttp", "urllib3", "fsspec", "s3fs", "gcsfs", "adlfs"}
)


def scheme_of(url: str) -> str:
    """The URL's protocol, lower case; a plain path is ``"file"``.  The one place a URL is
    sniffed: the implementation, the fsspec options and a level's default name follow it."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


class Reader(ABC):
    """One version of one file, read in pieces: its first bytes, then the ranges they call for
    (a blob whose header says how much follows).  Only valid inside :meth:`Storage.read_with`."""

    @abstractmethod
    def head(self, n: int) -> tuple[bytes, int]:
        """The file's first ``min(n, size)`` bytes and its size."""

    @abstractmethod
    def read_into(self, ranges: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each ``(offset, dest)``; bytes past the end are :class:`CorruptBlobError`."""


class Storage(ABC):
    """Named files under one root (a path, ``file://``, ``s3://``, ``memory://``, any fsspec URL).

    ``Storage(url, storage_options, ...)`` opens the implementation the URL names (as
    ``pathlib.Path`` gives a ``PosixPath``): ``storage_options`` go to fsspec untouched (S3 gets
    fmstore's timeouts unless they set their own); ``fs``: an already open ``(filesystem, root
    path)`` to share; ``create=False``: a local root that is not there is
    :class:`~fmstore.errors.RootNotFoundError`, not made.  ``part_size``: bytes per ranged read, upload
    part and streamed part; ``concurrency``: parts in flight (and in memory) at once;
    ``io_threads``: the pool local I/O, decoding and filling streamed parts run on.

    Public methods translate faults once (:meth:`_faults`); subclasses implement the ``_``
    methods.  A missing file is ``FileNotFoundError``, an exclusive write's existing file
    ``FileExistsError``; both are asked for by callers and pass untranslated.
    """

    #: Whether files are on this machine's file system, where :meth:`path` names them.
    local: bool = False

    def __new__(cls, url: Any = None, *args: Any, **kwargs: Any) -> Storage:
        if cls is Storage:  # chosen once, by URL
            from .url import storage_class

            cls = storage_class(os.fspath(url), kwargs.get("fs"))
        return super().__new__(cls)

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        io_threads: int = 8,
        part_size: int = 32 << 20,
        concurrency: int = 8,
    ) -> None:
        self.url = os.fspath(url)
        self.part_size = max(1, part_size)
        self.concurrency = max(1, concurrency)
        self.pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="fmstore-io")
        #: Where files live, in the implementation's own terms (a directory, "bucket/prefix").
        self.root = ""

    @contextmanager
    def _faults(self, verb: str, rel: str) -> Iterator[None]:
        """Turn a storage call's faults into :class:`StorageError` naming the file and the URL
        (the original as ``__cause__``).  fmstore's own errors pass, and anything that is not a
        storage fault (a bug) is not hidden."""
        try:
            yield
        except (FileNotFoundError, FileExistsError, FmstoreError):
            raise
        except OSError as e:
            where = f"{verb} {rel or '.'!r} under {self.url!r}"
            raise StorageError.of(e, f"{where} failed: {e.strerror or e}") from e
        except Exception as e:
            if type(e).__module__.split(".")[0] not in CLIENT_PACKAGES:
                raise
            where = f"{verb} {rel or '.'!r} under {self.url!r}"
            raise StorageError(f"{where} failed: {type(e).__name__}: {e}") from e

    @abstractmethod
    def path(self, rel: str) -> str:
        """Where ``rel`` is, in the implementation's terms (a local path, ``bucket/key``)."""

    # ------------------------------------------------------------------ write

    def write(self, rel: str, segments: Sequence[bytes | memoryview], *, exclusive: bool = False) -> int:
        """Write ``rel`` as the concatenation of ``segments`` (not concatenated in memory);
        visible only once complete; returns its size.  ``exclusive``: never replace an existing
        ``rel`` (``FileExistsError``), atomically where the storage can."""
        with self._faults("writing", rel):
            return self._write(rel, segments, exclusive)

    def write_streamed(
        self, rel: str, size: int, fill: Callable[[int, memoryview], None], *, part_size: int | None = None
    ) -> int:
        """Write ``rel`` (``size`` bytes) part by part, for files too large to hold in memory:
        ``fill(offset, buf)`` puts the file's bytes at ``offset`` into ``buf`` (called from
        worker threads, a few parts at once; at most ``concurrency`` parts of ``part_size``
        bytes are in memory).  Visible only once complete; a failed write leaves nothing."""
        with self._faults("writing", rel):
            self._write_streamed(rel, size, fill, max(1, part_size or self.part_size))
            return size

    # ------------------------------------------------------------------ read

    def read_bytes(self, rel: str) -> bytes:
        """A whole (small) file."""
        with self._faults("reading", rel):
            return self._read_bytes(rel)

    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each ``(offset, dest)`` with the file's bytes there (in parallel); bytes past
        the end are :class:`CorruptBlobError`.  For files that are not replaced while read."""
        with self._faults("reading", rel):
            self._read_ranges(rel, ranges)

    def read_with(self, rel: str, use: Callable[[Reader], T]) -> T:
        """``use(reader)`` with a :class:`Reader` of one version of ``rel``: a file replaced
        meanwhile never gives a mix of two versions (``use`` may be called again)."""
        with self._faults("reading", rel):
            return self._read_with(rel, use)

    def size(self, rel: str) -> int:
        with self._faults("asking the size of", rel):
            return self._size(rel)

    def exists(self, rel: str) -> bool:
        with self._faults("looking for", rel):
            return self._exists(rel)

    # ------------------------------------------------------------------ listing and deleting

    def list_dir(self, rel: str = "") -> list[str]:
        """Sorted names directly under ``rel`` (files and directories), temporary files left
        out; a directory that is not there is empty."""
        with self._faults("listing", rel):
            return self._list_dir(rel)

    def scan(self, rel: str = "", *, temp: bool = False) -> Iterator[tuple[str, int]]:
        """(name relative to the root, size) of every file under ``rel``, at any depth;
        temporary files of writes in progress (or of dead writers) only with ``temp``."""
        with self._faults("listing", rel):
            found = list(self._scan(rel, temp))
        return iter(found)

    def delete(self, rel: str) -> None:
        """Remove the file ``rel``; one that is not there is fine.  A directory left empty holds
        nothing; it goes too, but for object stores with real folders (SeaweedFS), which may
        list it until :meth:`delete_dir`."""
        with self._faults("deleting", rel):
            self._delete(rel)

    def delete_dir(self, rel: str) -> None:
        """Remove ``rel`` and everything under it (temporary files of dead writers too)."""
        with self._faults("deleting", rel):
            self._delete_dir(rel)

    def sweep_temp(self, rel: str = "") -> int:
        """Delete the temporary files that writers now dead left for the file ``rel`` or
        anywhere under the directory ``rel``; how many went.  Only local files have them: an
        object store's unfinished upload is invisible (a lifecycle rule frees it)."""
        with self._faults("deleting temporary files of", rel):
            return self._sweep_temp(rel)

    # ------------------------------------------------------------------ conditional requests

    @property
    def conditional(self) -> bool:
        """Whether :meth:`put_if`, :meth:`read_tagged` and :meth:`delete_if` are atomic here
        (S3's conditional requests); where they are not, they raise ``NotImplementedError``."""
        return False

    def put_if(self, rel: str, data: bytes, tag: str | None) -> str:
        """One write of ``data`` to ``rel`` if the file there is still version ``tag`` (None:
        if there is none); returns the new tag.  ``FileExistsError`` when the condition fails."""
        with self._faults("writing", rel):
            return self._put_if(rel, data, tag)

    def read_tagged(self, rel: str) -> tuple[bytes, str]:
        """A small file's bytes and its version tag."""
        with self._faults("reading", rel):
            return self._read_tagged(rel)

    def delete_if(self, rel: str, tag: str) -> bool:
        """Delete ``rel`` if it is still version ``tag``; whether it was deleted."""
        with self._faults("deleting", rel):
            return self._delete_if(rel, tag)

    def _put_if(self, rel: str, data: bytes, tag: str | None) -> str:
        raise NotImplementedError(f"{self!r} has no conditional requests (see .conditional)")

    def _read_tagged(self, rel: str) -> tuple[bytes, str]:
        raise NotImplementedError(f"{self!r} has no conditional requests (see .conditional)")

    def _delete_if(self, rel: str, tag: str) -> bool:
        raise NotImplementedError(f"{self!r} has no conditional requests (see .conditional)")

    # ------------------------------------------------------------------ the rest

    def close(self) -> None:
        """Wait for this storage's I/O threads and stop them; stored files stay."""
        self.pool.shutdown(wait=True)

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # the URL only: storage options may hold credentials
        return f"{type(self).__name__}({self.url!r})"

    # ------------------------------------------------------------------ for implementations

    @abstractmethod
    def _write(self, rel: str, segments: Sequence[bytes | memoryview], exclusive: bool) -> int: ...

    @abstractmethod
    def _write_streamed(
        self, rel: str, size: int, fill: Callable[[int, memoryview], None], part: int
    ) -> None: ...

    @abstractmethod
    def _read_bytes(self, rel: str) -> bytes: ...

    @abstractmethod
    def _read_ranges(self, rel: str, ranges: Sequence[tuple[int, memoryview]]) -> None: ...

    @abstractmethod
    def _read_with(self, rel: str, use: Callable[[Reader], T]) -> T: ...

    @abstractmethod
    def _size(self, rel: str) -> int: ...

    @abstractmethod
    def _exists(self, rel: str) -> bool: ...

    @abstractmethod
    def _list_dir(self, rel: str) -> list[str]: ...

    @abstractmethod
    def _scan(self, rel: str, temp: bool) -> Iterator[tuple[str, int]]: ...

    @abstractmethod
    def _delete(self, rel: str) -> None: ...

    @abstractmethod
    def _delete_dir(self, rel: str) -> None: ...

    def _sweep_temp(self, rel: str) -> int:
        return 0
