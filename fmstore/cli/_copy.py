"""The copy engine of ``fmstore cp``: committed snapshots from one root to another (any two of
a local directory, S3 or another fsspec URL).

For each step, the files its manifest references are copied under the same relative paths,
an earlier step's file it references incrementally included ("carried"), so the manifest is
valid at the destination unchanged.  Files are streamed in parts (never held whole in memory)
and written whole-or-nothing (:meth:`Storage.write_streamed`).  Nothing is trusted
before it is read back from the destination:

* each copied file is read back part by part, and every part must equal the part read from the
  source (an xxh3_128 digest per part, taken while copying: the whole file, safetensors header
  included, arrived intact);
* every raw shard's stored range is checked against the manifest's chunk digests (xxh3_128 of
  each ``chunk_size`` chunk, as the checkpointer recorded them) in the same read-back pass;
* coded shards (a non-empty ``codec``) are decoded from the destination and checked by the
  snapshot reader itself (:meth:`Snapshot.verify` over a :class:`Snapshot` built from the
  source manifest held in memory and the destination's storage: no manifest file is needed).

Only then is ``manifest.json`` written at the destination (one atomic write: the commit), with
the source's exact bytes.  A killed copy leaves at most shard files (and, locally, a temporary
file of a dead writer, which no listing shows), never a manifest; the next run finds the files
that are already there with the right size, verifies them as above (against the manifest, and
the safetensors header against the source's) and copies the rest.  A step committed at the
destination already is never written to.  A file that a committed snapshot at the destination
references is never overwritten: if it differs from the source's, the copy stops.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..checkpoint.level import SnapshotLevel, SnapshotNotFoundError
from ..checkpoint.manifest import MANIFEST, Manifest, Shard, step_dir
from ..errors import CorruptBlobError, FmstoreError
from ..storage import Storage
from ..storage.files import chunks

#: Bytes per copy part (and per source digest): the unit read, written and uploaded.
PART_SIZE = 32 << 20
#: Parts a read-back window holds; two windows are in memory (one read while one is checked).
WINDOW_PARTS = 2
#: Test-only hook, documented in docs/cli.md: after the first file a ``cp`` process has copied
#: and verified, it creates the file this variable names and waits while that file exists
#: (a test kills it there, or deletes the file to let it go on).
PAUSE_ENV = "FMSTORE_CP_PAUSE_AFTER_FILE"


@dataclass
class FileCopy:
    file: str
    bytes: int
    action: str  # "copied" or "skipped" (already at the destination, verified)


@dataclass
class StepCopy:
    step: int
    status: str  # "copied", or "committed": already committed at the destination, skipped
    files: list[FileCopy] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    def count(self, action: str) -> tuple[int, int]:
        done = [f for f in self.files if f.action == action]
        return len(done), sum(f.bytes for f in done)

    def to_json(self) -> dict[str, Any]:
        copied, copied_bytes = self.count("copied")
        skipped, skipped_bytes = self.count("skipped")
        return {
            "step": self.step,
            "status": self.status,
            "note": self.note,
            "files_copied": copied,
            "bytes_copied": copied_bytes,
            "files_skipped": skipped,
            "bytes_skipped": skipped_bytes,
            "seconds": round(self.seconds, 4),
            "gb_per_s": round(copied_bytes / self.seconds / 1e9, 4) if self.seconds and copied_bytes else 0.0,
            "files": [{"file": f.file, "bytes": f.bytes, "action": f.action} for f in self.files],
        }


@dataclass(frozen=True)
class _Check:
    """A range of a file whose xxh3_128 digest must be ``digest``."""

    start: int
    end: int
    digest: str
    what: str  # for the error message


def _shard_checks(name: str, shard: Shard) -> list[_Check]:
    """The chunk checks of a raw shard's stored range (as the reader does them)."""
    size = shard.end - shard.begin
    if size == 0:
        return []
    cs = shard.chunk_size
    if not cs:
        raise CorruptBlobError(f"tensor {name!r} in {shard.file!r} has no chunk checksums")
    spans = list(chunks(shard.begin, shard.end, cs))
    if len(spans) != len(shard.chunks):
        raise CorruptBlobError(
            f"tensor {name!r} in {shard.file!r}: {len(shard.chunks)} chunk digests for {len(spans)} chunks"
        )
    return [
        _Check(a, b, d, f"tensor {name!r} chunk {i} (bytes {a}..{b})")
        for i, ((a, b), d) in enumerate(zip(spans, shard.chunks))
    ]


