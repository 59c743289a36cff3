"""The snapshot manifest: the one JSON document that makes a snapshot exist.

Layout under a checkpoint root::

    step-0000000100/1a2b3c4d-shard-r00000.safetensors   shard files (valid safetensors)
    step-0000000100/1a2b3c4d-kept-r00000.safetensors    unchanged tensors copied forward
    step-0000000100/manifest.json                       written last, by the coordinator

A shard file's prefix hashes the writer and the rank, so no two writers write one file.

The manifest records, for every tensor, its global shape and dtype and each saved shard's
slice (offsets/lengths), the file holding its bytes (possibly in an earlier snapshot, for
data that did not change), the byte range in that file, the codec chain and a checksum of
the original bytes; plus the JSON tree of the whole state.  Paths are relative to the root
and checked on load: a manifest cannot point outside the checkpoint.  Everything else a load
trusts (dtypes, shapes, byte ranges, chunk sizes, coded sizes, the tree) is validated when
the manifest is read, before anything is allocated or read for it (:meth:`Manifest.validate`).

Reading a manifest imports no torch (``fmstore ls`` lists a root in a fraction of a second):
dtype sizes come from a table here, and the codec registry is loaded only for a manifest that
records a codec.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from ..errors import CorruptBlobError, FmstoreError, ManifestError
from ..gcpause import paused_gc
from .shardtable import ShardTable, TableError
from .tree import MISSING, path_text, per_rank_ranks, subtree, tensor_leaves, unflatten
from .tree import arrays_as_tensors as _arrays_read_as_tensors

if TYPE_CHECKING:  # TensorEntry.torch_dtype's annotation: reading a manifest imports no torch
    import torch

    from .manifest_check import ByFile

FORMAT = "fmstore.snapshot"
#: Checksum chunk: a partial read (resharding) verifies just the chunks it touches.
CHUNK_SIZE = 16 << 20
#: The chunk sizes a manifest may record: a load makes one hash job per chunk, and hashes
#: a chunk in one piece.
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 4 << 10, 1 << 30
#: How deep a state tree may nest (rebuilding it recurses; real states are a few levels).
MAX_TREE_DEPTH = 200
#: Bounds on a tensor's shape: its rank, and its elements (beyond any real tensor, and what
#: keeps every count and byte offset a load computes within 64 bits).
MAX_DIMS, MAX_NUMEL = 64, 1 << 53
#: 3: the shards as the columns of a shard table (:mod:`.shardtable`); 2: a JSON object per
#: shard, codecs as {"name", "configuration"} entries; 1: codecs as chains of strings.  All
#: three are read (:mod:`.manifest_compat` reads and writes the older two).
VERSION = 3
READS = (1, 2, 3)
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{10})$")
_FILE = re.compile(r"^step-(\d{10})/[A-Za-z0-9._-]+\.safetensors$")


def step_dir(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**10:
        raise FmstoreError(f"step must be an int in [0, 1e10), got {step!r}")
    return f"step-{step:010d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


@dataclass
class Shard:
    """One saved piece of a tensor and where its bytes are."""

    offsets: list[int]  # where the piece starts in the global tensor, per dimension
    lengths: list[int]  # its extent per dimension
    file: str  # relative to the checkpoint root: "step-XXXXXXXXXX/<name>.safetensors"
    begin: int  # byte range in the file
    end: int
    checksum: str  # "xxh3_128:<hex>" over the chunk digests: equal iff every chunk is
    codec: list[dict[str, Any]] = field(default_factory=list)  # [] raw, else [{"name", "configuration"}]
    chunk_size: int = 0  # the original bytes are checked in chunks of this many bytes...
    chunks: list[str] = field(default_factory=list)  # ...each with its xxh3_128 hex digest


class TensorEntry:
    """A tensor of a snapshot: its dtype, global shape and saved shards.  Built from a list of
    :class:`Shard` (a rank's own write), or as rows ``rows`` of a :class:`ShardTable` (a
    merged or read manifest), whose ``shards`` are made when first asked for."""

    __slots__ = ("dtype", "shape", "_shards", "table", "rows")

    def __init__(
        self,
        dtype: str,
        shape: list[int],
        shards: list[Shard] | None = None,
        *,
        table: ShardTable | None = None,
        rows: tuple[int, int] = (0, 0),
    ) -> None:
        self.dtype, self.shape = dtype, shape
        self._shards = shards if shards is not None or table is not None else []
        self.table, self.rows = table, rows

    @property
    def shards(self) -> list[Shard]:
        if self._shards is None:
            assert self.table is not None
            self._shards = self.table.shards(*self.rows, len(self.shape))
        return self._shards

    @shards.setter
    def shards(self, value: list[Shard]) -> None:
        self._shards, self.table = value, None

    @property
    def nshards(self) -> int:
        return self.rows[1] - self.rows[0] if self._shards is None else len(self._shards)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The tensor's dtype as a ``torch.dtype`` (``dtype`` is the manifest's name for it;
        this imports torch)."""
        from ..blob import dtype_from_name

        return dtype_from_name(self.dtype)

    def files(self) -> set[str]:
        """The files holding a shard of this tensor."""
        if self._shards is None:
            a, b = self.rows
            t = self.table
            return {t.files[i] for i in np.unique(t.file[a:b]).tolist()}  # type: ignore[union-attr]
        return {s.file for s in self._shards}

    def overlaps(
        self, off: tuple[int, ...], ln: tuple[int, ...]
    ) -> list[tuple[Shard, tuple[int, ...], tuple[int, ...], bool]]:
        """:func:`.sharding.overlaps` of this tensor's shards with the box ``off``/``ln``; from
        the table where there is one (array arithmetic, and Shard objects only for the shards
        that meet the box: a resharded load meets a few of a tensor's shards, one per saved rank)."""
        if self._shards is not None:
            from .sharding import overlaps  # imports torch: reading a manifest does not

            return overlaps(self._shards, off, ln)
        return self.meeting(off, ln).overlaps()

    def meeting(self, off: tuple[int, ...], ln: tuple[int, ...]) -> Meeting:
        """The rows of this (table) tensor's shards that meet the box ``off``/``ln``, as
        columns: what a reader plans from without making a Shard object per row."""
        table = self.table
        assert table is not None  # (its shards, where made, were made from it)
        rows, ov_off, ov_len = table.meeting(*self.rows, off, ln)
        if off:
            o, k = table.offsets[rows, 1 : len(off)], table.lengths[rows, 1 : len(off)]
            same = ((o == np.asarray(off[1:], np.int64)) & (k == np.asarray(ln[1:], np.int64))).all(axis=1)
        else:
            same = np.zeros(len(rows), dtype=bool)
        return Meeting(table, len(off), rows, ov_off, ov_len, same)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorEntry):
            return NotImplemented
        return (self.dtype, self.shape, self.shards) == (other.dtype, other.shape, other.shards)

    def __repr__(self) -> str:
        return f"TensorEntry(dtype={self.dtype!r}, shape={self.shape!r}, shards=<{self.nshards}>)"


