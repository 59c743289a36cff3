"""One durable place holding snapshots (a local directory, an S3 prefix): write, commit, list,
retain and collect garbage there.

Each rank writes its own shard file; with several ranks, each reports its tensor table in a
small JSON file and rank 0 merges the reports and writes ``manifest.json``, the commit.
Ranks meet through files, not collectives: the persist runs in a background thread, where a
collective could deadlock against the training thread's own.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..blob import dtype_name
from ..codec import Encoded
from ..errors import FmstoreError, StorageError
from ..gcpause import paused_gc
from ..storage import Storage
from .lease import DEFAULT_TTL, WriterLease
from .listing import SnapshotNotFoundError, committed_steps, read_manifest  # noqa: F401
from .manifest import CHUNK_SIZE, MANIFEST, Manifest, Shard, TensorEntry, step_dir, tensors_body
from .reports import Layouts, Merged, ReportError, layout_digest, merge_reports
from .shardfile import FileEntry, header_digest, shard_header
from .sharding import Piece
from .snapshots import Snapshots
from .staging import StagedTensor
from .tree import merge_per_rank, per_rank_nodes

# SnapshotNotFoundError (fmstore.errors) is re-exported here for the modules that import it from
# this one.

#: An incremental save references unchanged tensors in a stored file only if they make up at
#: least this much of it (else they are copied forward: see SnapshotLevel.write_local), so
#: retention can free all but at most about 1 - LIVE_FRACTION of what older files hold.
LIVE_FRACTION = 0.9
#: ... and a file whose dead bytes are fewer than this is referenced whatever its fraction
#: (a small file pins little; copying would rewrite the unchanged tensors for nothing).
DEAD_SLACK = 1 << 20


@dataclass
class WriteItem:
    """A staged tensor piece this rank writes, with its (pending) checksum and, when the
    checkpointer compresses, how to encode it (once, whichever level asks first)."""

    staged: StagedTensor
    piece: Piece
    digest: Future[list[tuple[str, list[str]]]]
    encoder: Callable[[StagedTensor], Encoded] | None = None
    _encoded: Encoded | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def encoded(self) -> Encoded | None:
        if self.encoder is None or self.staged.nbytes == 0:
            return None
        with self._lock:
            if self._encoded is None:
                self._encoded = self.encoder(self.staged)
            return self._encoded


@dataclass
class LocalWrite:
    """What one rank's part of a snapshot wrote (its tensor table, its shard file)."""

    entries: dict[str, TensorEntry]
    files: dict[str, int]
    bytes_written: int
    tensors_written: int
    headers: dict[str, str] = field(default_factory=dict)  # file -> its header_digest


@dataclass
class Written:
    """What one level's part of a save did."""

    bytes_written: int
    tensors: int
    tensors_written: int


