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
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..errors import CorruptBlobError, FmstoreError, ManifestError
from ..gcpause import paused_gc
from .tree import MISSING, path_text, per_rank_ranks, subtree, tensor_leaves, unflatten
from .tree import arrays_as_tensors as _arrays_read_as_tensors

if TYPE_CHECKING:  # TensorEntry.torch_dtype's annotation: reading a manifest imports no torch
    import torch

FORMAT = "fmstore.snapshot"
#: Checksum chunk: a partial read (resharding) verifies just the chunks it touches.
CHUNK_SIZE = 16 << 20
#: The chunk sizes a manifest may record: a load makes one hash job per chunk, and hashes
#: a chunk in one piece.
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 4 << 10, 1 << 30
#: How deep a state tree may nest (rebuilding it recurses; real states are a few levels).
MAX_TREE_DEPTH = 200
#: 2: codecs as {"name", "configuration"} entries (1: chains of strings, still read).
VERSION = 2
READS = (1, 2)
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

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Shard:
        """The shard of a manifest's (or a rank report's) JSON object.  One with exactly the
        fields, in order (as :meth:`Manifest.to_json` writes them), becomes the shard's
        attributes as it is: a large job's table has a shard per rank and tensor, and the
        constructor's keyword matching is most of the cost of reading one.  Any other object
        goes through the constructor, which refuses unknown names and fills defaults."""
        if type(body) is dict and len(body) == _NFIELDS and list(body) == _FIELDS:
            shard = object.__new__(cls)
            shard.__dict__ = body
            return shard
        return cls(**body)


_FIELDS = [f.name for f in fields(Shard)]
_NFIELDS = len(_FIELDS)


def _shard_body(s: Shard) -> dict[str, Any]:
    """What ``asdict`` gives for a shard (the JSON is the same), without copying its lists: its
    own attributes, which hold exactly the fields in order unless something added one."""
    d = s.__dict__
    return d if len(d) == _NFIELDS else {f: getattr(s, f) for f in _FIELDS}