@dataclass
class Meeting:
    """The shards of one tensor a box meets, as rows of its :class:`ShardTable`: the rows, the
    overlaps' offsets and lengths (``rows x ndim``) and whether each shard has the box's
    extent in every dimension but the first (its overlap is then a run of whole rows)."""

    table: ShardTable
    ndim: int
    rows: np.ndarray
    off: np.ndarray
    len: np.ndarray
    same: np.ndarray

    def files(self) -> set[str]:
        t = self.table
        return {t.files[i] for i in np.unique(t.file[self.rows]).tolist()}

    def overlaps(
        self, which: np.ndarray | None = None
    ) -> list[tuple[Shard, tuple[int, ...], tuple[int, ...], bool]]:
        """:func:`.sharding.overlaps`' form of the rows (of ``which`` of them: a bool mask)."""
        rows, off, ln, same = self.rows, self.off, self.len, self.same
        if which is not None:
            rows, off, ln, same = rows[which], off[which], ln[which], same[which]
        shards = self.table.shards_of(rows, self.ndim)
        if not self.ndim:
            return [(s, (), (), False) for s in shards]
        return [
            (s, tuple(a), tuple(b), r) for s, a, b, r in zip(shards, off.tolist(), ln.tolist(), same.tolist())
        ]


#: What :func:`seal` puts before the digest, as the manifest's last member.
_SEAL = b',"seal":"xxh3_128:'
#: The seal's length: that, 32 hex digits, the closing quote and brace.
_SEALED = len(_SEAL) + 32 + 2
_HEX = re.compile(r"[0-9a-f]{32}")


