"""The Hugging Face Trainer integration, with the real Trainer in subprocesses (tests/hf_job.py):
a run SIGKILLed with a save in flight, twice, resumes bit-exact to an uninterrupted run (data
order, dropout RNG and evaluations included) and the Trainer writes no checkpoint folder; a
partial snapshot is never resumed from; nothing committed is a fresh start; the snapshots load
with a plain Checkpointer; DDP ranks save their parts and resume bit-exact."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import free_port, shard_file, shard_name
from safetensors import safe_open
from safetensors.torch import load_file

from fmstore import Checkpointer, ConfigError
from fmstore.checkpoint import StateKeysError

JOB = Path(__file__).with_name("hf_job.py")
# Saves every 3 steps, an evaluation at each save (it draws from the RNG), logs every 2 steps,
# 6 steps an epoch, 15 steps: the crashes below resume mid-epoch (3) and at an epoch's end (6).
ARGS = ("--max-steps", "15", "--save-steps", "3", "--eval-steps", "3", "--logging-steps", "2")
CRASHES = (6, 9)  # the commit of each kills the run in turn


def job_cmd(root: Path, out: Path, *extra: str, args: tuple[str, ...] = ARGS, ranks: int = 1) -> list[str]:
    launcher = [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-port",
        str(free_port()),
    ]
    return [
        sys.executable,
        *(launcher if ranks > 1 else []),
        str(JOB),
        "--root",
        str(root),
        "--output-dir",
        str(root) + "-trainer",
        "--out",
        str(out),
        *args,
        *extra,
    ]


def job_env(tmp: Path) -> dict[str, str]:
    # The resume folder goes to the temp dir; a killed run leaves its own there, not in /tmp.
    return {**os.environ, "TMPDIR": str(tmp)}


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def committed(root: Path) -> list[int]:
    with Checkpointer(root) as ck:
        return ck.steps()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run ("ref"), and one killed at the commit of step 6, rerun (resuming)
    and killed at the commit of step 9, then rerun to the end ("run").  Records what each crash
    left on disk."""
    tmp = tmp_path_factory.mktemp("hf")
    (tmp / "tmp").mkdir()
    env = job_env(tmp / "tmp")
    ref = subprocess.Popen(
        job_cmd(tmp / "ref", tmp / "ref-out"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    crashes = {}
    for step in CRASHES:
        proc = run(job_cmd(tmp / "run", tmp / f"crash{step}-out", "--crash-at-step", str(step)), env)
        step_dir = tmp / "run" / f"step-{step:010d}"
        crashes[step] = {
            "proc": proc,
            "committed": committed(tmp / "run"),
            "partial": sorted(os.listdir(step_dir)) if step_dir.is_dir() else None,
        }
    last = run(job_cmd(tmp / "run", tmp / "run-out"), env)
    ref_out, _ = ref.communicate(timeout=300)
    return {"tmp": tmp, "ref": (ref.returncode, ref_out), "crashes": crashes, "last": last}


@pytest.fixture(scope="module")
def hf_job() -> ModuleType:
    """tests/hf_job.py as a module (its Trainer factory), for tests that run the Trainer here."""
    sys.path.insert(0, str(JOB.parent))
    try:
        import hf_job
    finally:
        sys.path.remove(str(JOB.parent))
    return hf_job


def result(runs: dict[str, Any], name: str) -> dict[str, Any]:
    return json.loads((runs["tmp"] / f"{name}-out" / "result.json").read_text())


def test_sigkill_with_a_save_in_flight_resumes_bit_exact(runs):
    rc, out = runs["ref"]
    assert rc == 0, out
    last = runs["last"]
    assert last.returncode == 0, last.stderr[-3000:]
    for step, crash in runs["crashes"].items():
        proc = crash["proc"]
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert f"crashing at the commit of step {step}" in proc.stdout
        # The save was in flight: its shard file is on disk, its manifest (the commit) is not,
        # and the step does not exist.  HF's own resume would pick this highest folder (#35525).
        partial = crash["partial"]
        assert len(partial) == 1 and re.fullmatch(shard_name(), partial[0]), partial
        assert crash["committed"] == [s for s in (3, 6) if s < step]
    # What each rerun resumed from: never the partial step, always the newest committed one
    # (3: mid-epoch, the Trainer skips 3 batches; 6: an epoch's end).
    assert "fresh start" in runs["crashes"][6]["proc"].stdout
    assert "resuming from step 3" in runs["crashes"][9]["proc"].stdout
    assert "resuming from step 6" in runs["last"].stdout
    final = result(runs, "run")
    assert final["resumed_from"] == 6
    assert final["global_step"] == 15 and final["steps"] == [3, 6, 9, 12, 15]

    ref_params = load_file(runs["tmp"] / "ref-out" / "params.safetensors")
    run_params = load_file(runs["tmp"] / "run-out" / "params.safetensors")
    assert ref_params.keys() == run_params.keys() and len(ref_params) > 10
    for name in ref_params:
        assert torch.equal(ref_params[name], run_params[name]), name

    # The whole trajectory, not only its end: every step's gradient norm and learning rate and
    # every evaluation loss match (the Trainer's own first log after a resume averages fewer
    # steps' losses and its runtimes differ, so those are left out).
    def trajectory(r: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [
            (e["step"], e.get("grad_norm"), e.get("learning_rate"), e.get("eval_loss"))
            for e in r["log_history"]
        ]

    reference = result(runs, "ref")
    assert trajectory(final) == trajectory(reference)
    assert final["total_flos"] == reference["total_flos"]

    # The Trainer wrote no checkpoint folder of its own, in any run; the resume folders are gone.
    for name in ("ref", "run"):
        trainer_out = runs["tmp"] / f"{name}-trainer"
        assert not [
            p
            for p in (os.listdir(trainer_out) if trainer_out.exists() else [])
            if p.startswith("checkpoint-")
        ]
    assert final["resume_folder"] is not None and not os.path.exists(final["resume_folder"])


def test_resume_with_nothing_committed_starts_fresh(runs, hf_job, tmp_path):
    # Empty roots: resume() gave None to the reference run and to the first of the crashed runs.
    assert "fresh start" in runs["ref"][1] and "fresh start" in runs["crashes"][6]["proc"].stdout
    assert result(runs, "ref")["resumed_from"] is None and result(runs, "ref")["resume_folder"] is None

    # A root holding only a partial snapshot (its shard file, no manifest), as a crash during
    # the first save leaves it: nothing is committed, so a fresh start, which commits step 3.
    root = tmp_path / "partial"
    (root / "step-0000000003").mkdir(parents=True)
    shutil.copy(shard_file(runs["tmp"] / "ref" / "step-0000000003"), root / "step-0000000003")
    from fmstore.integrations.hf import LOADERS

    trainer, callback = hf_job.make_trainer(str(root), str(tmp_path / "out"), max_steps=3)
    assert callback.resume(trainer) is None
    assert not [name for name in LOADERS if name in vars(trainer)]  # the Trainer's own loaders stay
    trainer.train(resume_from_checkpoint=None)
    assert trainer.state.global_step == 3
    assert callback.checkpointer.steps() == [3]
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith("checkpoint-")]
    callback.close()


def test_snapshots_load_with_a_plain_checkpointer(runs):
    root = runs["tmp"] / "ref"
    params = load_file(runs["tmp"] / "ref-out" / "params.safetensors")
    with Checkpointer(root) as ck:
        assert ck.steps() == [3, 6, 9, 12, 15]
        state = ck.load()  # the last snapshot, as plain CPU tensors and JSON
    assert set(state) == {"model", "optimizer", "lr_scheduler", "rng", "trainer_state"}
    for name, value in params.items():
        assert torch.equal(state["model"][name], value), name
    assert state["trainer_state"]["global_step"] == 15 and state["trainer_state"]["max_steps"] == 15
    assert state["lr_scheduler"]["last_epoch"] == 15
    moments = state["optimizer"]["state"]
    assert len(moments) == len(params) and all("exp_avg_sq" in s for s in moments.values())
    assert isinstance(state["rng"]["torch"], torch.Tensor) and state["rng"]["torch"].dtype == torch.uint8
    # Nothing else is stored: safetensors shards (any safetensors tool opens them) and manifests.
    for step_dir in root.iterdir():
        if step_dir.name == "writer.lease":  # who writes the root (see docs/RELIABILITY.md)
            continue
        names = sorted(os.listdir(step_dir))
        shards = [n for n in names if re.fullmatch(shard_name(), n)]
        assert set(names) - set(shards) <= {"manifest.json"} and len(shards) <= 1, names
        for name in shards:
            with safe_open(step_dir / name, "pt") as f:
                assert list(f.keys())


def test_mismatches_and_unsupported_setups_are_named(runs, hf_job, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the resume folder a failed train() leaves

    root = runs["tmp"] / "ref"
    # A model with a third layer: the strict load names the layers the snapshot lacks.
    trainer, callback = hf_job.make_trainer(str(root), str(tmp_path / "out"), n_layer=3)
    folder = callback.resume(trainer)
    assert (
        folder is not None
        and json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"] == 15
    )
    with pytest.raises(StateKeysError, match=r"model/transformer\.h\.2\."):
        trainer.train(resume_from_checkpoint=folder)
    callback.close()

    trainer, callback = hf_job.make_trainer(
        str(tmp_path / "best"), str(tmp_path / "out"), save_strategy="best", metric_for_best_model="loss"
    )
    with pytest.raises(ConfigError, match="save_strategy='best'"):
        callback.resume(trainer)

    class OtherTrainer(transformers.Trainer):
        _load_rng_state = None  # as if a future transformers had renamed it

    trainer, callback = hf_job.make_trainer(str(tmp_path / "other"), str(tmp_path / "out"))
    trainer.__class__ = OtherTrainer
    with pytest.raises(ConfigError, match=rf"transformers {transformers.__version__}.*_load_rng_state"):
        callback.resume(trainer)


def test_save_total_limit_is_keep_last(hf_job, tmp_path):
    """The Trainer's save_total_limit is honoured (it was silently ignored): 9 steps saved every
    3 with a limit of 2 leave steps 6 and 9."""
    root = str(tmp_path / "limited")
    trainer, callback = hf_job.make_trainer(
        root, str(tmp_path / "out"), max_steps=9, save_steps=3, save_total_limit=2
    )
    trainer.train()
    callback.close()
    with Checkpointer(root) as ck:
        assert ck.steps() == [6, 9]
    # Two limits that disagree are named, before anything is saved.
    trainer, callback = hf_job.make_trainer(
        str(tmp_path / "both"), str(tmp_path / "out2"), keep_last=3, save_total_limit=2
    )
    with pytest.raises(ConfigError, match=r"keep_last=3.*save_total_limit=2"):
        trainer.train()
    callback.close()
    assert not (tmp_path / "both").exists() or not any((tmp_path / "both").iterdir())


def test_import_fmstore_does_not_import_transformers():
    code = "import sys, fmstore, fmstore.checkpoint; assert 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


@pytest.mark.slow
def test_ddp_every_rank_saves_its_part_and_resumes_bit_exact(tmp_path):
    env = job_env(tmp_path)
    args = ("--max-steps", "6", "--save-steps", "2", "--eval-steps", "2", "--logging-steps", "2")
    ref = run(job_cmd(tmp_path / "ref", tmp_path / "ref-out", args=args, ranks=2), env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    with Checkpointer(tmp_path / "ref") as ck:
        assert ck.steps() == [2, 4, 6]
        manifest = ck.manifest(6)
    assert manifest.world_size == 2
    # Replicated tensors (weights, optimizer state) are written once, by one rank or the other;
    # each rank's generators are its own.
    assert all(len(entry.shards) == 1 for entry in manifest.tensors.values())
    assert {"rng/rank-0/torch", "rng/rank-1/torch"} <= set(manifest.tensors)
    files = {s.file.rsplit("/", 1)[-1] for e in manifest.tensors.values() for s in e.shards}
    assert len(files) == 2 and all(any(re.fullmatch(shard_name(r), f) for f in files) for r in (0, 1)), files

    # Resume both ranks from step 2 (mid-epoch: 3 steps an epoch on two ranks).
    shutil.copytree(tmp_path / "ref", tmp_path / "run")
    with Checkpointer(tmp_path / "run") as ck:
        ck.delete(6)
        ck.delete(4)
    resumed = run(job_cmd(tmp_path / "run", tmp_path / "run-out", args=args, ranks=2), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming from step 2") == 2
    ref_params = load_file(tmp_path / "ref-out" / "params.safetensors")
    run_params = load_file(tmp_path / "run-out" / "params.safetensors")
    assert ref_params.keys() == run_params.keys()
    for name in ref_params:
        assert torch.equal(ref_params[name], run_params[name]), name
