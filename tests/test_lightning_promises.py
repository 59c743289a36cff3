"""What the Lightning drop-ins promise beyond the common path (issue 27, points 1-3):

1. a plain shuffled ``DataLoader`` (two workers) resumes mid-epoch bit-exact, through the plugin
   (``fit(ckpt_path="last")``) and through the callback (rerun), after a SIGKILL;
2. a name Lightning's ``-vN`` counter picks is taken the moment its save starts, so no
   checkpoint is replaced without a word; a claim a crash left is never loaded as a checkpoint
   and is settled by the next run;
3. nothing of the plugin outlives a finished Trainer (``ddp_spawn`` included): no thread, no
   queued removal, and it pickles; ``AsyncCheckpointIO`` wrapping is refused.
"""

from __future__ import annotations

import json
import pickle
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_integration_lightning import JobServer, jobs  # noqa: F401 - one job server per module

from fmstore import ConfigError

JOB = Path(__file__).with_name("lightning_job.py")
SIGKILLED = -9


def fmstore_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("fmstore"))


# ---------------------------------------------------------------------------- 1. mid-epoch resume

# The case: 8 shuffled batches an epoch (2 workers), a checkpoint every 4 steps, killed at
# step 22 (epoch 2, batch 6): the rerun resumes from step 20, in the middle of epoch 2.
PLAIN = ("--plain-loader", "--every", 4, "--steps", 30, "--settle-before-crash")
CRASH_AT = 22


def _crash_resume_compare(jobs: JobServer, base: Path, *opts: Any) -> dict[str, Any]:
    run, ref, log = base / "run", base / "ref", base / "job.log"
    rc = jobs.run("--dir", run, "--crash-at-step", CRASH_AT, "--log", log, *PLAIN, *opts)
    assert rc == SIGKILLED, log.read_text()
    assert not (run / "final.safetensors").exists()
    rc = jobs.run("--dir", run, "--then-reference", ref, "--log", log, *PLAIN, *opts)
    assert rc == 0, log.read_text()
    x, y = load_file(run / "final.safetensors"), load_file(ref / "final.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k
    return json.loads((run / "summary.json").read_text())


def test_plugin_plain_dataloader_resumes_mid_epoch_bit_exact(jobs, tmp_path):
    # --position-from-start: the plugin's data_position also covers the first epoch; without it
    # the plugin learns of the Trainer at its first save (checked by the next test).
    summary = _crash_resume_compare(jobs, tmp_path, "--mode", "plugin", "--position-from-start")
    assert summary["start_step"] == 20, summary  # resumed mid-epoch 2, not at an epoch boundary
    assert summary["skipped"] == 4, summary  # epoch 2's first 4 batches were replayed and dropped


def test_plugin_alone_resumes_mid_epoch_bit_exact_after_the_first_epoch(jobs, tmp_path):
    summary = _crash_resume_compare(jobs, tmp_path, "--mode", "plugin")
    assert summary["start_step"] == 20 and summary["skipped"] == 4, summary


def test_callback_plain_dataloader_resumes_mid_epoch_bit_exact(jobs, tmp_path):
    summary = _crash_resume_compare(jobs, tmp_path, "--mode", "callback")
    assert summary["start_step"] == 20 and summary["skipped"] == 4, summary


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from torch.randn(8, 32).unbind(0)


def _boring_trainer(tmp_path: Path, **kw: Any) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=kw.pop("devices", 1),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_an_iterable_dataset_without_state_is_warned_once_by_name(tmp_path):
    from fmstore.integrations.lightning import FmstoreCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Model(BoringModel):
        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(_Stream(), batch_size=2)

    trainer = _boring_trainer(
        tmp_path,
        max_steps=4,
        limit_val_batches=0,
        callbacks=[FmstoreCheckpoint(tmp_path / "fm", every_n_train_steps=1)],
    )
    with pytest.warns(UserWarning) as caught:
        trainer.fit(Model())
    ours = [str(w.message) for w in caught if "cannot be saved" in str(w.message)]
    assert len(ours) == 1, ours  # four saves, one warning
    assert "train dataloader 0" in ours[0] and "_Stream" in ours[0] and "IterableDataset" in ours[0]


# ---------------------------------------------------------------------------- 2. no silent replacement


def test_version_counter_after_rerun_same_trainer_keeps_every_checkpoint(tmp_path):
    # Lightning's test_ckpt_version_after_rerun_same_trainer, with the plugin: a fixed filename,
    # save_top_k=-1, two fits of one Trainer; every save must get its own -vN name.
    from fmstore.integrations.lightning import FmstoreCheckpointIO, load_checkpoint
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    mc = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, monitor="epoch", mode="max", filename="test")
    mc.STARTING_VERSION = 9
    trainer = _boring_trainer(
        tmp_path,
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        callbacks=[mc],
        plugins=[FmstoreCheckpointIO()],
    )
    trainer.fit(BoringModel())
    trainer.fit_loop.max_epochs = 4
    trainer.fit(BoringModel())

    expected = {"test.ckpt", "test-v9.ckpt", "test-v10.ckpt", "test-v11.ckpt"}
    assert {Path(f).name for f in mc.best_k_models} == expected
    assert {p.name for p in tmp_path.glob("*.ckpt")} == expected
    epochs = sorted(load_checkpoint(tmp_path / name)["epoch"] for name in expected)
    assert epochs == [0, 1, 2, 3]  # four checkpoints, none replaced


