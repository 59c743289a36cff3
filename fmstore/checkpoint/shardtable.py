"""The shard table: every saved piece of a snapshot's tensors as columns, one row per shard.

A large job's snapshot has a shard per rank and tensor: 512 k of them for 1,024 ranks with
500 tensors each.  As one JSON object apiece (manifest version 2) that was 136 MB, seconds to
write, seconds to read and seconds more to check.  As columns, each integer column the base64
of a little-endian array of the narrowest integer type that holds it, the file names and codecs
in small tables the rows index, every chunk digest in one string, it is a fraction of that, which
``json`` and numpy turn into arrays in milliseconds; it is checked a column at a time
(:meth:`Manifest.validate <fmstore.checkpoint.manifest.Manifest.validate>`), the ranks' reports
are merged by concatenating their tables (:mod:`.reports`), and a reader finds the shards a
region meets with array arithmetic (:meth:`ShardTable.meeting`).  :class:`~.manifest.Shard`
objects are made on demand, for the shards something looks at.

Columns (``rows`` long, ``offsets``/``lengths`` ``rows * dims``, padded with zeros past a
tensor's rank): ``tensor`` (index into the tensor list the table comes with), ``file`` (index
into ``files``), ``begin`` and ``size`` (the byte range in the file), ``offsets`` and
``lengths`` (the slice of the global tensor), ``chunk_size`` and ``nchunks`` (the checksum
chunks; their 16-byte xxh3-128 digests follow one another in ``digests``, base64; in memory the
32-character hex of each in ``chunks``), ``codec`` (index into ``codecs``, whose entry 0 is the
raw ``[]``) and ``checksums``: ``{"derived": "xxh3_128", "other": [[row, checksum], ...]}``, a
row's checksum being the xxh3-128 of its chunk digests unless ``other`` names it (a codec
stream's).  The first manifests of version 3 had plain ``[type, base64]`` columns, hex
``chunks`` and a list of every checksum; they still load.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from ..errors import TableError

if TYPE_CHECKING:
    from .manifest import Shard

#: The length of an xxh3-128 hex digest, the form of every chunk digest.
HEX = 32
_INTS = ("<i1", "<i2", "<i4", "<i8")
_COLUMNS = ("tensor", "file", "begin", "size", "chunk_size", "nchunks", "codec")


def encode_ints(a: np.ndarray) -> list[str]:
    """``[type, "deflate", base64]`` of an integer column: the narrowest little-endian type
    holding it, deflated.  A job's columns are regular (every rank's slice of a tensor at the
    same offsets, files of one rank in a row, one chunk size), so they deflate to a few percent
    of their bytes; deflate is zlib's, in the standard library, and inflates at hundreds of MB/s,
    which is why it is used rather than recording each layout as a rule."""
    a = np.asarray(a, dtype=np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for t in _INTS:
        info = np.iinfo(np.dtype(t))
        if info.min <= lo and hi <= info.max:
            break
    packed = zlib.compress(a.astype(t).tobytes(), 1)
    return [t, "deflate", base64.b64encode(packed).decode("ascii")]


def decode_ints(x: Any, n: int, what: str) -> np.ndarray:
    """The int64 column of ``encode_ints``'s ``x``, which must hold ``n`` values (a plain
    ``[type, base64]`` pair too: the first manifests of version 3 had those)."""
    deflated = isinstance(x, list) and len(x) == 3 and x[1] == "deflate"
    if deflated:
        x = [x[0], x[2]]
    if not (isinstance(x, list) and len(x) == 2 and x[0] in _INTS and isinstance(x[1], str)):
        raise TableError(f"column {what!r} is not a [type, base64] pair of an integer type")
    t = np.dtype(x[0])
    raw = _unbase64(x[1], what)
    if deflated:
        raw = _inflate(raw, n * t.itemsize, what)
    if len(raw) != n * t.itemsize:
        raise TableError(f"column {what!r} holds {len(raw)} bytes, not {n} values of {x[0]}")
    return np.frombuffer(raw, dtype=t).astype(np.int64)


def _unbase64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise TableError(f"column {what!r} is not base64 ({e})") from None


def _inflate(raw: bytes, expect: int, what: str) -> bytes:
    """``raw`` inflated, never to more than ``expect`` bytes (a hostile stream cannot make it
    allocate more than the column it claims to be)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(raw, expect)
    except zlib.error as e:
        raise TableError(f"column {what!r} is not a deflate stream ({e})") from None
    if d.unconsumed_tail or not d.eof:
        raise TableError(f"column {what!r} inflates to other than {expect} bytes")
    return out


