"""The one owner of a root's snapshots: :class:`Snapshots`.

Everything that changes what a checkpoint root holds goes through it, and it is the only code
besides the storage layer (:mod:`fmstore.storage`) that deletes anything under a root: the
Checkpointer's levels (commit, retention, ``gc``, ``delete``, a failed save's files), the DCP
writer, Lightning's removal of checkpoints and of saves a crash interrupted, and ``fmstore
gc`` / ``du``.  One place holds the rules:

- a snapshot exists once its ``step-N/manifest.json`` exists (:meth:`Snapshots.commit` creates
  it, never replaces it), and is gone once that manifest is (deleted first, files after);
- a file a committed snapshot references is never deleted;
- garbage is collected only in step directories older than the newest committed snapshot
  (a newer one may be being written now);
- only the root's writer deletes: the writer lease (:mod:`fmstore.checkpoint.lease`) is
  claimed, checked before each commit and retention, and released here.

Imports no torch (``fmstore gc`` and ``du`` use it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import FmstoreError, WriterConflictError
from ..storage import Storage
from .lease import DEFAULT_TTL, LEASE, WriterLease
from .listing import SnapshotNotFoundError, committed_steps, read_manifest
from .manifest import MANIFEST, Manifest, parse_step_dir, step_dir


class Snapshots:
    """The snapshots under one root (``storage``), written by ``writer`` (a job's id, the same
    on its ranks) holding the root's writer lease once :meth:`claim` ed."""

    def __init__(self, storage: Storage, *, writer: str | None = None, lease_ttl: float = DEFAULT_TTL) -> None:
        self.storage = storage
        self.writer = writer or uuid.uuid4().hex
        self.lease_ttl = lease_ttl
        self.lease: WriterLease | None = None  # the writer's claim on the root, once claimed

    @property
    def url(self) -> str:
        return self.storage.url

    # ------------------------------------------------------------------ listing

    def steps(self) -> list[int]:
        """Committed steps, oldest first (a snapshot without its manifest does not exist)."""
        return committed_steps(self.storage)

    def committed(self, step: int) -> bool:
        return self.storage.exists(f"{step_dir(step)}/{MANIFEST}")

    def manifest(self, step: int | None = None) -> Manifest:
        """The manifest of ``step`` (default: the latest committed one)."""
        return read_manifest(self.storage, step)

    def scan(self) -> Scan:
        """Every file under the root and every committed manifest, as of one listing."""
        return scan(self.storage)

    # ------------------------------------------------------------------ the writer lease

    def claim(self) -> None:
        """Take the root's writer lease (before this writer's first write); raises
        :class:`WriterConflictError` naming the holder if another writer holds it."""
        if self.lease is None:
            self.lease = WriterLease(self.storage, self.writer, ttl=self.lease_ttl, remove=self._remove_lease)
        self.lease.acquire()

    def check(self) -> None:
        """Before a commit or a deletion: raise if this writer claimed the root and lost it."""
        if self.lease is not None:
            self.lease.check()

    def release(self, *, forget: bool = False) -> None:
        """Give the root up (idempotent); ``forget``: a later :meth:`claim` takes a new lease."""
        lease = self.lease
        if forget:
            self.lease = None
        if lease is not None:
            lease.release()

    def orphan(self) -> None:
        """This writer's owner was dropped without closing (see :meth:`WriterLease.orphan`)."""
        if self.lease is not None:
            self.lease.orphan()

    @contextmanager
    def claimed(self, who: str = "gc") -> Iterator[Snapshots]:
        """Hold the root's writer lease for the block, under a new id starting ``who-`` (so a job
        refused meanwhile sees who holds the root); :class:`~fmstore.errors.WriterConflictError`
        naming the holder while another job holds the root (nothing deleted)."""
        self.writer = f"{who}-{uuid.uuid4().hex}"
        self.lease = None
        try:
            self.claim()
        except WriterConflictError as e:
            raise WriterConflictError(f"nothing deleted: {e}") from None
        try:
            yield self
        finally:
            self.release(forget=True)

    def _remove_lease(self, tag: str | None) -> None:
        """The lease's object goes with its release (not a local lease file: deleting it would
        race a claimant); ``tag``: its version, where the store has conditional requests."""
        if tag is not None:
            self.storage.delete_if(LEASE, tag)
        else:
            self.storage.delete(LEASE)

    # ------------------------------------------------------------------ write

    def begin(self, step: int) -> str:
        """Before writing ``step``: its directory; a committed step is never overwritten."""
        if self.committed(step):
            raise FmstoreError(f"step {step} is already committed under {self.url!r}; it is never overwritten")
        return step_dir(step)

    def commit(self, step: int, raw: bytes) -> None:
        """Commit ``step``: create its manifest (``raw``), never replacing one, as the root's
        writer.  Of two writers committing one step, one wins; the other gets
        :class:`WriterConflictError`."""
        self.check()
        try:
            self.storage.write(f"{step_dir(step)}/{MANIFEST}", [raw], exclusive=True)
        except FileExistsError:
            raise WriterConflictError(
                f"step {step} not saved to {self.url!r}: another writer committed it meanwhile "
                "(its snapshot is kept; this save's files are removed)"
            ) from None

    def discard(self, files: Any) -> None:
        """Delete ``files`` (paths under the root) of a save that is not committed, or that
        its commit no longer needs (rank reports, a lost race's shard files)."""
        for rel in files:
            self.storage.delete(rel)

    def discard_unfinished(self) -> list[str]:
        """Remove the step directories newer than the newest committed snapshot: saves a crash
        interrupted (call before this writer's first save; another writer's save in progress
        would go too).  Older uncommitted directories may hold files committed snapshots
        reference, and stay.  Returns the directories removed."""
        committed = self.steps()
        newest = committed[-1] if committed else -1
        gone = []
        for name in self.storage.list_dir():
            step = parse_step_dir(name)
            if step is not None and step > newest:
                self.storage.delete_dir(name)
                gone.append(name)
        return gone

    # ------------------------------------------------------------------ delete, retain, collect

    def drop(self, step: int) -> None:
        """Uncommit ``step`` and delete the files no other committed snapshot references."""
        if not self.committed(step):
            raise SnapshotNotFoundError(f"no committed snapshot for step {step} under {self.url!r}")
        self.storage.delete(f"{step_dir(step)}/{MANIFEST}")  # from here on it does not exist
        self._delete_unreferenced([step_dir(step)], self._referenced(self.steps()))

    def retain(self, keep_last: int) -> None:
        """Keep the newest ``keep_last`` committed snapshots: uncommit the others, then delete
        what the kept ones do not reference (:meth:`gc`)."""
        self.check()
        steps = self.steps()
        drop, keep = steps[:-keep_last], steps[-keep_last:]
        for step in drop:  # uncommit first: from here on the snapshot does not exist
            self.storage.delete(f"{step_dir(step)}/{MANIFEST}")
        self.gc(keep_steps=keep)

    def gc(self, *, keep_steps: list[int] | None = None) -> list[str]:
        """Delete files that no committed snapshot references, in directories older than
        the newest committed snapshot (newer ones may still be being written)."""
        keep = self.steps() if keep_steps is None else keep_steps
        if not keep:
            return []
        dirs = [
            name
            for name in self.storage.list_dir()
            if (step := parse_step_dir(name)) is not None and step not in keep and step < keep[-1]
        ]
        return self._delete_unreferenced(dirs, self._referenced(keep))

    def _referenced(self, steps: list[int]) -> set[str]:
        out: set[str] = set()
        for step in steps:
            out |= self.manifest(step).referenced_files()
        return out

    def _delete_unreferenced(self, dirs: list[str], referenced: set[str]) -> list[str]:
        """Delete the files of ``dirs`` not in ``referenced`` (a directory left empty goes too)."""
        deleted = []
        for name in dirs:
            files = [f"{name}/{f}" for f in self.storage.list_dir(name)]
            doomed = [f for f in files if f not in referenced]
            if len(doomed) == len(files):
                self.storage.delete_dir(name)
            else:
                for f in doomed:
                    self.storage.delete(f)
            deleted += doomed
        return deleted

    def plan_gc(self, keep_last: int | None = None) -> GcPlan:
        """What ``fmstore gc`` collects (:func:`plan_gc` of a fresh :meth:`scan`)."""
        return plan_gc(self.scan(), keep_last)

    def collect(self, plan: GcPlan) -> None:
        """Do what ``plan`` lists, holding the lease (:meth:`claimed`; the plan made under it):
        uncommit the dropped steps first, then delete.  A lease lost meanwhile (an S3 lease not
        renewed in time, taken over) stops it before the next deletion."""
        for step in plan.uncommit:  # from here on the snapshot does not exist
            self.check()
            self.storage.delete(f"{step_dir(step)}/{MANIFEST}")
        for d in plan.dirs:
            self.check()
            if d["whole"]:
                self.storage.delete_dir(d["dir"])
            else:
                for f, _ in d["files"]:
                    self.storage.delete(f)

    def __repr__(self) -> str:
        return f"Snapshots({self.url!r})"


