"""The metadata of a many-rank save, at a size a test affords (issue 13, deliverable 10): the
rank reports :mod:`fmstore.testing.metadata` builds (``bench/metadata_scale.py``: 1,024 ranks),
here 64 ranks with 100 sharded tensors (plus step scalars and per-rank RNG state), merged,
committed and read back, and resharded loads planned and run from them.  Correctness only:
the timings are the bench's.

The job's tensors have real bytes here (shapes divided by 16, 4 KiB checksum chunks, so a
saved slice spans several chunks and a resharded slice starts and ends inside them), so a plan
is run to the end: every byte it reads is checked against the chunk digests, and every
destination is compared with the tensor's bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import xxhash

import fmstore.testing.metadata as ms
from fmstore.blob import as_memoryview
from fmstore.checkpoint.level import SnapshotLevel
from fmstore.checkpoint.manifest import (
    MIN_CHUNK_SIZE,
    Manifest,
    TensorEntry,
    seal,
    tensors_body,
    tensors_of_table,
)
from fmstore.checkpoint.manifest_compat import to_json_v2
from fmstore.checkpoint.reader import SnapshotReader
from fmstore.checkpoint.reports import ReportError, merge_reports
from fmstore.checkpoint.tree import tensor_leaves
from fmstore.storage import Storage

WORLD, TENSORS = 64, 100


@pytest.fixture(scope="module")
def job() -> ms.Job:
    return ms.Job(WORLD, TENSORS, scale=16, chunk_size=MIN_CHUNK_SIZE, data=True)


@pytest.fixture(scope="module")
def merged(job: ms.Job) -> ms.MergedTree:
    return ms.merge(job, job.reports)


@pytest.fixture(scope="module")
def manifest(job: ms.Job, merged: Any) -> Manifest:
    return Manifest.from_json(ms.commit(job, *merged), where="test")


def test_the_slices_are_torchs_shard_0() -> None:
    from torch.distributed.tensor.placement_types import Shard as Shard0

    for n in (0, 1, 4, 63, 64, 65, 2004, 128256):
        for world in (1, 7, 64, 1024):
            for rank in {r for r in (0, 1, world // 2, world - 2, world - 1) if 0 <= r < world}:
                assert ms.dim0(n, world, rank) == tuple(Shard0.local_shard_size_and_offset(n, world, rank))


def test_reports_are_in_the_form_a_level_writes(job: ms.Job) -> None:
    rep = job.reports[1]
    assert list(rep) == ["token", "error", "also", "files", "headers", "tensors", "shards", "per_rank"]
    (file,) = rep["files"]
    assert rep["files"][file] == len(job.blobs[file])
    n = int.from_bytes(job.blobs[file][:8], "little")
    assert rep["headers"] == {file: xxhash.xxh3_128_hexdigest(job.blobs[file][: 8 + n])}
    entries = tensors_of_table(rep["tensors"], rep["shards"])  # a version-3 manifest's table
    for e in entries.values():
        (sh,) = e.shards
        assert sh.file == file and len(sh.chunks) == -(-(sh.end - sh.begin) // MIN_CHUNK_SIZE)
    assert "rng/rank-1/torch" in entries and "rng/rank-1/torch" not in rep["also"]
    assert [path for path, _ in rep["per_rank"]] == [["rng"]]


def test_the_merged_table_covers_every_tensor_once(job: ms.Job, merged: Any) -> None:
    entries, files, tree, _ = merged
    names = {n for rep in job.reports.values() for n in [*rep["also"], *rep["tensors"]["names"]]}
    assert set(entries) == names
    assert len(entries) == TENSORS + len(job.steps) + 3 * WORLD
    assert set(files) == {job.shard_file(r) for r in range(WORLD)}
    for s in job.sharded:  # dim-0 slices in rank order, end to end (empty ones once)
        shards = entries[s.name].shards
        rows = [(sh.offsets[0], sh.lengths[0]) for sh in shards]
        nonempty = [(o, n) for o, n in rows if n]
        assert [o for o, _ in nonempty] == [sum(n for _, n in nonempty[:i]) for i in range(len(nonempty))]
        assert sum(n for _, n in rows) == s.shape[0]
        assert all(
            sh.lengths[1:] == list(s.shape[1:]) and sh.offsets[1:] == [0] * (len(s.shape) - 1)
            for sh in shards
        )
    for r in range(WORLD):  # each rank's own generators, from its own file
        (sh,) = entries[f"rng/rank-{r}/torch"].shards
        assert sh.file == job.shard_file(r)
        assert tensor_leaves(tree, r)[("rng", "torch")] == f"rng/rank-{r}/torch"
    # The coordinator's own path (the report files through SnapshotLevel.collect_reports) agrees.
    assert ms.merge_files(job, ms.MemoryStorage(job)) == merged


def _report_without(rep: dict[str, Any], name: str) -> dict[str, Any]:
    """``rep`` with tensor ``name``'s shard rows gone (its name still in the state: ``also``)."""
    entries = tensors_of_table(rep["tensors"], rep["shards"])
    del entries[name]
    kept = {n: TensorEntry(e.dtype, e.shape, e.shards) for n, e in entries.items()}
    return {**rep, **tensors_body(kept), "also": [*rep["also"], name]}