def seal(raw: bytes) -> bytes:
    """A manifest's JSON object ``raw`` with a last member ``"seal"``: the xxh3-128 of ``raw``
    itself.  It is what makes a manifest :attr:`~Manifest.sealed` when read: any change to
    its bytes (an edit, a torn or damaged copy) leaves a seal that does not match."""
    assert raw.endswith(b"}")
    return raw[:-1] + _SEAL + xxhash.xxh3_128_hexdigest(raw).encode() + b'"}'


def is_sealed(raw: bytes) -> bool:
    """Whether ``raw`` ends with the seal of the rest (:func:`seal`): 2 ms for 13 MB."""
    if len(raw) < _SEALED or raw[-_SEALED:-34] != _SEAL or raw[-2:] != b'"}':
        return False
    h = xxhash.xxh3_128()
    h.update(memoryview(raw)[:-_SEALED])
    h.update(b"}")
    return h.hexdigest().encode() == raw[-34:-2]


def headers_of(x: Any) -> dict[str, str]:
    """The ``headers`` member: file name -> a 32-hex-digit digest."""
    if not (isinstance(x, dict) and all(isinstance(v, str) and _HEX.fullmatch(v) for v in x.values())):
        raise ValueError("'headers' is not an object of xxh3-128 hex digests")
    return {str(k): v for k, v in x.items()}


