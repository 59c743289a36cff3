"""A many-rank save's metadata without processes or (by default) tensor data: the rank reports of
a ``world``-rank FSDP-style job, the coordinator's merge of them, its commit, and resharded
loads planned (and, with ``data=True``, run) from the manifest, each through the code a real
save and load run (:class:`~fmstore.checkpoint.level.SnapshotLevel`'s report, merge and
commit; :class:`~fmstore.checkpoint.SnapshotReader`'s file checks and plan).

``bench/metadata_scale.py`` times these for 1,024 ranks with 500 tensors;
``tests/test_metadata_scale.py`` checks them on a small job with real bytes.

The job: every rank holds a dim-0 slice of every sharded tensor (torch's ``Shard(0)``
chunking, so the last ranks of a tensor with fewer rows than a multiple of the world hold
empty slices).  The sharded tensors are the bf16 parameters of an 8B-class decoder (hidden
4096, ffn 14336, 8 kv heads, vocabulary 128256) and their fp32 Adam moments; beside them each
parameter's 0-d ``step`` (written once, by the rank ``owner_of`` picks) and each rank's own
random number generators (three tensors per rank under a per-rank node of the tree).
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import xxhash

from ..blob import dtype_name
from ..checkpoint.level import SnapshotLevel, merge_trees, rank_report
from ..checkpoint.manifest import CHUNK_SIZE, MANIFEST, Manifest, Shard, TensorEntry, step_dir
from ..checkpoint.manifest_compat import to_json_v2
from ..checkpoint.reader import Region, SnapshotReader, files_of, find_overlaps, plan_regions
from ..checkpoint.reports import Layouts, Merged, layout_digest, merge_reports
from ..checkpoint.shardfile import FileEntry, header_digest, shard_header
from ..checkpoint.sharding import owner_of
from ..checkpoint.tree import PerRank, compare, flatten, tensor_leaves
from ..checkpoint.writing import digest_all

_EMPTY = torch.empty(0, dtype=torch.uint8)

__all__ = [
    "Spec",
    "Job",
    "MemoryStorage",
    "Target",
    "Planned",
    "dim0",
    "merge",
    "merge_files",
    "commit",
    "plan_load",
    # A manifest as an older fmstore wrote it (version 1 or 2): the metadata bench measures
    # the size and validated read of the same job's manifest in both formats.
    "to_json_v2",
]

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
        heads = [FileEntry.raw(s.name, s.dtype, local) for s, _, local in pieces]
        header, spans = shard_header(heads)
        self.files[file] = header
        self.sizes[file] = len(header) + sum(h.nbytes for h in heads)
        cs = self.chunk_size
        if self.data:
            bodies = [self.piece_bytes(s, offsets, local) for s, offsets, local in pieces]
            self.blobs[file] = header + b"".join(bodies)
            views = [torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else _EMPTY for b in bodies]
            digests = digest_all(views, chunk_size=cs)
        else:  # digests of the right number and form (nothing checks them)
            digests = []
            for s, _, _ in pieces:
                n = -(-heads[len(digests)].nbytes // cs)
                chunks = [xxhash.xxh3_128_hexdigest(f"{s.name}|{rank}|{c}".encode()) for c in range(n)]
                digests.append(("xxh3_128:" + xxhash.xxh3_128_hexdigest("".join(chunks).encode()), chunks))
        entries = {}
        for (s, offsets, local), (begin, end), (checksum, chunks) in zip(pieces, spans, digests):
            shard = Shard(list(offsets), list(local), file, begin, end, checksum, [], cs, chunks)
            entries[s.name] = TensorEntry(dtype_name(s.dtype), list(s.shape), [shard])
        files = {file: self.sizes[file]}
        headers = {file: header_digest(header)}
        return rank_report(self.token, sorted(specs), files, entries, self.tree(rank), rank, headers)

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
    #: As a local root: what the bench measures is the CPU's part of the metadata, and with no
    #: latency to hide, an object store's 16 file checks at once would only contend for the
    #: GIL (whole-tensor plan at 1,024 ranks: checks 140 ms one after the other, 200 ms so).
    local = True
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


#: What the merge gives a commit: reports.Merged with the ranks' per-rank nodes merged into the tree.
MergedTree = tuple[dict[str, TensorEntry], dict[str, int], dict, dict[str, str]]


def merge(job: Job, reports: dict[int, dict[str, Any]]) -> MergedTree:
    """The coordinator's merge of parsed reports, and the tree merge ``SnapshotLevel.write``
    does: the tensor table, files -> sizes, the tree, files -> header digests."""
    entries, files, per_rank, headers = merge_reports(reports, job.step)
    tree = merge_trees(job.tree(0), per_rank)
    return entries, files, tree, headers


def steady_reports(job: Job) -> tuple[Layouts, dict[int, bytes]]:
    """The steady state of a long run: a coordinator's ``Layouts`` that merged the job's
    reports once, and each rank's next report file, carrying only its layout's digest."""
    layouts, full, steady = Layouts(), {}, {}
    for r, rep in job.reports.items():
        full[r] = {**rep, "layout": layout_digest(rep["also"], rep["tensors"])}
        steady[r] = json.dumps({k: v for k, v in full[r].items() if k not in ("also", "tensors")}).encode()
    merge_reports(full, job.step, layouts)
    return layouts, steady


def merge_steady(job: Job, layouts: Layouts, steady: dict[int, bytes]) -> Merged:
    """The coordinator's merge of ``steady_reports``' files (their ``json.loads`` included)."""
    return merge_reports({r: json.loads(raw) for r, raw in steady.items()}, job.step, layouts)


def merge_files(job: Job, storage: MemoryStorage) -> MergedTree:
    """``SnapshotLevel.collect_reports`` on the report files (their ``json.loads`` included)."""
    level = SnapshotLevel("bench", storage, rank=0, world_size=job.world)  # type: ignore[arg-type]
    entries, files, per_rank, headers = level.collect_reports(step_dir(job.step), job.step, job.token)
    return entries, files, merge_trees(job.tree(0), per_rank), headers


def commit(
    job: Job,
    entries: dict[str, TensorEntry],
    files: dict[str, int],
    tree: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> bytes:
    """``SnapshotLevel.commit`` of the merged table, into a :class:`MemoryStorage`: the
    manifest's bytes."""
    storage = MemoryStorage(job)
    level = SnapshotLevel("bench", storage, world_size=job.world)  # type: ignore[arg-type]
    level.commit(job.step, entries, files, tree, job.meta(), headers=headers)
    return storage.written[f"{step_dir(job.step)}/{MANIFEST}"]


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
        dtype = entry.torch_dtype
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
    reader.check_all(files)
    t4 = time.perf_counter()
    plan = plan_regions(manifest, regions, reader.pool, None, found)
    t5 = time.perf_counter()
    seconds.update(keys=t1 - t0, regions=t2 - t1, files=t3 - t2, checks=t4 - t3, plan=t5 - t4)
    return Planned(regions, files, plan, seconds)