def test_the_merge_refuses_reports_that_do_not_add_up(job: ms.Job) -> None:
    reports = json.loads(json.dumps(job.reports))
    reports = {int(r): rep for r, rep in reports.items()}
    name = job.sharded[0].name
    reports[3] = _report_without(reports[3], name)  # rank 3's rows of it never saved
    with pytest.raises(ReportError, match="not fully saved"):
        merge_reports(reports, job.step)
    reports[3] = json.loads(json.dumps(job.reports[3]))
    reports[5]["tensors"]["shapes"][reports[5]["tensors"]["names"].index(name)] = [1, 2]
    with pytest.raises(ReportError, match="ranks disagree"):
        merge_reports(reports, job.step)
    reports[5] = json.loads(json.dumps(job.reports[5]))
    del reports[7]["shards"]["offsets"]
    with pytest.raises(ReportError, match="rank 7's report is malformed"):
        merge_reports(reports, job.step)
    reports[7] = json.loads(json.dumps(job.reports[7]))
    reports[7]["shards"]["tensor"] = reports[7]["shards"]["file"]  # rows naming no tensor of it
    reports[7]["shards"]["tensor"][0] = "<i8"
    with pytest.raises(ReportError, match="rank 7's report is malformed"):
        merge_reports(reports, job.step)


def test_layouts_sent_once_merge_the_same_and_an_unknown_one_is_refused(job: ms.Job, merged: Any) -> None:
    """DCP's plan cache in fmstore's form: a rank sends its layout (tensor names, dtypes,
    shapes) with its digest, then only the digest; the coordinator's Layouts fills it in and,
    with every rank's layout as at the last save, reuses that save's mapping."""
    from fmstore.checkpoint.reports import Layouts, layout_digest

    def reports(strip: bool) -> dict[int, dict[str, Any]]:
        out = {}
        for r, rep in json.loads(json.dumps(job.reports)).items():
            rep["layout"] = layout_digest(rep["also"], rep["tensors"])
            if strip:
                del rep["also"], rep["tensors"]
            out[int(r)] = rep
        return out

    layouts = Layouts()
    first = merge_reports(reports(strip=False), job.step, layouts)
    assert first[:2] == merged[:2]
    key, mapping = layouts.key, layouts.mapping
    again = merge_reports(reports(strip=True), job.step, layouts)
    assert again[:2] == merged[:2] and layouts.key == key and layouts.mapping is mapping  # reused
    assert merge_reports(reports(strip=True), job.step, layouts)[:2] == merged[:2]
    with pytest.raises(ReportError, match="rank 0's report names layout .* not seen"):
        merge_reports(reports(strip=True), job.step, Layouts())
    # One rank's layout changes (a tensor more in its state): sent whole, merged anew.
    changed = reports(strip=True)
    rep = json.loads(json.dumps(job.reports[5]))
    rep["also"].append("extra")
    rep["layout"] = layout_digest(rep["also"], rep["tensors"])
    changed[5] = rep
    with pytest.raises(ReportError, match="'extra' is not fully saved"):
        merge_reports(changed, job.step, layouts)


