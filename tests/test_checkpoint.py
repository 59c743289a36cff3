"""Checkpointer: async save, atomic commit, bit-exact load, incremental, retention, errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rounds, shard_file, shard_rel
from manifest_versions import v3_to_v2

from fmstore import Checkpointer, CorruptBlobError
from fmstore.blob import as_bytes_tensor
from fmstore.checkpoint import (
    ChecksumError,
    LoadMismatchError,
    ManifestError,
    SnapshotNotFoundError,
    UnsupportedValueError,
)

HERE = Path(__file__).parent
DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
    torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
]  # fmt: skip


def bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return (raw % 2 if dtype == torch.bool else raw).view(dtype).reshape(shape)


def assert_equal_state(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(as_bytes_tensor(a.cpu()), as_bytes_tensor(b.cpu()))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            assert_equal_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_state(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


def training_state(seed: int = 0) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(
        torch.bfloat16
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    for _ in range(3):
        model(torch.randn(4, 32, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    state = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "loader": {"epoch": 2, "position": 1234, "seed": None},
        "step": 3,
    }
    return state, model, opt


def test_round_trip_every_dtype_and_nested_values(tmp_path):
    state = {
        "dtypes": {str(d): bits(d, (3, 4), i) for i, d in enumerate(DTYPES)},
        "odd": {
            "zero_d": torch.tensor(2.5),
            "empty": torch.empty(0, 3),
            "view": torch.arange(12.0).view(3, 4).t(),
        },
        "plain": {1: "int key", "inf": float("inf"), "nan": float("nan"), "t": (1, [2, None]), "b": True},
        "arr": np.arange(6, dtype=np.float16).reshape(2, 3),
    }
    with Checkpointer(tmp_path) as ck:
        ck.save(10, state).wait()
        out = ck.load()
    expected = dict(state)
    expected["odd"] = dict(state["odd"], view=state["odd"]["view"].contiguous())
    assert_equal_state(out, expected)


def test_round_trip_training_state_into_a_fresh_model(tmp_path):
    state, model, opt = training_state()
    with Checkpointer(tmp_path) as ck:
        handle = ck.save(3, state)
        info = handle.wait()
        assert info.step == 3 and ck.steps() == [3] and handle.done()
        assert handle.stall_seconds >= 0 and handle.nbytes == info.nbytes > 0
        # In place, into a differently initialised model and optimizer.
        fresh_state, fresh_model, fresh_opt = training_state(seed=1)
        restored = ck.load(fresh_state)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)
    assert_equal_state(restored, state)
    fresh_opt.load_state_dict(restored["optim"])
    random.setstate(restored["rng"]["python"])
    np.random.set_state(restored["rng"]["numpy"])


def test_a_load_reads_the_manifest_once(tmp_path, monkeypatch):
    """A load into a training state reads the manifest for the state's shape (fresh optimizers
    are given state to fill) and for the load itself: once (a 1,024-rank manifest is 13 MB,
    read by every rank)."""
    from fmstore.storage import Storage

    state, _, _ = training_state()
    with Checkpointer(tmp_path, keep_last=None) as ck:
        ck.save(3, state).wait()
    reads = []
    real = Storage.read_bytes

    def counting(self, rel, *args, **kwargs):
        reads.append(rel)
        return real(self, rel, *args, **kwargs)

    monkeypatch.setattr(Storage, "read_bytes", counting)
    fresh_state, fresh_model, _ = training_state(seed=1)
    with Checkpointer(tmp_path) as ck:
        restored = ck.load(fresh_state)
    assert [r for r in reads if r.endswith("manifest.json")] == ["step-0000000003/manifest.json"]
    assert_equal_state(restored, state)


def test_save_returns_after_staging_and_is_isolated_from_later_changes(tmp_path):
    w = torch.zeros(1 << 20)
    with Checkpointer(tmp_path) as ck:
        handle = ck.save(1, {"w": w})
        w.add_(1)  # training goes on right after save() returns
        handle.wait()
        assert torch.equal(ck.load()["w"], torch.zeros(1 << 20))


def test_incremental_snapshots_write_only_changed_tensors(tmp_path):
    frozen = torch.randn(1 << 18)  # 1 MiB, e.g. an embedding nobody trains
    w = torch.randn(1 << 16)  # 256 KiB
    with Checkpointer(tmp_path) as ck:
        first = ck.save(1, {"frozen": frozen, "w": w, "step": 1}).wait()
        assert first.tensors_written == 2 and first.bytes_written > (1 << 20) + (1 << 18)
        w0 = w.clone()
        w.add_(1.0)
        second = ck.save(2, {"frozen": frozen, "w": w, "step": 2}).wait()
        assert second.tensors_written == 1
        manifest_size = ck.storage.size("step-0000000002/manifest.json")
        shard_size = ck.storage.size(shard_rel(ck.storage, 2))
        assert second.bytes_written == manifest_size + shard_size
        assert (1 << 18) <= shard_size < (1 << 18) + 4096  # w and a header, not the frozen MiB
        third = ck.save(3, {"frozen": frozen, "w": w, "step": 3}).wait()
        assert third.tensors_written == 0 and ck.storage.list_dir("step-0000000003") == ["manifest.json"]
        for step, expect_w in ((1, w0), (2, w), (3, w)):
            out = ck.load(step=step)
            assert (
                torch.equal(out["frozen"], frozen) and torch.equal(out["w"], expect_w) and out["step"] == step
            )


def test_retention_and_gc_keep_every_referenced_byte(tmp_path):
    frozen = torch.randn(1 << 16)
    with Checkpointer(tmp_path, keep_last=2) as ck:
        for step in range(1, 7):
            ck.save(step, {"frozen": frozen, "w": torch.full((1000,), float(step))}).wait()
        assert ck.steps() == [5, 6]
        for step in (5, 6):
            out = ck.load(step=step)
            assert torch.equal(out["frozen"], frozen) and bool((out["w"] == step).all())
        # Step 1's shard still holds "frozen" (referenced); steps 2-4 are gone entirely.
        steps = [n for n in sorted(os.listdir(tmp_path)) if n != "writer.lease"]
        assert steps == ["step-0000000001", "step-0000000005", "step-0000000006"]
        assert [p.name for p in (tmp_path / "step-0000000001").iterdir()] == [
            shard_file(tmp_path / "step-0000000001").name
        ]
        assert ck.gc() == []


@pytest.mark.s3
def test_s3_round_trip(s3):
    state, *_ = training_state()
    url = s3.url(f"ckpt-{time.time_ns()}")
    with Checkpointer(url, storage_options=s3.storage_options, keep_last=2) as ck:
        ck.save(1, state).wait()
        ck.save(2, state).wait()
        assert ck.steps() == [1, 2]
        assert_equal_state(ck.load(), state)
    with Checkpointer(url, storage_options=s3.storage_options) as again:
        assert again.steps() == [1, 2]
        assert_equal_state(again.load(step=1), state)


def test_memory_url_round_trip():
    state, *_ = training_state()
    with Checkpointer(f"memory://fmstore-ckpt-{time.time_ns()}") as ck:
        ck.save(5, state).wait()
        assert_equal_state(ck.load(), state)


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_bad_snapshot(tmp_path):
    sys.path.insert(0, str(HERE))
    from ckpt_writer import state_at

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    rng = random.Random(2024)
    next_step, kills_mid_save = 0, 0
    n = rounds(10)
    for _ in range(n):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "ckpt_writer.py"), str(tmp_path), str(next_step)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()  # the writer is up and saving
        time.sleep(rng.uniform(0.0, 0.4))  # then a random point in the save loop
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        lines = [first, *out.decode().splitlines()]
        saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        ck = Checkpointer(tmp_path)
        steps = ck.steps()
        for step in steps:
            assert_equal_state(ck.load(step=step), state_at(step))
        if len(saved) >= 2:
            # save(N) returns after staging, having waited for this process's previous save
            # to commit: all but the last reported step are committed.
            assert steps and steps[-1] >= sorted(saved)[-2], (steps, saved)
        uncommitted = [
            n
            for n in os.listdir(tmp_path)
            if n.startswith("step-") and not (tmp_path / n / "manifest.json").exists()
        ]
        kills_mid_save += any(int(n.split("-")[1]) > max(steps, default=-1) for n in uncommitted)
        ck.close()
        next_step = max([next_step, *(s + 1 for s in steps), *(s + 1 for s in saved)])
    # One kill in ten at least must land mid-save, or the test did not test what it names.
    assert kills_mid_save >= max(1, n // 10), f"only {kills_mid_save} of {n} kills hit a save in progress"
    assert ck.steps(), "no snapshot was ever committed"


# ----------------------------------------------------------------- bad input


def test_truncated_shard_is_reported_with_file_and_others_still_load(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"a": torch.randn(1000)}).wait()
        ck.save(2, {"a": torch.randn(1000)}).wait()
        shard = shard_file(tmp_path / "step-0000000002")
        shard.write_bytes(shard.read_bytes()[:-100])
        with pytest.raises(CorruptBlobError) as err:
            ck.load()
        assert f"step-0000000002/{shard.name}" in str(err.value) and "truncated" in str(err.value)
        ck.load(step=1)  # untouched


def test_checksum_mismatch_names_the_tensor(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"layer": {"w": torch.randn(1000)}}).wait()
        shard = shard_file(tmp_path / "step-0000000001")
        raw = bytearray(shard.read_bytes())
        raw[-7] ^= 0x10  # one flipped bit in the data
        shard.write_bytes(bytes(raw))
        with pytest.raises(ChecksumError) as err:
            ck.load()
        assert "layer/w" in str(err.value) and "checksum" in str(err.value)


@pytest.mark.parametrize(
    "bad_file",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "step-0000000001/../../x.safetensors",
        "step-0000000009/shard.safetensors",
    ],
)
def test_manifest_naming_a_path_outside_its_snapshot(tmp_path, bad_file):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"w": torch.ones(3)}).wait()
        path = tmp_path / "step-0000000001" / "manifest.json"
        body = v3_to_v2(json.loads(path.read_text()))  # edited as version 2 (an object per shard)
        body["tensors"]["w"]["shards"][0]["file"] = bad_file
        path.write_text(json.dumps(body))
        with pytest.raises(ManifestError) as err:
            ck.load()
        assert bad_file in str(err.value) and "'w'" in str(err.value)


def test_missing_snapshot(tmp_path):
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(SnapshotNotFoundError, match="no committed snapshot"):
            ck.load()
        ck.save(1, {"w": torch.ones(3)}).wait()
        with pytest.raises(SnapshotNotFoundError, match="step 7"):
            ck.load(step=7)


def test_dtype_or_shape_mismatch_names_the_tensor(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"enc": {"w": torch.ones(4, 4)}}).wait()
        with pytest.raises(LoadMismatchError, match="enc/w") as err:
            ck.load({"enc": {"w": torch.ones(4, 5)}})
        assert "[4, 4]" in str(err.value) and "[4, 5]" in str(err.value)
        with pytest.raises(LoadMismatchError, match="bfloat16"):
            ck.load({"enc": {"w": torch.ones(4, 4, dtype=torch.bfloat16)}})
        assert torch.equal(ck.load()["enc"]["w"], torch.ones(4, 4))


def test_unsupported_value_names_its_key(tmp_path):
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(UnsupportedValueError, match="model/fn"):
            ck.save(1, {"model": {"fn": lambda x: x}})
        with pytest.raises(UnsupportedValueError, match="key"):
            ck.save(1, {"model": {(1, 2): torch.ones(1)}})
        assert ck.steps() == []


def test_committed_steps_are_never_overwritten(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"w": torch.ones(3)}).wait()
        with pytest.raises(Exception, match="already committed"):
            ck.save(1, {"w": torch.zeros(3)})
        assert torch.equal(ck.load()["w"], torch.ones(3))


def test_background_error_surfaces_once_on_wait_or_next_save(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path)
    ck.save(1, {"w": torch.ones(3)}).wait()
    failed = threading.Event()

    def broken(rel, segments, **kwargs):
        failed.set()
        raise OSError("disk full")

    monkeypatch.setattr(ck.storage, "write", broken)
    handle = ck.save(2, {"w": torch.zeros(3)})
    with pytest.raises(OSError, match="disk full"):
        handle.wait()
    monkeypatch.undo()
    ck.save(3, {"w": torch.zeros(3)}).wait()  # already reported by wait(): not raised again
    failed.clear()
    monkeypatch.setattr(ck.storage, "write", broken)
    ck.save(5, {"w": torch.zeros(3)})  # its handle is dropped: nobody waits for it
    assert failed.wait(60)
    monkeypatch.undo()
    with pytest.raises(OSError, match="disk full") as err:
        ck.save(6, {"w": torch.full((3,), 6.0)})  # so the next save reports it once...
    assert "save(6) itself went ahead" in "\n".join(err.value.__notes__)
    ck.wait()  # ...and saves its own step all the same
    assert ck.steps() == [1, 3, 6] and torch.equal(ck.load(step=6)["w"], torch.full((3,), 6.0))
    ck.save(7, {"w": torch.zeros(3)}).wait()  # reported once, the error does not stick
    assert ck.steps() == [1, 3, 6, 7]
    ck.close()  # nothing unreported left: close does not raise


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_state_saves_through_pinned_staging(tmp_path):
    model = torch.nn.Linear(256, 256).cuda().to(torch.bfloat16)
    state = {"model": model.state_dict(), "step": 1}
    with Checkpointer(tmp_path) as ck:
        handle = ck.save(1, state, block=False)
        handle.wait_staged()
        assert ck._pipeline.stager.pool.pinned
        handle.wait()
        out = ck.load(device="cuda")
        assert out["model"]["weight"].device.type == "cuda"
        assert torch.equal(out["model"]["weight"], model.weight)
        fresh = torch.nn.Linear(256, 256).cuda().to(torch.bfloat16)
        ck.load({"model": fresh.state_dict(), "step": 0})
        assert torch.equal(fresh.weight, model.weight)


def test_reserve_pins_ahead_what_saves_then_use(tmp_path):
    """``reserve(state)`` allocates the pool's buffers before the first save (pinning them under
    training stalls its CUDA calls): the saves that follow allocate nothing more, and nothing is
    written by the reserve itself."""
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    state = {"model": model, "optim": opt}
    with Checkpointer(tmp_path) as ck:
        pool = ck._pipeline.stager.pool
        held = ck.reserve(state)
        assert held == pool.reserved > 0
        allocations = pool.allocations
        assert ck.steps() == [] and not any(tmp_path.glob("step-*"))
        for step in (1, 2, 3):
            ck.save(step, state).wait()
        assert pool.allocations == allocations and pool.reserved == held