def _shard_key(s: Shard) -> tuple[int, int, str]:
    return (s.begin, s.end, s.checksum)


class Copier:
    """Copies committed snapshots from ``src`` to ``dst`` (see the module docstring)."""

    def __init__(
        self,
        src: Storage,
        dst: Storage,
        *,
        part_size: int = PART_SIZE,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.src, self.dst = src, dst
        self.part_size = part_size
        self._on_bytes = on_bytes or (lambda n: None)
        self._lock = threading.Lock()
        self._dst_level = SnapshotLevel("destination", dst)
        self._dst_refs: set[str] | None = None  # files committed destination snapshots reference
        # Shards (file -> (begin, end, checksum)) verified at the destination by this run:
        # a later step referencing the same bytes does not read them again.
        self._verified: dict[str, set[tuple[int, int, str]]] = {}
        self._pause = os.environ.get(PAUSE_ENV) or None
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="fmstore-cp-verify")

    def close(self) -> None:
        self._verifier.shutdown(wait=True)

    # ------------------------------------------------------------------ one step

    def copy(self, step: int, raw: bytes, manifest: Manifest) -> StepCopy:
        t0 = time.perf_counter()
        rel_manifest = f"{step_dir(step)}/{MANIFEST}"
        out = StepCopy(step, "copied")
        try:
            have = self.dst.read_bytes(rel_manifest)
        except FileNotFoundError:
            have = None
        if have is not None:
            out.status = "committed"
            out.note = (
                "already committed at the destination (identical manifest): skipped"
                if have == raw
                else "already committed at the destination with a DIFFERENT manifest: skipped, not overwritten"
            )
            out.seconds = time.perf_counter() - t0
            return out

        by_file: dict[str, list[tuple[str, Shard]]] = {}
        for name, entry in manifest.tensors.items():
            for s in entry.shards:
                by_file.setdefault(s.file, []).append((name, s))
        files = sorted(set(by_file) | set(manifest.files))
        pending: list[tuple[str, Future[None]]] = []
        for rel in files:
            shards = by_file.get(rel, [])
            size = self._source_size(rel, manifest)
            action = self._copy_file(rel, size, shards, pending)
            out.files.append(FileCopy(rel, size, action))
            if self._pause and action == "copied":
                for _, fut in pending:
                    fut.result()
                self._wait_paused()
        for _rel, fut in pending:
            fut.result()
        self._verify_coded(manifest, by_file)
        # Everything the manifest names is at the destination and verified: commit.
        self.dst.write(rel_manifest, [raw])
        if self._dst_refs is not None:
            self._dst_refs |= manifest.referenced_files()
        out.seconds = time.perf_counter() - t0
        return out

    def _source_size(self, rel: str, manifest: Manifest) -> int:
        try:
            size = self.src.size(rel)
        except FileNotFoundError:
            raise CorruptBlobError(
                f"source snapshot step {manifest.step}: shard file {rel!r} is missing under {self.src.url!r}"
            ) from None
        want = manifest.files.get(rel)
        if want is not None and want != size:
            raise CorruptBlobError(
                f"source snapshot step {manifest.step}: {rel!r} has {size} bytes, its manifest says {want}"
            )
        return size

    def _copy_file(
        self, rel: str, size: int, shards: list[tuple[str, Shard]], pending: list[tuple[str, Future[None]]]
    ) -> str:
        """Copy ``rel`` unless the destination has it intact; "copied" or "skipped"."""
        raw = [(n, s) for n, s in shards if not s.codec]
        coded = [(n, s) for n, s in shards if s.codec]
        try:
            dst_size: int | None = self.dst.size(rel)
        except FileNotFoundError:
            dst_size = None
        if dst_size == size:
            known = self._verified.get(rel)  # None: not seen intact by this run yet
            todo = [(n, s) for n, s in raw if known is None or _shard_key(s) not in known]
            try:
                if known is None:
                    self._check_header(rel, size)
                checks = [c for n, s in todo for c in _shard_checks(n, s)]
                # A coded shard is checked against the manifest by decoding (before the commit);
                # here its stored bytes must equal the source's, so a damaged copy is copied
                # again rather than failing every rerun.
                checks += [
                    _Check(s.begin, s.end, self._source_digest(rel, s.begin, s.end), f"tensor {n!r} (coded)")
                    for n, s in coded
                    if known is None or _shard_key(s) not in known
                ]
                if checks:
                    self._read_back(rel, size, checks, None)
                self._remember(rel, [s for _, s in todo])
                self._on_bytes(size)
                return "skipped"
            except CorruptBlobError as e:
                if rel in self._committed_refs():
                    raise CorruptBlobError(
                        f"{self.dst.url}/{rel} differs from the source and a snapshot committed at the "
                        f"destination references it: not overwritten ({e})"
                    ) from None
        elif dst_size is not None and rel in self._committed_refs():
            raise FmstoreError(
                f"{self.dst.url}/{rel} has {dst_size} bytes, the source's {size}, and a snapshot committed "
                "at the destination references it: not overwritten (a different run's snapshots?)"
            )
        self._verified.pop(rel, None)
        # A killed copy's temporary file of rel (locally; on S3 an unfinished multipart upload
        # is invisible, and a bucket lifecycle rule, AbortIncompleteMultipartUpload, frees it).
        self.dst.sweep_temp(rel)
        digests: dict[int, tuple[int, str]] = {}

        def fill(offset: int, buf: memoryview) -> None:
            if len(buf):
                self.src.read_ranges(rel, [(offset, buf)])
            digest = xxhash.xxh3_128_hexdigest(buf)
            with self._lock:
                digests[offset] = (len(buf), digest)
            self._on_bytes(len(buf))

        try:
            self.dst.write_streamed(rel, size, fill, part_size=self.part_size)
        except FileNotFoundError:
            raise CorruptBlobError(f"source: shard file {rel!r} vanished during the copy") from None
        checks = [c for n, s in raw for c in _shard_checks(n, s)]

        def verify() -> None:
            self._read_back(rel, size, checks, digests)
            self._remember(rel, [s for _, s in raw])

        pending.append((rel, self._verifier.submit(verify)))
        return "copied"

    def _remember(self, rel: str, shards: list[Shard]) -> None:
        with self._lock:
            self._verified.setdefault(rel, set()).update(_shard_key(s) for s in shards)

    def _committed_refs(self) -> set[str]:
        if self._dst_refs is None:
            refs: set[str] = set()
            for step in self._dst_level.steps():
                refs |= self._dst_level.manifest(step).referenced_files()
            self._dst_refs = refs
        return self._dst_refs

    # ------------------------------------------------------------------ verification

    def _source_digest(self, rel: str, start: int, end: int) -> str:
        """xxh3_128 of the source's bytes ``[start, end)`` of ``rel``, read a part at a time."""
        h = xxhash.xxh3_128()
        buf = bytearray(min(self.part_size, end - start))
        for a, b in chunks(start, end, self.part_size):
            mv = memoryview(buf)[: b - a]
            self.src.read_ranges(rel, [(a, mv)])
            h.update(mv)
        return h.hexdigest()

    def _check_header(self, rel: str, size: int) -> None:
        """The leading bytes (the safetensors header) of the destination's file equal the source's."""
        n = min(size, 64 << 10)
        if size >= 8:
            first = bytearray(8)
            self.src.read_ranges(rel, [(0, memoryview(first))])
            hlen = 8 + int.from_bytes(first, "little")
            if hlen <= size:
                n = hlen
        a, b = bytearray(n), bytearray(n)
        self.src.read_ranges(rel, [(0, memoryview(a))])
        self.dst.read_ranges(rel, [(0, memoryview(b))])
        if a != b:
            raise CorruptBlobError(f"{self.dst.url}/{rel}: its first {n} bytes differ from the source's")

    def _read_back(
        self, rel: str, size: int, checks: list[_Check], parts: dict[int, tuple[int, str]] | None
    ) -> None:
        """Read ``rel`` back from the destination, window by window in order, and check every
        copy part's digest (``parts``: offset -> (length, digest) of the source's bytes; the
        whole file is read) and every chunk check; the first mismatch raises
        :class:`CorruptBlobError`."""
        where = f"{self.dst.url}/{rel}"
        spans = sorted(checks, key=lambda c: c.start)
        if parts is not None:  # windows of whole copy parts, WINDOW_PARTS at a time
            offsets = sorted(parts)
            if sum(parts[a][0] for a in offsets) != size:
                raise CorruptBlobError(f"{where}: the copy did not cover the file")
            groups = [offsets[i : i + WINDOW_PARTS] for i in range(0, len(offsets), WINDOW_PARTS)]
            windows = [(g[0], g[-1] + parts[g[-1]][0]) for g in groups]
        else:  # just the windows the checks touch
            step = self.part_size * WINDOW_PARTS
            starts = sorted({w for c in spans for w in range(c.start // step * step, c.end, step)})
            windows = [(a, min(size, a + step)) for a in starts]
        active: list[tuple[_Check, Any]] = []
        nxt = 0
        for w0, mv in self._windows(rel, windows):
            w1 = w0 + len(mv)
            if parts is not None:
                a = w0
                while a < w1:
                    n, digest = parts[a]
                    if xxhash.xxh3_128_hexdigest(mv[a - w0 : a - w0 + n]) != digest:
                        raise CorruptBlobError(
                            f"{where}: bytes {a}..{a + n} read back differ from the source's after the copy"
                        )
                    a += n
            while nxt < len(spans) and spans[nxt].start < w1:
                active.append((spans[nxt], xxhash.xxh3_128()))
                nxt += 1
            still = []
            for c, h in active:
                h.update(mv[max(c.start, w0) - w0 : min(c.end, w1) - w0])
                if c.end > w1:
                    still.append((c, h))
                elif h.hexdigest() != c.digest:
                    raise CorruptBlobError(f"{where}: {c.what} does not match the manifest's checksum")
            active = still
        if active or nxt < len(spans):
            raise CorruptBlobError(f"{where}: shorter than the ranges the manifest records")

    def _windows(self, rel: str, windows: list[tuple[int, int]]) -> Iterator[tuple[int, memoryview]]:
        """The destination's bytes of each window, in order; the next window is read while
        the caller checks one (two window buffers in memory)."""
        if not windows:
            return
        longest = max(b - a for a, b in windows)
        bufs = [bytearray(longest) for _ in range(min(2, len(windows)))]

        def read(i: int) -> memoryview:
            a, b = windows[i]
            mv = memoryview(bufs[i % len(bufs)])[: b - a]
            try:
                self.dst.read_ranges(rel, [(a, mv)])
            except FileNotFoundError:
                raise CorruptBlobError(f"{self.dst.url}/{rel}: missing at the destination") from None
            return mv

        with ThreadPoolExecutor(1, thread_name_prefix="fmstore-cp-read") as ahead:
            fut = ahead.submit(read, 0)
            for i in range(len(windows)):
                mv = fut.result()
                if i + 1 < len(windows):
                    fut = ahead.submit(read, i + 1)
                yield windows[i][0], mv

    def _verify_coded(self, manifest: Manifest, by_file: dict[str, list[tuple[str, Shard]]]) -> None:
        """Decode and check, from the destination, every tensor with a coded shard not verified
        yet by this run (the snapshot reader does it; the manifest is the source's, in memory)."""
        names = sorted(
            {
                n
                for rel, shards in by_file.items()
                for n, s in shards
                if s.codec and _shard_key(s) not in self._verified.get(rel, set())
            }
        )
        if not names:
            return
        from ..checkpoint.snapshot import Snapshot

        problems = Snapshot(self.dst, manifest).verify(names)
        if problems:
            detail = "; ".join(f"{p.tensor}: {p.message}" for p in problems[:5])
            raise CorruptBlobError(
                f"step {manifest.step} at {self.dst.url}: {len(problems)} tensor(s) fail verification "
                f"after the copy: {detail}"
            )
        for n in names:
            for s in manifest.tensors[n].shards:
                if s.codec:
                    self._remember(s.file, [s])

    def _wait_paused(self) -> None:
        """The test-only pause (see :data:`PAUSE_ENV`): once per process."""
        path, self._pause = self._pause, None
        if path is None:
            return
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        while os.path.exists(path):
            time.sleep(0.02)


def committed_steps(storage: Storage) -> list[int]:
    """The committed steps under ``storage``, oldest first."""
    return SnapshotLevel("root", storage).steps()


def source_manifest(src: Storage, step: int) -> tuple[bytes, Manifest]:
    """The manifest of ``step`` under ``src``: its exact bytes (what the copy commits) and parsed."""
    rel = f"{step_dir(step)}/{MANIFEST}"
    try:
        raw = src.read_bytes(rel)
    except FileNotFoundError:
        raise SnapshotNotFoundError(
            f"no committed snapshot for step {step} under {src.url!r} (have {committed_steps(src)})"
        ) from None
    return raw, Manifest.from_json(raw, where=f"{src.url}/{rel}")
