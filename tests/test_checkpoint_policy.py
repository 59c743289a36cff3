"""Multi-level policy: newest snapshot in host memory, every k-th to the root (NVMe), every
m-th to a further level (another disk, S3); restore from the fastest level holding a copy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from conftest import shard_file, shard_name, shard_rel
from test_checkpoint import assert_equal_state

from fmstore import (
    Checkpointer,
    ConfigError,
    FmstoreError,
    HostTier,
    InvalidKeyError,
    Level,
    LocalTier,
    ObjectTier,
    Policy,
    TieredStore,
)
from fmstore.checkpoint import ChecksumError, LoadMismatchError, SnapshotNotFoundError
from fmstore.tiers.host import size_class


def make_state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {
            "w": torch.randn(256, 64, generator=g),
            "frozen": torch.arange(4096, dtype=torch.bfloat16),  # never changes: incremental
            "b": torch.randn(64, generator=g).to(torch.float16),
        },
        "optim": {"step": step, "m": [torch.randn(300, generator=g)]},
        "rng": torch.get_rng_state(),
        "loader": {"epoch": step // 3, "pos": step * 10},
    }


def empty_like_state(state: dict) -> dict:
    def z(v):
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        if isinstance(v, dict):
            return {k: z(x) for k, x in v.items()}
        if isinstance(v, list):
            return [z(x) for x in v]
        return v

    return z(state)


def forbid_reads(monkeypatch: pytest.MonkeyPatch, ck: Checkpointer, *names: str) -> None:
    """Make reading tensor bytes from these levels fail the test."""
    for lvl in ck.levels:
        if lvl.name in names:

            def boom(rel, ranges, _name=lvl.name):
                raise AssertionError(f"read {rel} from level {_name!r}")

            monkeypatch.setattr(lvl.storage, "read_ranges", boom)


def test_three_levels_every_k_and_m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvme, archive = tmp_path / "nvme", tmp_path / "archive"
    policy = Policy(host_memory=1, every=2, levels=[Level(archive, every=4, name="archive")])
    states = {s: make_state(s) for s in range(1, 9)}
    with Checkpointer(nvme, keep_last=2, policy=policy) as ck:
        assert ck.level_names() == ["host", "local", "archive"]
        for step, state in states.items():
            info = ck.save(step, state).wait()
            want = ["host"] + (["local"] if step % 2 == 0 else []) + (["archive"] if step % 4 == 0 else [])
            assert info.levels == want, step
            assert ck.where(step) == want
        assert ck.steps("host") == [8]
        assert ck.steps("local") == [6, 8]  # keep_last=2 applies to the root
        assert ck.steps("archive") == [4, 8]  # the archive keeps everything it took
        assert ck.steps() == [4, 6, 8]
        # An archive snapshot references only archive files (its own incremental chain).
        for step in (4, 8):
            for f in ck.manifest(step, level="archive").referenced_files():
                assert (archive / f).is_file()
        frozen_files = {s.file for s in ck.manifest(8, level="archive").tensors["model/frozen"].shards}
        assert frozen_files == {shard_rel(ck.levels[1].storage, 4)}

        # The newest snapshot comes back from host memory: no storage read at all.
        forbid_reads(monkeypatch, ck, "local", "archive")
        target = empty_like_state(states[8])
        out = ck.load(target)
        assert_equal_state(out, states[8])
        assert out["model"]["w"] is target["model"]["w"]  # in place
        assert_equal_state(ck.load(), states[8])
        monkeypatch.undo()

        # Older steps from the fastest durable level holding them.
        forbid_reads(monkeypatch, ck, "archive")
        assert_equal_state(ck.load(step=6), states[6])
        monkeypatch.undo()
        forbid_reads(monkeypatch, ck, "local")
        assert_equal_state(ck.load(step=4), states[4])
        monkeypatch.undo()
        with pytest.raises(SnapshotNotFoundError, match="step 5"):
            ck.load(step=5)  # was only ever in host memory, now evicted

    # A new process has no host memory: the newest durable copy is step 8, read from NVMe.
    with Checkpointer(nvme, keep_last=2, policy=policy) as again:
        assert again.steps() == [4, 6, 8]
        forbid_reads(monkeypatch, again, "archive")
        assert_equal_state(again.load(), states[8])


def test_host_memory_copy_is_independent_of_the_live_tensors(tmp_path: Path) -> None:
    state = make_state(1)
    want = make_state(1)
    with Checkpointer(tmp_path, policy=Policy(host_memory=2, every=10)) as ck:
        h = ck.save(1, state)
        state["model"]["w"].add_(1.0)  # training goes on right after save() returns
        info = h.wait()
        assert info.levels == ["host"] and info.bytes_written == 0 and info.path == "host"
        assert os.listdir(tmp_path) == []  # step 1 is not a multiple of every=10
        assert_equal_state(ck.load(step=1), want)
        ck.save(2, make_state(2)).wait()
        ck.save(3, make_state(3)).wait()
        assert ck.steps() == [2, 3]  # host_memory=2
        with pytest.raises(LoadMismatchError, match="model.w"):
            bad = empty_like_state(make_state(3))
            bad["model"]["w"] = torch.zeros(255, 64)
            ck.load(bad)
        # block=False: the snapshot is restorable at once (the restore waits for the copies).
        h4 = ck.save(4, make_state(4), block=False)
        assert_equal_state(ck.load(), make_state(4))
        assert h4.wait().levels == ["host"]
        reserved = ck._pipeline.stager.pool.reserved
    assert ck._pipeline.stager.pool.reserved == 0 and reserved > 0  # close() gives host memory back


def test_first_save_pins_the_steady_state_host_memory(tmp_path: Path) -> None:
    """The pool holds, from the first save on, the buffers of every snapshot saves keep at once
    (host_memory=1, the one being staged, max_persists=1 persist): a durable save later in the
    run allocates nothing (pinning gigabytes mid-run stalled a GPU step for seconds)."""
    with Checkpointer(tmp_path, policy=Policy(host_memory=1, every=3), max_persists=1) as ck:
        ck.save(1, make_state(1)).wait()
        pool = ck._pipeline.stager.pool
        one_set = sum(size_class(n) for n in ck._pipeline.reserved_for)
        assert pool.reserved == 3 * one_set
        allocations = pool.allocations
        handles = [ck.save(step, make_state(step), block=False) for step in range(2, 8)]
        for h in handles:
            h.wait()
        assert pool.allocations == allocations and pool.reserved == 3 * one_set
        assert ck.steps(level="local") == [3, 6]
        assert_equal_state(ck.load(step=6), make_state(6))
    # No host memory: a save stages only once fewer than max_persists persists run, so the one
    # being staged is one of them (the H100's 1 B job pinned 2 x 11.3 GiB where 1 x was used).
    with Checkpointer(tmp_path / "durable-only", max_persists=2) as ck:
        ck.save(1, make_state(1)).wait()
        assert ck._pipeline.stager.pool.reserved == 2 * sum(size_class(n) for n in ck._pipeline.reserved_for)
        allocations = ck._pipeline.stager.pool.allocations
        for h in [ck.save(step, make_state(step), block=False) for step in range(2, 8)]:
            h.wait()
        assert ck._pipeline.stager.pool.allocations == allocations
        assert_equal_state(ck.load(step=7), make_state(7))


def test_levels_all_and_unknown_level(tmp_path: Path) -> None:
    with Checkpointer(
        tmp_path / "a", policy=Policy(every=100, levels=[Level(tmp_path / "b", every=1000, name="b")])
    ) as ck:
        assert ck.save(7, make_state(7)).wait().levels == []
        assert ck.save(8, make_state(8), levels="all").wait().levels == ["local", "b"]
        assert ck.save(9, make_state(9), levels=["b"]).wait().levels == ["b"]
        assert ck.steps() == [8, 9]
        with pytest.raises(ConfigError, match="no checkpoint level 'nope'"):
            ck.save(10, make_state(10), levels=["nope"])
        with pytest.raises(ConfigError, match="nope"):
            ck.load(level="nope")
        with pytest.raises(ConfigError, match="no checkpoint level 'host'"):
            ck.load(level="host")  # this policy keeps nothing in host memory
        with pytest.raises(FmstoreError, match="already committed"):
            ck.save(9, make_state(9), levels="all")


def test_damaged_fast_copy_falls_back_to_slower_level(tmp_path: Path) -> None:
    policy = Policy(levels=[Level(tmp_path / "archive", name="archive")])
    state = make_state(3)
    with Checkpointer(tmp_path / "nvme", policy=policy) as ck:
        ck.save(3, state).wait()
    shard = shard_file(tmp_path / "nvme" / "step-0000000003")
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with Checkpointer(tmp_path / "nvme", policy=policy) as ck:
        with pytest.warns(UserWarning, match="level 'local' is damaged.*from 'archive'"):
            assert_equal_state(ck.load(), state)
        with pytest.raises(ChecksumError, match=shard.name):
            ck.load(level="local")
    assert (tmp_path / "nvme" / "step-0000000003" / "manifest.json").exists()  # nothing committed is touched


def test_one_level_failing_leaves_the_others_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = Policy(levels=[Level(tmp_path / "archive", name="archive")])
    with Checkpointer(tmp_path / "nvme", policy=policy) as ck:
        archive = ck.levels[1]

        def broken(rel, segments, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(archive.storage, "write", broken)
        h = ck.save(1, make_state(1))
        with pytest.raises(
            FmstoreError,
            match=r"committed to 'local' but not to: 'archive': StorageError: step 1 not saved to "
            r"'.*archive': writing step-0000000001/" + shard_name() + " failed: disk full",
        ):
            h.wait()
        assert ck.where(1) == ["local"]
        monkeypatch.undo()
        # wait() reported it: the next save does not raise it again
        assert ck.save(2, make_state(2)).wait().levels == ["local", "archive"]


def test_policy_config_errors(tmp_path: Path) -> None:
    for bad, match in [
        (Policy(every=0), "Policy.every"),
        (Policy(host_memory=-1), "host_memory"),
        (Policy(levels=[Level(tmp_path / "x", every=0)]), "every"),
        (Policy(levels=[Level(tmp_path / "x")]), "distinct names"),  # two levels called 'local'
        (Policy(name="host"), "distinct names"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Checkpointer(tmp_path / "root", policy=bad)
    with pytest.raises(ConfigError, match="fmstore.Policy"):
        Checkpointer(tmp_path / "root", policy={"every": 2})
    with pytest.raises(ConfigError, match="keep_last"):
        Checkpointer(tmp_path / "root", keep_last=0)


def test_tiered_store_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TieredStore's tiers are the levels: host memory, its local tier, its object tier."""
    store = TieredStore(
        [
            HostTier("64MiB", name="host-tier"),
            LocalTier(tmp_path / "nvme", name="nvme"),
            ObjectTier(f"file://{tmp_path / 'bucket'}", name="bucket"),
        ]
    )
    store.put("weights/embedding", torch.ones(8))
    states = {s: make_state(s) for s in (1, 2)}
    with Checkpointer(store, policy=Policy(every=1, levels=[Level(store.tiers[2], every=2)])) as ck:
        assert ck.level_names() == ["host", "nvme", "bucket"]
        assert ck.save(1, states[1]).wait().levels == ["host", "nvme"]
        assert ck.save(2, states[2]).wait().levels == ["host", "nvme", "bucket"]
        forbid_reads(monkeypatch, ck, "nvme", "bucket")
        assert_equal_state(ck.load(), states[2])
        monkeypatch.undo()
    assert (tmp_path / "nvme" / ".fmstore" / "checkpoints" / "step-0000000001" / "manifest.json").is_file()
    assert (tmp_path / "bucket" / ".fmstore" / "checkpoints" / "step-0000000002" / "manifest.json").is_file()
    store.flush()
    store.close()
    # The snapshots are not blobs of the store, and no key can reach them.
    reopened = TieredStore([LocalTier(tmp_path / "nvme"), ObjectTier(f"file://{tmp_path / 'bucket'}")])
    assert not any(k.startswith(".fmstore") for k in reopened.keys())
    with pytest.raises(InvalidKeyError, match="reserved"):
        reopened.put(".fmstore/checkpoints/x", torch.ones(1))
    with Checkpointer(reopened) as ck:  # no memory tier: no host level
        assert ck.level_names() == ["local", "object"]
        assert ck.steps() == [1, 2]
        assert_equal_state(ck.load(step=1), states[1])
    reopened.close()


