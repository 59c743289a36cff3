"""Checkpointer: async snapshots of training state, committed atomically by one manifest.

``save`` stages the state's tensors into pooled host memory (all training waits for) and
returns a :class:`SaveHandle`; a background thread checksums the staged bytes, writes the
tensors that changed since the previous snapshot into one safetensors shard file, then
writes ``manifest.json`` (the commit), then applies retention.  Unchanged tensors are
referenced in the previous snapshot's files, not written again.  ``load`` restores the
latest (or a given) committed snapshot, verifying every checksum.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch

from ..blob import SAFETENSORS_CODES, dtype_from_name, dtype_name
from ..errors import CorruptBlobError, FmstoreError
from .manifest import MANIFEST, Manifest, ManifestError, Shard, TensorEntry, parse_step_dir, step_dir
from .staging import Staged, Stager
from .storage import SnapshotStorage
from .tree import flatten, unflatten


class SnapshotNotFoundError(FmstoreError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class ChecksumError(CorruptBlobError):
    """Bytes read back do not match the checksum recorded when they were saved."""


class LoadMismatchError(FmstoreError, ValueError):
    """A snapshot tensor does not fit the target tensor it is loaded into (dtype or shape)."""


def checksum(data: torch.Tensor) -> str:
    """``xxh3_128`` of a flat uint8 CPU tensor's bytes (xxHash: ~10+ GB/s on one core)."""
    import xxhash

    if data.numel() == 0:
        return "xxh3_128:" + xxhash.xxh3_128_hexdigest(b"")
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(memoryview(data.numpy()))


@dataclass
class SnapshotInfo:
    """A committed snapshot, as ``SaveHandle.wait`` and ``Checkpointer.snapshots`` give it."""

    step: int
    path: str
    nbytes: int  # bytes of tensor data in the snapshot
    bytes_written: int  # bytes this save wrote (shard files + manifest); less when incremental
    tensors: int
    tensors_written: int


class SaveHandle:
    """Returned by :meth:`Checkpointer.save` once staging is done; persisting goes on."""

    def __init__(self, step: int, future: Future[SnapshotInfo], staged: Staged, stall_s: float) -> None:
        self.step = step
        self._future = future
        self._staged = staged
        self.stall_seconds = stall_s  # time save() blocked the caller
        self.nbytes = staged.nbytes
        self.persist_seconds: float | None = None

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> SnapshotInfo:
        """Block until the snapshot is committed; returns its info or raises the save's error."""
        return self._future.result(timeout)

    def wait_staged(self) -> None:
        """Block until the device-to-host copies are done (only needed with ``block=False``)."""
        self._staged.wait()

    def __repr__(self) -> str:
        state = (
            "committed"
            if self.done() and not self._future.exception()
            else ("failed" if self.done() else "persisting")
        )
        return f"SaveHandle(step={self.step}, {state}, stall={self.stall_seconds:.3f}s, bytes={self.nbytes})"


