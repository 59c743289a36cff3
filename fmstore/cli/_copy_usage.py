"""What a checkpoint root holds, file by file, for ``fmstore du`` and ``fmstore gc``.

One listing of every file under the root (temporary files of dead writers included) and every
committed manifest; each file falls in exactly one class, so the classes add up to the bytes
stored under the root:

``own``        a file a committed snapshot wrote (its manifest's ``files``)
``manifest``   a committed snapshot's ``manifest.json``
``retained``   in a step directory without a manifest, but referenced by a committed snapshot
               (left by retention, which uncommits a step and keeps what newer steps reference,
               or carried there by ``fmstore cp``)
``incomplete`` any other file of a step directory without a manifest: a snapshot being written
               now (newer than the newest committed one) or left by a crash (older)
``unreferenced`` any other file of a committed step's directory (e.g. a dead writer's
               temporary file, a rank report a crash left)
``other``      anything outside ``step-XXXXXXXXXX/`` directories (the root's ``writer.lease``
               among them: every file is counted, so the total is what ``du -b`` says)

``gc`` follows the checkpointer's own retention rules (:meth:`SnapshotLevel.gc`): it only
touches step directories older than the newest committed snapshot (a newer one may be being
written now), never deletes a file a kept snapshot references, and with ``keep_last`` first
uncommits the snapshots retention would drop (their manifests go first).  Deleting needs the
root's writer lease (:func:`claimed`), as a checkpointer's retention does: a running job may
reference any file of its root in its next incremental save, so ``gc --yes`` is refused while a
job holds the root.  ``other`` files are never deleted (the lease is one).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint.lease import WriterLease
from ..checkpoint.manifest import MANIFEST, Manifest, parse_step_dir, step_dir
from ..checkpoint.storage import SnapshotStorage
from ..errors import WriterConflictError


def all_files(storage: SnapshotStorage) -> dict[str, int]:
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
        """Each file's class (see the module docstring)."""
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


def scan(storage: SnapshotStorage) -> Scan:
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


# ---------------------------------------------------------------------- du


def _ranges(m: Manifest, prefix: str, inside: bool) -> set[tuple[str, int, int]]:
    """The distinct stored ranges ``m`` references in files under ``prefix`` (``inside``) or
    elsewhere."""
    return {
        (s.file, s.begin, s.end)
        for e in m.tensors.values()
        for s in e.shards
        if s.file.startswith(prefix) == inside
    }


def usage(sc: Scan) -> dict[str, Any]:
    """What ``du --json`` prints (see docs/cli.md)."""
    classes = sc.classify()
    totals = {k: 0 for k in ("own", "manifest", "retained", "incomplete", "unreferenced", "other")}
    for rel, kind in classes.items():
        totals[kind] += sc.files[rel]
    steps = []
    committed = sc.committed
    for i, step in enumerate(committed):
        m = sc.manifests[step]
        own_dir = step_dir(step) + "/"
        later_refs: set[tuple[str, int, int]] = set()
        for later in committed[i + 1 :]:
            later_refs |= _ranges(sc.manifests[later], own_dir, True)
        others = set()
        for s in committed:
            if s != step:
                others |= sc.manifests[s].referenced_files()
        mine = sc.in_dir(step)
        steps.append(
            {
                "step": step,
                "own_bytes": sum(sc.files.get(f, 0) for f in m.files),
                "own_files": len(m.files),
                "manifest_bytes": sc.files.get(own_dir + MANIFEST, 0),
                "referenced_bytes": sum(b - a for _, a, b in _ranges(m, own_dir, False)),
                "shared_bytes": sum(b - a for _, a, b in later_refs),
                "freed_if_dropped": sum(sc.files[f] for f in mine if f not in others),
                "missing_files": sorted(f for f in m.referenced_files() if f not in sc.files),
            }
        )
    newest = committed[-1] if committed else None
    incomplete = []
    for step in sorted(sc.dirs):
        if step in sc.manifests:
            continue
        files = sc.in_dir(step)
        incomplete.append(
            {
                "step": step,
                "bytes": sum(sc.files[f] for f in files if classes[f] == "incomplete"),
                "retained_bytes": sum(sc.files[f] for f in files if classes[f] == "retained"),
                "files": len(files),
                "newer_than_newest_committed": newest is None or step > newest,
            }
        )
    return {
        "root": sc.url,
        "steps": steps,
        "incomplete": incomplete,
        "totals": {f"{k}_bytes": v for k, v in totals.items()} | {"total_bytes": sum(sc.files.values())},
        "files": len(sc.files),
    }


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


@contextmanager
def claimed(storage: SnapshotStorage) -> Iterator[WriterLease]:
    """The root's writer lease, held by this ``gc`` for the block (as a checkpointer's first save
    claims it); :class:`~fmstore.errors.WriterConflictError` naming the holder while another job
    holds the root.  Its id starts ``gc-``, so a job refused meanwhile sees who holds the root."""
    lease = WriterLease(storage, f"gc-{uuid.uuid4().hex}")
    try:
        lease.acquire()
    except WriterConflictError as e:
        raise WriterConflictError(f"nothing deleted: {e}") from None
    try:
        yield lease
    finally:
        lease.release()


def apply_gc(storage: SnapshotStorage, plan: GcPlan, lease: WriterLease) -> None:
    """Do what ``plan`` lists, holding ``lease`` (:func:`claimed`; the plan made under it):
    uncommit the dropped steps first, then delete.  A lease lost meanwhile (an S3 lease not
    renewed in time, taken over) stops it before the next deletion."""
    for step in plan.uncommit:  # from here on the snapshot does not exist
        lease.check()
        storage.delete(f"{step_dir(step)}/{MANIFEST}")
    for d in plan.dirs:
        lease.check()
        if d["whole"]:
            storage.delete_dir(d["dir"])
        else:
            for f, _ in d["files"]:
                storage.delete(f)
