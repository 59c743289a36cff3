"""What ``fmstore export`` and ``fmstore import`` share: picking and naming a snapshot's
tensors and reading them in bounded pieces ahead of the writer (the atomic output is the
storage layer's :class:`fmstore.storage.AtomicOutput`).

Imported only inside the commands' ``run`` (it imports torch).
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..blob import dtype_from_name
from ..checkpoint import SnapshotNotFoundError
from ..checkpoint.tree import tensor_leaves
from ..errors import ConfigError

#: A raw (uncompressed) tensor larger than this is read in row ranges of about this size,
#: so memory stays bounded whatever the largest tensor.  (Reading a tensor whole goes straight
#: into its buffer; a row range of a saved shard takes one more copy.)
PIECE_BYTES = 256 << 20
#: Bytes read ahead of the writer at most (the piece being written included).
WINDOW_BYTES = 512 << 20


@dataclass(frozen=True)
class Item:
    """One tensor to export: its name in the snapshot, its name in the output, its info."""

    name: str
    out: str
    info: Any  # fmstore.checkpoint.TensorInfo

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.info.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.info.shape)

    @property
    def nbytes(self) -> int:
        return int(self.info.raw_bytes)


# ------------------------------------------------------------------ selection and names


def select(snap: Any, patterns: list[str] | None) -> list[Any]:
    """The snapshot's tensors matching any of the globs (all without any), in the order the
    state was saved in (a module's ``state_dict`` order), then any others by name."""
    infos = {t.name: t for t in snap.tensors()}
    order = [n for n in tensor_leaves(snap.manifest.tree).values() if n in infos]
    order = list(dict.fromkeys([*order, *sorted(infos)]))
    if patterns:
        order = [n for n in order if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not order:
            pats = " ".join(repr(p) for p in patterns)
            raise SnapshotNotFoundError(
                f"no tensor of snapshot step {snap.step} under {snap.storage.url!r} matches --select {pats}"
            )
    if not order:
        raise SnapshotNotFoundError(f"snapshot step {snap.step} under {snap.storage.url!r} holds no tensors")
    return [infos[n] for n in order]


def auto_prefix(names: list[str]) -> str:
    """The prefix to strip by default: ``first/`` when every name has more than one path
    component and all share the first one (``model/`` of a state saved as ``{"model": m}``)."""
    firsts = {n.split("/", 1)[0] for n in names}
    if len(firsts) == 1 and all("/" in n for n in names):
        return f"{firsts.pop()}/"
    return ""


def name_items(infos: list[Any], prefix: str | None) -> tuple[list[Item], str]:
    """The tensors with their output names (``prefix`` stripped; None: :func:`auto_prefix`)."""
    names = [t.name for t in infos]
    if prefix is None:
        prefix = auto_prefix(names)
    items = []
    for t in infos:
        if not t.name.startswith(prefix) or len(t.name) == len(prefix):
            raise ConfigError(
                f"tensor {t.name!r} does not start with --prefix {prefix!r}: pick the tensors with "
                f"--select (e.g. --select '{prefix}*') or pass another --prefix ('' keeps the names)"
            )
        items.append(Item(t.name, t.name[len(prefix) :], t))
    return items, prefix


# ------------------------------------------------------------------ reading ahead


@dataclass(frozen=True)
class RowRange:
    """Rows ``[start, stop)`` along dim 0 of an item (the whole tensor for a 0-d one)."""

    item: Item
    start: int
    stop: int
    whole: bool

    @property
    def nbytes(self) -> int:
        if self.whole:
            return self.item.nbytes
        rows = self.item.shape[0]
        return self.item.nbytes // rows * (self.stop - self.start) if rows else 0


def pieces(
    item: Item, *, piece_bytes: int | None = None, multiple: int = 1, chunk_size: int = 0
) -> list[RowRange]:
    """How to read an item: whole, or (a raw tensor above ``piece_bytes``) in row ranges.

    Encoded shards are read whole: a slice of one would decode the whole shard every time.
    ``multiple``: row counts are multiples of it (a zarr chunk's rows).  Otherwise a piece
    never straddles two saved row shards (a piece that is a whole shard is read straight into
    its buffer) and, where ``chunk_size`` (the shards' checksum chunk) is whole rows and not
    above ``piece_bytes``, covers whole chunks, so no byte is read twice.
    """
    piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
    shape = item.shape
    rows = shape[0] if shape else 0
    shards = item.info.shards
    raw = all(not s.codec for s in shards)
    row_bytes = item.nbytes // rows if rows else 0
    if not shape or rows <= 1 or item.nbytes <= piece_bytes or not raw or not row_bytes:
        return [RowRange(item, 0, rows, True)]
    step = max(1, piece_bytes // row_bytes)
    bounds = {0, rows}
    if multiple > 1:
        step = max(multiple, step // multiple * multiple)
    else:
        if chunk_size and chunk_size % row_bytes == 0 and chunk_size // row_bytes <= step:
            per = chunk_size // row_bytes
            step = step // per * per
        rest = tuple(shape[1:])
        if all(not any(s.offsets[1:]) and tuple(s.lengths[1:]) == rest for s in shards):
            bounds |= {s.offsets[0] for s in shards}
    edges = sorted(bounds)
    return [
        RowRange(item, a, min(b, a + step), False) for lo, b in zip(edges, edges[1:]) for a in range(lo, b, step)
    ]


#: Pieces at least this large are read into reused buffers (a fresh 64 MiB allocation costs
#: its page faults and zeroing every time).
REUSE_BYTES = 1 << 20


class _Buffers:
    """Byte buffers handed back and reused (smallest that fits), shared by the read threads."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> torch.Tensor:
        with self._lock:
            fits = [b for b in self._free if b.numel() >= n]
            if fits:
                best = min(fits, key=lambda b: b.numel())
                self._free.remove(best)
                return best
        return torch.empty(n, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)


class Feed:
    """Reads pieces (verified against the snapshot's checksums) in background threads, at most
    ``window`` bytes ahead, and gives them back in order: ``for piece, tensor in feed``.  A
    tensor given is valid until the next one is asked for (its buffer is then reused)."""

    def __init__(
        self,
        snap: Any,
        todo: list[RowRange],
        *,
        threads: int | None = None,
        window: int | None = None,
    ) -> None:
        self.snap = snap
        self.todo = todo
        self.window = WINDOW_BYTES if window is None else window
        # Local files: reads from the page cache or a disk need few threads, and each one more
        # competes with the writer for the cores; object storage: latency, so more.
        local = getattr(getattr(snap, "storage", None), "local", True)
        self.threads = threads or (max(1, min(4, (os.cpu_count() or 1) // 2)) if local else 8)
        self._buffers = _Buffers()

    def _read(self, p: RowRange) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the piece's values, the reused buffer holding them or None)."""
        shape = p.item.shape
        if p.whole:
            offsets, region = (0,) * len(shape), shape
        else:
            offsets, region = (p.start,) + (0,) * (len(shape) - 1), (p.stop - p.start, *shape[1:])
        buf = self._buffers.take(p.nbytes) if p.nbytes >= REUSE_BYTES else None
        out = buf[: p.nbytes].view(p.item.dtype).view(region) if buf is not None else None
        try:
            return self.snap.read(p.item.name, offsets=offsets, shape=region, out=out), buf
        except BaseException:
            if buf is not None:
                self._buffers.give(buf)
            raise

    def __iter__(self) -> Iterator[tuple[RowRange, torch.Tensor]]:
        pending: deque[tuple[RowRange, Future[tuple[torch.Tensor, torch.Tensor | None]]]] = deque()
        ahead = 0
        nxt = 0
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fmstore-export")
        try:
            while nxt < len(self.todo) or pending:
                while nxt < len(self.todo) and (not pending or ahead + self.todo[nxt].nbytes <= self.window):
                    p = self.todo[nxt]
                    pending.append((p, pool.submit(self._read, p)))
                    ahead += p.nbytes
                    nxt += 1
                p, fut = pending.popleft()
                t, buf = fut.result()
                yield p, t
                del t
                ahead -= p.nbytes
                if buf is not None:
                    self._buffers.give(buf)
        finally:
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)