class Checkpointer:
    """Async, incremental, crash-safe snapshots of training state under ``root``.

    Parameters:
        root: a directory or fsspec URL (``s3://bucket/run1``, ``file://``, ``memory://``).
        storage_options: passed to fsspec untouched (credentials, endpoint).
        keep_last: keep only the newest N committed snapshots (bytes that a kept snapshot
            references are never deleted).
        incremental: reference unchanged tensors in earlier snapshots instead of rewriting.
        compression, policy, process_group: reserved for the codec, multi-level policy and
            distributed saving; only their defaults (None) are supported so far.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        compression: Any = None,
        keep_last: int | None = None,
        policy: Any = None,
        process_group: Any = None,
        incremental: bool = True,
        io_threads: int = 8,
    ) -> None:
        for arg, value in (
            ("compression", compression),
            ("policy", policy),
            ("process_group", process_group),
        ):
            if value is not None:
                raise NotImplementedError(f"Checkpointer({arg}=...) is not supported yet; leave it None")
        if keep_last is not None and keep_last < 1:
            raise FmstoreError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.storage = SnapshotStorage(root, storage_options, io_threads=io_threads)
        self.keep_last = keep_last
        self.incremental = incremental
        self._stager = Stager()
        self._persist = ThreadPoolExecutor(1, thread_name_prefix="fmstore-persist")
        self._last: SaveHandle | None = None
        self._last_manifest: Manifest | None = None
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ listing

    def steps(self) -> list[int]:
        """Committed steps, oldest first (a snapshot without its manifest does not exist)."""
        out = []
        for name in self.storage.list_dir():
            step = parse_step_dir(name)
            if step is not None and self.storage.exists(f"{name}/{MANIFEST}"):
                out.append(step)
        return sorted(out)

    def manifest(self, step: int | None = None) -> Manifest:
        """The manifest of ``step`` (default: the latest committed one)."""
        if step is None:
            steps = self.steps()
            if not steps:
                raise SnapshotNotFoundError(f"no committed snapshot under {self.storage.url!r}")
            step = steps[-1]
        rel = f"{step_dir(step)}/{MANIFEST}"
        try:
            raw = self.storage.read_bytes(rel)
        except FileNotFoundError:
            raise SnapshotNotFoundError(
                f"no committed snapshot for step {step} under {self.storage.url!r} (have {self.steps()})"
            ) from None
        return Manifest.from_json(raw, where=f"{self.storage.url}/{rel}")

    # ------------------------------------------------------------------ save

    def save(
        self, step: int, state: Any, *, block: bool = True, meta: dict[str, Any] | None = None
    ) -> SaveHandle:
        """Snapshot ``state`` as ``step``: returns once its tensors are staged in host memory.

        With ``block=False`` it returns as soon as the device-to-host copies are queued; call
        ``handle.wait_staged()`` before changing the tensors (e.g. before the next optimizer
        step).  Errors of the background persist surface on ``handle.wait()`` and on the next
        ``save``.
        """
        if self._closed:
            raise FmstoreError("the checkpointer is closed")
        rel_dir = step_dir(step)
        t0 = time.perf_counter()
        tensors, tree = flatten(state)
        prev = self._last
        if prev is not None:
            self._last = None  # its error is raised once, here (or on its own wait())
            prev.wait()  # one persist at a time keeps memory bounded
        if self.storage.exists(f"{rel_dir}/{MANIFEST}"):
            raise FmstoreError(
                f"step {step} is already committed under {self.storage.url!r}; it is never overwritten"
            )
        staged = self._stager.stage(tensors)
        if block:
            staged.wait()
        stall = time.perf_counter() - t0
        future = self._persist.submit(self._persist_job, step, staged, tree, dict(meta or {}))
        handle = SaveHandle(step, future, staged, stall)
        future.add_done_callback(
            lambda f: setattr(handle, "persist_seconds", time.perf_counter() - t0 - stall)
        )
        self._last = handle
        return handle

    def _persist_job(
        self, step: int, staged: Staged, tree: dict[str, Any], meta: dict[str, Any]
    ) -> SnapshotInfo:
        try:
            staged.wait()
            rel_dir = step_dir(step)
            base = self._base_manifest()
            entries: dict[str, TensorEntry] = {}
            to_write = []
            for st in staged.tensors:
                digest = checksum(st.data)
                shape = list(st.shape)
                old = base.tensors.get(st.name) if base is not None else None
                if (
                    old is not None
                    and old.dtype == dtype_name(st.dtype)
                    and old.shape == shape
                    and len(old.shards) == 1
                    and old.shards[0].checksum == digest
                    and not old.shards[0].codec
                ):
                    entries[st.name] = old  # unchanged: point at the bytes already stored
                    continue
                to_write.append((st, digest))
            files: dict[str, int] = {}
            written = 0
            if to_write:
                rel = f"{rel_dir}/shard-r00000.safetensors"
                header, offsets = _shard_header(to_write)
                segments: list[memoryview | bytes] = [header]
                segments += [memoryview(st.data.numpy()) for st, _ in to_write if st.nbytes]
                size = self.storage.write(rel, segments)
                files[rel] = size
                written += size
                for (st, digest), (begin, end) in zip(to_write, offsets):
                    entries[st.name] = TensorEntry(
                        dtype_name(st.dtype),
                        list(st.shape),
                        [Shard([0] * len(st.shape), list(st.shape), rel, begin, end, digest)],
                    )
            manifest = Manifest(step=step, world_size=1, tensors=entries, tree=tree, files=files, meta=meta)
            raw = manifest.to_json()
            self.storage.write(f"{rel_dir}/{MANIFEST}", [raw])  # the commit
            written += len(raw)
            self._last_manifest = manifest
            if self.keep_last is not None:
                self._apply_retention()
            return SnapshotInfo(
                step=step,
                path=f"{self.storage.url.rstrip('/')}/{rel_dir}",
                nbytes=staged.nbytes,
                bytes_written=written,
                tensors=len(entries),
                tensors_written=len(to_write),
            )
        finally:
            staged.release()

    def _base_manifest(self) -> Manifest | None:
        """The snapshot an incremental save references: the newest committed one."""
        if not self.incremental:
            return None
        if self._last_manifest is not None:
            return self._last_manifest
        try:
            return self.manifest()
        except SnapshotNotFoundError:
            return None

    # ------------------------------------------------------------------ retention

    def _apply_retention(self) -> None:
        steps = self.steps()
        assert self.keep_last is not None
        drop, keep = steps[: -self.keep_last], steps[-self.keep_last :]
        for step in drop:  # uncommit first: from here on the snapshot does not exist
            self.storage.delete(f"{step_dir(step)}/{MANIFEST}")
        self.gc(keep_steps=keep)

    def gc(self, *, keep_steps: list[int] | None = None) -> list[str]:
        """Delete files that no committed snapshot references, in directories older than
        the newest committed snapshot (newer ones may still be being written).  Returns
        what was deleted."""
        keep = self.steps() if keep_steps is None else keep_steps
        if not keep:
            return []
        referenced: set[str] = set()
        for step in keep:
            referenced |= self.manifest(step).referenced_files()
        deleted = []
        for name in self.storage.list_dir():
            step = parse_step_dir(name)
            if step is None or step in keep or step >= keep[-1]:
                continue
            files = [f"{name}/{f}" for f in self.storage.list_dir(name)]
            doomed = [f for f in files if f not in referenced]
            if len(doomed) == len(files):
                self.storage.delete_dir(name)
            else:
                for f in doomed:
                    self.storage.delete(f)
            deleted += doomed
        return deleted

    # ------------------------------------------------------------------ load

    def load(
        self, state: Any = None, step: int | None = None, *, device: str | torch.device | None = None
    ) -> Any:
        """Restore a committed snapshot (default: the latest).

        With ``state`` given, its tensors are filled in place (dtype and shape must match)
        and the restored state is returned (plain values such as step counters come from the
        snapshot); without, a new state is built on ``device`` (default CPU).
        """
        self._wait_last(raise_error=False)  # a failed save is its handle's (and the next save's) to report
        manifest = self.manifest(step)
        targets: dict[str, torch.Tensor] = flatten(state)[0] if state is not None else {}
        out: dict[str, torch.Tensor] = {}
        reads: dict[str, list[tuple[int, memoryview]]] = {}
        pending = []
        for name, entry in manifest.tensors.items():
            dtype = dtype_from_name(entry.dtype)
            shape = tuple(entry.shape)
            target = targets.get(name)
            if target is not None and (target.dtype != dtype or tuple(target.shape) != shape):
                raise LoadMismatchError(
                    f"tensor {name!r}: snapshot step {manifest.step} has {entry.dtype} {list(shape)}, "
                    f"the target is {dtype_name(target.dtype)} {list(target.shape)}"
                )
            if len(entry.shards) != 1 or entry.shards[0].codec:
                raise FmstoreError(f"tensor {name!r}: sharded or encoded tensors load in a later version")
            shard = entry.shards[0]
            nbytes = shard.end - shard.begin
            numel = 1
            for s in shape:
                numel *= s
            if nbytes != numel * torch.empty(0, dtype=dtype).element_size():
                raise ManifestError(
                    f"tensor {name!r}: {nbytes} bytes recorded for {entry.dtype} {list(shape)}"
                )
            direct = target is not None and target.device.type == "cpu" and target.is_contiguous()
            buf = (
                torch.empty(nbytes, dtype=torch.uint8) if not direct else target.reshape(-1).view(torch.uint8)
            )
            if nbytes:
                reads.setdefault(shard.file, []).append((shard.begin, memoryview(buf.numpy())))
            pending.append((name, shard, buf, dtype, shape, target))
        for file, ranges in reads.items():
            try:
                self.storage.read_ranges(file, ranges)
            except FileNotFoundError:
                raise CorruptBlobError(
                    f"snapshot step {manifest.step}: shard file {file!r} is missing"
                ) from None
            except CorruptBlobError as e:
                names = [n for n, s, *_ in pending if s.file == file]
                raise CorruptBlobError(
                    f"snapshot step {manifest.step}: shard file {file!r} (tensors {names[:3]}...): {e}"
                ) from None
        for name, shard, buf, dtype, shape, target in pending:
            if checksum(buf) != shard.checksum:
                raise ChecksumError(
                    f"snapshot step {manifest.step}: tensor {name!r} in {shard.file!r} "
                    f"(bytes {shard.begin}..{shard.end}) does not match its checksum"
                )
            if target is not None:
                if buf.data_ptr() != target.data_ptr():
                    target.copy_(buf.view(dtype).reshape(shape))
                out[name] = target
            else:
                t = buf.view(dtype).reshape(shape)
                out[name] = t.to(device) if device is not None else t
        return unflatten(manifest.tree, out)

    # ------------------------------------------------------------------ lifecycle

    def _wait_last(self, *, raise_error: bool = True) -> None:
        last = self._last
        if last is None:
            return
        if raise_error:
            last.wait()
        else:
            wait_futures([last._future])

    def wait(self) -> SnapshotInfo | None:
        """Wait for the save in flight, if any; re-raises its error."""
        last = self._last
        return last.wait() if last is not None else None

    def close(self) -> None:
        """Wait for the save in flight, then free the pinned pool and threads."""
        if self._closed:
            return
        try:
            self._wait_last()
        finally:
            self._closed = True
            self._persist.shutdown(wait=True)
            self._stager.pool.clear()
            self.storage.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.storage.url!r})"


def _shard_header(items: list) -> tuple[bytes, list[tuple[int, int]]]:
    """A safetensors header for the tensors to write, and each one's byte range in the file."""
    body: dict[str, Any] = {"__metadata__": {"format": "fmstore.shard", "fmstore": "1"}}
    pos = 0
    spans = []
    for st, _ in items:
        code = SAFETENSORS_CODES.get(st.dtype)  # others are stored as U8; the manifest has the dtype
        shape = list(st.shape) if code else [st.nbytes]
        body[st.name] = {"dtype": code or "U8", "shape": shape, "data_offsets": [pos, pos + st.nbytes]}
        spans.append((pos, pos + st.nbytes))
        pos += st.nbytes
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    hlen = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, [(a + hlen, b + hlen) for a, b in spans]
