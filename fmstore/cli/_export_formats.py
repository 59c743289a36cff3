"""The output formats of ``fmstore export``: a safetensors file, a Hugging Face folder, a
zarr v3 store.  Each writes into a temporary name that :class:`fmstore.storage.AtomicOutput` renames.

safetensors files are streamed: the header is laid out first (the same layout the
``safetensors`` library writes: tensors by descending dtype, as the library orders dtypes,
then by name, the JSON space-padded to 8 bytes, so every tensor is aligned to its element
size), then each tensor's bytes are written as they are read.  The library itself only writes
from a dict of tensors all in memory at once; the output is byte for byte what
``safetensors.torch.save_file`` writes for the same tensors (tested).

Imported only inside ``fmstore export``'s ``run`` (it imports torch).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from collections.abc import Iterator
from typing import Any

import torch

from ..blob import SAFETENSORS_CODES, as_memoryview, dtype_name
from ..checkpoint.manifest import numel
from ..errors import ConfigError, FmstoreError
from ._export_io import Feed, Item, RowRange, pieces

#: safetensors codes beyond those fmstore's blobs use (known to safetensors >= 0.4.3).
EXTRA_CODES: dict[torch.dtype, str] = {
    torch.complex64: "C64",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}

#: The ``__metadata__`` key transformers checks (``save_pretrained`` writes "pt").
HF_FORMAT = {"format": "pt"}
#: Where a snapshot's ``meta`` may hold a Hugging Face config (a dict), written as config.json.
HF_CONFIG_META = "hf_config"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
#: A safetensors file's writeback is started every this many bytes written.
WRITE_BEHIND = 128 << 20
#: Target bytes of one zarr chunk (rows along dim 0, the other dims whole).
ZARR_CHUNK_BYTES = 4 << 20


def safetensors_code(item: Item) -> str:
    code = SAFETENSORS_CODES.get(item.dtype) or EXTRA_CODES.get(item.dtype)
    if code is None or code not in _dtype_rank():
        raise FmstoreError(
            f"tensor {item.name!r} has dtype {dtype_name(item.dtype)}, which safetensors cannot hold; "
            "leave it out (--select) or export it --format zarr"
        )
    return code


@functools.cache
def _dtype_rank() -> dict[str, int]:
    """Each safetensors code's place in the library's data order (0 first), asked of the
    installed library itself: one element of each dtype it knows, serialized."""
    from safetensors.torch import save

    sample = {}
    for dtype, code in {**SAFETENSORS_CODES, **EXTRA_CODES}.items():
        try:
            save({code: torch.zeros(1, dtype=dtype)})
        except Exception:  # an older safetensors without this dtype
            continue
        sample[code] = torch.zeros(1, dtype=dtype)
    blob = save(sample)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    order = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    return {code: i for i, (_, code) in enumerate(order)}


def layout(items: list[Item]) -> list[Item]:
    """The items in the order their bytes go in a safetensors file (the library's order)."""
    rank = _dtype_rank()
    return sorted(items, key=lambda it: (rank[safetensors_code(it)], it.out))


def safetensors_header(items: list[Item], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length and JSON header for ``items`` (already in :func:`layout` order)."""
    body: dict[str, Any] = {}
    if metadata:
        body["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for it in items:
        if it.out in body:
            raise FmstoreError(f"two tensors would both be named {it.out!r} in the output")
        body[it.out] = {
            "dtype": safetensors_code(it),
            "shape": list(it.shape),
            "data_offsets": [pos, pos + it.nbytes],
        }
        pos += it.nbytes
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class Writer:
    """Feeds pieces to the format writers and counts bytes on the progress bar."""

    def __init__(self, snap: Any, order: list[Item], bar: Any, *, multiple: dict[str, int] | None = None):
        todo: list[RowRange] = []
        for it in order:
            entry = snap.manifest.tensors[it.name]
            sizes = {s.chunk_size for s in entry.shards}
            chunk = sizes.pop() if len(sizes) == 1 else 0
            todo.extend(pieces(it, multiple=(multiple or {}).get(it.name, 1), chunk_size=chunk))
        self._feed: Iterator[tuple[RowRange, torch.Tensor]] = iter(Feed(snap, todo))
        self.bar = bar
        self.bytes = 0

    def take(self, item: Item) -> Iterator[tuple[RowRange, torch.Tensor]]:
        """The pieces of ``item`` (the next item of the order), in order."""
        got = 0
        while True:
            p, t = next(self._feed)
            if p.item is not item:
                raise AssertionError(f"export out of order: expected {item.name!r}, got {p.item.name!r}")
            yield p, t
            got = p.stop
            self.bytes += p.nbytes
            self.bar.update(p.nbytes)
            if p.whole or got >= item.shape[0]:
                return

    def close(self) -> None:
        close = getattr(self._feed, "close", None)
        if close is not None:
            close()


def write_safetensors(path: str, items: list[Item], w: Writer, metadata: dict[str, str] | None) -> int:
    """Stream ``items`` (in :func:`layout` order) into a safetensors file at ``path``;
    returns the file's size.  Write-behind: every :data:`WRITE_BEHIND` bytes written, their
    writeback to the disk is started, so the disk works while later tensors are still being
    read, the dirty memory stays small and the final fsync (the caller's) has little left."""
    header = safetensors_header(items, metadata)
    with open(path, "wb") as f:
        f.write(header)
        started = 0
        for it in items:
            n = 0
            for _, t in w.take(it):
                mv = as_memoryview(t)
                f.write(mv)
                n += len(mv)
                pos = f.tell()
                if pos - started >= WRITE_BEHIND:
                    f.flush()
                    start_writeback(f.fileno(), started, pos - started)
                    started = pos
            if n != it.nbytes:
                raise FmstoreError(f"tensor {it.name!r}: read {n} bytes, expected {it.nbytes}")
        f.flush()
        return f.tell()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file back to its disk, without waiting.  Linux: the
    ``POSIX_FADV_DONTNEED`` advice starts the writeback of the range's dirty pages and drops
    only pages that are clean already (the range was just written, so few or none).  Where
    the advice does not write back, nothing happens and the final fsync does it all."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        try:
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


# ------------------------------------------------------------------ Hugging Face folders


def plan_shards(items: list[Item], max_size: int) -> list[list[Item]]:
    """Items (in state order) split greedily into files of at most ``max_size`` bytes; a
    tensor larger than that gets a file of its own (as ``save_pretrained`` splits)."""
    shards: list[list[Item]] = []
    cur: list[Item] = []
    size = 0
    for it in items:
        if cur and size + it.nbytes > max_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it.nbytes
    if cur:
        shards.append(cur)
    return shards


def hf_file_names(n: int) -> list[str]:
    if n == 1:
        return [HF_WEIGHTS]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def looks_like_safetensors(path: str) -> bool:
    """An empty file, or one that starts like a safetensors file (a length, then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return True
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


def looks_like_hf(path: str) -> bool:
    names = os.listdir(path)
    return not names or HF_WEIGHTS in names or HF_INDEX in names


def hf_config(config: str | None, meta: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """(file to copy as config.json, or a config dict from the snapshot's meta), or neither."""
    if config is not None:
        path = os.path.join(config, "config.json") if os.path.isdir(config) else config
        if not os.path.isfile(path):
            raise ConfigError(f"--config {config!r}: no such file")
        return path, None
    value = meta.get(HF_CONFIG_META)
    return None, value if isinstance(value, dict) else None


def write_hf(
    tmp: str,
    items: list[Item],
    snap: Any,
    bar: Any,
    *,
    max_size: int,
    metadata: dict[str, str],
    config: tuple[str | None, dict[str, Any] | None],
) -> list[tuple[str, int]]:
    """A Hugging Face folder in directory ``tmp``: the weights (one file, or shards with an
    index), and config.json when there is one; returns (file name, bytes) of each file."""
    shards = [layout(s) for s in plan_shards(items, max_size)]
    names = hf_file_names(len(shards))
    w = Writer(snap, [it for s in shards for it in s], bar)
    out: list[tuple[str, int]] = []
    try:
        for name, shard in zip(names, shards):
            out.append(
                (name, write_safetensors(os.path.join(tmp, name), shard, w, {**HF_FORMAT, **metadata}))
            )
    finally:
        w.close()
    if len(shards) > 1:
        index = {
            "metadata": {
                "total_size": sum(it.nbytes for it in items),
                "total_parameters": sum(numel(it.shape) for it in items),
            },
            "weight_map": {it.out: name for name, s in zip(names, shards) for it in s},
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        with open(os.path.join(tmp, HF_INDEX), "w") as f:
            f.write(text)
        out.append((HF_INDEX, len(text.encode())))
    src, cfg = config
    if src is not None:
        shutil.copyfile(src, os.path.join(tmp, "config.json"))
        out.append(("config.json", os.path.getsize(src)))
    elif cfg is not None:
        text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(text)
        out.append(("config.json", len(text.encode())))
    return out


# ------------------------------------------------------------------ zarr v3

#: torch dtypes a zarr v3 array holds as themselves; any other (bfloat16, float8, ...) is
#: stored as the unsigned integers of its bit patterns, named by the ``fmstore_dtype`` attribute.
ZARR_NATIVE = {
    torch.float64,
    torch.float32,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint64,
    torch.uint32,
    torch.uint16,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
}
_BITS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def zarr_storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor's zarr array holds: itself, or an unsigned int of its width."""
    if dtype in ZARR_NATIVE:
        return dtype
    size = torch.empty(0, dtype=dtype).element_size()
    if size not in _BITS:
        raise FmstoreError(f"dtype {dtype_name(dtype)} has no zarr form")
    return _BITS[size]


def zarr_chunks(shape: tuple[int, ...], itemsize: int, target: int | None = None) -> tuple[int, ...]:
    """Rows along dim 0 of about ``target`` bytes (default :data:`ZARR_CHUNK_BYTES`), the other
    dims whole (at least 1 each)."""
    target = ZARR_CHUNK_BYTES if target is None else target
    if not shape:
        return ()
    row = max(1, numel(shape[1:]) * itemsize)
    rows = max(1, min(shape[0], target // row))
    return (rows, *(max(1, d) for d in shape[1:]))


def looks_like_zarr(path: str) -> bool:
    names = os.listdir(path)
    return not names or "zarr.json" in names


def write_zarr(
    tmp: str, items: list[Item], snap: Any, bar: Any, attrs: dict[str, Any]
) -> list[tuple[str, int]]:
    """A zarr v3 store in directory ``tmp``: a group (attribute ``fmstore``: step, root, tensor
    count) with one chunked array per tensor at path = its output name.  Every array has the
    attributes ``fmstore_dtype`` (the torch dtype) and ``fmstore_name`` (the snapshot's name)."""
    import numpy as np
    import zarr
    from zarr.storage import LocalStore

    if int(zarr.__version__.split(".")[0]) < 3:
        raise ConfigError(f"--format zarr writes zarr v3 and needs zarr>=3 (have {zarr.__version__})")
    group = zarr.open_group(store=LocalStore(tmp), mode="w", zarr_format=3, attributes={"fmstore": attrs})
    chunks = {}
    for it in items:
        sdt = zarr_storage_dtype(it.dtype)
        chunks[it.name] = zarr_chunks(it.shape, torch.empty(0, dtype=sdt).element_size())
    w = Writer(snap, items, bar, multiple={n: (c[0] if c else 1) for n, c in chunks.items()})
    try:
        for it in items:
            sdt = zarr_storage_dtype(it.dtype)
            arr = group.create_array(
                it.out,
                shape=it.shape,
                dtype=np.dtype(str(sdt).removeprefix("torch.")),
                chunks=chunks[it.name],
                fill_value=0,
                attributes={"fmstore_dtype": dtype_name(it.dtype), "fmstore_name": it.name},
            )
            for p, t in w.take(it):
                t = t if sdt == it.dtype else t.view(sdt)
                a = t.numpy()
                if p.whole:
                    arr[...] = a
                else:
                    arr[p.start : p.stop] = a
    finally:
        w.close()
    total = 0
    for dirpath, _, files in os.walk(tmp):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return [(".", total)]