# ---------------------------------------------------------------------- what a root holds


def all_files(storage: Storage) -> dict[str, int]:
    """Every file under the root (relative path -> size), temporary files included."""
    return dict(storage.scan(temp=True))


@dataclass
class Scan:
    """A root's files and committed manifests, as of one listing."""

    url: str
    files: dict[str, int]
    dirs: dict[int, str]  # step -> its directory, every step directory (empty ones too)
    manifests: dict[int, Manifest] = field(default_factory=dict)  # committed steps

    @property
    def committed(self) -> list[int]:
        return sorted(self.manifests)

    def in_dir(self, step: int) -> list[str]:
        prefix = self.dirs[step] + "/"
        return sorted(f for f in self.files if f.startswith(prefix))

    def classify(self) -> dict[str, str]:
        """Each file's class (see :mod:`fmstore.cli._copy_usage`)."""
        own = {f for m in self.manifests.values() for f in m.files}
        referenced = {f for m in self.manifests.values() for f in m.referenced_files()}
        out = {}
        for rel in self.files:
            top, _, rest = rel.partition("/")
            step = parse_step_dir(top) if rest else None
            if step is None:
                out[rel] = "other"
            elif rel in own:
                out[rel] = "own"
            elif step in self.manifests and rest == MANIFEST:
                out[rel] = "manifest"
            elif rel in referenced:
                out[rel] = "retained"
            elif step not in self.manifests:
                out[rel] = "incomplete"
            else:
                out[rel] = "unreferenced"
        return out