@dataclass
class TensorEntry:
    dtype: str
    shape: list[int]
    shards: list[Shard]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The tensor's dtype as a ``torch.dtype`` (``dtype`` is the manifest's name for it;
        this imports torch)."""
        from ..blob import dtype_from_name

        return dtype_from_name(self.dtype)


@dataclass
class Manifest:
    step: int
    world_size: int
    tensors: dict[str, TensorEntry]
    tree: dict[str, Any]
    files: dict[str, int]  # files this snapshot wrote -> size in bytes
    created: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The manifest's JSON: ``{"format", "version", **asdict(self)}``, compact.  Built without
        ``asdict``, whose deep copy of every shard's lists cost more than the encoding."""
        body = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "tensors": {
                name: {"dtype": e.dtype, "shape": e.shape, "shards": [_shard_body(s) for s in e.shards]}
                for name, e in self.tensors.items()
            },
            "tree": self.tree,
            "files": self.files,
            "created": self.created,
            "meta": self.meta,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> Manifest:
        # Millions of objects for a large job (a shard per rank and tensor), none of them
        # garbage: the collector would only rescan them, many times over (2-4x the parse).
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
            from_body = Shard.from_body
            if version == 1:
                from_body = lambda s: _legacy_shard(s, where)  # noqa: E731
            tensors = {
                name: TensorEntry(e["dtype"], list(e["shape"]), [from_body(s) for s in e["shards"]])
                for name, e in body["tensors"].items()
            }
            m = cls(
                step=_count(body["step"], "step"),
                world_size=_count(body["world_size"], "world_size"),
                tensors=tensors,
                tree=body["tree"],
                files={str(k): _count(v, f"files[{k!r}]") for k, v in body["files"].items()},
                created=float(body.get("created", 0.0)),
                meta=dict(body.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        """Everything a load trusts before it allocates or reads: each shard names a shard file
        of this or an earlier snapshot of the root, lies inside its tensor's shape, and its byte
        range, checksum chunks and codec fit its size; the shards cover the tensor; the tree is
        well formed and names only tensors of the table.  A shard in an earlier snapshot's file
        is checked against that file's real size when a load opens it (the reader)."""
        # A large job's table has a shard per rank and tensor (512 k for 1,024 ranks x 500
        # tensors): what is the same for many shards (a file's name and size, a tensor's dtype
        # and shape) is checked once, and the shards of a tensor are first passed by a quick
        # check that accepts only what the full one does; where it finds anything else, the
        # full check runs on each shard and names what is wrong.
        known: dict[str, tuple[bool, int | None]] = {}  # good file names -> (this snapshot's, recorded size)
        for name, entry in self.tensors.items():
            at = f"{where}: tensor {name!r}"
            if not isinstance(entry.dtype, str):
                raise ManifestError(f"{at}: dtype {entry.dtype!r} is not a dtype name")
            try:
                itemsize = dtype_itemsize(entry.dtype)
            except ManifestError:
                raise ManifestError(f"{at}: unknown dtype {entry.dtype!r}") from None
            if not _ints(entry.shape):
                raise ManifestError(f"{at}: shape {entry.shape!r} is not a list of ints >= 0")
            held = _held_by_plain_shards(entry, itemsize, known)
            if held is None:  # not all raw shards of files seen already: each checked in full
                held = 0
                for s in entry.shards:
                    held += self._validate_shard(at, entry, s, itemsize, known)
            # Shards may repeat a region (replicas), never leave one out: a tensor is at most
            # as large as its shards, which are bounded by the bytes stored for them.
            if held < numel(entry.shape):
                raise ManifestError(
                    f"{at}: its shards hold {held} of the {numel(entry.shape)} elements of shape {entry.shape}"
                )
        _validate_tree(self.tree, self.tensors, where)

    def _validate_shard(
        self, at: str, entry: TensorEntry, s: Shard, itemsize: int, known: dict[str, tuple[bool, int | None]]
    ) -> int:
        """Check one shard (see :meth:`validate`); its number of elements."""
        file = s.file
        if type(file) is str and file in known:
            own, size = known[file]
        else:
            m = _FILE.match(file) if isinstance(file, str) else None
            if m is None or int(m.group(1)) > self.step:
                raise ManifestError(
                    f"{at} names file {file!r}, which is not a shard file "
                    "of this snapshot or an earlier one under the same root"
                )
            own = int(m.group(1)) == self.step  # a file this snapshot wrote: its size is recorded
            size = self.files.get(file) if own else None
            known[file] = (own, size)
        begin, end = s.begin, s.end
        if not (_int(begin) and _int(end) and 0 <= begin <= end):
            raise ManifestError(f"{at} has a bad byte range {begin!r}..{end!r}")
        if own and (size is None or end > size):
            raise ManifestError(
                f"{at}: bytes {begin}..{end} of {file!r} lie outside the file "
                f"({'not in the files' if size is None else f'{size} bytes'} this snapshot records)"
            )
        offsets, lengths, shape = s.offsets, s.lengths, entry.shape
        if not _ints(offsets) or not _ints(lengths):
            raise ManifestError(f"{at}: shard offsets/lengths are not lists of ints >= 0")
        if len(offsets) != len(shape) or len(lengths) != len(shape):
            raise ManifestError(f"{at}: shard rank does not match shape")
        n = 1
        for o, k, g in zip(offsets, lengths, shape):
            if o + k > g:
                raise ManifestError(f"{at}: a shard lies outside shape {shape}")
            n *= k
        chunks, codec = s.chunks, s.codec
        if not isinstance(s.checksum, str) or not isinstance(chunks, list):
            raise ManifestError(f"{at}: shard checksum/chunks are malformed")
        if not isinstance(codec, list) or len(codec) > 1:
            raise ManifestError(f"{at}: codec {codec!r} is not a list of at most one codec")
        nbytes = n * itemsize
        stored = end - begin
        checksum = "chunks"
        if not codec:
            if stored != nbytes:
                raise ManifestError(
                    f"{at}: {stored} bytes recorded in {file!r} for a raw shard of {nbytes} bytes"
                )
        else:
            registry = _registry()
            try:
                c = registry.get(codec[0], at)
                c.check(itemsize, at)
                c.check_sizes(stored, nbytes, itemsize, f"{at} in {file!r}")
            except registry.CodecConfigError as e:
                raise ManifestError(str(e)) from None
            checksum = c.checksum
        if checksum == "chunks":  # the reader hashes the (decoded) bytes in these chunks
            cs = s.chunk_size
            if not _int(cs) or not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE:
                raise ManifestError(
                    f"{at}: chunk_size {cs!r} in {file!r} is not in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
                )
            if len(chunks) != -(-nbytes // cs):
                raise ManifestError(
                    f"{at}: {len(chunks)} chunk digests in {file!r} for {nbytes} bytes "
                    f"in chunks of {cs} (want {-(-nbytes // cs)})"
                )
        return n

    def referenced_files(self) -> set[str]:
        return {s.file for e in self.tensors.values() for s in e.shards}

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
            raise KeyError(f"snapshot step {self.step} holds no state at {path_text(tuple(path))!r} for rank {rank}")
        return value

    def saved_ranks(self, path: tuple[Any, ...]) -> list[int] | None:
        """The ranks that saved the per-rank state at ``path`` (keys from the root: a Stateful
        with ``fmstore_per_rank = True``, an :class:`~fmstore.checkpoint.RNGState`), in order;
        None where ``path`` holds no per-rank state."""
        return per_rank_ranks(self.tree, tuple(path))


def _held_by_plain_shards(
    entry: TensorEntry, itemsize: int, known: dict[str, tuple[bool, int | None]]
) -> int | None:
    """The elements ``entry``'s shards hold, if every shard is raw, of a file whose name
    :meth:`Manifest._validate_shard` accepted already (in ``known``) and passes its every check
    in the plainest form (exact ints and lists); else None (for the full check, which this never
    contradicts: it accepts a subset of what that does)."""
    shape = entry.shape
    ndim = len(shape)
    held = 0
    for s in entry.shards:
        file, begin, end, offsets, lengths = s.file, s.begin, s.end, s.offsets, s.lengths
        info = known.get(file) if type(file) is str else None
        if info is None or type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            return None
        own, size = info
        if own and (size is None or end > size):
            return None
        if (
            type(offsets) is not list
            or type(lengths) is not list
            or len(offsets) != ndim
            or len(lengths) != ndim
        ):
            return None
        n = 1
        for o, k, g in zip(offsets, lengths, shape):
            if type(o) is not int or type(k) is not int or o < 0 or k < 0 or o + k > g:
                return None
            n *= k
        codec, chunks, cs = s.codec, s.chunks, s.chunk_size
        if type(codec) is not list or codec or type(s.checksum) is not str or type(chunks) is not list:
            return None
        nbytes = n * itemsize
        if end - begin != nbytes or type(cs) is not int or not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE:
            return None
        if len(chunks) != -(-nbytes // cs):
            return None
        held += n
    return held


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


def _validate_tree(tree: Any, tensors: dict[str, TensorEntry], where: str) -> None:
    """The state tree: nodes of the kinds :mod:`.tree` writes, at most ``MAX_TREE_DEPTH``
    deep (rebuilding it recurses), each tensor leaf naming an entry of ``tensors``.  Walked
    with a stack, so a hostile tree cannot exhaust the interpreter's."""
    stack: list[tuple[tuple[Any, ...], int, Any]] = [((), 1, tree)]
    while stack:
        path, depth, node = stack.pop()
        problem = (
            _node_problem(node, tensors)
            if depth <= MAX_TREE_DEPTH
            else f"nested deeper than {MAX_TREE_DEPTH}"
        )
        if problem is not None:
            raise ManifestError(f"{where}: state tree at {path_text(path)!r}: {problem}")
        kind = node["t"]
        if kind == "per_rank":
            stack.extend((path, depth + 1, sub) for sub in node["ranks"].values())
        elif kind in ("dict", "odict"):
            stack.extend(((*path, k), depth + 1, v) for k, v in node["items"])
        elif kind in ("list", "tuple"):
            stack.extend(((*path, i), depth + 1, v) for i, v in enumerate(node["items"]))


def _node_problem(node: Any, tensors: dict[str, TensorEntry]) -> str | None:
    """What is wrong with one node of a state tree (its children are checked on their own)."""
    kind = node.get("t") if isinstance(node, dict) else None
    if kind in ("tensor", "ndarray"):
        name = node.get("name")
        if not isinstance(name, str) or name not in tensors:
            return f"names tensor {name!r}, which the manifest does not have"
    elif kind == "per_rank":
        if not isinstance(node.get("ranks"), dict):
            return "a per-rank node without ranks"
    elif kind in ("dict", "odict"):
        items, meta = node.get("items"), node.get("metadata", [])
        if not isinstance(items, list) or not all(_pair(kv) and _key(kv[0]) for kv in items):
            return f"a {kind} node whose items are not [key, node] pairs"
        if not isinstance(meta, list) or not all(map(_pair, meta)):
            return f"a {kind} node whose metadata is not [key, value] pairs"
    elif kind in ("list", "tuple"):
        if not isinstance(node.get("items"), list):
            return f"a {kind} node without items"
    elif kind == "value":
        if "v" not in node:
            return "a value node without a value"
    elif kind == "float":
        try:
            float(node.get("v"))
        except (TypeError, ValueError):
            return f"a float node of {node.get('v')!r}"
    else:
        return f"unknown node kind {kind!r}" if kind is not None else "not a tree node"
    return None


def _pair(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 2


def _key(k: Any) -> bool:
    return isinstance(k, str) or _int(k)


def _legacy_shard(body: dict[str, Any], where: str) -> Shard:
    """A shard of a version-1 manifest: its codec a chain of strings (["planes4", "zstd"])."""
    shard = Shard(**body)
    registry = _registry()
    try:
        shard.codec = registry.from_legacy(list(shard.codec), where)
    except registry.CodecConfigError as e:
        raise ManifestError(str(e)) from None
    return shard


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
