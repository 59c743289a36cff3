"""Metadata at scale (issue 13, deliverable 10): merging the rank reports of one save, committing
its manifest and planning a resharded load, for a job of ``--world`` ranks (1,024) with
``--tensors`` sharded tensors (500), without processes or tensor data.

The job is FSDP-style: every rank holds a dim-0 slice of every sharded tensor (torch's
``Shard(0)`` chunking, so the last ranks of a tensor with fewer rows than a multiple of the world
hold empty slices).  The sharded tensors are the bf16 parameters of an 8B-class decoder (hidden
4096, ffn 14336, 8 kv heads, vocabulary 128256: the embeddings, ``--tensors``/3 parameters in
all) and their fp32 Adam moments; beside them, as a real training state has them, each
parameter's 0-d ``step`` (a plain tensor, written once by the rank ``owner_of`` picks) and
each rank's own random number generators (:class:`~fmstore.checkpoint.RNGState`: three tensors
per rank under a per-rank node of the tree).  The job, its reports and the operations live in
:mod:`fmstore.testing.metadata` (the test checks them on a small job with real bytes); the
reports are the library's own (``rank_report`` of ``FileEntry``/``shard_header`` shard entries
and safetensors header spans, one xxh3-128 digest per 16 MiB checksum chunk), then timed as
the real code runs them:

- merge: ``merge_reports`` on the parsed reports, then the tree merge ``SnapshotLevel.write``
  does (``merge_trees``: a copy of rank 0's tree, every rank's per-rank nodes merged into it);
  and ``SnapshotLevel.collect_reports`` itself on the report files (held in memory), which
  adds their ``json.loads``;
- commit: ``SnapshotLevel.commit`` (``Manifest(...)`` and ``to_json()`` with the collector
  paused, and its write, into memory);
- read: ``Manifest.from_json`` with all its validation;
- plan, per target rank: the strict key check, the regions ``Checkpointer._load_from`` builds
  (each rank's local region, its destination allocated), and what ``SnapshotReader.read`` does
  before it reads any data: the files the regions touch, each file's check (its size and
  safetensors header, held in memory here) and ``plan_regions``; for 512 ranks (``Shard(0)``),
  1,024 ranks on a 64 x 16 mesh (``Shard(0)``, ``Shard(1)``: rows by 64, columns by 16) and 1
  rank loading every tensor whole.  "whole load" is one rank's part from the manifest's bytes
  to its plan: read + plan.

Each is run ``--repeats`` times, medians, against a raw limit measured in the same run: json of
the same bytes (``json.loads`` of the report files and of the manifest, ``json.dumps`` of the
manifest's body as plain dicts) and, for the merge and the plans, one pass over every shard
entry doing nothing.

Beside them, in the same run and for the same job (``--no-dcp`` leaves it out), torch DCP's
counterpart of each (``fmstore.testing.metadata_dcp`` builds and runs it through torch's own functions,
without a process group; see its docstring for what is built how), and the ratio fmstore/DCP:

- merge <-> DCP's global save planning: ``DefaultSavePlanner.create_global_plan`` on every
  rank's ``SavePlan`` (``dedup_save_plans``, ``create_default_global_save_plan``, the flatten
  mappings merged, ``_validate_global_plan``);
- commit <-> ``FileSystemWriter.finish``: ``Metadata`` with ``storage_data`` (a ``_StorageInfo``
  per ``MetadataIndex``) and its ``pickle.dumps``; the pickled size beside the manifest's;
- read <-> ``pickle.loads`` of those bytes: no validation at all (fmstore's read validates
  everything, and does not use pickle, which is not safe on untrusted data);
- plan <-> ``create_default_local_load_plan`` for the same target ranks (DTensor stand-ins
  whose chunk torch computes; meta tensors for the whole-tensor rank): DCP's plan is its read
  items only (no file checks, no destinations allocated);
- whole load <-> unpickle + load plan.

Run::

    PYTHONPATH=. .venv/bin/python bench/metadata_scale.py                 # 1,024 x 500
    PYTHONPATH=. .venv/bin/python bench/metadata_scale.py --world 64 --tensors 100 --repeats 1
    PYTHONPATH=. .venv/bin/python bench/metadata_scale.py --world 8192 --repeats 1  # its job: ~5 min, 2.7 GB
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from fmstore.checkpoint import Manifest
from fmstore.testing.metadata import (
    Job,
    MemoryStorage,
    Target,
    commit,
    merge,
    merge_files,
    merge_steady,
    plan_load,
    steady_reports,
    to_json_v2,
)


def goal(world: int) -> float:
    """Seconds per operation the issue sets (issue 30): 1 s up to 1,024 ranks, 8 s beyond
    (8,192 ranks)."""
    return 1.0 if world <= 1024 else 8.0


# ---------------------------------------------------------------------- raw limits


def touch_reports(reports: dict[int, dict[str, Any]]) -> int:
    """One pass over every shard row of the reports, doing nothing with it."""
    n = 0
    for rep in reports.values():
        for _ in range(rep["shards"]["rows"]):
            n += 1
    return n


def touch_manifest(manifest: Manifest) -> int:
    n = 0
    for e in manifest.tensors.values():
        for _ in e.shards:
            n += 1
    return n


def plain_body(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)


# ---------------------------------------------------------------------- the run


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=1024)
    p.add_argument("--tensors", type=int, default=500, help="sharded tensors (DTensors over all ranks)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-extras", action="store_true", help="no step scalars, no per-rank RNG state")
    p.add_argument("--no-dcp", action="store_true", help="no torch DCP counterpart")
    p.add_argument(
        "--dcp-repeats",
        type=int,
        help="DCP's side: runs of each operation (default --repeats; 1 also plans for the first "
        "target rank only: DCP's side is most of a 1,024-rank run's time)",
    )
    p.add_argument(
        "--profile", metavar="OP", help="cProfile one operation (merge, commit, read, plan) instead"
    )
    args = p.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])  # bench/: common
    from common import machine_info

    machine_info(".", "cpu")
    t0 = time.perf_counter()
    job = Job(args.world, args.tensors, extras=not args.no_extras)
    reports = job.reports
    report_files = job.report_files
    storage = MemoryStorage(job)
    n_shards = touch_reports(reports)
    print(
        f"job:     {args.world} ranks, {len(job.sharded)} sharded tensors + {len(job.steps)} step scalars"
        f" + {3 * args.world if job.extras else 0} per-rank RNG tensors; {n_shards} shard entries;"
        f" reports {sum(map(len, report_files.values())) / 1e6:.1f} MB (built in {time.perf_counter() - t0:.1f} s)"
    )
    tp = 16 if args.world % 16 == 0 and args.world >= 32 else 1
    targets = [
        Target(f"{args.world // 2} ranks, Shard(0)", (max(1, args.world // 2),)),
        Target(f"{args.world} ranks, {args.world // tp}x{tp} mesh", (args.world // tp, tp)),
        Target("1 rank, whole tensors", (1,)),
    ]
    entries, files, tree, headers = merge(job, reports)
    raw = commit(job, entries, files, tree, headers)
    manifest = Manifest.from_json(raw, where="bench")
    raw_v2 = to_json_v2(manifest)  # the same manifest as version 2 (an object per shard)
    print(
        f"manifest: {len(raw) / 1e6:.1f} MB (version 3; {len(raw_v2) / 1e6:.1f} MB as version 2), "
        f"{len(manifest.tensors)} tensors\n",
        flush=True,
    )

    if args.profile:
        import cProfile
        import pstats

        ops: dict[str, Callable[[], Any]] = {
            "merge": lambda: merge(job, reports),
            "merge-files": lambda: merge_files(job, storage),
            "commit": lambda: commit(job, entries, files, tree, headers),
            "read": lambda: Manifest.from_json(raw, where="bench"),
            "plan": lambda: [plan_load(job, storage, manifest, t, t.world // 2) for t in targets],
        }
        prof = cProfile.Profile()
        prof.runcall(ops[args.profile])
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        return 0

    rows: list[tuple[str, float, float | None, str]] = []
    fm: dict[str, float] = {}  # fmstore's seconds of the operations DCP is compared on

    def row(label: str, seconds: float, raw_s: float | None, raw_label: str = "") -> None:
        rows.append((label, seconds, raw_s, raw_label))
        ratio = f"{seconds / raw_s:6.2f}x {raw_label}" if raw_s else ""
        mark = "ok" if seconds < limit else "OVER"
        print(f"{label:58s} {seconds:8.3f} s  {mark:4s}  {ratio}", flush=True)

    r = args.repeats
    limit = goal(args.world)
    print(f"{'operation (median of ' + str(r) + ')':58s} {'time':>10s}  goal {limit:.0f} s  vs raw limit")
    touch_r, _ = timed(lambda: touch_reports(reports), r)
    loads_reports, _ = timed(lambda: [json.loads(b) for b in report_files.values()], r)
    fm["merge"] = timed(lambda: merge(job, reports), r)[0]
    row("merge the reports (parsed)", fm["merge"], touch_r, "one pass over the entries")
    row(
        "merge the report files (json.loads included)",
        timed(lambda: merge_files(job, storage), r)[0],
        loads_reports,
        "json.loads of the reports",
    )
    # The steady state of a long run: every rank's layout (tensor names, dtypes, shapes) as at
    # the last save, so its report carries only the layout's digest (reports.Layouts).
    layouts, steady = steady_reports(job)
    loads_steady, _ = timed(lambda: [json.loads(b) for b in steady.values()], r)
    fm["merge-steady"] = timed(lambda: merge_steady(job, layouts, steady), r)[0]
    row(
        f"merge the report files, layouts known ({sum(map(len, steady.values())) / 1e6:.1f} MB)",
        fm["merge-steady"],
        loads_steady,
        "json.loads of the reports",
    )
    body = plain_body(raw)
    dumps_s, _ = timed(lambda: json.dumps(body, separators=(",", ":")).encode(), r)
    fm["commit"] = timed(lambda: commit(job, entries, files, tree, headers), r)[0]
    row("commit: Manifest(...).to_json()", fm["commit"], dumps_s, "json.dumps of the same body")
    loads_s, _ = timed(lambda: json.loads(raw), r)
    gc.disable()
    try:
        loads_nogc, _ = timed(lambda: json.loads(raw), r)
    finally:
        gc.enable()
    read_s, _ = timed(lambda: Manifest.from_json(raw, where="bench"), r)
    fm["read"] = read_s
    row("read: Manifest.from_json (validated)", read_s, loads_s, "json.loads of the manifest")
    print(f"{'   (json.loads of the manifest, collector paused)':58s} {loads_nogc:8.3f} s")
    v2_s, _ = timed(lambda: Manifest.from_json(raw_v2, where="bench"), 1)  # (a side figure: once)
    print(f"{'   (the same manifest as version 2, validated, once)':58s} {v2_s:8.3f} s")
    touched = Manifest.from_json(raw, where="bench")  # (its Shard objects made: not the one planned from)
    touch_m, _ = timed(lambda: touch_manifest(touched), r)
    for target in targets:
        ranks = sorted({0, target.world // 2, target.world - 1})
        per: dict[str, list[float]] = {}
        for rank in ranks:
            for _ in range(r):
                gc.collect()
                planned = plan_load(job, storage, manifest, target, rank)
                per.setdefault("total", []).append(sum(planned.seconds.values()))
                for k, v in planned.seconds.items():
                    per.setdefault(k, []).append(v)
                del planned
        med = {k: statistics.median(v) for k, v in per.items()}
        parts = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in med.items() if k != "total")
        fm[target.label] = med["total"]
        row(f"plan {target.label}", med["total"], touch_m, "one pass over the shards")
        print(f"{'   (ms: ' + parts + ')':58s}")
        row("   whole load: read + plan", read_s + med["total"], loads_s + touch_m, "json.loads + one pass")
    over = [label for label, s, _, _ in rows if s >= limit]
    print(
        f"\n{len(rows) - len(over)} of {len(rows)} under {limit:.0f} s" + (f"; over: {over}" if over else "")
    )
    if not args.no_dcp:
        # fmstore's objects are not needed any more: free them before DCP's (8,192 ranks).
        del reports, report_files, storage, entries, files, tree, manifest, touched, body
        job.__dict__.pop("reports", None)
        job.__dict__.pop("report_files", None)
        gc.collect()
        dcp(job, targets, fm, read_s, len(raw), args.dcp_repeats or r)
    return 0


def dcp(
    job: Job, targets: list[Target], fm: dict[str, float], read_s: float, manifest_bytes: int, r: int
) -> None:
    """torch DCP's counterpart of the operations, at the same job size, and fmstore/DCP."""
    import fmstore.testing.metadata_dcp as d

    t0 = time.perf_counter()
    plans = d.save_plans(job)
    n_items = sum(len(p.items) for p in plans)
    print(
        f"\ntorch DCP, the same job: {n_items} write items in {job.world} local SavePlans"
        f" (built in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    dcp_s: dict[str, float] = {}
    dcp_s["merge"], (final, metadata) = timed(functools.partial(d.global_plan, plans), r)
    del plans
    results = d.write_results(final)
    del final
    gc.collect()
    dcp_s["commit"], raw = timed(functools.partial(d.finish, metadata, results), r)
    del results, metadata
    gc.collect()
    dcp_s["read"], md = timed(lambda: d.read(raw), r)
    print(
        f"DCP .metadata: {len(raw) / 1e6:.1f} MB pickled ({len(md.storage_data)} storage entries)"
        f" vs fmstore manifest {manifest_bytes / 1e6:.1f} MB\n",
        flush=True,
    )
    for target in targets:
        ranks = sorted({0, target.world // 2, target.world - 1}) if r > 1 else [0]
        times = []
        for rank in ranks:
            state = d.load_state_dict(job, target, rank)
            for _ in range(r):
                gc.collect()
                t0 = time.perf_counter()
                d.load_plan(state, md)
                times.append(time.perf_counter() - t0)
        dcp_s[target.label] = statistics.median(times)
    rows = [
        ("merge the reports <-> DCP create_global_plan", "merge", "merge"),
        ("commit <-> DCP finish: storage_data + pickle.dumps", "commit", "commit"),
        ("read (validated) <-> pickle.loads (no validation)", "read", "read"),
    ]
    for target in targets:
        rows.append((f"plan {target.label} <-> create_default_local_load_plan", target.label, target.label))
    head = f"operation (median of {r}), fmstore <-> DCP"
    print(f"{head:68s} {'fmstore':>9s} {'DCP':>9s}  fmstore/DCP")
    for label, a, b in rows:
        print(f"{label:68s} {fm[a]:8.3f}s {dcp_s[b]:8.3f}s  {fm[a] / dcp_s[b]:7.2f}x", flush=True)
    for target in targets:
        f_s, d_s = read_s + fm[target.label], dcp_s["read"] + dcp_s[target.label]
        label = f"whole load, {target.label}: read + plan"
        print(f"{label:68s} {f_s:8.3f}s {d_s:8.3f}s  {f_s / d_s:7.2f}x")
    print(
        "(DCP's read is an unpickle that checks nothing, and pickle runs code from the file: fmstore's\n"
        " read validates the manifest and is plain json. DCP's plan is its read items only; fmstore's\n"
        " also checks the keys, allocates the destinations and checks every file it reads.)"
    )


if __name__ == "__main__":
    sys.exit(main())
