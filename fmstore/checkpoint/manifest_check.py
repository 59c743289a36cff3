"""Checking a manifest before a load trusts it (:meth:`Manifest.validate
<fmstore.checkpoint.manifest.Manifest.validate>`), and the index of its shards by file that a
reader checks each shard file against (:meth:`Manifest.shards_by_file`).

The shards are checked as the columns of their :class:`~.shardtable.ShardTable` (a manifest
of version 1 or 2 has its shards made into one first), a column at a time with numpy: a large
job's table has a shard per rank and tensor (512 k rows for 1,024 ranks x 500 tensors).  The
first row that fails a check is named in the error.  Nothing is allocated for a shard before
it passes: the table's columns are what the manifest's own bytes decoded to, and every size a
load will allocate is bounded here by the sizes the snapshot records for its files (and by a
file's real size, which the reader checks when it opens one).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..errors import ManifestError
from .manifest import (
    _FILE,
    MAX_CHUNK_SIZE,
    MAX_DIMS,
    MAX_NUMEL,
    MAX_TREE_DEPTH,
    MIN_CHUNK_SIZE,
    Manifest,
    TensorEntry,
    _int,
    _ints,
    _registry,
    dtype_itemsize,
    numel,
    table_of,
)
from .shardtable import ShardTable, TableError
from .tree import path_text

INT64_MAX = int(np.iinfo(np.int64).max)


def validate(m: Manifest, where: str) -> None:
    """:meth:`Manifest.validate`: the tensors' dtypes and shapes, then their shards as the
    columns of the shard table, then the state tree."""
    names = list(m.tensors)
    entries = list(m.tensors.values())
    itemsizes, ndims = [], []
    for name, e in m.tensors.items():
        at = f"{where}: tensor {name!r}"
        if not isinstance(e.dtype, str):
            raise ManifestError(f"{at}: dtype {e.dtype!r} is not a dtype name")
        try:
            itemsizes.append(dtype_itemsize(e.dtype))
        except ManifestError:
            raise ManifestError(f"{at}: unknown dtype {e.dtype!r}") from None
        if not _ints(e.shape) or len(e.shape) > MAX_DIMS:
            raise ManifestError(f"{at}: shape {e.shape!r} is not a list of ints >= 0")
        if numel([d for d in e.shape if d]) > MAX_NUMEL:
            raise ManifestError(f"{at}: shape {e.shape!r} is larger than fmstore handles")
        ndims.append(len(e.shape))
    try:
        table = table_of(m.tensors)
    except TableError as e:
        row = e.row
        at = f"{where}: tensor {_name_of_row(entries, names, row)!r}" if row is not None else where
        raise ManifestError(f"{at}: {e}") from None
    _check_table(table, names, entries, np.array(itemsizes, dtype=np.int64), ndims, m, where)
    validate_tree(m.tree, m.tensors, where)


def _name_of_row(entries: list[TensorEntry], names: list[str], row: int) -> str:
    """The tensor of the ``row``-th shard of ``entries`` (in order)."""
    for name, e in zip(names, entries):
        if row < e.nshards:
            return name
        row -= e.nshards
    return "?"


def _check_table(
    table: ShardTable,
    names: list[str],
    entries: list[TensorEntry],
    itemsizes: np.ndarray,
    ndims: list[int],
    m: Manifest,
    where: str,
) -> None:
    """:meth:`Manifest.validate`'s checks of the shards, on the columns of their table."""
    n, dims = table.rows, table.dims
    t = table.tensor
    if n and (t.min() < 0 or t.max() >= len(names)):
        raise ManifestError(f"{where}: malformed manifest (shard table: a row names no tensor)")
    files = table.files

    def fail(bad: np.ndarray, message: Any) -> None:
        """Raise ``message(row)`` for the first row of the mask ``bad``, if any."""
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ManifestError(f"{where}: tensor {names[int(t[i])]!r}{message(i)}")

    nd = np.array(ndims, dtype=np.int64)[t] if n else np.zeros(0, np.int64)
    if max(ndims, default=0) > dims:
        fail(nd > dims, lambda i: ": shard rank does not match shape")
    shapes = np.zeros((len(names), dims), dtype=np.int64)
    for i, e in enumerate(entries):
        shapes[i, : len(e.shape)] = e.shape
    off, ln = table.offsets, table.lengths
    fail(((off < 0) | (ln < 0)).any(axis=1), lambda i: ": shard offsets/lengths are not lists of ints >= 0")
    pad = np.arange(dims)[None, :] >= nd[:, None]
    fail((((off != 0) | (ln != 0)) & pad).any(axis=1), lambda i: ": shard rank does not match shape")
    g = shapes[t]
    fail(
        ((off > g) | (ln > g - off)).any(axis=1),
        lambda i: f": a shard lies outside shape {entries[int(t[i])].shape}",
    )
    begin, size = table.begin, table.size
    fail(
        (begin < 0) | (size < 0) | (begin > 1 << 62) | (size > 1 << 62),
        lambda i: f" has a bad byte range {int(begin[i])}..{int(begin[i] + size[i])}",
    )
    end = begin + size
    # The files: each a shard file of this or an earlier snapshot; this one's have sizes.
    limit = np.full(len(files), -1, dtype=np.int64)  # -1: no limit here (an earlier file)
    used = np.unique(table.file).tolist()
    for f in used:
        name = files[f]
        mt = _FILE.match(name)
        if mt is None or int(mt.group(1)) > m.step:
            fail(
                table.file == f,
                lambda i, name=name: (
                    f" names file {name!r}, which is not a shard file "
                    "of this snapshot or an earlier one under the same root"
                ),
            )
        if int(mt.group(1)) == m.step:
            recorded = m.files.get(name)
            # -2: not recorded, nothing fits; a size past int64 (a damaged manifest) bounds no
            # int64 end, so it is clamped rather than overflowing the column
            limit[f] = -2 if recorded is None else min(recorded, INT64_MAX)
    lim = limit[table.file]
    fail(
        (lim == -2) | ((lim >= 0) & (end > lim)),
        lambda i: (
            f": bytes {int(begin[i])}..{int(end[i])} of {files[int(table.file[i])]!r} lie outside the file "
            + (
                "(not in the files this snapshot records)"
                if lim[i] == -2
                else f"({int(lim[i])} bytes this snapshot records)"
            )
        ),
    )
    count = np.where(pad, 1, ln).prod(axis=1) if dims else np.ones(n, dtype=np.int64)
    nbytes = count * itemsizes[t]
    codec = table.codec
    raw = codec == 0
    fail(
        raw & (size != nbytes),
        lambda i: (
            f": {int(size[i])} bytes recorded in {files[int(table.file[i])]!r} "
            f"for a raw shard of {int(nbytes[i])} bytes"
        ),
    )
    chunked = raw.copy()
    if not raw.all():
        kinds: dict[tuple[int, int], Any] = {}
        for i in np.flatnonzero(~raw).tolist():
            at = f"{where}: tensor {names[int(t[i])]!r}"
            c, isz = int(codec[i]), int(itemsizes[t[i]])
            spec = table.codecs[c]
            registry = _registry()
            try:
                if not isinstance(spec, list) or len(spec) != 1:
                    raise ManifestError(f"{at}: codec {spec!r} is not a list of at most one codec")
                coder = kinds.get((c, isz))
                if coder is None:
                    coder = kinds[(c, isz)] = registry.get(spec[0], at)
                    coder.check(isz, at)
                coder.check_sizes(int(size[i]), int(nbytes[i]), isz, f"{at} in {files[int(table.file[i])]!r}")
            except registry.CodecConfigError as e:
                raise ManifestError(str(e)) from None
            chunked[i] = coder.checksum == "chunks"
    cs = table.chunk_size
    fail(
        chunked & ((cs < MIN_CHUNK_SIZE) | (cs > MAX_CHUNK_SIZE)),
        lambda i: (
            f": chunk_size {int(cs[i])} in {files[int(table.file[i])]!r} "
            f"is not in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        ),
    )
    want = -(-nbytes // np.where(chunked, cs, 1))
    fail(
        chunked & (table.nchunks != want),
        lambda i: (
            f": {int(table.nchunks[i])} chunk digests in {files[int(table.file[i])]!r} for "
            f"{int(nbytes[i])} bytes in chunks of {int(cs[i])} (want {int(want[i])})"
        ),
    )
    # Shards may repeat a region (replicas), never leave one out: a tensor is at most as large
    # as its shards, which are bounded by the bytes stored for them.
    if n:
        starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
        held = np.zeros(len(names), dtype=np.int64)
        held[t[starts]] = np.add.reduceat(count, starts)
        vast = np.zeros(len(names), dtype=bool)  # more than any tensor has: int64 sums may wrap
        vast[t[starts]] = np.add.reduceat(count.astype(np.float64), starts) > 2.0**62
    for i, e in enumerate(entries):
        total = numel(e.shape)
        have = int(held[i]) if n else 0
        if have < total and not (n and vast[i]):
            raise ManifestError(
                f"{where}: tensor {names[i]!r}: its shards hold {have} of the {total} "
                f"elements of shape {e.shape}"
            )


def validate_tree(tree: Any, tensors: dict[str, TensorEntry], where: str) -> None:
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


class FileShard(NamedTuple):
    """A shard as the reader checks it against its file's safetensors header: the entry there
    at bytes ``begin..end`` must be named ``name`` and, for raw bytes (not ``coded``), have
    the safetensors code of ``dtype`` and shape ``lengths`` (or be U8 bytes where safetensors
    has no code for ``dtype``); a coded shard's entry is U8 bytes of its size."""

    name: str
    begin: int
    end: int
    dtype: str
    lengths: tuple[int, ...]
    coded: bool


class ByFile(dict):  # type: ignore[type-arg]
    """:meth:`Manifest.shards_by_file`: the rows of the shard table sorted by file once, each
    file's list made on its first lookup."""

    def __init__(self, m: Manifest) -> None:
        super().__init__()
        # file -> (table, (name, dtype, ndim) of its entries, row -> entry, rows in the file)
        self._groups: dict[str, list[tuple[ShardTable, list[tuple[str, str, int]], np.ndarray, np.ndarray]]]
        self._groups = {}
        self._info: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] = {}  # id(info) -> _of_info's
        tables: dict[int, tuple[ShardTable, list[tuple[str, TensorEntry]]]] = {}
        for name, e in m.tensors.items():
            if e.table is None:
                for s in e.shards:
                    self.setdefault(s.file, []).append(
                        FileShard(name, s.begin, s.end, e.dtype, tuple(s.lengths), bool(s.codec))
                    )
            else:
                tables.setdefault(id(e.table), (e.table, []))[1].append((name, e))
        for table, ents in tables.values():
            which = np.full(table.rows, -1, dtype=np.int64)  # row -> its entry, -1: none here
            for k, (_, e) in enumerate(ents):
                which[e.rows[0] : e.rows[1]] = k
            rows = np.flatnonzero(which >= 0)
            rows = rows[np.argsort(table.file[rows], kind="stable")]
            f = table.file[rows]
            cuts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]]) if len(f) else np.zeros(0, np.int64)
            info = [(n, e.dtype, len(e.shape)) for n, e in ents]
            for a, b in zip(cuts.tolist(), [*cuts[1:].tolist(), len(f)]):
                self._groups.setdefault(table.files[int(f[a])], []).append((table, info, which, rows[a:b]))

        for file in [f for f in self if f in self._groups]:  # shards of both kinds in one file
            self[file] = self[file] + self._of_groups(file)

    def __missing__(self, file: str) -> list[FileShard]:
        self[file] = out = self._of_groups(file)
        return out

    def _of_groups(self, file: str) -> list[FileShard]:
        return self._columns(file).shards()

    def get(self, file: str, default: Any = None) -> Any:  # noqa: ARG002 - every file has a list
        return self[file]

    def rows(self, file: str) -> FileRows | None:
        """The shards in ``file`` as columns, where they all come from shard tables (else
        None: the file has shards of Shard lists, checked from :class:`FileShard` objects)."""
        groups = self._groups.get(file)
        if not groups or dict.__contains__(self, file) and len(self[file]) != sum(len(g[3]) for g in groups):
            return None
        return self._columns(file)

    def _columns(self, file: str) -> FileRows:
        """The table rows in ``file`` as columns (none: no rows)."""
        parts = []
        for table, info, which, rows in self._groups.get(file, []):
            k = which[rows]
            ndims, dtype_of, dtypes = self._of_info(info)
            coded = np.array([bool(c) for c in table.codecs], dtype=bool)[table.codec[rows]]
            parts.append(
                (
                    k,
                    info,
                    table.begin[rows],
                    table.end[rows],
                    table.lengths[rows],
                    ndims[k],
                    coded,
                    dtype_of[k],
                    dtypes,
                )
            )
        return FileRows(parts)

    def _of_info(self, info: list[tuple[str, str, int]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Each tensor's rank, and its dtype as an index into the dtypes of ``info``: once per
        table (a whole load asks for a thousand files of the same tensors)."""
        out = self._info.get(id(info))
        if out is None:
            dtypes = sorted({d for _, d, _ in info})
            at = {d: i for i, d in enumerate(dtypes)}
            out = self._info[id(info)] = (
                np.array([n for _, _, n in info], dtype=np.int64),
                np.array([at[d] for _, d, _ in info], dtype=np.int64),
                dtypes,
            )
        return out


class FileRows:
    """The shards of one file as columns, from :meth:`ByFile.rows`: per group of one shard
    table, the entry index of each row into ``info`` ((name, dtype, ndim) per tensor), the
    byte ranges, the lengths (padded), each row's rank, whether its bytes are coded, and its
    dtype as an index into the table's dtypes."""

    def __init__(self, parts: list[tuple[Any, ...]]) -> None:
        self.parts = parts  # (entry of each row, info, begin, end, lengths, rank, coded, dtype index, dtypes)

    def __len__(self) -> int:
        return sum(len(p[0]) for p in self.parts)

    def shards(self) -> list[FileShard]:
        """The same shards as :class:`FileShard` objects (to name the first bad one)."""
        out = []
        for k, info, begin, end, lengths, ndim, coded, *_ in self.parts:
            for i, b, e, ln, n, c in zip(k.tolist(), begin.tolist(), end.tolist(), lengths.tolist(), ndim.tolist(), coded.tolist()):  # fmt: skip
                name, dtype, _ = info[i]
                out.append(FileShard(name, b, e, dtype, tuple(ln[:n]), c))
        return out
