"""Metadata at scale (issue 13, deliverable 10): merging the rank reports of one save, committing
its manifest and planning a resharded load, for a job of ``--world`` ranks (1,024) with
``--tensors`` sharded tensors (500), without processes or tensor data.

The job is FSDP-style: every rank holds a dim-0 slice of every sharded tensor (torch's
``Shard(0)`` chunking, so the last ranks of a tensor with fewer rows than a multiple of the world
hold empty slices).  The sharded tensors are the bf16 parameters of an 8B-class decoder (hidden
4096, ffn 14336, 8 kv heads, vocabulary 128256: the embeddings, ``--tensors``/3 parameters in
all) and their fp32 Adam moments; beside them, as a real training state has them, each
parameter's 0-d ``step`` (a plain tensor, written once by the rank :func:`owner_of` picks) and
each rank's own random number generators (:class:`~fmstore.checkpoint.RNGState`: three tensors
per rank under a per-rank node of the tree).  The reports are built exactly as
``SnapshotLevel.write`` makes them (``write_local``'s shard entries and safetensors header
spans, one xxh3-128 digest per 16 MiB checksum chunk), then timed as the real code runs them:

- merge: ``fmstore.checkpoint.reports.merge_reports`` on the parsed reports, then the tree merge
  ``SnapshotLevel.write`` does (a copy of rank 0's tree, every rank's per-rank nodes merged into
  it); and ``SnapshotLevel._merge_reports`` itself on the report files (held in memory), which
  adds their ``json.loads``;
- commit: ``Manifest(...)`` and ``to_json()`` with the collector paused, as ``commit`` does;
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
entry doing nothing.  Run::

    PYTHONPATH=. .venv/bin/python bench/metadata_scale.py                 # 1,024 x 500
    PYTHONPATH=. .venv/bin/python bench/metadata_scale.py --world 64 --tensors 100 --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import xxhash

from fmstore.blob import SAFETENSORS_CODES, dtype_from_name, dtype_name
from fmstore.checkpoint.level import SnapshotLevel, _Entry, _shard_header
from fmstore.checkpoint.manifest import CHUNK_SIZE, Manifest, TensorEntry, step_dir
from fmstore.checkpoint.reader import Region, SnapshotReader, files_of, find_overlaps, plan_regions
from fmstore.checkpoint.reports import merge_reports
from fmstore.checkpoint.sharding import owner_of
from fmstore.checkpoint.tree import PerRank, compare, flatten, merge_per_rank, per_rank_nodes, tensor_leaves
from fmstore.gcpause import paused_gc

GOAL = 1.0  # seconds, per operation (issue 13)

# An 8B-class decoder (Llama 3 8B's shapes): (name, shape) of its parameters.
_EMBED = ("tok_embeddings.weight", (128256, 4096))
_LAYER = [
    ("attention.wq.weight", (4096, 4096)),
    ("attention.wk.weight", (1024, 4096)),
    ("attention.wv.weight", (1024, 4096)),
    ("attention.wo.weight", (4096, 4096)),
    ("feed_forward.w1.weight", (14336, 4096)),
    ("feed_forward.w2.weight", (4096, 14336)),
    ("feed_forward.w3.weight", (14336, 4096)),
    ("attention_norm.weight", (4096,)),
    ("ffn_norm.weight", (4096,)),
]
_TAIL = [("norm.weight", (4096,)), ("output.weight", (128256, 4096))]
_RNG = [
    ("torch", (5056,), torch.uint8),
    ("numpy/keys", (624,), torch.uint32),
    ("python/state", (625,), torch.int64),
]


@dataclass(frozen=True)
class Spec:
    """A tensor of the state: ``kind`` "sharded" (a DTensor, dim 0 over the ranks), "plain"
    (the same on every rank, written by one) or "rank" (a rank's own, under a per-rank node)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str


def dim0(n: int, world: int, rank: int) -> tuple[int, int]:
    """(rows, first row) of ``rank``'s slice of ``n`` rows chunked over ``world`` ranks, as
    torch's ``Shard(0)`` places them (``torch.chunk``: the last ranks may hold none)."""
    size = -(-n // world)
    start = min(n, size * rank)
    return max(0, min(n, start + size) - start), start


def params(n_params: int) -> list[tuple[str, tuple[int, ...]]]:
    """The first ``n_params`` parameters: the embeddings, whole layers, the final norm and output."""
    body = [(f"layers.{i}.{p}", s) for i in range(-(-n_params // len(_LAYER)) + 1) for p, s in _LAYER]
    out = [_EMBED, *body[: max(0, n_params - 1 - len(_TAIL))], *_TAIL]
    return out[:n_params] if n_params < len(out) else out


class Job:
    """A ``world``-rank FSDP job saving ``tensors`` sharded tensors (see the module docstring).

    ``scale`` divides every dimension of the shapes (rounding up); ``data``: the shard files get
    their tensor bytes too (each tensor's bytes drawn from a generator seeded by its name, the
    chunk digests theirs), so a plan can be run and its result checked (the test does, on a
    small job)."""

    def __init__(
        self,
        world: int,
        tensors: int,
        *,
        step: int = 100,
        extras: bool = True,
        scale: int = 1,
        chunk_size: int = CHUNK_SIZE,
        data: bool = False,
    ) -> None:
        self.world, self.step, self.extras = world, step, extras
        self.chunk_size, self.data = chunk_size, data
        self.token = "bench-session:1"
        ps = [(p, tuple(-(-d // scale) for d in s)) for p, s in params(-(-tensors // 3))]
        sharded = [Spec(f"model/{p}", s, torch.bfloat16, "sharded") for p, s in ps]
        moments = [
            Spec(f"optim/state/{p}/{m}", s, torch.float32, "sharded")
            for p, s in ps
            for m in ("exp_avg", "exp_avg_sq")
        ]
        self.sharded = sharded + moments[: tensors - len(sharded)]
        with_state = sorted({s.name.split("/")[2] for s in moments[: tensors - len(sharded)]})
        self.param_names = [p for p, _ in ps]
        self.steps = (
            [Spec(f"optim/state/{p}/step", (), torch.float32, "plain") for p in with_state] if extras else []
        )
        self._moment_names = {s.name for s in self.sharded if s.name.startswith("optim/")}
        self.files: dict[str, bytes] = {}  # shard file -> its safetensors header (the bytes a check reads)
        self.blobs: dict[str, bytes] = {}  # shard file -> its bytes (``data``)
        self._bytes: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, int] = {}

    # ------------------------------------------------------------------ the state each rank saves

    def state(self, rank: int) -> dict[str, Any]:
        """Rank ``rank``'s state, as its ``state_dict()``s give it (meta tensors: only names count)."""
        t = torch.empty(0, device="meta")
        steps = {s.name for s in self.steps}
        have = self._moment_names | steps
        optim_state: dict[str, Any] = {}
        for p in self.param_names:
            st = {m: t for m in ("exp_avg", "exp_avg_sq", "step") if f"optim/state/{p}/{m}" in have}
            if st:
                optim_state[p] = st
        group = {
            "lr": 3e-4,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": 0.1,
            "params": self.param_names,
        }
        out: dict[str, Any] = {
            "model": {p: t for p in self.param_names},
            "optim": {"state": optim_state, "param_groups": [group]},
        }
        if self.extras:
            out["rng"] = PerRank(
                {
                    "torch": t,
                    "numpy": {
                        "bit_generator": "MT19937",
                        "keys": t,
                        "pos": 624,
                        "has_gauss": 0,
                        "cached_gaussian": 0.0,
                    },
                    "python": {"version": 3, "state": t, "gauss_next": None},
                }
            )
        out["step"] = self.step
        out["data"] = {"epoch": 0, "samples_seen": 51_200_000}
        return out

    def specs(self, rank: int) -> dict[str, Spec]:
        """Every tensor of rank ``rank``'s state, in the order ``flatten`` names them."""
        out = {s.name: s for s in self.sharded}
        out.update({s.name: s for s in self.steps})
        if self.extras:
            for part, shape, dtype in _RNG:
                name = f"rng/rank-{rank}/{part}"
                out[name] = Spec(name, shape, dtype, "rank")
        names = list(flatten(self.state(rank), rank)[0])
        return {n: out[n] for n in names}

    def shard_file(self, rank: int) -> str:
        level = SnapshotLevel("bench", None, rank=rank, world_size=self.world)  # type: ignore[arg-type]
        level.writer = "bench"  # one job: the same writer id on every rank
        name = getattr(level, "shard_file", None)  # the hash-prefixed name, where the level has one
        return name(self.step) if name else f"{step_dir(self.step)}/shard-r{rank:05d}.safetensors"

    # ------------------------------------------------------------------ its reports

    def report(self, rank: int) -> dict[str, Any]:
        """What ``SnapshotLevel.write`` of rank ``rank`` reports: the shard entries of the pieces it
        writes (in ``write_local``'s form, byte ranges from the real safetensors header), its
        file, every tensor name of its state and (rank > 0) its per-rank nodes."""
        specs = self.specs(rank)
        pieces = []  # (spec, offsets, local shape)
        for s in specs.values():
            if s.kind == "sharded":
                rows, first = dim0(s.shape[0], self.world, rank)
                pieces.append((s, (first, *[0] * (len(s.shape) - 1)), (rows, *s.shape[1:])))
            elif s.kind == "rank" or owner_of(s.name, self.world) == rank:
                pieces.append((s, (0,) * len(s.shape), s.shape))
        file = self.shard_file(rank)
        heads = []
        for s, _, local in pieces:
            nbytes = math.prod(local) * torch.empty(0, dtype=s.dtype).element_size()
            code = SAFETENSORS_CODES.get(s.dtype)
            heads.append(_Entry(s.name, code or "U8", list(local) if code else [nbytes], nbytes, []))
        header, spans = _shard_header(heads)
        self.files[file] = header
        self.sizes[file] = len(header) + sum(h.nbytes for h in heads)
        cs = self.chunk_size
        bodies = [self.piece_bytes(s, offsets, local) for s, offsets, local in pieces] if self.data else []
        if self.data:
            self.blobs[file] = header + b"".join(bodies)
        entries = {}
        for i, ((s, offsets, local), head, (begin, end)) in enumerate(zip(pieces, heads, spans)):
            if self.data:
                body = bodies[i]
                chunks = [xxhash.xxh3_128_hexdigest(body[a : a + cs]) for a in range(0, len(body), cs)]
            else:  # digests of the right number and form (nothing checks them)
                chunks = [
                    xxhash.xxh3_128_hexdigest(f"{s.name}|{rank}|{c}".encode())
                    for c in range(-(-head.nbytes // cs))
                ]
            shard = {
                "offsets": list(offsets),
                "lengths": list(local),
                "file": file,
                "begin": begin,
                "end": end,
                "checksum": "xxh3_128:" + xxhash.xxh3_128_hexdigest("".join(chunks).encode()),
                "codec": [],
                "chunk_size": cs,
                "chunks": chunks,
            }
            entries[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "shards": [shard]}
        return {
            "token": self.token,
            "error": None,
            "names": sorted(specs),
            "files": {file: self.sizes[file]},
            "entries": entries,
            "per_rank": per_rank_nodes(self.tree(rank)) if rank != 0 else [],
        }

    def global_bytes(self, s: Spec) -> torch.Tensor:
        """Tensor ``s``'s bytes (``data``), as a uint8 tensor of its shape and one more
        dimension of its item size."""
        out = self._bytes.get(s.name)
        if out is None:
            itemsize = torch.empty(0, dtype=s.dtype).element_size()
            g = torch.Generator().manual_seed(zlib.crc32(s.name.encode()))
            out = self._bytes[s.name] = torch.randint(
                0, 256, (*s.shape, itemsize), dtype=torch.uint8, generator=g
            )
        return out

    def piece_bytes(self, s: Spec, offsets: tuple[int, ...], local: tuple[int, ...]) -> bytes:
        whole = self.global_bytes(s)
        if s.shape:
            whole = whole[offsets[0] : offsets[0] + local[0]]
        return whole.contiguous().numpy().tobytes()

    def tree(self, rank: int) -> dict[str, Any]:
        return flatten(self.state(rank), rank)[1]

    @cached_property
    def reports(self) -> dict[int, dict[str, Any]]:
        return {r: self.report(r) for r in range(self.world)}

    @cached_property
    def report_files(self) -> dict[str, bytes]:
        """The report files in the step's directory, as ``SnapshotLevel._report`` writes them."""
        rel = step_dir(self.step)
        return {f"{rel}/rank-{r:05d}.json": json.dumps(rep).encode() for r, rep in self.reports.items()}

    def meta(self) -> dict[str, Any]:
        return {"job": "bench"}


class MemoryStorage:
    """What the coordinator's merge and a reader's file checks ask of a snapshot's storage,
    served from memory: the report files, and each shard file's size and header (a read of
    the data is an error where the job has no data)."""

    url = "memory://bench"
    local = False
    pool = None

    def __init__(self, job: Job) -> None:
        self.job = job
        self.written: dict[str, bytes] = {}
        self.reads: list[tuple[str, int, int]] = []  # (file, offset, length) of every ranged read

    def exists(self, rel: str) -> bool:
        return rel in self.job.report_files

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.job.report_files[rel]
        except KeyError:
            raise FileNotFoundError(rel) from None

    def write(self, rel: str, segments: Sequence[bytes | memoryview], **_: Any) -> int:
        self.written[rel] = b"".join(segments)
        return len(self.written[rel])

    def size(self, rel: str) -> int:
        try:
            return self.job.sizes[rel]
        except KeyError:
            raise FileNotFoundError(rel) from None

    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        header = self.job.files[rel]
        blob = self.job.blobs.get(rel)
        for offset, dest in ranges:
            self.reads.append((rel, offset, len(dest)))
            if blob is not None:
                if offset + len(dest) > len(blob):
                    raise AssertionError(f"a read past the end of {rel}")
                dest[:] = blob[offset : offset + len(dest)]
                continue
            if offset >= len(header):  # a header read may run past the header, never start past it
                raise AssertionError(f"planning read data: {rel} at {offset} ({len(dest)} bytes)")
            got = header[offset : offset + len(dest)]
            dest[: len(got)] = got


# ---------------------------------------------------------------------- the operations


def merge(
    job: Job, reports: dict[int, dict[str, Any]]
) -> tuple[dict[str, TensorEntry], dict[str, int], dict]:
    """The coordinator's merge of parsed reports, and the tree merge ``SnapshotLevel.write`` does."""
    entries, files, per_rank = merge_reports(reports, job.step)
    tree = merge_trees(job.tree(0), per_rank)
    return entries, files, tree


def merge_trees(tree: dict[str, Any], per_rank: dict[int, list[Any]]) -> dict[str, Any]:
    tree = json.loads(json.dumps(tree))  # as SnapshotLevel.write: into a copy of rank 0's tree
    for r, nodes in per_rank.items():
        merge_per_rank(tree, r, nodes)
    return tree


def merge_files(job: Job, storage: MemoryStorage) -> tuple[dict[str, TensorEntry], dict[str, int], dict]:
    """``SnapshotLevel._merge_reports`` on the report files (their ``json.loads`` included)."""
    level = SnapshotLevel("bench", storage, rank=0, world_size=job.world)  # type: ignore[arg-type]
    entries, files, per_rank = level._merge_reports(step_dir(job.step), job.step, job.token)
    return entries, files, merge_trees(job.tree(0), per_rank)


def commit(job: Job, entries: dict[str, TensorEntry], files: dict[str, int], tree: dict[str, Any]) -> bytes:
    """What ``SnapshotLevel.commit`` does before its write."""
    manifest = Manifest(
        step=job.step, world_size=job.world, tensors=entries, tree=tree, files=files, meta=job.meta()
    )
    with paused_gc():
        return manifest.to_json()


@dataclass(frozen=True)
class Target:
    """A sharding to load into: ``world`` ranks on a mesh of ``mesh`` (rows by the first
    dimension, columns of matrices by the second; vectors are replicated over the second)."""

    label: str
    mesh: tuple[int, ...]

    @property
    def world(self) -> int:
        return math.prod(self.mesh)

    def region(self, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, shape) of ``rank``'s local shard of a sharded tensor of ``shape``."""
        if self.world == 1 or not shape:
            return (0,) * len(shape), shape
        coords = []
        for d in reversed(self.mesh):
            coords.append(rank % d)
            rank //= d
        coords.reverse()
        off, ln = [0] * len(shape), list(shape)
        for dim, (n, c) in enumerate(zip(self.mesh, coords)):
            if dim < len(shape):
                ln[dim], off[dim] = dim0(shape[dim], n, c)
        return tuple(off), tuple(ln)


@dataclass
class Planned:
    regions: list[Region]
    files: set[str]
    plan: Any
    seconds: dict[str, float]


def plan_load(job: Job, storage: MemoryStorage, manifest: Manifest, target: Target, rank: int) -> Planned:
    """One target rank's load up to its first data read, as ``Checkpointer._load_from`` and
    ``SnapshotReader.read`` do it, each part timed."""
    seconds = {}
    t0 = time.perf_counter()
    # Checkpointer._check_keys (strict): the target's keys against the snapshot's.
    target_tree = job.tree(rank)
    missing, unexpected = compare(manifest.tree, target_tree, rank, [])
    assert not missing and not unexpected, (missing[:3], unexpected[:3])
    wanted = tensor_leaves(target_tree, rank)
    names = {name for path, name in tensor_leaves(manifest.tree, rank).items() if path in wanted}
    t1 = time.perf_counter()
    # Checkpointer._load_from: each tensor's region and destination (a DTensor target's local shard).
    sharded = {s.name for s in job.sharded}
    regions = []
    for name, entry in manifest.tensors.items():
        if name not in names:
            continue
        dtype = dtype_from_name(entry.dtype)
        gshape = tuple(entry.shape)
        if name in sharded:
            offsets, shape = target.region(gshape, rank)
        else:
            offsets, shape = (0,) * len(gshape), gshape
        regions.append(Region(name, offsets, torch.empty(shape, dtype=dtype)))
    t2 = time.perf_counter()
    # SnapshotReader.read, up to its first data read.
    reader = SnapshotReader(storage, manifest)  # type: ignore[arg-type]
    found = find_overlaps(manifest, regions)
    files = files_of(found)
    t3 = time.perf_counter()
    for file in sorted(files):
        reader.check_file(file)
    t4 = time.perf_counter()
    plan = plan_regions(manifest, regions, reader.pool, None, found)
    t5 = time.perf_counter()
    seconds.update(keys=t1 - t0, regions=t2 - t1, files=t3 - t2, checks=t4 - t3, plan=t5 - t4)
    return Planned(regions, files, plan, seconds)


# ---------------------------------------------------------------------- raw limits


def touch_reports(reports: dict[int, dict[str, Any]]) -> int:
    """One pass over every shard entry of the reports, doing nothing with it."""
    n = 0
    for rep in reports.values():
        for e in rep["entries"].values():
            for _ in e["shards"]:
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
    p.add_argument(
        "--profile", metavar="OP", help="cProfile one operation (merge, commit, read, plan) instead"
    )
    args = p.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
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
    entries, files, tree = merge(job, reports)
    raw = commit(job, entries, files, tree)
    manifest = Manifest.from_json(raw, where="bench")
    print(f"manifest: {len(raw) / 1e6:.1f} MB, {len(manifest.tensors)} tensors\n", flush=True)

    if args.profile:
        import cProfile
        import pstats

        ops: dict[str, Callable[[], Any]] = {
            "merge": lambda: merge(job, reports),
            "merge-files": lambda: merge_files(job, storage),
            "commit": lambda: commit(job, entries, files, tree),
            "read": lambda: Manifest.from_json(raw, where="bench"),
            "plan": lambda: [plan_load(job, storage, manifest, t, t.world // 2) for t in targets],
        }
        prof = cProfile.Profile()
        prof.runcall(ops[args.profile])
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        return 0

    rows: list[tuple[str, float, float | None, str]] = []

    def row(label: str, seconds: float, raw_s: float | None, raw_label: str = "") -> None:
        rows.append((label, seconds, raw_s, raw_label))
        ratio = f"{seconds / raw_s:6.2f}x {raw_label}" if raw_s else ""
        mark = "ok" if seconds < GOAL else "OVER"
        print(f"{label:58s} {seconds:8.3f} s  {mark:4s}  {ratio}", flush=True)

    r = args.repeats
    print(f"{'operation (median of ' + str(r) + ')':58s} {'time':>10s}  goal {GOAL:.0f} s  vs raw limit")
    touch_r, _ = timed(lambda: touch_reports(reports), r)
    loads_reports, _ = timed(lambda: [json.loads(b) for b in report_files.values()], r)
    row(
        "merge the reports (parsed)",
        timed(lambda: merge(job, reports), r)[0],
        touch_r,
        "one pass over the entries",
    )
    row(
        "merge the report files (json.loads included)",
        timed(lambda: merge_files(job, storage), r)[0],
        loads_reports,
        "json.loads of the reports",
    )
    body = plain_body(raw)
    dumps_s, _ = timed(lambda: json.dumps(body, separators=(",", ":")).encode(), r)
    row(
        "commit: Manifest(...).to_json()",
        timed(lambda: commit(job, entries, files, tree), r)[0],
        dumps_s,
        "json.dumps of the same body",
    )
    loads_s, _ = timed(lambda: json.loads(raw), r)
    with paused_gc():
        loads_nogc, _ = timed(lambda: json.loads(raw), r)
    read_s, _ = timed(lambda: Manifest.from_json(raw, where="bench"), r)
    row("read: Manifest.from_json (validated)", read_s, loads_s, "json.loads of the manifest")
    print(f"{'   (json.loads of the manifest, collector paused)':58s} {loads_nogc:8.3f} s")
    touch_m, _ = timed(lambda: touch_manifest(manifest), r)
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
        row(f"plan {target.label}", med["total"], touch_m, "one pass over the shards")
        print(f"{'   (ms: ' + parts + ')':58s}")
        row("   whole load: read + plan", read_s + med["total"], loads_s + touch_m, "json.loads + one pass")
    over = [label for label, s, _, _ in rows if s >= GOAL]
    print(
        f"\n{len(rows) - len(over)} of {len(rows)} under {GOAL:.0f} s" + (f"; over: {over}" if over else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
