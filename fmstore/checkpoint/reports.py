"""Merging the ranks' reports of one save into the manifest's tensor table: the coordinator's
half of a multi-rank commit, a pure function of the parsed reports (``SnapshotLevel``
waits for and reads them), so that its cost for a large job is measured and tested without
processes (``bench/metadata_scale.py``: 1,024 ranks with 500 tensors each).

A report is what :meth:`SnapshotLevel.write` of one rank writes: the names of every tensor of its
state, its shard file and size, the tensor entries (dtype, global shape, the shards it wrote or
references) and, from ranks other than 0, its per-rank subtrees.  The merge takes each tensor's
shards in rank order, a region that several ranks report (a replica, an empty slice) once, and
refuses a table in which a tensor some rank holds is not fully covered.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod
from typing import Any

from ..errors import ReportError
from ..gcpause import paused_gc
from .manifest import Shard, TensorEntry


def merge_reports(
    reports: Mapping[int, Mapping[str, Any]], step: int
) -> tuple[dict[str, TensorEntry], dict[str, int], dict[int, list[Any]]]:
    """(tensor table, files written -> size, rank -> its per-rank nodes) of the reports of one
    save attempt (rank -> report, every rank's, none with an error)."""
    with paused_gc():  # a shard per rank and tensor (512 k for 1,024 x 500), none of them garbage
        return _merge(reports, step)


def _merge(
    reports: Mapping[int, Mapping[str, Any]], step: int
) -> tuple[dict[str, TensorEntry], dict[str, int], dict[int, list[Any]]]:
    # Per tensor: its entry, the regions it has, the elements they hold (one lookup per entry:
    # a 1,024-rank job's reports hold 500 k of them).
    table: dict[str, list[Any]] = {}
    files: dict[str, int] = {}
    names: set[str] = set()
    from_body = Shard.from_body
    for r in sorted(reports):
        rep = reports[r]
        try:
            names.update(rep["names"])
            files.update(rep["files"])
            for name, e in rep["entries"].items():
                dtype, shape, shards = e["dtype"], e["shape"], e["shards"]
                t = table.get(name)
                if t is None:
                    t = table[name] = [TensorEntry(dtype, shape, []), set(), 0]
                elif t[0].dtype != dtype or t[0].shape != shape:
                    have = t[0]
                    raise ReportError(
                        f"step {step}: ranks disagree on tensor {name!r}: {have.dtype} {have.shape} "
                        f"vs {dtype} {shape} (rank {r})"
                    )
                seen = t[1]
                if len(shards) == 1:  # what a rank reports for each of its tensors
                    sh = shards[0]
                    box = (tuple(sh["offsets"]), tuple(sh["lengths"]))
                    if box not in seen:
                        seen.add(box)
                        t[0].shards.append(from_body(sh))
                        t[2] += prod(box[1])
                    continue
                new = [
                    (box, sh)
                    for sh in shards
                    if (box := (tuple(sh["offsets"]), tuple(sh["lengths"]))) not in seen
                ]
                for box, sh in new:  # (a region repeated within one report is kept, as it was)
                    seen.add(box)
                    t[0].shards.append(from_body(sh))
                    t[2] += prod(box[1])
        except ReportError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ReportError(
                f"step {step}: rank {r}'s report is malformed ({type(e).__name__}: {e})"
            ) from None
    entries = {name: t[0] for name, t in table.items()}
    covered = {name: t[2] for name, t in table.items()}
    for name in sorted(names):
        entry = entries.get(name)
        total = prod(int(n) for n in entry.shape) if entry is not None else None
        if entry is None or covered[name] != total:
            raise ReportError(
                f"step {step} not committed: tensor {name!r} is not fully saved "
                f"({covered.get(name, 0)} of {total if entry else '?'} elements); a plain tensor must "
                "exist on every rank (it is taken to be replicated), a sharded one must be a DTensor"
            )
    per_rank = {r: rep.get("per_rank", []) for r, rep in reports.items() if r != 0}
    return entries, files, per_rank