@dataclass
class Manifest:
    step: int
    world_size: int
    tensors: dict[str, TensorEntry]
    tree: dict[str, Any]
    files: dict[str, int]  # files this snapshot wrote -> size in bytes
    created: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)
    #: Files this snapshot wrote -> the xxh3-128 of the safetensors header written there (as
    #: its bytes begin the file), where the writer reported it: see :attr:`sealed`.
    headers: dict[str, str] = field(default_factory=dict)
    #: Whether the manifest read was byte for byte the one its writer sealed (:func:`seal`).
    #: Then a shard file whose header has the digest in :attr:`headers` holds the header its
    #: writer made from these very entries, and a reader need not parse it to check it
    #: (:func:`~fmstore.checkpoint.shardfile.check_shard_file`); an edited or damaged
    #: manifest gets the whole check, which finds names or dtypes that no longer match.
    sealed: bool = field(default=False, compare=False, repr=False)

    def to_json(self) -> bytes:
        """The manifest's JSON (version 3), compact: the tensors' names, dtypes and shapes, and
        every shard as a row of the shard table (:mod:`.shardtable`)."""
        body = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "world_size": self.world_size,
            **tensors_body(self.tensors),
            "tree": self.tree,
            "files": self.files,
            "created": self.created,
            "meta": self.meta,
            "headers": self.headers,
        }
        return seal(json.dumps(body, separators=(",", ":")).encode())

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> Manifest:
        # A version-2 manifest of a large job is millions of objects, none of them garbage:
        # the collector would only rescan them, many times over (2-4x the parse).
        with paused_gc():
            return cls._from_json(raw, where)

    @classmethod
    def _from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: manifest is not JSON ({e})") from None
        except RecursionError:  # the parser's own limit, on hostile nesting
            raise ManifestError(f"{where}: manifest JSON is nested too deeply") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ManifestError(f"{where}: not an fmstore snapshot manifest")
        version = body.get("version")
        if version not in READS:
            raise ManifestError(
                f"{where}: manifest version {version!r}; this fmstore reads versions {list(READS)}"
            )
        try:
            if version == 3:
                tensors = tensors_of_table(body["tensors"], body["shards"])
            else:
                from .manifest_compat import tensors_of_v2

                tensors = tensors_of_v2(body["tensors"], version, where)
            m = cls(
                step=_count(body["step"], "step"),
                world_size=_count(body["world_size"], "world_size"),
                tensors=tensors,
                tree=body["tree"],
                files={str(k): _count(v, f"files[{k!r}]") for k, v in body["files"].items()},
                created=float(body.get("created", 0.0)),
                meta=dict(body.get("meta", {})),
                headers=headers_of(body.get("headers", {})),
                sealed=is_sealed(raw),
            )
        except TableError as e:
            raise ManifestError(f"{where}: malformed manifest (shard table: {e})") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        """Everything a load trusts before it allocates or reads: each shard names a shard file
        of this or an earlier snapshot of the root, lies inside its tensor's shape, and its byte
        range, checksum chunks and codec fit its size; the shards cover the tensor; the tree is
        well formed and names only tensors of the table.  A shard in an earlier snapshot's file
        is checked against that file's real size when a load opens it (the reader).

        The shards are checked as the columns of the shard table, a column at a time (a large
        job's table has a shard per rank and tensor); the first row that fails a check is
        named in the error (:mod:`.manifest_check`)."""
        from .manifest_check import validate

        validate(self, where)

    def shards_by_file(self) -> ByFile:
        """File -> every shard in it as a :class:`.manifest_check.FileShard` (tensor, byte
        range, dtype, shape, coded or not): what a reader checks a file's header against.
        The lists are made when first asked for (a large job's table has 512 k rows; a load
        reads a few of its files)."""
        from .manifest_check import ByFile

        return ByFile(self)

    def referenced_files(self) -> set[str]:
        out: set[str] = set()
        tables = {}
        for e in self.tensors.values():
            if e._shards is None:
                tables[id(e.table)] = e.table
            else:
                out.update(s.file for s in e._shards)
        for t in tables.values():
            out.update(t.files[i] for i in np.unique(t.file).tolist())
        return out

    def state(
        self,
        path: tuple[Any, ...] = (),
        rank: int = 0,
        *,
        tensor: Callable[[str], Any] | None = None,
        arrays_as_tensors: bool = False,
    ) -> Any:
        """The state saved at ``path`` (keys from the root; under per-rank state, ``rank``'s
        own), rebuilt from this manifest alone: no tensor data is read, and the tree's encoding
        stays inside this class.

        Plain values come back as saved.  Each tensor leaf is ``tensor(name)`` (for example an
        empty tensor of ``self.tensors[name]``'s shape and :attr:`TensorEntry.torch_dtype`: a
        load target for exactly what was saved); without ``tensor`` the tensors are left out,
        as a load leaves out what it was not asked for.  A numpy-array leaf is
        ``tensor(name).numpy()``, or the tensor itself with ``arrays_as_tensors``.  Raises
        :class:`KeyError` where nothing is saved at ``path`` for ``rank``."""
        node = subtree(self.tree, tuple(path), rank)
        value = MISSING
        if node is not None:
            if arrays_as_tensors:
                node = _arrays_read_as_tensors(node)
            names = tensor_leaves(node, rank).values() if tensor is not None else ()
            value = unflatten(node, {name: tensor(name) for name in names}, rank)  # type: ignore[misc]
        if value is MISSING:
            raise KeyError(
                f"snapshot step {self.step} holds no state at {path_text(tuple(path))!r} for rank {rank}"
            )
        return value

    def saved_ranks(self, path: tuple[Any, ...]) -> list[int] | None:
        """The ranks that saved the per-rank state at ``path`` (keys from the root: a Stateful
        with ``fmstore_per_rank = True``, an :class:`~fmstore.checkpoint.RNGState`), in order;
        None where ``path`` holds no per-rank state."""
        return per_rank_ranks(self.tree, tuple(path))


def tensors_body(tensors: dict[str, TensorEntry]) -> dict[str, Any]:
    """The ``tensors`` (names, dtypes, shapes) and ``shards`` (the shard table) of a
    version-3 manifest's JSON, and of a rank's report."""
    return {
        "tensors": {
            "names": list(tensors),
            "dtypes": [e.dtype for e in tensors.values()],
            "shapes": [e.shape for e in tensors.values()],
        },
        "shards": table_of(tensors).to_body(),
    }