@pytest.mark.parametrize(
    "raw", [b'{"token": "t", "entr', b"\xff\xfe", b"[1, 2]"], ids=["torn", "binary", "list"]
)
def test_a_rank_report_that_is_not_a_json_object_is_a_report_error_naming_the_rank(
    tmp_path: Any, raw: bytes
) -> None:
    """The coordinator reads every rank's report file; one that is torn, not text or not an
    object fails the commit with a ReportError naming the rank and the file (it was a bare
    JSONDecodeError / AttributeError)."""
    with Storage(tmp_path) as storage:
        level = SnapshotLevel("local", storage, world_size=2)
        storage.write("step-0000000003/rank-00000.json", [b'{"token": "t"}'])
        storage.write("step-0000000003/rank-00001.json", [raw])
        with pytest.raises(ReportError, match=r"step 3: rank 1's report step-0000000003/rank-00001\.json"):
            level.collect_reports("step-0000000003", 3, "t")


def test_the_manifest_is_the_json_of_its_fields(job: ms.Job, merged: Any) -> None:
    entries, files, tree, headers = merged
    raw = ms.commit(job, entries, files, tree, headers)
    m = Manifest(
        step=job.step, world_size=WORLD, tensors=entries, tree=tree, files=files, meta=job.meta(), headers=headers
    )
    m.created = json.loads(raw)["created"]
    body = {
        "format": "fmstore.snapshot", "version": 3, "step": m.step, "world_size": WORLD,
        **tensors_body(entries), "tree": tree, "files": files, "created": m.created, "meta": m.meta,
        "headers": headers,
    }  # fmt: skip
    assert raw == seal(json.dumps(body, separators=(",", ":")).encode())
    assert len(headers) == WORLD and set(headers) == set(files)  # a digest of every rank's file
    back = Manifest.from_json(raw, where="test")
    assert back == m and back.sealed
    # Version 2 of the same manifest (an object per shard) reads back the same.
    # (as an older fmstore wrote it: no header digests, no seal)
    v2 = Manifest.from_json(to_json_v2(m), where="test")
    assert v2.headers == {} and not v2.sealed
    v2.headers = m.headers
    assert v2 == m


