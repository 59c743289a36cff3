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

``gc``'s listing, plan and deletions (:meth:`Snapshots.scan`, :meth:`Snapshots.plan_gc`,
:meth:`Snapshots.collect`) belong to the root's owner, :class:`fmstore.checkpoint.snapshots.Snapshots`,
which holds the checkpointer's own retention rules: ``gc`` only touches step directories older
than the newest committed snapshot (a newer one may be being written now), never deletes a file
a kept snapshot references, and with ``keep_last`` first uncommits the snapshots retention would
drop (their manifests go first).  Deleting needs the root's writer lease
(:meth:`Snapshots.claimed`), as a checkpointer's retention does: a running job may reference any
file of its root in its next incremental save, so ``gc --yes`` is refused while a job holds the
root.  ``other`` files are never deleted (the lease is one).  This module keeps ``du``'s
accounting (:func:`usage`).
"""

from __future__ import annotations

from typing import Any

from ..checkpoint.manifest import MANIFEST, Manifest, step_dir
from ..checkpoint.snapshots import Scan

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