def table_of(tensors: dict[str, TensorEntry]) -> ShardTable:
    """The shard table of ``tensors`` in their order: the one they are rows of, where they are
    all of it in order (a merged or read manifest), else one built from their shards.  A
    shard field of the wrong type is a :class:`TableError` naming the row."""
    entries = list(tensors.values())
    first = entries[0].table if entries else None
    if first is not None and all(e.table is first and e._shards is None for e in entries):
        bounds = [e.rows for e in entries]
        if (
            bounds[0][0] == 0
            and bounds[-1][1] == first.rows
            and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        ):
            counts = np.array([b - a for a, b in bounds], dtype=np.int64)
            if np.array_equal(first.tensor, np.repeat(np.arange(len(entries)), counts)):
                return first
    ndims = [len(e.shape) if isinstance(e.shape, list) else 0 for e in entries]
    return ShardTable.of_shards(
        ((i, s) for i, e in enumerate(entries) for s in e.shards), max(ndims, default=0), ndims
    )


def tensors_of_table(tbody: Any, sbody: Any) -> dict[str, TensorEntry]:
    """The tensor entries of a version-3 manifest (or a report): rows of its shard table, one
    tensor's shards together, in the order of the tensors."""
    names, dtypes, shapes = tbody["names"], tbody["dtypes"], tbody["shapes"]
    if not (type(names) is list and type(dtypes) is list and type(shapes) is list):
        raise TableError("tensors' names, dtypes and shapes are not lists")
    if not len(names) == len(dtypes) == len(shapes) or not all(type(n) is str for n in names):
        raise TableError("tensors' names, dtypes and shapes do not match")
    if len(set(names)) != len(names):
        raise TableError("a tensor name is listed twice")
    table = ShardTable.from_body(sbody)
    t = table.tensor
    if table.rows and (t.min() < 0 or t.max() >= len(names) or (np.diff(t) < 0).any()):
        raise TableError("rows are not grouped by tensor in the tensors' order")
    ends = np.cumsum(np.bincount(t, minlength=len(names))).tolist() if names else []
    starts = [0, *ends[:-1]]
    return {
        n: TensorEntry(d, s, table=table, rows=(a, b))
        for n, d, s, a, b in zip(names, dtypes, shapes, starts, ends)
    }


def _count(x: Any, what: str) -> int:
    """``x`` if it is a whole number >= 0: not a float (``Infinity``, which Python's json reads,
    or 2.5 that int() would quietly make 2), a bool or a string."""
    if not _int(x) or x < 0:
        raise ValueError(f"{what} is {x!r}, not a whole number >= 0")
    return int(x)


def _int(x: Any) -> bool:
    return type(x) is int or (isinstance(x, int) and not isinstance(x, bool))


def _ints(xs: Any) -> bool:
    """A list of ints >= 0 (a shape, offsets, lengths)."""
    if not isinstance(xs, list):
        return False
    for x in xs:  # a loop, not all(...): this runs twice per shard
        if not (type(x) is int or _int(x)) or x < 0:
            return False
    return True


def numel(shape: object) -> int:
    """Elements of a tensor of ``shape`` (1 for a scalar's empty shape)."""
    n = 1
    for s in shape:  # type: ignore[attr-defined]
        n *= int(s)
    return n


_codec_registry: Any = None


def _registry() -> Any:
    """:mod:`fmstore.codec.registry`, imported on first use: it imports torch, which a manifest
    of raw shards never needs (one global read per shard, not an import statement)."""
    global _codec_registry
    if _codec_registry is None:
        from ..codec import registry

        _codec_registry = registry
    return _codec_registry


#: Bytes per element of the dtypes fmstore saves, so that reading a manifest needs no torch
#: (a test checks each against torch); other names are looked up in torch's own table.
_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
}


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a manifest dtype name (``float32``)."""
    size = _ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
    if size is not None:
        return size
    from ..blob import dtype_from_name  # imports torch: a rare dtype, or not a dtype at all

    try:
        return dtype_from_name(dtype).itemsize
    except CorruptBlobError:
        raise ManifestError(f"unknown dtype {dtype!r}") from None
