"""PyTorch Lightning integration: FmstoreCheckpointIO under ModelCheckpoint and the FmstoreCheckpoint
callback, with real Trainers in real processes (tests/lightning_job.py), SIGKILLed mid-run and
resumed bit-exact; pointer files, removals and their ordering; nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fmstore.integrations.lightning import (
    FmstoreCheckpointIO,
    PointerError,
    PointerNotFoundError,
    load_checkpoint,
    read_pointer,
)
from safetensors.torch import load_file

from fmstore import Checkpointer, ConfigError, FmstoreError
from fmstore.checkpoint import UnsupportedValueError

JOB = Path(__file__).with_name("lightning_job.py")
STEPS, EVERY, CRASH = 20, 2, 12  # the job's defaults, and the step a crash run is killed at
SIGKILLED = -9


class JobServer:
    """tests/lightning_job.py --serve: imports torch and Lightning once, forks every job's ranks.
    Other tests can use it the same way: ``server.run("--dir", d, ...)`` gives the exit code."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(JOB), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, *argv: Any) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([str(a) for a in argv]) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the job server died (exit code {self.proc.poll()})"
        return json.loads(answer)["rc"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def jobs() -> Iterator[JobServer]:
    server = JobServer()
    yield server
    server.close()


def crash_and_resume(jobs: JobServer, base: Path, *opts: Any) -> tuple[Path, Path]:
    """A run SIGKILLed right after its saves of step CRASH started, then rerun (resuming) and an
    uninterrupted reference run in REF.  Returns (run dir, reference dir)."""
    run, ref = base / "run", base / "ref"
    log = base / "job.log"
    rc = jobs.run("--dir", run, "--crash-at-step", CRASH, "--log", log, *opts)
    assert rc == SIGKILLED, log.read_text()
    assert not (run / "final.safetensors").exists()  # it really died before the end
    rc = jobs.run("--dir", run, "--then-reference", ref, "--log", log, *opts)
    assert rc == 0, log.read_text()
    return run, ref


def assert_bit_exact(a: Path, b: Path) -> None:
    x, y = load_file(a / "final.safetensors"), load_file(b / "final.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def resumed_from(run: Path) -> int:
    start = json.loads((run / "summary.json").read_text())["start_step"]
    # The rerun started from a checkpoint of the killed run, not from scratch (which would end
    # bit-exact too): a step that was saved, at or before the crash.
    assert 0 < start <= CRASH and start % EVERY == 0, start
    return start


@pytest.fixture(scope="module")
def plugin_runs(jobs: JobServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("plugin")
    # --big: a 2 MiB parameter (6 MiB with Adam's moments), so commits trail the saves by some
    # steps; --exit-save: one more save, left to interpreter exit (no teardown).
    return crash_and_resume(jobs, base, "--big", 500_000, "--exit-save", base / "exit" / "at-exit.ckpt")


# ---------------------------------------------------------------------------- Trainer runs


def test_plugin_sigkill_then_fit_last_is_bit_exact(plugin_runs):
    run, ref = plugin_runs
    resumed_from(run)
    assert_bit_exact(run, ref)


def test_plugin_pointers_are_top_k_and_last_and_snapshots_hold_their_steps(plugin_runs):
    _, ref = plugin_runs
    ckpts = ref / "ckpts"
    last = load_checkpoint(ckpts / "last.ckpt")
    (mc_state,) = [v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint")]
    expected = {Path(p).name for p in mc_state["best_k_models"]} | {"last.ckpt"}
    assert len(expected) == 3
    assert {p.name for p in ckpts.glob("*.ckpt")} == expected  # removed top-k files are gone

    record = load_file(ref / "record.safetensors")  # the state dict at every saving step
    pointers = {name: read_pointer(ckpts / name) for name in expected}
    assert {p.root for p in pointers.values()} == {os.path.realpath(ckpts / ".fmstore")}
    assert json.loads((ckpts / "last.ckpt").read_text())["root"] == ".fmstore"  # relative: movable
    io = FmstoreCheckpointIO()
    try:
        for name in pointers:
            ckpt = io.load_checkpoint(ckpts / name)
            step = ckpt["global_step"]
            if name == "last.ckpt":
                assert step == STEPS
            else:
                assert f"step={step}" in name and step % EVERY == 0
            # Saved with block=False while training went on: exactly the weights of its step.
            for key, value in ckpt["state_dict"].items():
                assert torch.equal(value, record[f"{step}/{key}"]), (name, key)
            assert ckpt["hyper_parameters"]["data_dir"] == Path("data")  # stored tagged, not pickled
            assert ckpt["hyper_parameters"]["dtype"] is torch.float32
    finally:
        io.teardown()

    with Checkpointer(ckpts / ".fmstore", no_dist=True) as ck:
        kept = {p.step for p in pointers.values()}
        assert set(ck.steps()) == kept  # every replaced or removed snapshot was deleted
        files = {f for s in kept for f in ck.manifest(s).referenced_files()}
        # Incremental: unchanged tensors are still read from files of snapshots long deleted
        # (the unchanging buffer, copied once into a file of tensors that stay): their bytes
        # stayed because kept snapshots reference them.
        dropped = {f for f in files if int(f.split("/")[0].removeprefix("step-")) not in kept}
        assert dropped, (sorted(files), kept)
        assert all((ckpts / ".fmstore" / f).is_file() for f in files)


def test_plugin_commits_pointers_at_exit_without_teardown(plugin_runs):
    run, _ = plugin_runs
    path = run.parent / "exit" / "at-exit.ckpt"
    expected = load_file(path.with_suffix(".expected.safetensors"))["w"]
    ckpt = load_checkpoint(path)
    assert ckpt["global_step"] == 3 and torch.equal(ckpt["w"], expected)


def test_plugin_ddp_sigkill_then_fit_last_is_bit_exact(jobs, tmp_path):
    run, ref = crash_and_resume(jobs, tmp_path, "--ddp")
    resumed_from(run)
    assert_bit_exact(run, ref)


def test_callback_ddp_sigkill_resume_is_bit_exact(jobs, tmp_path):
    # Dropout: the random number generators (per rank) must come back too.
    run, ref = crash_and_resume(jobs, tmp_path, "--ddp", "--mode", "callback", "--dropout", 0.2)
    assert resumed_from(run) >= CRASH - EVERY  # saves are not left behind: at most one in flight
    assert_bit_exact(run, ref)
    with Checkpointer(run / "fmstore", no_dist=True) as ck:
        assert ck.steps() == list(range(EVERY, STEPS + 1, EVERY))  # the interrupted save made again
        manifest = ck.manifest(CRASH)
        assert manifest.world_size == 2
        state = ck.load(step=STEPS)
    assert state["trainer"]["global_step"] == STEPS
    assert not any(k.startswith("FmstoreCheckpoint") for k in state["trainer"]["callbacks"])
    assert state["model"].keys() == load_file(ref / "final.safetensors").keys()
    for key, value in load_file(ref / "final.safetensors").items():
        assert torch.equal(state["model"][key], value), key


def test_callback_fsdp2_sigkill_resume_is_bit_exact(jobs, tmp_path):
    # ModelParallelStrategy + fully_shard: each rank saves and restores its own DTensor shards.
    run, ref = crash_and_resume(jobs, tmp_path, "--fsdp2", "--mode", "callback", "--dropout", 0.2)
    assert resumed_from(run) >= CRASH - EVERY
    assert_bit_exact(run, ref)
    with Checkpointer(run / "fmstore", no_dist=True) as ck:
        manifest = ck.manifest(STEPS)
        state = ck.load(step=STEPS)  # whole tensors, assembled from both ranks' shards
    weight = manifest.tensors["model/body.0.weight"]
    assert [s.lengths[0] for s in weight.shards] == [weight.shape[0] // 2] * 2  # sharded, not gathered
    for key, value in load_file(ref / "final.safetensors").items():
        assert torch.equal(state["model"][key], value), key


# ---------------------------------------------------------------------------- in-process


def test_callback_policy_spreads_snapshots_over_levels_and_a_new_fit_resumes(tmp_path):
    import lightning as L
    from fmstore.integrations.lightning import FmstoreCheckpoint

    from fmstore import Level, Policy

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 4)), batch_size=4)
    policy = Policy(host_memory=1, every=4, levels=[Level(tmp_path / "archive", every=8, name="archive")])

    def fit(max_steps: int) -> FmstoreCheckpoint:
        cb = FmstoreCheckpoint(tmp_path / "local", every_n_train_steps=1, policy=policy)
        trainer = L.Trainer(
            max_steps=max_steps,
            callbacks=[cb],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(Tiny(), data)
        return cb

    first = fit(9)  # every step in host memory, every 4th on disk, every 8th archived, the end everywhere
    assert first.resumed_step is None
    with Checkpointer(tmp_path / "local", no_dist=True) as ck:
        assert ck.steps() == [4, 8, 9]
    with Checkpointer(tmp_path / "archive", no_dist=True) as ck:
        assert ck.steps() == [8, 9]
    second = fit(12)  # a new Trainer: host memory is gone, the newest durable snapshot is step 9
    assert second.resumed_step == 9
    with Checkpointer(tmp_path / "local", no_dist=True) as ck:
        assert ck.steps() == [4, 8, 9, 12]


class _Detonator:
    """Unpickling this creates a marker file: proof that something unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def test_load_checkpoint_refuses_what_is_not_a_pointer_and_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"
    torch_file = tmp_path / "torch.ckpt"
    torch.save({"state_dict": {}, "boom": _Detonator(str(marker))}, torch_file)
    pickle_file = tmp_path / "plain.ckpt"
    pickle_file.write_bytes(pickle.dumps(_Detonator(str(marker))))
    json_file = tmp_path / "other.ckpt"
    json_file.write_text(json.dumps({"format": "something-else", "step": 1}))
    io = FmstoreCheckpointIO()
    try:
        for path in (torch_file, pickle_file, json_file, tmp_path):
            with pytest.raises(PointerError) as info:
                io.load_checkpoint(path)
            assert str(path) in str(info.value)
        with pytest.raises(PointerNotFoundError, match="missing.ckpt"):
            io.load_checkpoint(tmp_path / "missing.ckpt")
        assert issubclass(PointerNotFoundError, FileNotFoundError)
    finally:
        io.teardown()
    assert not marker.exists()


def test_checkpoint_values_round_trip_or_are_refused_by_name(tmp_path):
    import argparse

    from lightning.fabric.utilities.data import AttributeDict

    odd = {
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "path": Path("a/b"),
        "tags": {"x", "y"},
        "frozen": frozenset({1}),
        "ns": argparse.Namespace(lr=0.1, names=("a", "b")),
        "attr": AttributeDict(k=1),
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(-3),
        "nan": float("nan"),
        "tuple": (1, "two", None),
        "int_keys": {0: "zero", 7: [1.0]},
    }
    checkpoint = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 5, "hyper_parameters": odd}
    io = FmstoreCheckpointIO()
    try:
        io.save_checkpoint(checkpoint, tmp_path / "c.ckpt")
        got = io.load_checkpoint(tmp_path / "c.ckpt")["hyper_parameters"]
        for key, value in odd.items():
            if key == "nan":
                assert np.isnan(got[key])
                continue
            assert type(got[key]) is type(value) and got[key] == value, key
        assert got["np_scalar"].dtype == np.float32

        bad = {"state_dict": {}, "hyper_parameters": {"cfg": {"inner": object()}}}
        with pytest.raises(UnsupportedValueError, match=r"\['hyper_parameters'\]\['cfg'\]\['inner'\]"):
            io.save_checkpoint(bad, tmp_path / "bad.ckpt")
        from collections import defaultdict, namedtuple

        with pytest.raises(UnsupportedValueError, match="defaultdict"):
            io.save_checkpoint({"x": defaultdict(int)}, tmp_path / "bad.ckpt")
        with pytest.raises(UnsupportedValueError, match=r"\['p'\]"):
            io.save_checkpoint({"p": namedtuple("P", "a")(1)}, tmp_path / "bad.ckpt")
        with pytest.raises(UnsupportedValueError, match="reserved"):
            io.save_checkpoint({"x": {"__fmstore_lightning__": 1}}, tmp_path / "bad.ckpt")
        with pytest.raises(ConfigError, match="storage_options"):
            io.save_checkpoint(checkpoint, tmp_path / "d.ckpt", storage_options={"x": 1})
    finally:
        io.teardown()
    assert not (tmp_path / "bad.ckpt").exists() and not (tmp_path / "d.ckpt").exists()


def test_block_false_save_holds_its_step_while_the_next_step_runs(tmp_path):
    # The copy of 64 MiB is still running when save_checkpoint returns; the optimizer step right
    # after it changes every element in place.  Without fmstore's step pre-hook waiting for the
    # copy (AsyncCheckpointIO's bug, Lightning #20953) the snapshot mixes both steps.
    io = FmstoreCheckpointIO(block=False)  # installs the hook: it sees the optimizer step below
    try:
        p = torch.nn.Parameter(torch.randn(16 << 20))
        opt = torch.optim.SGD([p], lr=0.5)
        p.grad = torch.ones_like(p)
        opt.step()
        before = p.detach().clone()
        io.save_checkpoint(
            {"state_dict": {"p": p.detach()}, "optimizer_states": [opt.state_dict()]}, tmp_path / "a.ckpt"
        )
        opt.step()  # what training does next
        saved = io.load_checkpoint(tmp_path / "a.ckpt")["state_dict"]["p"]
        assert torch.equal(saved, before)
        assert not torch.equal(p.detach(), before)
    finally:
        io.teardown()


def test_removal_never_precedes_the_commit_of_its_replacement(tmp_path):
    io = FmstoreCheckpointIO(block=False)
    old, new = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    try:
        io.save_checkpoint({"state_dict": {"w": torch.randn(4 << 20)}}, old)
        io.teardown()
        assert old.exists()
        # 16 MiB of new bytes: writing them takes a while, the removal is asked for at once.
        io.save_checkpoint({"state_dict": {"w": torch.randn(4 << 20)}}, new)
        io.remove_checkpoint(old)
        while True:
            pending = bool(io._jobs.running())  # the queue's state, before looking
            have_old, have_new = old.exists(), new.exists()
            assert have_old or have_new, "the old checkpoint was removed before its replacement existed"
            if not pending:
                break
        io.teardown()
        assert not old.exists() and new.exists()
        root = tmp_path / ".fmstore"
        with Checkpointer(root, no_dist=True) as ck:
            assert ck.steps() == [read_pointer(new).step]  # the old snapshot went with its pointer
    finally:
        io.teardown()


def test_a_failed_save_keeps_the_checkpoint_it_would_replace(tmp_path):
    keep = tmp_path / "keep.ckpt"
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory is needed: the pointer cannot be written")
    io = FmstoreCheckpointIO(root=tmp_path / "snapshots")
    try:
        with warnings.catch_warnings(record=True) as caught:  # from the queue's thread
            warnings.simplefilter("always")
            io.save_checkpoint({"w": torch.ones(3)}, keep)
            # The name is claimed before save_checkpoint returns, so the failure is raised by the
            # save itself: Lightning stops before it asks for the removal below.
            with pytest.raises(FmstoreError, match="new.ckpt"):
                io.save_checkpoint({"w": torch.zeros(3)}, blocker / "new.ckpt")
        io.teardown()  # raised once, not again
        assert torch.equal(io.load_checkpoint(keep)["w"], torch.ones(3))
    finally:
        io.teardown()


def test_pointers_and_snapshots_on_an_fsspec_url():
    import uuid

    import fsspec

    url = f"memory://fmstore-lightning-{uuid.uuid4().hex[:8]}/ckpts"
    io = FmstoreCheckpointIO()
    try:
        io.save_checkpoint({"w": torch.arange(4.0)}, f"{url}/a.ckpt")
        io.save_checkpoint({"w": torch.arange(5.0)}, f"{url}/last.ckpt")
        io.save_checkpoint({"w": torch.arange(6.0)}, f"{url}/last.ckpt")  # replaces the one before
        io.remove_checkpoint(f"{url}/a.ckpt")
        io.teardown()
        fs = fsspec.filesystem("memory")
        assert not fs.exists(f"{url}/a.ckpt")
        assert json.loads(fs.cat_file(f"{url}/last.ckpt"))["root"] == ".fmstore"
        pointer = read_pointer(f"{url}/last.ckpt")
        assert pointer.root == f"{url}/.fmstore" and pointer.step == 3
        assert torch.equal(io.load_checkpoint(f"{url}/last.ckpt")["w"], torch.arange(6.0))
        with Checkpointer(pointer.root, no_dist=True) as ck:
            assert ck.steps() == [3]  # a.ckpt's snapshot and the replaced last one are gone
    finally:
        io.teardown()
