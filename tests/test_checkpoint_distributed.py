"""Sharded saving and resharded loading with real processes (gloo on CPU).

Four ranks save DTensors sharded on a 1-D and a 2-D mesh (one mesh dimension replicated)
plus replicated plain tensors; the snapshot then loads on 1, 2 and 3 ranks, each rank
getting exactly its local shard, bit-exact.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, quick_exit

from fmstore import Checkpointer

pytestmark = pytest.mark.slow


def reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(10, 6, generator=g).to(torch.bfloat16),  # 10 rows: uneven on 3 and 4 ranks
        "cols": torch.randn(5, 3, generator=g),  # Shard(1), 3 columns on 4 ranks: one rank empty
        "grid": torch.randn(8, 4, generator=g),  # 2-D mesh: Shard(0) x Replicate
        "bias": torch.randn(5, generator=g),  # a plain (replicated) tensor
    }


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


@quick_exit  # gloo teardown at exit aborts now and then, after the body passed (conftest)
def _save_worker(rank: int, world: int, port: int, root: str, compression: str | None = None) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    _init(rank, world, port)
    try:
        ref = reference()
        mesh = init_device_mesh("cpu", (world,))
        mesh2 = init_device_mesh("cpu", (2, world // 2))
        state = {
            "model": {
                "w": distribute_tensor(ref["w"], mesh, [Shard(0)]),
                "cols": distribute_tensor(ref["cols"], mesh, [Shard(1)]),
                "grid": distribute_tensor(ref["grid"], mesh2, [Shard(0), Replicate()]),
                "bias": ref["bias"].clone(),
            },
            "step": 1,
        }
        with Checkpointer(root, compression=compression) as ck:
            assert (ck.rank, ck.world_size) == (rank, world)
            level, sent = ck.levels[0], []  # the reports this rank sends (keys only)
            report = level._report
            level._report = lambda rel, body: (sent.append(set(body)), report(rel, body))[1]
            info = ck.save(1, state).wait()
            assert info.step == 1
            # An incremental second snapshot: only "w" changes.
            state["model"]["w"] = distribute_tensor(ref["w"] + 1, mesh, [Shard(0)])
            state["step"] = 2
            info2 = ck.save(2, state).wait()
            assert info2.tensors_written <= 1
            # The layout (tensor names, dtypes, shapes) went with the first report only: the
            # coordinator merged the second from its memory of it (reports.Layouts).
            assert "tensors" in sent[0] and "layout" in sent[0], sent
            assert "tensors" not in sent[1] and "layout" in sent[1], sent
            dist.barrier()
    finally:
        dist.destroy_process_group()


@quick_exit  # gloo teardown at exit aborts now and then, after the body passed (conftest)
def _load_worker(rank: int, world: int, port: int, root: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    _init(rank, world, port)
    try:
        ref = reference()
        mesh = init_device_mesh("cpu", (world,))
        zeros = {k: torch.zeros_like(v) for k, v in ref.items()}
        target = {
            "model": {
                "w": distribute_tensor(zeros["w"], mesh, [Shard(0)]),
                "cols": distribute_tensor(zeros["cols"], mesh, [Shard(0)]),  # a different sharding
                "grid": distribute_tensor(zeros["grid"], mesh, [Shard(1)]),
                "bias": zeros["bias"],
            },
            "step": 0,
        }
        with Checkpointer(root) as ck:
            out = ck.load(target, step=1)
            assert out["step"] == 1
            for name in ("w", "cols", "grid"):
                got = target["model"][name].full_tensor()
                assert torch.equal(got, ref[name]), name
            assert torch.equal(target["model"]["bias"], ref["bias"])
            ck.load(target, step=2)
            assert torch.equal(target["model"]["w"].full_tensor(), ref["w"] + 1)
            assert torch.equal(target["model"]["grid"].full_tensor(), ref["grid"])
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, root: str, *extra) -> None:
    mp.spawn(fn, args=(world, free_port(), root, *extra), nprocs=world, join=True)


def test_save_on_4_ranks_load_on_1_2_3(tmp_path):
    root = str(tmp_path / "ckpt")
    _spawn(_save_worker, 4, root)
    ref = reference()
    with Checkpointer(root) as ck:
        assert ck.steps() == [1, 2]
        m = ck.manifest(1)
        assert m.world_size == 4
        assert len(m.tensors["model/w"].shards) == 4
        assert len(m.tensors["model/grid"].shards) == 2  # the replicas wrote once
        # Every byte is stored once: the shard files hold the tensors and their headers only.
        total = sum(v.numel() * v.element_size() for v in ref.values())
        files = [f for f in os.listdir(os.path.join(root, "step-0000000001")) if f.endswith(".safetensors")]
        on_disk = sum(os.path.getsize(os.path.join(root, "step-0000000001", f)) for f in files)
        assert total <= on_disk <= total + 4 * 1024
        assert not [f for f in os.listdir(os.path.join(root, "step-0000000001")) if f.startswith("rank-")]
        # Step 2 rewrote only "w": its directory holds w's shards alone.
        assert (
            sum(
                len(e.shards)
                for e in ck.manifest(2).tensors.values()
                if e.shards[0].file.startswith("step-0000000002")
            )
            == 4
        )
        out = ck.load(step=1)  # one process, whole tensors
        for name, t in ref.items():
            assert torch.equal(out["model"][name], t), name
    _spawn(_load_worker, 2, root)
    _spawn(_load_worker, 3, root)


def test_compressed_snapshot_reshards(tmp_path):
    """Encoded shards are decoded whole, then each rank copies the overlap it needs."""
    root = str(tmp_path / "ckpt")
    _spawn(_save_worker, 4, root, "lossless")
    with Checkpointer(root) as ck:
        shards = [s for e in ck.manifest(1).tensors.values() for s in e.shards]
        assert all(s.codec for s in shards if s.end > s.begin)  # empty pieces are stored as they are
    _spawn(_load_worker, 3, root)


def test_a_version_3_snapshot_reshards_on_2_ranks_as_version_2_does(tmp_path):
    """Issue 30: the manifests a 4-rank save commits are version 3 (the ranks' report tables
    concatenated); 2 gloo ranks load them resharded, and load the same once they are
    rewritten as version 2."""
    import json

    from fmstore.checkpoint import Manifest
    from fmstore.checkpoint.manifest import MANIFEST
    from fmstore.checkpoint.manifest_compat import to_json_v2

    root = str(tmp_path / "ckpt")
    _spawn(_save_worker, 4, root)
    paths = [os.path.join(root, f"step-000000000{s}", MANIFEST) for s in (1, 2)]
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        assert json.loads(raw)["version"] == 3
    _spawn(_load_worker, 2, root)  # from version 3
    for path in paths:
        with open(path, "rb") as f:
            m = Manifest.from_json(f.read(), where=path)
        with open(path, "wb") as f:
            f.write(to_json_v2(m))
    _spawn(_load_worker, 2, root)  # the same from version 2


@quick_exit  # gloo teardown at exit aborts now and then, after the body passed (conftest)
def _stale_worker(rank: int, world: int, port: int, root: str) -> None:
    _init(rank, world, port)
    try:
        with Checkpointer(root) as ck:
            ck.save(5, {"a": torch.full((4,), 1.0), "b": torch.arange(3.0)}).wait()
    finally:
        dist.destroy_process_group()


def test_a_dead_attempts_reports_are_never_merged(tmp_path):
    """A job killed while saving step 5 left its reports and an abort in step 5's directory; the
    restarted job's save of step 5 ignores them (another attempt's token) and commits its own."""
    import json

    root = tmp_path / "ckpt"
    stale = root / "step-0000000005"
    stale.mkdir(parents=True)
    bogus = {"token": "dead:1", "error": None, "names": ["x"], "files": {}, "entries": {}, "per_rank": []}
    (stale / "rank-00001.json").write_text(json.dumps(bogus))
    (stale / "aborted.json").write_text(json.dumps({"token": "dead:2", "errors": ["rank 1: killed"]}))
    _spawn(_stale_worker, 2, str(root))
    with Checkpointer(root) as ck:
        out = ck.load(step=5)
        assert set(ck.manifest(5).tensors) == {"a", "b"}  # the dead attempt's "x" was not merged
    assert torch.equal(out["a"], torch.full((4,), 1.0)) and torch.equal(out["b"], torch.arange(3.0))


@quick_exit  # gloo teardown at exit aborts now and then, after the body passed (conftest)
def _refused_worker(rank: int, world: int, port: int, root: str) -> None:
    from fmstore import WriterConflictError

    _init(rank, world, port)
    try:
        ck = Checkpointer(root)
        try:
            ck.save(1, {"w": torch.full((100,), float(rank))})
        except WriterConflictError as e:  # on every rank, rank 0's claim having failed
            assert "is being written by" in str(e), str(e)
        else:
            raise AssertionError(f"rank {rank}: the save was not refused")
        ck.close()
    finally:
        dist.destroy_process_group()


def test_a_job_whose_root_another_writer_holds_is_refused_on_every_rank(tmp_path):
    root = str(tmp_path / "ckpt")
    with Checkpointer(root) as holder:
        holder.save(0, {"w": torch.zeros(100)}).wait()
        _spawn(_refused_worker, 2, root)
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-0000000000", "writer.lease"]
        assert holder.steps() == [0]