def derived_checksum(hexes: str) -> str:
    """A shard's checksum as :func:`~fmstore.checkpoint.writing.digest_all` makes it from its
    chunk digests (``hexes``, one after another): the manifest stores only those that differ."""
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(hexes.encode("ascii"))


class ShardTable:
    """The shards of a set of tensors as columns (see the module docstring)."""

    __slots__ = (
        "tensor", "file", "begin", "size", "offsets", "lengths", "chunk_size", "nchunks", "codec",
        "_checksums", "_other", "chunks", "files", "codecs", "_chunk_at", "_end",
    )  # fmt: skip

    def __init__(
        self,
        *,
        tensor: np.ndarray,
        file: np.ndarray,
        begin: np.ndarray,
        size: np.ndarray,
        offsets: np.ndarray,
        lengths: np.ndarray,
        chunk_size: np.ndarray,
        nchunks: np.ndarray,
        codec: np.ndarray,
        checksums: list[Any] | None,
        chunks: str,
        files: list[Any],
        codecs: list[Any],
        other: dict[int, str] | None = None,
    ) -> None:
        """``checksums``: every row's; or None and ``other``: the rows whose checksum is not
        the one derived from their digests (:func:`derived_checksum`), the rest derived when
        first asked for (a merge and a commit never ask)."""
        self.tensor, self.file, self.begin, self.size = tensor, file, begin, size
        self.offsets, self.lengths = offsets, lengths  # (rows, dims)
        self.chunk_size, self.nchunks, self.codec = chunk_size, nchunks, codec
        self.chunks, self.files, self.codecs = chunks, files, codecs
        self._checksums, self._other = checksums, other
        assert checksums is not None or other is not None
        self._chunk_at: np.ndarray | None = None
        self._end: np.ndarray | None = None

    @property
    def checksums(self) -> list[Any]:
        if self._checksums is None:
            at = (HEX * self.chunk_at).tolist()
            chunks = self.chunks
            out = [derived_checksum(chunks[a:b]) for a, b in zip(at, at[1:])]
            for i, c in (self._other or {}).items():
                out[i] = c
            self._checksums = out
        return self._checksums

    def _checksum_of(self) -> Callable[[int, int, int], str]:
        """Row ``i``'s checksum, given its chunks ``a0..a1`` (of :attr:`chunk_at`): from the
        list where it is made, else derived for that row alone (a load that makes Shard
        objects of a few rows of a large table need not derive all 512 k)."""
        if self._checksums is not None:
            listed = self._checksums
            return lambda i, a0, a1: listed[i]
        other, chunks = self._other or {}, self.chunks
        return lambda i, a0, a1: other.get(i) or derived_checksum(chunks[HEX * a0 : HEX * a1])

    def other(self) -> dict[int, str]:
        """The rows whose checksum is not derived from their digests, and theirs."""
        if self._other is None:
            at = (HEX * self.chunk_at).tolist()
            chunks = self.chunks
            self._other = {
                i: c for i, (c, a, b) in enumerate(zip(self.checksums, at, at[1:])) if c != derived_checksum(chunks[a:b])
            }  # fmt: skip
        return self._other

    @property
    def rows(self) -> int:
        return len(self.tensor)

    @property
    def dims(self) -> int:
        return self.offsets.shape[1]

    @property
    def end(self) -> np.ndarray:
        if self._end is None:  # (once: a load asks for a few rows of it per tensor)
            self._end = self.begin + self.size
        return self._end

    @property
    def chunk_at(self) -> np.ndarray:
        """Where each row's digests start in ``chunks`` (in digests), and the total at the end."""
        if self._chunk_at is None:
            at = np.zeros(self.rows + 1, dtype=np.int64)
            np.cumsum(self.nchunks, out=at[1:])
            self._chunk_at = at
        return self._chunk_at

    # ------------------------------------------------------------------ building

    @classmethod
    def of_shards(cls, rows: Iterable[tuple[int, Shard]], dims: int, ndims: Sequence[int]) -> ShardTable:
        """The table of ``(tensor index, shard)`` pairs, in order (``ndims``: each tensor's
        rank).  A field without the type the manifest gives it is a :class:`TableError`
        naming the row."""
        tensor, file, begin, size, cs, nch, codec, checksums = [], [], [], [], [], [], [], []
        offsets: list[int] = []
        lengths: list[int] = []
        chunks: list[str] = []
        files: dict[str, int] = {}
        codecs: dict[str, int] = {"[]": 0}
        codec_list: list[Any] = [[]]
        for row, (t, s) in enumerate(rows):
            try:
                f = files.setdefault(s.file, len(files)) if isinstance(s.file, str) else None
                key = json.dumps(s.codec, sort_keys=True)
            except (TypeError, ValueError):
                f = None
            if f is None:
                raise TableError(f"shard file {s.file!r} or codec {s.codec!r} is malformed", row)
            c = codecs.get(key)
            if c is None:
                c = codecs[key] = len(codec_list)
                codec_list.append(s.codec)
            if not (_ints(s.offsets) and _ints(s.lengths)):
                raise TableError("shard offsets/lengths are not lists of ints >= 0", row)
            if len(s.offsets) != ndims[t] or len(s.lengths) != ndims[t]:
                raise TableError("shard rank does not match shape", row)
            if not (_int(s.begin) and _int(s.end)):
                raise TableError(f"has a bad byte range {s.begin!r}..{s.end!r}", row)
            if not _int(s.chunk_size):
                raise TableError(f"chunk_size {s.chunk_size!r} in {s.file!r} is not an int", row)
            if not isinstance(s.checksum, str) or not isinstance(s.chunks, list):
                raise TableError("shard checksum/chunks are malformed", row)
            if not all(isinstance(h, str) and len(h) == HEX and h.isascii() for h in s.chunks):
                raise TableError("shard chunks are not xxh3-128 hex digests", row)
            offsets += s.offsets
            offsets += [0] * (dims - len(s.offsets))
            lengths += s.lengths
            lengths += [0] * (dims - len(s.lengths))
            tensor.append(t)
            file.append(f)
            begin.append(s.begin)
            size.append(s.end - s.begin)
            cs.append(s.chunk_size)
            nch.append(len(s.chunks))
            codec.append(c)
            checksums.append(s.checksum)
            chunks += s.chunks
        try:
            cols = {
                k: np.array(v, dtype=np.int64)
                for k, v in zip(_COLUMNS, (tensor, file, begin, size, cs, nch, codec))
            }
            off = np.array(offsets, dtype=np.int64).reshape(len(tensor), dims)
            ln = np.array(lengths, dtype=np.int64).reshape(len(tensor), dims)
        except OverflowError as e:
            raise TableError(f"a shard field does not fit 64 bits ({e})") from None
        return cls(
            **cols, offsets=off, lengths=ln, checksums=checksums, chunks="".join(chunks),
            files=list(files), codecs=codec_list,
        )  # fmt: skip

    @classmethod
    def concat(cls, tables: Sequence[ShardTable], tensor_maps: Sequence[np.ndarray]) -> ShardTable:
        """One table of ``tables`` one after the other, each one's tensor indices mapped
        through its ``tensor_maps`` entry; files and codecs are pooled."""
        dims = max((t.dims for t in tables), default=0)
        files: dict[str, int] = {}
        codecs: dict[str, int] = {"[]": 0}
        codec_list: list[Any] = [[]]
        cols: dict[str, list[np.ndarray]] = {k: [] for k in (*_COLUMNS, "offsets", "lengths")}
        other: dict[int, str] = {}
        at = 0
        for t, tmap in zip(tables, tensor_maps):
            fmap = np.array([files.setdefault(f, len(files)) for f in t.files], dtype=np.int64)
            cmap = []
            for c in t.codecs:
                key = json.dumps(c, sort_keys=True)
                if key not in codecs:
                    codecs[key] = len(codec_list)
                    codec_list.append(c)
                cmap.append(codecs[key])
            cols["tensor"].append(tmap[t.tensor])
            cols["file"].append(fmap[t.file] if len(fmap) else t.file)
            cols["codec"].append(np.array(cmap, dtype=np.int64)[t.codec])
            for k in ("begin", "size", "chunk_size", "nchunks"):
                cols[k].append(getattr(t, k))
            for k in ("offsets", "lengths"):
                a = getattr(t, k)
                cols[k].append(np.pad(a, ((0, 0), (0, dims - a.shape[1]))) if a.shape[1] < dims else a)
            other.update((at + i, c) for i, c in t.other().items())
            at += t.rows
        cat = {k: np.concatenate(v) if v else np.zeros((0, dims) if k in ("offsets", "lengths") else 0, np.int64) for k, v in cols.items()}  # fmt: skip
        return cls(
            **cat, checksums=None, other=other, chunks="".join(t.chunks for t in tables),
            files=list(files), codecs=codec_list,
        )  # fmt: skip

    def take(self, rows: np.ndarray) -> ShardTable:
        """The table of ``rows`` (indices), in that order."""
        lens = self.nchunks[rows]
        first = self.chunk_at[rows]
        # The digests of the rows, as indices into the table's (one string of 32-byte records).
        which = np.repeat(first - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        digests = np.frombuffer(self.chunks.encode("ascii"), dtype=f"S{HEX}") if self.chunks else None
        chunks = digests[which].tobytes().decode("ascii") if digests is not None else ""
        return ShardTable(
            tensor=self.tensor[rows], file=self.file[rows], begin=self.begin[rows], size=self.size[rows],
            offsets=self.offsets[rows], lengths=self.lengths[rows], chunk_size=self.chunk_size[rows],
            nchunks=self.nchunks[rows], codec=self.codec[rows],
            checksums=None, other=self._take_other(rows), chunks=chunks, files=self.files, codecs=self.codecs,
        )  # fmt: skip

    def _take_other(self, rows: np.ndarray) -> dict[int, str]:
        other = self.other()
        if not other:
            return {}
        keys = np.fromiter(other, dtype=np.int64, count=len(other))
        at = np.flatnonzero(np.isin(rows, keys))
        return {new: other[old] for new, old in zip(at.tolist(), rows[at].tolist())}

    # ------------------------------------------------------------------ JSON

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"rows": self.rows, "dims": self.dims}
        for k in _COLUMNS:
            body[k] = encode_ints(getattr(self, k))
        body["offsets"] = encode_ints(self.offsets.reshape(-1))
        body["lengths"] = encode_ints(self.lengths.reshape(-1))
        # Raw digests: a 16-byte xxh3-128 is 22 characters of base64 against 32 of hex.  A
        # checksum made from the row's digests (every codec but a stream's) is not stored.
        other = [[i, c] for i, c in sorted(self.other().items())]
        body.update(
            files=self.files, codecs=self.codecs, checksums={"derived": "xxh3_128", "other": other},
            digests=base64.b64encode(bytes.fromhex(self.chunks)).decode("ascii"),
        )  # fmt: skip
        return body

    @classmethod
    def from_body(cls, body: Any) -> ShardTable:
        """The table of :meth:`to_body`'s JSON: the columns decoded and their lengths and the
        index columns' ranges checked (what the values mean is the manifest's to check)."""
        if not isinstance(body, dict):
            raise TableError("the shard table is not an object")
        n, dims = body.get("rows"), body.get("dims")
        if type(n) is not int or type(dims) is not int or n < 0 or not 0 <= dims <= 64:
            raise TableError(f"rows {n!r} / dims {dims!r} are not counts")
        cols = {k: decode_ints(body.get(k), n, k) for k in _COLUMNS}
        off = decode_ints(body.get("offsets"), n * dims, "offsets").reshape(n, dims)
        ln = decode_ints(body.get("lengths"), n * dims, "lengths").reshape(n, dims)
        files, codecs, checksums, chunks = (body.get(k) for k in ("files", "codecs", "checksums", "chunks"))
        if "digests" in body:  # raw digests (the first manifests of version 3 had hex)
            if chunks is not None or not isinstance(body["digests"], str):
                raise TableError("digests is not one base64 string (beside no chunks)")
            chunks = _unbase64(body["digests"], "digests").hex()
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TableError("files is not a list of names")
        if not isinstance(codecs, list) or not codecs or codecs[0] != []:
            raise TableError("codecs is not a list starting with [] (raw)")
        if not isinstance(chunks, str) or not chunks.isascii():
            raise TableError("chunks is not a string of hex digests")
        for k, bound in (("file", len(files)), ("codec", len(codecs))):
            c = cols[k]
            if n and (c.min() < 0 or c.max() >= bound):
                raise TableError(f"column {k!r} indexes past its table of {bound}")
        nch = cols["nchunks"]
        if n and (nch.min() < 0 or nch.max() > len(chunks) // HEX):  # (bounded: the sum cannot wrap)
            raise TableError("a chunk count out of range")
        if len(chunks) != HEX * int(nch.sum()):
            raise TableError(f"chunks holds {len(chunks)} characters for {int(nch.sum())} digests")
        if isinstance(checksums, list):
            if len(checksums) != n or not all(isinstance(c, str) for c in checksums):
                raise TableError(f"checksums is not a list of {n} strings")
            return cls(
                **cols,
                offsets=off,
                lengths=ln,
                checksums=checksums,
                chunks=chunks,
                files=files,
                codecs=codecs,
            )
        other = _other_checksums(checksums, n)
        return cls(
            **cols,
            offsets=off,
            lengths=ln,
            checksums=None,
            other=other,
            chunks=chunks,
            files=files,
            codecs=codecs,
        )

    # ------------------------------------------------------------------ shards

    def shards(self, a: int, b: int, ndim: int) -> list[Shard]:
        """:class:`Shard` objects of rows ``a..b`` (of a tensor of rank ``ndim``)."""
        return self.shards_of(np.arange(a, b), ndim)

    def shards_of(self, rows: np.ndarray, ndim: int) -> list[Shard]:
        from .manifest import Shard

        at = self.chunk_at
        chunks, files, codecs = self.chunks, self.files, self.codecs
        checksum = self._checksum_of()
        offs = self.offsets[rows, :ndim].tolist()
        lens = self.lengths[rows, :ndim].tolist()
        out = []
        new = object.__new__
        for i, o, k, f, b, e, c, cs, a0, a1 in zip(
            rows.tolist(), offs, lens, self.file[rows].tolist(), self.begin[rows].tolist(),
            self.end[rows].tolist(), self.codec[rows].tolist(), self.chunk_size[rows].tolist(),
            at[rows].tolist(), at[rows + 1].tolist(),
        ):  # fmt: skip
            s = new(Shard)
            s.__dict__ = {
                "offsets": o, "lengths": k, "file": files[f], "begin": b, "end": e,
                "checksum": checksum(i, a0, a1), "codec": codecs[c], "chunk_size": cs,
                "chunks": [chunks[j : j + HEX] for j in range(HEX * a0, HEX * a1, HEX)],
            }  # fmt: skip
            out.append(s)
        return out

    def refs(self, rows: np.ndarray) -> list[ChunkRef]:
        """:class:`ChunkRef` s of ``rows``: what checking their chunks needs, without a
        :class:`Shard` object each (a whole load of a 1,024-rank snapshot checks 512 k)."""
        at = self.chunk_at
        new = object.__new__
        files, chunks = self.files, self.chunks
        out = []
        for f, b, cs, a0, a1 in zip(
            self.file[rows].tolist(), self.begin[rows].tolist(), self.chunk_size[rows].tolist(),
            (HEX * at[rows]).tolist(), (HEX * at[rows + 1]).tolist(),
        ):  # fmt: skip
            ref = new(ChunkRef)
            ref.file, ref.begin, ref.chunk_size, ref.hexes = files[f], b, cs, chunks[a0:a1]
            out.append(ref)
        return out

    def meeting(
        self, a: int, b: int, offsets: Sequence[int], shape: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Of rows ``a..b`` (one tensor's), those whose slice meets the region at ``offsets``
        of ``shape``: (their indices, the overlaps' offsets, the overlaps' lengths)."""
        nd = len(shape)
        o = self.offsets[a:b, :nd]
        lo = np.maximum(o, np.asarray(offsets, dtype=np.int64))
        hi = np.minimum(
            o + self.lengths[a:b, :nd],
            np.asarray(offsets, dtype=np.int64) + np.asarray(shape, dtype=np.int64),
        )
        hit = np.flatnonzero((hi > lo).all(axis=1))
        return hit + a, lo[hit], (hi - lo)[hit]


class ChunkRef:
    """A table row's shard as a chunk check sees it (:func:`~fmstore.checkpoint.reader.verify_all`):
    its file, where it begins, its chunk size and its chunk digests (``hexes``, one after
    another: ``chunks`` splits them when asked)."""

    __slots__ = ("file", "begin", "chunk_size", "hexes")
    file: str
    begin: int
    chunk_size: int
    hexes: str

    @property
    def chunks(self) -> list[str]:
        h = self.hexes
        return [h[j : j + HEX] for j in range(0, len(h), HEX)]


def _other_checksums(x: Any, n: int) -> dict[int, str]:
    """The rows of a body's ``{"derived": "xxh3_128", "other": [[row, checksum], ...]}``
    whose checksum is not derived from their digests, and theirs."""
    if not (isinstance(x, dict) and x.get("derived") == "xxh3_128" and isinstance(x.get("other"), list)):
        raise TableError('checksums is neither a list nor {"derived": "xxh3_128", "other": [...]}')
    out: dict[int, str] = {}
    for item in x["other"]:
        if not (isinstance(item, list) and len(item) == 2 and _int(item[0]) and isinstance(item[1], str)):
            raise TableError("checksums' other is not a list of [row, checksum]")
        if not 0 <= item[0] < n:
            raise TableError(f"checksums' other names row {item[0]} of {n}")
        out[item[0]] = item[1]
    return out


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(xs: Any) -> bool:
    return isinstance(xs, list) and all(_int(x) and x >= 0 for x in xs)