@pytest.mark.s3
def test_object_storage_level(s3, tmp_path: Path) -> None:
    url = s3.url(f"policy-{time.time_ns()}")
    policy = Policy(
        host_memory=1, every=1, levels=[Level(url, every=2, keep_last=1, storage_options=s3.storage_options)]
    )
    states = {s: make_state(s) for s in range(1, 5)}
    with Checkpointer(tmp_path / "nvme", keep_last=1, policy=policy) as ck:
        assert ck.level_names() == ["host", "local", "s3"]
        for step, state in states.items():
            ck.save(step, state).wait()
        assert ck.steps("s3") == [4] and ck.steps("local") == [4]
    # The local disk is lost; the object store still restores step 4, and step 2 is gone (keep_last=1).
    import shutil

    shutil.rmtree(tmp_path / "nvme")
    with Checkpointer(tmp_path / "nvme", policy=policy) as ck:
        assert ck.steps() == [4]
        assert_equal_state(ck.load(), states[4])
        assert ck.where(4) == ["s3"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_rollback_from_host_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Save GPU tensors with block=False, change them, restore in place from pinned host memory."""
    g = torch.Generator(device="cuda").manual_seed(0)
    state = {
        "w": torch.randn(1024, 1024, device="cuda", generator=g),
        "b": torch.randn(7, device="cuda", generator=g),
    }
    want = {k: v.clone() for k, v in state.items()}
    with Checkpointer(tmp_path, policy=Policy(host_memory=1, every=1000)) as ck:
        h = ck.save(1, state, block=False)
        forbid_reads(monkeypatch, ck, "local")
        early = {k: torch.empty_like(v) for k, v in state.items()}
        ck.load(early)  # right away: the restore waits for the copies still in flight
        for k, v in want.items():
            assert torch.equal(early[k], v), k
        h.wait_staged()  # then training may change the tensors
        for t in state.values():
            t.mul_(-3)
        ck.load(state)  # back to the snapshot, in place on the GPU
        for k, v in want.items():
            assert state[k].device.type == "cuda" and torch.equal(state[k], v), k
        assert ck._pipeline.stager.pool.pinned
        out = ck.load(device="cuda")
        assert out["w"].device.type == "cuda" and torch.equal(out["w"], want["w"])