def expected(job: ms.Job, spec: ms.Spec, offsets: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    whole = job.global_bytes(spec)
    return whole[tuple(slice(o, o + n) for o, n in zip(offsets, shape))].reshape(-1)


@pytest.mark.parametrize(
    "target, ranks",
    [
        (ms.Target("32 ranks, Shard(0)", (32,)), range(32)),
        (ms.Target("64 ranks, 4x16 mesh", (4, 16)), [0, 15, 16, 31, 33, 47, 48, 63]),
        (ms.Target("1 rank", (1,)), [0]),
    ],
)
def test_a_resharded_load_reads_exactly_what_it_needs(
    job: ms.Job, manifest: Manifest, target: ms.Target, ranks: Any
) -> None:
    specs = {s.name: s for r in range(WORLD) for s in job.specs(r).values()}
    for rank in ranks:
        storage = ms.MemoryStorage(job)
        planned = ms.plan_load(job, storage, manifest, target, rank)
        names = {r.name for r in planned.regions}
        assert f"rng/rank-{rank}/torch" in names and len(names) == TENSORS + len(job.steps) + 3
        # The bytes the plan reads: of each saved shard that meets a region, its rows that do,
        # rounded out to the checksum chunks (a shard split in columns: all its rows), no other.
        want = set()
        for r in planned.regions:
            off, ln = tuple(r.offsets), tuple(r.dest.shape)
            for sh in manifest.tensors[r.name].shards:
                if not all(
                    max(a, b) < min(a + m, b + n) for a, m, b, n in zip(off, ln, sh.offsets, sh.lengths)
                ):
                    continue
                stored, cs = sh.end - sh.begin, sh.chunk_size
                a, b = 0, stored  # a 0-d tensor, or a shard split in columns: all of it
                if off and off[1:] == tuple(sh.offsets[1:]) and ln[1:] == tuple(sh.lengths[1:]):
                    row = stored // sh.lengths[0]
                    a = (max(off[0], sh.offsets[0]) - sh.offsets[0]) * row
                    b = (min(off[0] + ln[0], sh.offsets[0] + sh.lengths[0]) - sh.offsets[0]) * row
                    a, b = a // cs * cs, min(stored, -(-b // cs) * cs)
                want.add((sh.file, sh.begin + a, b - a))
        assert {
            (f, o, n) for f, ranges in planned.plan.reads.items() for o, mv in ranges for n in [len(mv)]
        } == want
        assert planned.files == {f for f, _, _ in want}
        # Run it: every chunk read is checked against its digest, every destination is exact.
        SnapshotReader(storage, manifest)._run(planned.plan)  # type: ignore[arg-type]
        for r in planned.regions:
            got = r.dest.reshape(-1).view(torch.uint8)
            assert torch.equal(got, expected(job, specs[r.name], tuple(r.offsets), tuple(r.dest.shape))), (
                r.name
            )


def test_the_plan_from_columns_is_the_plan_from_shard_objects(job: ms.Job, manifest: Manifest) -> None:
    """The reader plans a table's tensors from its columns (``Meeting``, Shard objects only
    for what it records); entries built from Shard lists go shard by shard.  Both give the
    same reads and chunk checks, for a dim-0 reshard, a 2-D mesh and a whole load."""
    listed = Manifest.from_json(manifest.to_json(), where="test")
    for e in listed.tensors.values():
        e.shards = list(e.shards)  # (the setter drops the table: the shard-by-shard path)
    assert all(e.table is None for e in listed.tensors.values())

    def summary(planned: ms.Planned) -> tuple[Any, Any]:
        reads = sorted((f, o, len(mv)) for f, ranges in planned.plan.reads.items() for o, mv in ranges)
        checks = sorted(
            (name, sh.file, sh.begin, tuple(sh.chunks), start, len(as_memoryview(buf)))
            for name, sh, buf, start in planned.plan.checks
        )
        return reads, checks

    for target, rank in [
        (ms.Target("32 ranks, Shard(0)", (32,)), 5),
        (ms.Target("64 ranks, 4x16 mesh", (4, 16)), 33),
        (ms.Target("1 rank", (1,)), 0),
    ]:
        storage = ms.MemoryStorage(job)
        columns = summary(ms.plan_load(job, storage, manifest, target, rank))
        assert columns == summary(ms.plan_load(job, storage, listed, target, rank)), target.label
        assert columns[0] and columns[1]


def test_the_column_check_of_a_header_passes_exactly_what_the_shard_loop_passes(
    job: ms.Job, manifest: Manifest
) -> None:
    """A shard file's header is checked as columns (``_rows_match``) and, where that finds a
    mismatch, by the loop over its shards that names the first bad one.  For each damage of
    one header entry, the column check passes only where the loop passes (else it would let
    a permuted or retyped manifest load other values)."""
    import random

    from fmstore.checkpoint.shardfile import _rows_match, check_shard_file, header_entries
    from fmstore.errors import CorruptBlobError

    class Damaged(ms.MemoryStorage):
        image = b""  # the damaged header (and its length before it)

        def read_ranges(self, rel: str, ranges: Any) -> None:
            if not self.image:
                return super().read_ranges(rel, ranges)
            for off, dest in ranges:
                dest[:] = (self.image + bytes(len(dest)))[off : off + len(dest)]

    storage = Damaged(job)
    file = sorted(manifest.referenced_files())[3]
    rows = manifest.shards_by_file().rows(file)
    assert rows is not None and len(rows) > 3
    head = bytearray(min(storage.size(file), 1 << 20))
    storage.read_ranges(file, [(0, memoryview(head))])
    n = int.from_bytes(head[:8], "little")
    good = json.loads(bytes(head[8 : 8 + n]))
    names = [k for k in good if k != "__metadata__"]
    rng = random.Random(7)

    def damages(h: dict[str, Any], k: str, other: str) -> list[tuple[str, Any]]:
        e = h[k]
        return [
            ("renamed", lambda: h.__setitem__(other + "x", h.pop(k))),
            (
                "swapped names",
                lambda: (
                    h.__setitem__("_t", h.pop(k)),
                    h.__setitem__(k, h.pop(other)),
                    h.__setitem__(other, h.pop("_t")),
                ),
            ),  # fmt: skip
            ("a suffix writers use", lambda: h.__setitem__(k + "@[0,4]~2", h.pop(k))),
            ("other dtype", lambda: e.__setitem__("dtype", "F64" if e["dtype"] != "F64" else "I8")),
            ("other shape", lambda: e.__setitem__("shape", [*e["shape"], 1])),
            ("a shape of text", lambda: e.__setitem__("shape", "x")),
            ("an end moved", lambda: e["data_offsets"].__setitem__(1, e["data_offsets"][1] + 2)),
            ("gone", lambda: h.pop(k)),
            ("unchanged", lambda: None),
        ]

    outcomes = set()
    full = [k for k in names if good[k]["data_offsets"][0] < good[k]["data_offsets"][1]]
    for round in range(12):
        k = rng.choice(full)
        other = rng.choice([x for x in names if x != k])
        for what, _ in damages(json.loads(json.dumps(good)), k, other):
            header = json.loads(json.dumps(good))
            dict(damages(header, k, other))[what]()
            header.pop("__metadata__")  # (room for a longer name: the data must not move)
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (n - len(raw)) if len(raw) <= n else b""
            if len(raw) != n:
                continue  # (a longer header would move the data: not this test's subject)

            storage.image = n.to_bytes(8, "little") + raw
            try:
                check_shard_file(storage, file, rows.shards(), 1)  # type: ignore[arg-type]
                loop = True
            except CorruptBlobError:
                loop = False
            columns = _rows_match(rows, header_entries(header), 8 + n)
            assert columns == loop, (what, round)
            outcomes.add((what, loop))
    assert ("unchanged", True) in outcomes and ("a suffix writers use", True) in outcomes
    assert {w for w, ok in outcomes if not ok} >= {
        "renamed",
        "swapped names",
        "other dtype",
        "other shape",
        "gone",
    }


def test_a_flipped_byte_in_a_load_planned_from_columns_is_a_checksum_error(
    job: ms.Job, manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole load plans each tensor's 64 shards from the table's columns, its chunk checks
    holding a ChunkRef, not a Shard: a byte flipped in one shard's bytes is still a
    ChecksumError naming the tensor, the file and the chunk."""
    from fmstore.checkpoint.shardtable import ChunkRef
    from fmstore.errors import ChecksumError

    storage = ms.MemoryStorage(job)
    planned = ms.plan_load(job, storage, manifest, ms.Target("1 rank", (1,)), 0)
    name, ref, buf, start = next(c for c in planned.plan.checks if isinstance(c[1], ChunkRef) and len(c[2]))
    bad = bytearray(job.blobs[ref.file])
    bad[ref.begin + start + len(buf) // 2] ^= 0x10
    monkeypatch.setitem(job.blobs, ref.file, bytes(bad))
    with pytest.raises(ChecksumError) as err:
        SnapshotReader(storage, manifest)._run(planned.plan)  # type: ignore[arg-type]
    assert name in str(err.value) and ref.file in str(err.value) and "chunk" in str(err.value)


def test_a_whole_read_through_the_reader_matches(job: ms.Job, manifest: Manifest) -> None:
    """SnapshotReader.read (file checks, plan, reads, verification) for a 4x16-mesh rank."""
    target = ms.Target("64 ranks, 4x16 mesh", (4, 16))
    regions = ms.plan_load(job, ms.MemoryStorage(job), manifest, target, 21).regions
    for r in regions:
        r.dest.zero_()
    SnapshotReader(ms.MemoryStorage(job), manifest).read(regions)  # type: ignore[arg-type]
    specs = {s.name: s for s in job.specs(21).values()}
    for r in regions:
        assert torch.equal(
            r.dest.reshape(-1).view(torch.uint8),
            expected(job, specs[r.name], tuple(r.offsets), tuple(r.dest.shape)),
        )


def test_an_object_stores_files_are_checked_several_at_once_and_a_bad_one_still_raises(
    job: ms.Job, manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole load from an object store (here a MemoryStorage that says it is not local)
    checks its 64 shard files from several threads: two checks meet at a barrier, which one
    after the other could not pass.  A damaged file among them is still a CorruptBlobError
    naming it."""
    import itertools
    import threading

    from fmstore.checkpoint import reader as reader_module
    from fmstore.errors import CorruptBlobError

    met = threading.Barrier(2, timeout=30)  # (one check alone there: BrokenBarrierError in 30 s)
    real = reader_module.check_shard_file
    calls = itertools.count()
    threads = set()

    def meeting(*args: Any) -> None:
        threads.add(threading.get_ident())
        if next(calls) < 2:  # the first two checks wait for each other
            met.wait()
        real(*args)

    monkeypatch.setattr(reader_module, "check_shard_file", meeting)
    monkeypatch.setattr(ms.MemoryStorage, "local", False)
    files = sorted(manifest.referenced_files())
    SnapshotReader(ms.MemoryStorage(job), manifest).check_all(files)  # type: ignore[arg-type]
    assert len(threads) > 1

    bad = bytearray(job.blobs[files[40]])
    bad[8:12] = b"????"  # its header is not JSON any more
    monkeypatch.setitem(job.blobs, files[40], bytes(bad))
    with pytest.raises(CorruptBlobError, match=files[40]):
        SnapshotReader(ms.MemoryStorage(job), manifest).check_all(files)  # type: ignore[arg-type]


def test_the_dcp_counterpart_writes_each_slice_once_and_loads_every_element_once() -> None:
    """The bench's torch DCP side (fmstore.testing.metadata_dcp) on 8 ranks x 6 tensors, shapes divided
    by 1,000 (so some ranks hold empty slices): after DCP's dedup, one write item per (tensor,
    rank with a non-empty slice) on that rank, at fmstore's dim-0 slice, each step scalar and
    RNG tensor once; a whole-tensor load plan reads every element exactly once, and a mesh
    rank's plan fills its chunk exactly once."""
    import fmstore.testing.metadata_dcp as d

    world = 8
    job = ms.Job(world, 6, scale=1000)
    final, metadata = d.global_plan(d.save_plans(job))
    items = [(rank, it) for rank, plan in enumerate(final) for it in plan.items]
    assert any(ms.dim0(s.shape[0], world, world - 1)[0] == 0 for s in job.sharded)  # empty slices exist
    for s in job.sharded:
        got = sorted(
            (rank, tuple(it.index.offset))
            for rank, it in items
            if it.index.fqn == s.name and it.tensor_data.chunk.sizes[0]
        )
        want = [
            (rank, (first, *[0] * (len(s.shape) - 1)))
            for rank in range(world)
            for rows, first in [ms.dim0(s.shape[0], world, rank)]
            if rows
        ]
        assert got == want, s.name
        # The empty slices all sit at offset shape[0]: DCP keeps one of them.
        assert sum(1 for _, it in items if it.index.fqn == s.name) - len(want) <= 1
    rng = ("torch", "numpy/keys", "python/state")
    plain = [s.name for s in job.steps] + [f"rng/rank-{r}/{p}" for r in range(world) for p in rng]
    assert sorted(it.index.fqn for _, it in items if it.type.name == "TENSOR") == sorted(plain)
    md = d.read(d.finish(metadata, d.write_results(final)))
    assert len(md.storage_data) == len(items)

    def covered(plan: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        seen = {n: torch.zeros(shape, dtype=torch.int32) for n, shape in shapes.items()}
        for ri in plan.items:
            box = tuple(slice(o, o + n) for o, n in zip(ri.dest_offsets, ri.lengths))
            seen[ri.dest_index.fqn][box] += 1
        for n, t in seen.items():
            assert bool((t == 1).all()), n

    whole = d.load_state_dict(job, ms.Target("1 rank", (1,)), 0)
    covered(d.load_plan(whole, md), {n: tuple(t.shape) for n, t in whole.items()})
    target = ms.Target("8 ranks, 4x2 mesh", (4, 2))
    for rank in range(target.world):
        state = d.load_state_dict(job, target, rank)
        shapes = {}
        for n, t in state.items():
            if isinstance(t, d.LocalShard):
                (chunk,) = t.__create_chunk_list__()
                spec = next(s for s in job.sharded if s.name == n)
                assert (tuple(chunk.offsets), tuple(chunk.sizes)) == target.region(spec.shape, rank)
                shapes[n] = tuple(chunk.sizes)
            else:
                shapes[n] = tuple(t.shape)
        plan = d.load_plan(state, md)
        covered(plan, shapes)
