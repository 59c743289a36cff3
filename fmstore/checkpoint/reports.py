"""Merging the ranks' reports of one save into the manifest's tensor table: the coordinator's
half of a multi-rank commit, a pure function of the parsed reports (``SnapshotLevel``
waits for and reads them), so that its cost for a large job is measured and tested without
processes (``bench/metadata_scale.py``: 1,024 ranks with 500 tensors each).

A report is what :meth:`SnapshotLevel.write` of one rank writes: the names of the tensors of its
state it neither wrote nor references (its tensors' names are the rest), its shard file and size, the tensors it wrote or references (names, dtypes, global
shapes) with their shards as a shard table (:mod:`.shardtable`, the manifest's own form) and,
from ranks other than 0, its per-rank subtrees.  The merge concatenates the tables in rank
order, keeps a region that several ranks report (a replica, an empty slice) once, groups the
rows by tensor, and refuses a table in which a tensor some rank holds is not fully covered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from math import prod
from typing import Any

import numpy as np
import xxhash

from ..errors import ReportError
from ..gcpause import paused_gc
from .manifest import TensorEntry, headers_of
from .shardtable import ShardTable


class Layouts:
    """The coordinator's memory of the ranks' layouts (DCP's plan cache, in fmstore's form).

    A rank's layout is the part of its report that stays while its state's structure does:
    its tensors' names, dtypes and shapes, and the names it holds but does not write.  A rank
    sends it with its digest (:func:`layout_digest`) and, after a save that committed, only
    the digest while it stays the same; the coordinator keeps the layouts of the last save,
    and where every rank sends the digests of the last save, the merge reuses that save's
    mapping of each rank's tensors to the manifest's instead of building it again.  A digest
    it does not know is a :class:`ReportError` (that save fails; the ranks send their layouts
    again at the next)."""

    def __init__(self) -> None:
        self.known: dict[str, tuple[Any, Any]] = {}  # digest -> (also, tensors)
        self.key: tuple[str, ...] | None = None  # the digests, in rank order, of ``mapping``
        self.mapping: Any = None

    def expand(self, reports: Mapping[int, dict[str, Any]], step: int) -> None:
        """Each report's layout in place: from the report (then remembered) or from memory."""
        known: dict[str, tuple[Any, Any]] = {}
        for r in sorted(reports):
            rep = reports[r]
            digest = rep.get("layout")
            if not isinstance(digest, str):
                continue  # (a whole report: nothing to expand or remember)
            if "tensors" in rep:
                known[digest] = (rep.get("also", []), rep["tensors"])
                continue
            layout = known.get(digest) or self.known.get(digest)
            if layout is None:
                raise ReportError(
                    f"step {step}: rank {r}'s report names layout {digest}, which the coordinator has not seen"
                )
            rep["also"], rep["tensors"] = known[digest] = layout
        self.known = known


def layout_digest(also: Any, tensors: Any) -> str:
    """The digest of a report's layout (:class:`Layouts`)."""
    return xxhash.xxh3_128_hexdigest(json.dumps([also, tensors], separators=(",", ":")).encode())


Merged = tuple[dict[str, TensorEntry], dict[str, int], dict[int, list[Any]], dict[str, str]]


def merge_reports(
    reports: Mapping[int, Mapping[str, Any]], step: int, layouts: Layouts | None = None
) -> Merged:
    """(tensor table, files written -> size, rank -> its per-rank nodes, files written -> their
    header digests) of the reports of one
    save attempt (rank -> report, every rank's, none with an error); ``layouts``: the
    coordinator's memory of the last save's (a report that carries only its layout's digest
    is expanded from it first)."""
    with paused_gc():
        if layouts is not None:
            layouts.expand(reports, step)  # type: ignore[arg-type]
        return _merge(reports, step, layouts)