class SnapshotLevel:
    """Snapshots under one root; takes the steps that are multiples of ``every``."""

    def __init__(
        self,
        name: str,
        storage: Storage,
        *,
        every: int = 1,
        keep_last: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        incremental: bool = True,
        timeout: float = 1800.0,
        writer: str | None = None,
        lease_ttl: float = DEFAULT_TTL,
    ) -> None:
        """``writer``: the id of the job writing (the same on its ranks), in its shard files'
        names, so that no two writers ever write the same file; ``lease_ttl``: see
        :class:`~fmstore.checkpoint.lease.WriterLease`."""
        self.name = name
        self.storage = storage
        self.every = every
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.incremental = incremental
        self.timeout = timeout
        self.writer = writer or uuid.uuid4().hex
        self.lease_ttl = lease_ttl
        #: the root's snapshots: listing, commit, retention, gc, delete, the writer lease
        self.snapshots = Snapshots(storage, writer=self.writer, lease_ttl=lease_ttl)
        self._file_sizes: dict[str, int] = {}  # stored files' sizes, for write_local's live fractions
        self._last_manifest: Manifest | None = None
        #: the layout digest of this rank's last committed report (the coordinator has it)
        self._layout_sent: str | None = None
        self._layouts = Layouts()  # the coordinator's memory of the ranks' layouts

    @property
    def url(self) -> str:
        return self.storage.url

    def takes(self, step: int) -> bool:
        return step % self.every == 0

    def path_of(self, step: int) -> str:
        return f"{self.url.rstrip('/')}/{step_dir(step)}"

    def shard_file(self, step: int, *, kept: bool = False) -> str:
        """This rank's shard file of ``step``: ``step-N/<hash>-shard-r<rank>.safetensors``
        (``-kept-``: its file of unchanged tensors, see :meth:`write_local`).  The hash of
        (writer, rank) makes the name unique to this writer, and, leading the name, spreads a
        large job's keys over S3's key space (S3 scales request rates per key prefix: names
        that all began "shard-r0" would share one)."""
        h = hashlib.blake2b(f"{self.writer}:{self.rank}".encode(), digest_size=4).hexdigest()
        return f"{step_dir(step)}/{h}-{'kept' if kept else 'shard'}-r{self.rank:05d}.safetensors"

    @property
    def lease(self) -> WriterLease | None:
        """The coordinator's claim on the root, once it saves."""
        return self.snapshots.lease

    def claim(self) -> None:
        """Take the root's writer lease (the coordinator, before its first write); raises
        :class:`WriterConflictError` if another writer holds it."""
        self.snapshots.claim()

    # ------------------------------------------------------------------ listing

    def steps(self) -> list[int]:
        """Committed steps, oldest first (a snapshot without its manifest does not exist)."""
        return self.snapshots.steps()

    def committed(self, step: int) -> bool:
        return self.snapshots.committed(step)

    def manifest(self, step: int | None = None) -> Manifest:
        """The manifest of ``step`` (default: the latest committed one)."""
        return self.snapshots.manifest(step)

    def _base_manifest(self, step: int) -> Manifest | None:
        """The snapshot an incremental save of ``step`` references: the newest committed one
        before it (a manifest may only name files of its own or earlier steps)."""
        if not self.incremental:
            return None
        last = self._last_manifest  # this level's newest commit, saves one listing per save
        if last is not None and last.step < step:
            return last
        earlier = [s for s in self.steps() if s < step]
        if not earlier:
            return None
        try:
            return self.manifest(earlier[-1])
        except SnapshotNotFoundError:  # removed meanwhile (retention): no base, write everything
            return None

    # ------------------------------------------------------------------ save

    def write(
        self,
        step: int,
        items: list[WriteItem],
        names: list[str],
        tree: dict[str, Any],
        meta: dict[str, Any],
        token: str = "",
    ) -> Written:
        """Write this rank's changed tensors, report, and (rank 0) commit the manifest.

        ``token`` names this save attempt, the same on every rank: reports and aborts left in
        the step's directory by an attempt that died (a killed job saving the same step again
        after its restart) carry another token and are ignored, never merged."""
        rel_dir = step_dir(step)
        doing = f"writing {self.shard_file(step)}"
        local: LocalWrite | None = None
        try:
            try:
                local = self.write_local(step, items)
            except BaseException as e:
                if self.world_size > 1:  # tell the coordinator instead of leaving it waiting
                    self._report(
                        rel_dir, {"token": token, "error": f"rank {self.rank}: {type(e).__name__}: {e}"}
                    )
                raise
            entries, files, headers = local.entries, local.files, local.headers
            if self.world_size > 1:
                doing = f"writing {rel_dir}/rank-{self.rank:05d}.json"
                report = rank_report(token, names, files, entries, tree, self.rank, headers)
                layout = report["layout"] = layout_digest(report["also"], report["tensors"])
                if layout == self._layout_sent:  # the coordinator has it from the last save
                    del report["also"], report["tensors"]
                self._report(rel_dir, report)
                self._layout_sent = None  # (until this save commits: after a failed one, send it all)
                if self.rank != 0:
                    doing = f"waiting for rank 0 to commit {rel_dir}"
                    self._wait_for_commit(rel_dir, token)
                    self._last_manifest = None  # only rank 0 holds it; read it back when needed
                    self._layout_sent = layout
                    return Written(local.bytes_written, len(entries), local.tensors_written)
                doing = f"merging the ranks' reports of {rel_dir}"
                entries, files, per_rank, headers = self.collect_reports(rel_dir, step, token)
                tree = merge_trees(tree, per_rank)
                self._layout_sent = layout
            doing = f"writing {rel_dir}/{MANIFEST}"
            written = local.bytes_written + self.commit(step, entries, files, tree, meta, headers=headers)
        except OSError as e:
            self._discard(step, local, token)
            cause = e.__cause__ if isinstance(e, StorageError) and isinstance(e.__cause__, OSError) else e
            reason = cause.strerror or cause
            raise StorageError.of(
                e, f"step {step} not saved to {self.url!r}: {doing} failed: {reason}"
            ) from e
        except BaseException:
            self._discard(step, local, token)
            raise
        if self.world_size > 1:
            self.snapshots.discard(f"{rel_dir}/rank-{r:05d}.json" for r in range(self.world_size))
        return Written(written, len(entries), local.tensors_written)

    def _discard(self, step: int, local: LocalWrite | None, token: str) -> None:
        """After a failed save: delete the shard files this rank wrote for it, unless the step
        got committed after all (a failure after the manifest, e.g. in retention) or another
        rank may still commit it (this rank's wait for the coordinator ran out: the files stay
        for gc).  Best effort: the save's own error is what the caller sees."""
        if local is None or not local.files:
            return
        try:
            try:  # committed after all, by this writer or (lost race) another: keep what it names
                keep = self.manifest(step).referenced_files()
            except SnapshotNotFoundError:
                keep = set()
            if keep:
                self.snapshots.discard(set(local.files) - keep)
                return
            if self.world_size > 1:
                aborted = self._abort_of(step_dir(step), token) is not None
                if self.rank != 0 and not aborted:
                    return
                if self.rank == 0 and not aborted:  # tell the other ranks, so they clean up too
                    body = {"token": token, "errors": [f"rank 0: the commit of step {step} failed"]}
                    self.storage.write(f"{step_dir(step)}/aborted.json", [json.dumps(body).encode()])
            self.snapshots.discard(local.files)
        except Exception:  # noqa: BLE001 - a full or failing disk may refuse this too
            pass

    def _abort_of(self, rel_dir: str, token: str) -> dict[str, Any] | None:
        """The abort this save attempt's coordinator left in ``rel_dir``, if any (one a dead
        attempt left carries another token and is ignored)."""
        try:  # (a look first: on an object store one request where a missing read is two)
            if not self.storage.exists(f"{rel_dir}/aborted.json"):
                return None
            body = json.loads(self.storage.read_bytes(f"{rel_dir}/aborted.json"))
        except FileNotFoundError:
            return None
        return body if isinstance(body, dict) and body.get("token", "") == token else None

    def write_local(self, step: int, items: list[WriteItem]) -> LocalWrite:
        """Write this rank's shard file: the items whose bytes the base snapshot does not hold
        already (those are referenced there).  Nothing is committed.

        An unchanged tensor is referenced only where that keeps files nearly all live: when
        the unchanged tensors found in a stored file make up at least :data:`LIVE_FRACTION`
        of it (or the rest is under :data:`DEAD_SLACK`).  Otherwise (a file of tensors that stay beside ones that changed) they are
        written once more, into this step's *kept* file, a file of tensors that stay, and
        referenced there from then on; so retention frees the changing tensors' files and
        the root holds about one snapshot's bytes, never whole older files pinned by a few
        of their tensors (issue 13, finding 9)."""
        base = self._base_manifest(step)
        if base is not None:
            self._file_sizes.update(base.files)
        entries: dict[str, TensorEntry] = {}
        to_write: list[tuple[WriteItem, Shard]] = []
        unchanged: dict[str, list[tuple[WriteItem, Shard, Shard]]] = {}  # stored file -> candidates
        for item in items:
            st, piece = item.staged, item.piece
            shard = Shard(list(piece.offsets), list(st.shape), "", 0, 0, "", [], CHUNK_SIZE, [])
            # Only a tensor the base snapshot might already hold waits for its digest
            # before the write; the others are hashed while the file is being written.
            if base is not None and _may_match(base, piece, st.dtype):
                shard.checksum, shard.chunks = item.digest.result()[0]
                old = _same_shard(base, piece, st.dtype, shard)
                if old is not None:
                    unchanged.setdefault(old.file, []).append((item, shard, old))
                    continue
            to_write.append((item, shard))
        to_keep: list[tuple[WriteItem, Shard]] = []
        for rel, found in unchanged.items():
            size = self._file_size(rel)
            dead = size - sum(old.end - old.begin for _, _, old in found)
            if dead <= max((1 - LIVE_FRACTION) * size, DEAD_SLACK):  # point at the bytes stored
                for item, _, old in found:
                    entries[item.piece.name] = TensorEntry(
                        dtype_name(item.staged.dtype), list(item.piece.global_shape), [old]
                    )
            else:
                to_keep += [(item, shard) for item, shard, _ in found]
        files: dict[str, int] = {}
        headers: dict[str, str] = {}
        for rel, pairs in ((self.shard_file(step), to_write), (self.shard_file(step, kept=True), to_keep)):
            if pairs:
                files[rel], headers[rel] = self._write_file(rel, pairs, entries)
        self._file_sizes.update(files)
        return LocalWrite(entries, files, sum(files.values()), len(to_write) + len(to_keep), headers)

    def _write_file(
        self, rel: str, pairs: list[tuple[WriteItem, Shard]], entries: dict[str, TensorEntry]
    ) -> tuple[int, str]:
        """Write ``pairs`` into shard file ``rel``; their entries go into ``entries``.  Returns
        the file's size and its header's digest."""
        bodies = [_body(item) for item, _ in pairs]
        header, spans = shard_header([b for b, _ in bodies])
        segments: list[memoryview | bytes] = [header]
        segments += [seg for _, segs in bodies for seg in segs]
        size = self.storage.write(rel, segments)
        for (item, shard), (begin, end), (entry, _) in zip(pairs, spans, bodies):
            shard.checksum, shard.chunks = item.digest.result()[0]
            shard.file, shard.begin, shard.end = rel, begin, end
            shard.codec = entry.codec
            entries[item.piece.name] = TensorEntry(
                dtype_name(item.staged.dtype), list(item.piece.global_shape), [shard]
            )
        return size, header_digest(header)

    def _file_size(self, rel: str) -> int:
        """A stored file's size: known from the manifests this level wrote or read, else asked."""
        if rel not in self._file_sizes:
            self._file_sizes[rel] = self.storage.size(rel)
        return self._file_sizes[rel]

    def commit(
        self,
        step: int,
        entries: dict[str, TensorEntry],
        files: dict[str, int],
        tree: dict[str, Any],
        meta: dict[str, Any],
        world_size: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> int:
        """Write the manifest (the commit) and apply retention; returns the manifest's size.
        ``headers``: the written files' header digests (:attr:`.Manifest.headers`)."""
        manifest = Manifest(
            step=step,
            world_size=world_size or self.world_size,
            tensors=entries,
            tree=tree,
            files=files,
            meta=meta,
            headers=headers or {},
        )
        with paused_gc():  # a manifest's JSON is thousands of short-lived objects
            raw = manifest.to_json()
        self.snapshots.commit(step, raw)  # created, never replaced: of two writers, one wins
        self._last_manifest = manifest
        if self.keep_last is not None and self.rank == 0:
            self.apply_retention()
        return len(raw)

    def drop(self, step: int) -> None:
        """Uncommit ``step`` and delete the files no other committed snapshot references."""
        if self._last_manifest is not None and self._last_manifest.step == step:
            self._last_manifest = None
        self.snapshots.drop(step)

    # ------------------------------------------------------------------ coordination

    def _report(self, rel_dir: str, body: dict[str, Any]) -> None:
        self.storage.write(f"{rel_dir}/rank-{self.rank:05d}.json", [json.dumps(body).encode()])

    def _poll(self, what: str, ready: Any) -> Any:
        """``ready()`` until it is not None, backing off to a longest wait that, on an object
        store, grows with the ranks that poll one key together, so that all of them ask at most
        :data:`POLL_RATE` times a second (S3 serves 5,500 GETs a second per prefix; 1,024 ranks
        polling every 0.5 s would ask 2,048 times), and from a first wait an eighth of that
        (8,192 ranks starting at 10 ms would ask 30,000 times a second in the first 10 s);
        waits jittered so the ranks spread out."""
        deadline = time.monotonic() + self.timeout
        spread = 0.0 if self.storage.local else self.world_size / POLL_RATE
        longest, delay = max(0.5, spread), max(0.01, spread / 8)  # (from the first wait on)
        while True:
            out = ready()
            if out is not None:
                return out
            if time.monotonic() > deadline:
                raise FmstoreError(f"timed out after {self.timeout:.0f} s waiting for {what}")
            time.sleep(delay * random.uniform(0.75, 1.0))
            delay = min(delay * 1.5, longest)

    def collect_reports(self, rel_dir: str, step: int, token: str) -> Merged:
        """Coordinator: wait for every rank's report of this attempt (``token``) in ``rel_dir``,
        then merge them into one tensor table (:func:`~fmstore.checkpoint.reports.merge_reports`:
        the table, files -> sizes, rank -> its per-rank nodes for :func:`merge_trees`, files ->
        header digests)."""
        reports: dict[int, dict[str, Any]] = {}

        def read(r: int) -> tuple[int, bytes | None]:
            rel = f"{rel_dir}/rank-{r:05d}.json"
            try:
                return r, self.storage.read_bytes(rel) if self.storage.exists(rel) else None
            except FileNotFoundError:  # replaced meanwhile: read it at the next poll
                return r, None

        def all_in() -> dict[int, dict[str, Any]] | None:
            missing = [r for r in range(self.world_size) if r not in reports]
            # In parallel: one after the other, 1,024 reports on an object store are a minute.
            # The collector paused for all of them: a large job's reports are millions of
            # objects, none garbage, that collections between two reports would scan again
            # and again (8,192 reports: 448 MB of JSON).
            with paused_gc():
                for r, raw in pool.map(read, missing) if len(missing) > 1 else map(read, missing):
                    if raw is None:
                        continue
                    rep = _parse_report(raw, f"{rel_dir}/rank-{r:05d}.json", r, step)
                    if rep.get("token", "") == token:  # else a dead attempt's: its rank rewrites it
                        reports[r] = rep
            return reports if len(reports) == self.world_size else None

        with ThreadPoolExecutor(
            min(REPORT_READERS, self.world_size), thread_name_prefix="fmstore-reports"
        ) as pool:
            self._poll(f"all {self.world_size} ranks to report step {step} to {self.name!r}", all_in)
        failed = [rep["error"] for rep in reports.values() if rep.get("error")]
        if failed:
            body = {"token": token, "errors": failed}
            self.storage.write(f"{rel_dir}/aborted.json", [json.dumps(body).encode()])
            raise FmstoreError(f"step {step} not committed to {self.name!r}: {'; '.join(failed)}")
        try:
            return merge_reports(reports, step, self._layouts)
        except BaseException:
            self._layouts = Layouts()  # (the ranks send their layouts again at the next save)
            raise

    def _wait_for_commit(self, rel_dir: str, token: str) -> None:
        def committed() -> bool | None:
            if self.storage.exists(f"{rel_dir}/{MANIFEST}"):
                return True
            abort = self._abort_of(rel_dir, token)
            if abort is not None:
                raise FmstoreError(f"{rel_dir} not committed to {self.name!r}: {'; '.join(abort['errors'])}")
            return None

        self._poll(f"rank 0 to commit {rel_dir} to {self.name!r}", committed)

    # ------------------------------------------------------------------ retention

    def apply_retention(self) -> None:
        assert self.keep_last is not None
        self.snapshots.retain(self.keep_last)

    def close(self) -> None:
        self.snapshots.release()
        self.storage.close()

    def __repr__(self) -> str:
        return f"SnapshotLevel({self.name!r}, {self.url!r}, every={self.every}, keep_last={self.keep_last})"


def open_levels(specs: list[Any], *, io_threads: int, **options: Any) -> list[SnapshotLevel]:
    """The levels of a policy's resolved ``specs`` (:func:`~fmstore.checkpoint.policy.resolve`),
    each on its storage; ``options`` are :class:`SnapshotLevel`'s."""
    return [
        SnapshotLevel(
            spec.name,
            Storage(spec.url, spec.storage_options, io_threads=io_threads, fs=spec.fs),
            every=spec.every,
            keep_last=spec.keep_last,
            **options,
        )
        for spec in specs
    ]


def _may_match(base: Manifest, piece: Piece, dtype: torch.dtype) -> bool:
    """Whether the base snapshot has a shard that could hold this piece unchanged."""
    old = base.tensors.get(piece.name)
    return (
        old is not None
        and old.dtype == dtype_name(dtype)
        and tuple(old.shape) == tuple(piece.global_shape)
        and any(s.offsets == list(piece.offsets) for s in old.shards)
    )


def _same_shard(base: Manifest, piece: Piece, dtype: torch.dtype, new: Shard) -> Shard | None:
    """The stored shard of the base snapshot holding exactly these bytes, if there is one."""
    old = base.tensors.get(piece.name)
    if old is None or old.dtype != dtype_name(dtype) or tuple(old.shape) != tuple(piece.global_shape):
        return None
    for s in old.shards:
        # Checksums are of the original bytes, so a match holds whatever codec stored it.
        if s.offsets == new.offsets and s.lengths == new.lengths and s.checksum == new.checksum:
            return s
    return None


def _body(item: WriteItem) -> tuple[FileEntry, list[memoryview | bytes]]:
    """The shard-file entry for a tensor and the segments of its bytes: the raw tensor, or
    its encoded blob as a U8 entry (the manifest records the codec)."""
    st = item.staged
    enc = item.encoded()
    if enc is not None:
        return FileEntry(st.name, "U8", [enc.nbytes], enc.nbytes, enc.codec), list(enc.segments)
    entry = FileEntry.raw(st.name, st.dtype, st.shape)
    return entry, [memoryview(st.data.numpy())] if st.nbytes else []


def rank_report(
    token: str,
    names: list[str],
    files: dict[str, int],
    entries: dict[str, TensorEntry],
    tree: dict[str, Any],
    rank: int,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The report rank ``rank`` writes of its part of a multi-rank save (the body of its
    ``rank-NNNNN.json``, which :meth:`SnapshotLevel.collect_reports` reads): the save attempt's
    ``token``, the tensor names of its state not among its tensors (``also``: each tensor
    name of a state is in one or the other), the files it wrote (name -> size; ``headers``:
    name -> :func:`~.shardfile.header_digest`), its tensors
    (names, dtypes, shapes) and their shards as a shard table (``tensors``/``shards``, as a
    version-3 manifest has them) and, from ranks other than 0, the per-rank nodes of its ``tree``."""
    return {
        "token": token,
        "error": None,
        "also": [n for n in names if n not in entries],
        "files": files,
        "headers": headers or {},
        # By name: a rank's layout is then the same at every save of the same state, whichever
        # of its tensors an incremental save wrote or referenced (reports.Layouts).
        **tensors_body(dict(sorted(entries.items()))),
        "per_rank": per_rank_nodes(tree) if rank != 0 else [],
    }


#: How many times a second all the ranks waiting on one key of an object store ask for it, at
#: most, once their backoff is done (:meth:`SnapshotLevel._poll`).
POLL_RATE = 500
#: Threads the coordinator reads the ranks' reports with.
REPORT_READERS = 32


def merge_trees(tree: dict[str, Any], per_rank: dict[int, list[Any]]) -> dict[str, Any]:
    """The snapshot's tree: a copy of rank 0's ``tree`` (the caller's stays as it is) with every
    other rank's per-rank nodes (``collect_reports``' third part) merged in."""
    tree = json.loads(json.dumps(tree))
    for r, nodes in per_rank.items():
        merge_per_rank(tree, r, nodes)
    return tree


def _parse_report(raw: bytes, rel: str, rank: int, step: int) -> dict[str, Any]:
    """A rank's report file as a JSON object; anything else (a torn or foreign file) is a
    :class:`ReportError` naming the rank, the step and the file, not a JSONDecodeError."""
    try:
        rep = json.loads(raw)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise ReportError(f"step {step}: rank {rank}'s report {rel} is not JSON ({e})") from None
    if not isinstance(rep, dict):
        raise ReportError(f"step {step}: rank {rank}'s report {rel} is a {type(rep).__name__}, not an object")
    return rep