def scan(storage: Storage) -> Scan:
    files = all_files(storage)
    dirs: dict[int, str] = {}
    for name in storage.list_dir():
        step = parse_step_dir(name)
        if step is not None:
            dirs[step] = name
    for rel in files:
        top, _, rest = rel.partition("/")
        step = parse_step_dir(top) if rest else None
        if step is not None:
            dirs[step] = top
    out = Scan(storage.url, files, dirs)
    for step in sorted(dirs):
        rel = f"{step_dir(step)}/{MANIFEST}"
        if rel in files:
            out.manifests[step] = Manifest.from_json(storage.read_bytes(rel), where=f"{storage.url}/{rel}")
    return out


# ---------------------------------------------------------------------- gc


@dataclass
class GcPlan:
    url: str
    newest: int | None  # the newest committed step
    keep: list[int]  # committed steps kept
    uncommit: list[int]  # committed steps dropped (--keep-last): their manifests go first
    dirs: list[dict[str, Any]]  # per directory touched: step, dir, reason, files, bytes, whole
    left_alone: list[int]  # step directories without a manifest newer than the newest committed

    @property
    def files(self) -> list[tuple[str, int]]:
        return [(f, n) for d in self.dirs for f, n in d["files"]]

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.files)

    def to_json(self, deleted: bool) -> dict[str, Any]:
        return {
            "root": self.url,
            "dry_run": not deleted,
            "newest_committed": self.newest,
            "kept": self.keep,
            "uncommitted": self.uncommit,
            "dirs": [
                {
                    "dir": d["dir"],
                    "step": d["step"],
                    "reason": d["reason"],
                    "whole": d["whole"],
                    "bytes": d["bytes"],
                    "files": [{"file": f, "bytes": n} for f, n in d["files"]],
                }
                for d in self.dirs
            ],
            "files": len(self.files),
            "bytes": self.bytes,
            "left_alone": self.left_alone,
        }


def plan_gc(sc: Scan, keep_last: int | None = None) -> GcPlan:
    committed = sc.committed
    if not committed:  # every step directory may be a snapshot being written: touch nothing
        return GcPlan(sc.url, None, [], [], [], sorted(sc.dirs))
    newest = committed[-1]
    keep = committed[-keep_last:] if keep_last else committed
    drop = [s for s in committed if s not in keep]
    referenced = {f for s in keep for f in sc.manifests[s].referenced_files()}
    dirs = []
    for step in sorted(sc.dirs):
        if step >= newest:
            continue
        files = sc.in_dir(step)
        if step in keep:  # a kept snapshot's directory: only files nobody needs (a dead writer's)
            m = sc.manifests[step]
            mine = {f"{sc.dirs[step]}/{MANIFEST}", *m.files}
            doomed = [f for f in files if f not in referenced and f not in mine]
            if not doomed:
                continue
            reason = "unreferenced"
        else:
            doomed = [f for f in files if f not in referenced]
            if not doomed and files:
                continue
            reason = "dropped by --keep-last" if step in drop else "no manifest"
        dirs.append(
            {
                "step": step,
                "dir": sc.dirs[step],
                "reason": reason,
                "files": [(f, sc.files[f]) for f in doomed],
                "bytes": sum(sc.files[f] for f in doomed),
                "whole": len(doomed) == len(files),
            }
        )
    left = sorted(s for s in sc.dirs if s > newest and s not in sc.manifests)
    return GcPlan(sc.url, newest, keep, drop, dirs, left)