def _merge(reports: Mapping[int, Mapping[str, Any]], step: int, layouts: Layouts | None = None) -> Merged:
    index: dict[str, int] = {}  # tensor name -> its index, in the order ranks first report them
    dtypes: list[Any] = []
    shapes: list[Any] = []
    files: dict[str, int] = {}
    headers: dict[str, str] = {}
    names: set[str] = set()
    tables: list[ShardTable] = []
    maps: list[np.ndarray] = []
    prev: tuple[list[Any], list[Any], list[Any], list[int]] | None = None  # the last rank's layout
    ranks = sorted(reports)
    key = tuple(str(reports[r].get("layout")) for r in ranks)
    # Every rank with the layout it had at the last save: that save's mapping holds.
    cached = (
        layouts is not None
        and layouts.key == key
        and all(isinstance(reports[r].get("layout"), str) for r in ranks)
    )
    if cached:
        index, dtypes, shapes, names, maps = layouts.mapping  # type: ignore[union-attr]
    for pos, r in enumerate(ranks):
        rep = reports[r]
        try:
            files.update(rep["files"])
            headers.update(headers_of(rep.get("headers", {})))
            table = ShardTable.from_body(rep["shards"])
            if cached:
                if table.rows and (table.tensor.min() < 0 or table.tensor.max() >= len(maps[pos])):
                    raise ValueError("a shard row names no tensor of the report")
                tables.append(table)
                continue
            names.update(rep["also"] if "also" in rep else rep["names"])  # ("names": all, before "also")
            tb = rep["tensors"]
            ns, ds, ss = tb["names"], tb["dtypes"], tb["shapes"]
            if not (
                type(ns) is list and type(ds) is list and type(ss) is list and len(ns) == len(ds) == len(ss)
            ):
                raise ValueError("its tensors' names, dtypes and shapes do not match")
            if table.rows and (table.tensor.min() < 0 or table.tensor.max() >= len(ns)):
                raise ValueError("a shard row names no tensor of the report")
            names.update(ns)
            if prev is not None and len(ns) == len(prev[0]) and ds == prev[1] and ss == prev[2]:
                # The last rank's layout but for a few names (its per-rank ones): FSDP ranks
                # hold the same tensors, so only the names that differ are looked up (8,192
                # ranks of 500 tensors: 4 M lookups and checks otherwise).
                to_global = list(prev[3])
                redo: Any = [i for i, (x, y) in enumerate(zip(ns, prev[0])) if x != y]
            else:
                to_global, redo = [0] * len(ns), range(len(ns))
            for i in redo:
                name, dtype, shape = ns[i], ds[i], ss[i]
                g = index.get(name)
                if g is None:
                    g = index[name] = len(dtypes)
                    dtypes.append(dtype)
                    shapes.append(shape)
                elif dtypes[g] != dtype or shapes[g] != shape:
                    raise ReportError(
                        f"step {step}: ranks disagree on tensor {name!r}: {dtypes[g]} {shapes[g]} "
                        f"vs {dtype} {shape} (rank {r})"
                    )
                to_global[i] = g
            prev = (ns, ds, ss, to_global)
            tables.append(table)
            maps.append(np.array(to_global, dtype=np.int64))
        except ReportError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ReportError(
                f"step {step}: rank {r}'s report is malformed ({type(e).__name__}: {e})"
            ) from None
    if layouts is not None and not cached:
        layouts.key, layouts.mapping = key, (index, dtypes, shapes, names, maps)
    order = list(index)
    merged = ShardTable.concat(tables, maps)
    ndims = np.array([len(s) for s in shapes], dtype=np.int64)
    table, count = _first_of_each_region(merged, ndims)
    t = table.tensor
    ends = np.cumsum(np.bincount(t, minlength=len(order))).tolist()
    starts = [0, *ends[:-1]]
    entries = {
        name: TensorEntry(dtypes[i], shapes[i], table=table, rows=(starts[i], ends[i]))
        for i, name in enumerate(order)
    }
    held = [sum(count[a:b].tolist()) for a, b in zip(starts, ends)]
    for name in sorted(names):
        i = index.get(name)
        total = prod(int(n) for n in shapes[i]) if i is not None else None
        if i is None or held[i] != total:
            raise ReportError(
                f"step {step} not committed: tensor {name!r} is not fully saved "
                f"({held[i] if i is not None else 0} of {total if i is not None else '?'} elements); "
                "a plain tensor must exist on every rank (it is taken to be replicated), a sharded one "
                "must be a DTensor"
            )
    per_rank = {r: rep.get("per_rank", []) for r, rep in reports.items() if r != 0}
    return entries, files, per_rank, headers


def _first_of_each_region(merged: ShardTable, ndims: np.ndarray) -> tuple[ShardTable, np.ndarray]:
    """``merged`` with each region of a tensor once (its first row: the lowest rank's), the rows
    grouped by tensor in rank order; and each row's number of elements."""
    n, dims = merged.rows, merged.dims
    key = np.column_stack([merged.tensor, merged.offsets, merged.lengths])
    by_key = np.lexsort(key.T[::-1])  # stable: of equal regions, the first row comes first
    repeat = np.zeros(n, dtype=bool)
    if n > 1:
        sk = key[by_key]
        repeat[by_key[1:]] = (sk[1:] == sk[:-1]).all(axis=1)
    keep = np.flatnonzero(~repeat)
    keep = keep[np.argsort(merged.tensor[keep], kind="stable")]
    table = merged if len(keep) == n and (keep == np.arange(n)).all() else merged.take(keep)
    pad = np.arange(dims)[None, :] >= ndims[table.tensor][:, None]
    count = np.where(pad, 1, table.lengths).prod(axis=1) if dims else np.ones(table.rows, dtype=np.int64)
    return table, count