def _interrupted_save(io: Any, state: dict[str, Any], path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``io.save_checkpoint`` as a process killed before its snapshot committed leaves it: the
    claim is written, the snapshot never commits and no commit job runs."""
    from fmstore.checkpoint import Checkpointer

    class Never:
        step = -1

    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "save", lambda self, *a, **k: Never())
        m.setattr(io._jobs, "submit", lambda *a, **k: None)
        io.save_checkpoint(state, path)


def test_a_claim_left_by_a_crash_is_never_loaded_and_is_settled_by_the_next_run(tmp_path, monkeypatch):
    from fmstore.integrations.lightning import (
        FmstoreCheckpointIO,
        PendingPointerError,
        read_pointer,
    )

    last, fresh = tmp_path / "last.ckpt", tmp_path / "epoch=1.ckpt"
    w0, w1 = torch.arange(4.0), torch.arange(4.0) + 1
    first = FmstoreCheckpointIO()
    first.save_checkpoint({"w": w0, "global_step": 1}, last)
    first.teardown()
    committed = read_pointer(last).step

    crashed = FmstoreCheckpointIO()
    _interrupted_save(crashed, {"w": w1, "global_step": 2}, last, monkeypatch)
    _interrupted_save(crashed, {"w": w1, "global_step": 2}, fresh, monkeypatch)
    crashed.teardown()
    assert fresh.exists()  # the name was taken the moment the save started

    with pytest.raises(PendingPointerError, match="last.ckpt"):
        read_pointer(last)
    resumed = FmstoreCheckpointIO()
    with pytest.raises(PendingPointerError, match=r"epoch=1\.ckpt"):
        resumed.load_checkpoint(fresh)  # it never named a committed snapshot
    with pytest.warns(UserWarning, match="last.ckpt.*pending"):
        ckpt = resumed.load_checkpoint(last)  # what last.ckpt named before the interrupted save
    assert torch.equal(ckpt["w"], w0)

    # The next run's first save settles the claims in its directory: nothing stays pending.
    with pytest.warns(UserWarning, match="left pending"):
        resumed.save_checkpoint({"w": w1, "global_step": 3}, tmp_path / "epoch=2.ckpt")
    resumed.teardown()
    assert read_pointer(last).step == committed
    assert not fresh.exists()
    assert torch.equal(resumed.load_checkpoint(tmp_path / "epoch=2.ckpt")["w"], w1)
    resumed.teardown()


def test_a_save_failing_after_its_claim_puts_back_what_the_path_named(tmp_path, monkeypatch):
    import fmstore.integrations.lightning as lit
    from fmstore.integrations.lightning import FmstoreCheckpointIO, read_pointer

    from fmstore import FmstoreError

    keep, last, new = tmp_path / "keep.ckpt", tmp_path / "last.ckpt", tmp_path / "new.ckpt"
    io = FmstoreCheckpointIO()
    io.save_checkpoint({"w": torch.ones(3)}, keep)
    io.save_checkpoint({"w": torch.ones(3)}, last)
    io.teardown()
    before = read_pointer(last).step
    write = lit._write_file

    def commit_fails(path: str, data: bytes, storage_options: Any) -> None:
        body = json.loads(data)
        if not body.get("pending") and body["step"] > before:
            raise OSError("disk full")  # a new save's pointer; claims and rollbacks go through
        write(path, data, storage_options)

    monkeypatch.setattr(lit, "_write_file", commit_fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        io.save_checkpoint({"w": torch.zeros(3)}, last)
        io.save_checkpoint({"w": torch.zeros(3)}, new)
        try:
            io.remove_checkpoint(keep)  # queued behind the failing saves: must be skipped
        except FmstoreError as e:
            assert "disk full" in str(e)
        else:
            with pytest.raises(FmstoreError, match="disk full"):
                io.teardown()
            assert any("kept" in str(w.message) and "keep.ckpt" in str(w.message) for w in caught)
    io.teardown()
    monkeypatch.undo()
    assert read_pointer(last).step == before  # the claim was rolled back: nothing left pending
    assert not new.exists()  # it named nothing before
    assert torch.equal(io.load_checkpoint(keep)["w"], torch.ones(3))
    io.teardown()


# ---------------------------------------------------------------------------- 3. teardown


def test_ddp_spawn_fit_leaves_no_thread_and_the_trainer_pickles(tmp_path):
    # Lightning's test_model_torch_save_ddp_cpu with the plugin: after a ddp_spawn fit (2 CPU
    # processes, gloo) the launcher has loaded and removed the workers' temporary checkpoint
    # through the plugin; nothing of it may still run, and the trainer must pickle.
    from fmstore.integrations.lightning import FmstoreCheckpointIO
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = _boring_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        plugins=[FmstoreCheckpointIO()],
    )
    trainer.fit(BoringModel())
    assert fmstore_threads() == []
    pickle.dumps(trainer.strategy.checkpoint_io)
    torch.save(trainer, tmp_path / "trainer.pt")
    assert fmstore_threads() == []


def test_no_fmstore_thread_outlives_a_finished_trainer(tmp_path):
    from fmstore.integrations.lightning import FmstoreCheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    io = FmstoreCheckpointIO()
    trainer = _boring_trainer(
        tmp_path,
        max_steps=6,
        limit_val_batches=0,
        plugins=[io],
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=1, monitor="step")
        ],
    )
    trainer.fit(BoringModel())
    assert fmstore_threads() == []
    pickle.dumps(io)


def test_async_checkpoint_io_wrapping_is_refused(tmp_path):
    from fmstore.integrations.lightning import FmstoreCheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    with pytest.raises(ConfigError, match="AsyncCheckpointIO"):
        AsyncCheckpointIO(FmstoreCheckpointIO()).load_checkpoint(tmp_path / "x.ckpt")
    trainer = _boring_trainer(
        tmp_path,
        max_steps=2,
        limit_val_batches=0,
        plugins=[AsyncCheckpointIO(FmstoreCheckpointIO())],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1)],
    )
    with pytest.raises(ConfigError, match="AsyncCheckpointIO"):
        trainer.fit(BoringModel())
    assert not list((tmp_path / "ckpts").glob("*.ckpt"))
    assert fmstore_threads() == []
