"""Committed snapshots opened for reading, outside any :class:`Checkpointer`.

A :class:`Root` is a checkpoint root (a local directory or a URL, with ``storage_options``) seen
by a reader: its committed steps, the steps a writer left without a manifest, and each step's
:class:`Snapshot`.  A snapshot lists its tensors (dtype, global shape, shards, codec chain,
stored against raw bytes, and where the bytes live: a tensor that did not change is stored in
an earlier snapshot's file and referenced), reads one tensor or a slice of it, and verifies
every checksum.  The ``fmstore`` command and :meth:`Checkpointer.load` read through the same
:class:`~fmstore.checkpoint.reader.SnapshotReader`.

    >>> with Root("fmstore-data/ckpt") as root:                       # doctest: +SKIP
    ...     snap = root.snapshot()                                      # the newest step
    ...     w = snap.read("model/w")                                    # a CPU tensor
    ...     bad = snap.verify()                                         # [] when intact
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CorruptBlobError
from ..storage import Storage
from .listing import SnapshotNotFoundError, committed_steps, read_manifest
from .manifest import (
    MANIFEST,
    Manifest,
    ManifestError,
    Shard,
    TensorEntry,
    dtype_itemsize,
    numel,
    parse_step_dir,
    step_dir,
)
from .tree import unflatten

if TYPE_CHECKING:
    import torch

    from .reader import SnapshotReader

# torch, the codec registry and the reader are imported where tensors are read or codecs named:
# listing a root and inspecting a manifest of raw shards (``fmstore ls``/``inspect``) import no
# torch.


@dataclass(frozen=True)
class ShardInfo:
    """One saved piece of a tensor and where its bytes are."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    file: str  # relative to the root
    begin: int
    end: int
    codec: tuple[dict[str, Any], ...]  # the manifest's codec entries ({"name", "configuration"}); empty: raw
    referenced: bool  # the bytes are in an earlier snapshot's file (an incremental reference)

    @property
    def codec_label(self) -> str:
        """``raw``, or the codec as ``name/configuration values`` (``fmhs/2``)."""
        if not self.codec:
            return "raw"
        from ..codec import registry

        return "+".join(registry.get(c).label for c in self.codec)

    @property
    def stored_bytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shards: tuple[ShardInfo, ...]

    @property
    def raw_bytes(self) -> int:
        return numel(self.shape) * dtype_itemsize(self.dtype)

    @property
    def stored_bytes(self) -> int:
        return sum(s.stored_bytes for s in self.shards)

    @property
    def referenced_bytes(self) -> int:
        """Stored bytes that live in earlier snapshots' files."""
        return sum(s.stored_bytes for s in self.shards if s.referenced)

    @property
    def codecs(self) -> list[str]:
        """The distinct codecs of its shards (``raw``, ``planes-zstd/4``, ``fmhs/2``, ...)."""
        return sorted({s.codec_label for s in self.shards})

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "referenced_bytes": self.referenced_bytes,
            "codecs": self.codecs,
            "shards": [
                {
                    "offsets": list(s.offsets),
                    "lengths": list(s.lengths),
                    "file": s.file,
                    "begin": s.begin,
                    "end": s.end,
                    "codec": list(s.codec),
                    "referenced": s.referenced,
                }
                for s in self.shards
            ],
        }


@dataclass(frozen=True)
class Problem:
    """A tensor that failed verification: which, in which file, and why."""

    tensor: str
    file: str | None
    chunk: int | None
    message: str


class Snapshot:
    """One committed snapshot of a root (see the module docstring)."""

    def __init__(self, storage: Storage, manifest: Manifest) -> None:
        self.storage = storage
        self.manifest = manifest
        self._reader_: SnapshotReader | None = None
        self._reader_lock = threading.Lock()

    @property
    def _reader(self) -> SnapshotReader:
        """The reader of its tensors, made on the first read (it imports torch; listing does not
        need it).  Under a lock: ``verify`` reads from several threads."""
        with self._reader_lock:
            if self._reader_ is None:
                from .reader import SnapshotReader

                self._reader_ = SnapshotReader(self.storage, self.manifest)
            return self._reader_

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def url(self) -> str:
        return f"{self.storage.url.rstrip('/')}/{step_dir(self.step)}"

    @property
    def created(self) -> float:
        return self.manifest.created

    @property
    def world_size(self) -> int:
        return self.manifest.world_size

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.meta

    @property
    def written_bytes(self) -> int:
        """The bytes of the files this snapshot wrote itself (incremental references excluded)."""
        return sum(self.manifest.files.values())

    def tensors(self, pattern: str | None = None) -> list[TensorInfo]:
        """Its tensors in name order; ``pattern``: only names matching this glob (``model/*``)."""
        names = sorted(self.manifest.tensors)
        if pattern is not None:
            names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        return [self._info(n, self.manifest.tensors[n]) for n in names]

    def tensor(self, name: str) -> TensorInfo:
        return self._info(name, self._entry(name))

    def _entry(self, name: str) -> TensorEntry:
        entry = self.manifest.tensors.get(name)
        if entry is None:
            raise SnapshotNotFoundError(
                f"snapshot step {self.step} under {self.storage.url!r} has no tensor {name!r}"
            )
        return entry

    def _info(self, name: str, e: TensorEntry) -> TensorInfo:
        own = step_dir(self.step) + "/"
        shards = tuple(
            ShardInfo(
                tuple(s.offsets),
                tuple(s.lengths),
                s.file,
                s.begin,
                s.end,
                tuple(dict(c) for c in s.codec),
                not s.file.startswith(own),
            )
            for s in e.shards
        )
        return TensorInfo(name, e.dtype, tuple(e.shape), shards)

    def read(
        self,
        name: str,
        *,
        offsets: tuple[int, ...] | None = None,
        shape: tuple[int, ...] | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tensor ``name`` (whole, or the slice of ``shape`` starting at ``offsets``), verified,
        into ``out`` or a new CPU tensor."""
        entry = self._entry(name)
        gshape = tuple(entry.shape)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(gshape)
        shape = tuple(shape) if shape is not None else tuple(g - o for g, o in zip(gshape, offsets))
        if (
            len(offsets) != len(gshape)
            or len(shape) != len(gshape)
            or any(o < 0 or n < 0 or o + n > g for o, n, g in zip(offsets, shape, gshape))
        ):
            raise SnapshotNotFoundError(
                f"tensor {name!r} of shape {list(gshape)} has no region at offsets {list(offsets)} of shape {list(shape)}"
            )
        import torch

        from ..blob import dtype_from_name
        from .reader import Region

        if out is None:  # its files hold what the manifest says, before the tensor is allocated
            self._reader.check_files([name])
        dest = out if out is not None else torch.empty(shape, dtype=dtype_from_name(entry.dtype))
        self._reader.read([Region(name, offsets, dest)])
        return dest

    def state(self) -> Any:
        """The whole saved state (rank 0's view of per-rank values), tensors on the CPU."""
        out = {name: self.read(name) for name in self.manifest.tensors}
        return unflatten(self.manifest.tree, out, 0)

    def verify(
        self,
        names: list[str] | None = None,
        *,
        threads: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Problem]:
        """Read back every tensor (or ``names``) and check every chunk of it, tensors in
        parallel (default: a thread per core, up to 8, for local files; 16 for object storage);
        the tensors that fail, each with its file and chunk ([] when all are intact).
        ``progress(nbytes)`` is called as each tensor's stored bytes are checked."""
        from .reader import ChecksumError, verify_all

        infos = {t.name: t for t in self.tensors()}
        todo = [infos[n] for n in (names if names is not None else sorted(infos))]
        problems: dict[str, Problem] = {}
        # Each file's size and safetensors header first (as a load checks them): a tensor in
        # a file that fails is reported with it, and its chunks are not read.
        for file in sorted({s.file for t in todo for s in t.shards}):
            try:
                self._reader.check_file(file)
            except CorruptBlobError as e:
                for t in todo:
                    if t.name not in problems and any(s.file == file for s in t.shards):
                        problems[t.name] = Problem(t.name, file, None, str(e))
        if problems:
            if progress is not None:
                progress(sum(infos[n].stored_bytes for n in problems))
            todo = [t for t in todo if t.name not in problems]
        # Raw shards: a window of whole checksum chunks at a time read (through the storage
        # layer) into this thread's reused buffer and checked by the reader's own chunk check,
        # windows in parallel (nothing is kept).  Coded shards: read through the reader, which
        # decodes and checks them.
        raw = [t for t in todo if all(not s.codec for s in self.manifest.tensors[t.name].shards)]
        windows = [
            (t.name, shard, a, n)
            for t in raw
            for shard in self.manifest.tensors[t.name].shards
            for a, n in _windows(shard)
        ]
        raw_names = {t.name for t in raw}
        coded = [t for t in todo if t.name not in raw_names]
        local = threading.local()
        lock = threading.Lock()

        def check_window(job: tuple[str, Shard, int, int]) -> None:
            name, shard, a, n = job
            problem = None
            try:
                buf = getattr(local, "buf", None)
                if buf is None or len(buf) < n:
                    buf = local.buf = bytearray(n)
                view = memoryview(buf)[:n]
                self.storage.read_ranges(shard.file, [(shard.begin + a, view)])
                verify_all([(name, shard, view, a)], self.step, None)
            except ChecksumError as e:
                problem = Problem(name, e.file, e.chunk, str(e))
            except FileNotFoundError:
                problem = Problem(
                    name, shard.file, None, f"snapshot step {self.step}: shard file {shard.file!r} is missing"
                )
            except CorruptBlobError as e:  # a truncated file
                problem = Problem(name, shard.file, a // shard.chunk_size, f"snapshot step {self.step}: {e}")
            finally:
                if progress is not None:
                    progress(n)
            if problem is not None:
                with lock:
                    if name not in problems or (problem.chunk or 0) < (problems[name].chunk or 0):
                        problems[name] = problem

        def check_coded(t: TensorInfo) -> None:
            try:
                self.read(t.name)
            except ChecksumError as e:
                problem = Problem(t.name, e.file, e.chunk, str(e))
            except CorruptBlobError as e:  # a missing or truncated file, a bad codec header
                files = sorted({s.file for s in t.shards})
                where = getattr(e, "file", None) or (files[0] if len(files) == 1 else None)
                problem = Problem(t.name, where, None, str(e))
            else:
                problem = None
            finally:
                if progress is not None:
                    progress(t.stored_bytes)
            if problem is not None:
                with lock:
                    problems[t.name] = problem

        # Local files: hashing is the work, a thread a core; object storage: requests in flight.
        default = min(8, os.cpu_count() or 1) if self.storage.local else 16
        workers = max(1, threads or default)
        with ThreadPoolExecutor(workers, thread_name_prefix="fmstore-verify") as pool:
            list(pool.map(check_window, windows))
            list(pool.map(check_coded, coded))
        order = names if names is not None else sorted(infos)
        return [problems[n] for n in order if n in problems]

    def __repr__(self) -> str:
        return f"Snapshot({self.url!r}, {len(self.manifest.tensors)} tensors)"


#: The bytes of a raw shard :meth:`Snapshot.verify` reads back at once (whole checksum chunks).
VERIFY_WINDOW = 16 << 20


def _windows(shard: Shard) -> list[tuple[int, int]]:
    """(start in the shard, bytes) of the windows of whole checksum chunks a raw shard is read
    back in (a shard without chunk digests is a manifest error; an empty one has none)."""
    n = shard.end - shard.begin
    if not n:
        return []
    cs = shard.chunk_size
    if cs <= 0:
        raise ManifestError(f"{shard.file!r}: a raw shard without chunk checksums (chunk_size {cs})")
    step = max(1, VERIFY_WINDOW // cs) * cs
    return [(a, min(step, n - a)) for a in range(0, n, step)]


class Root:
    """A checkpoint root opened for reading (``url``: a directory, ``file://``, ``s3://``, ...)."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        self.storage = Storage(url, storage_options, create=False)

    @property
    def url(self) -> str:
        return self.storage.url

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return committed_steps(self.storage)

    def incomplete(self) -> list[int]:
        """Steps with a directory but no manifest: being written now, or left by a crash."""
        out = []
        for name in self.storage.list_dir():
            step = parse_step_dir(name)
            if step is not None and not self.storage.exists(f"{name}/{MANIFEST}"):
                out.append(step)
        return sorted(out)

    def files(self, step: int) -> list[str]:
        """The files under ``step``'s directory, relative to the root (temp files left out)."""
        name = step_dir(step)
        return [f"{name}/{f}" for f in self.storage.list_dir(name)]

    def snapshot(self, step: int | None = None) -> Snapshot:
        """The committed snapshot of ``step`` (default: the newest)."""
        return Snapshot(self.storage, read_manifest(self.storage, step))

    def snapshots(self) -> Iterator[Snapshot]:
        for step in self.steps():
            try:
                yield self.snapshot(step)
            except SnapshotNotFoundError:  # removed since the listing (retention)
                continue

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # the URL only: storage_options may hold credentials
        return f"Root({self.url!r})"
