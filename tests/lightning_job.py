"""A small, deterministic Lightning training job for tests/test_integration_lightning.py.

Trains a tiny MLP on CPU with a resumable data loader, checkpointing either through
``FmstoreCheckpointIO`` + ``ModelCheckpoint`` (``--mode plugin``; every run calls
``fit(ckpt_path="last")``, so a rerun resumes) or through the ``FmstoreCheckpoint`` callback
(``--mode callback``; resumes by itself).  ``--crash-at-step N`` SIGKILLs the job (the whole
process group, with two ranks) right after the checkpoint saves of step N have started.

Global rank 0 writes, under ``--dir``: ``final.safetensors`` (the parameters and buffers at the
end), ``record.safetensors`` (``<global_step>/<name>``: the state dict at every step a save
happens) and ``summary.json`` (the step training started from, and the checkpoint resumed).
``--then-reference REF`` runs an uninterrupted job in REF afterwards, in the same process(es):
one launch for "resume, then the run to compare with" (Lightning's import costs seconds).

``--ddp`` (Lightning's ``strategy="ddp"``) and ``--fsdp2`` (``ModelParallelStrategy`` with
``fully_shard``: DTensor parameters) run two ranks (gloo on CPU) as forked processes with the
variables a launcher such as torchrun sets (``LOCAL_RANK``, ``WORLD_SIZE``, ...), in a process
group of their own.  ``--serve`` reads one job's arguments per line (a JSON list) from
stdin, runs it in forked processes and answers with its exit code (a JSON object) on stdout:
the tests pay for importing torch and Lightning (seconds) once, not once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import sys
from typing import Any

import lightning as L
import torch
from fmstore.integrations.lightning import FmstoreCheckpoint, FmstoreCheckpointIO
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file

WORLD = 2

DIM, HIDDEN, SAMPLES, BATCH = 16, 32, 256, 16
PLAIN_BATCH, PLAIN_WORKERS = 32, 2  # --plain-loader: 8 shuffled batches an epoch, two worker processes


class ResumableLoader:
    """Batches of a fixed synthetic regression set: a shuffle seeded per epoch, this rank's
    share of each global batch, and its position as state so a mid-epoch resume is exact."""

    def __init__(self, rank: int = 0, world: int = 1, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(SAMPLES, DIM, generator=g)
        w = torch.randn(DIM, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(SAMPLES, generator=g)
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch, self.pos = -1, 0  # the epoch being iterated and the batches it has yielded
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return SAMPLES // (BATCH * self.world)

    def __iter__(self):
        # Decided when iter() is called (not at the first next()): a resumed epoch goes on from
        # its saved position, any other starts the next epoch at 0.
        if self._resume is not None:
            (self.epoch, self.pos), self._resume = self._resume, None
        else:
            self.epoch, self.pos = self.epoch + 1, 0
        perm = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        return self._batches(perm, self.pos)

    def _batches(self, perm: torch.Tensor, start: int):
        for i in range(start, len(self)):
            begin = (i * self.world + self.rank) * BATCH
            idx = perm[begin : begin + BATCH]
            self.pos = i + 1
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["pos"]))


class Net(L.LightningModule):
    def __init__(
        self,
        dropout: float = 0.0,
        big: int = 0,
        lr: float = 0.02,
        data_dir: pathlib.Path = pathlib.Path("data"),  # hparams that are not JSON: stored tagged
        dtype: torch.dtype = torch.float32,
        fsdp2: bool = False,
        plain_loader: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("proj", torch.randn(DIM, DIM) / DIM**0.5)  # never changes: referenced
        self.body = torch.nn.Sequential(
            torch.nn.Linear(DIM, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(HIDDEN, 1),
        )
        # A larger parameter makes each save's persist outlast a few training steps: the pointers
        # trail the saves, as with a real model.
        self.big = torch.nn.Parameter(torch.zeros(big)) if big else None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.body(x @ self.proj).squeeze(-1), y)
        if self.big is not None:
            loss = loss + 1e-3 * (self.big - 1).pow(2).mean()  # every element changes every step
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_model(self) -> None:
        if self.hparams.fsdp2:  # parameters become DTensors, each rank holding half of each
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.body, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> Any:
        if self.hparams.plain_loader:
            # A stock shuffled DataLoader: no state_dict; its order comes from torch's global RNG.
            data = ResumableLoader()
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(data.x, data.y),
                batch_size=PLAIN_BATCH,
                shuffle=True,
                num_workers=PLAIN_WORKERS,
            )
        return ResumableLoader(self.trainer.global_rank, self.trainer.world_size)


class Record(Callback):
    """Rank 0: the state dict at every step a checkpoint is saved, and where training started."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.weights: dict[str, torch.Tensor] = {}
        self.start_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            for name, t in full_state(pl_module).items():  # a collective under FSDP2: every rank
                if trainer.is_global_zero:
                    self.weights[f"{step}/{name}"] = t


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state dict with whole tensors (DTensor shards gathered, on every rank)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in module.state_dict().items()
    }


class CrashAfterSave(Checkpoint):
    """A Checkpoint subclass, so Lightning runs it after the checkpoint callbacks before it: at
    step N their saves have just started (async) when the job is killed."""

    def __init__(self, step: int, group: bool, settle: bool = False) -> None:
        self.step, self.group, self.settle = step, group, settle

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            if self.settle:  # the saves before this step are committed: the rerun's start is known
                for cb in trainer.checkpoint_callbacks:
                    if isinstance(cb, FmstoreCheckpoint) and cb.last_handle is not None:
                        cb.last_handle.wait()
                io = trainer.strategy.checkpoint_io
                if isinstance(io, FmstoreCheckpointIO):
                    io._drain(raise_errors=True)
            print(f"lightning_job: SIGKILL at step {self.step}", file=sys.stderr, flush=True)
            if self.group:
                os.killpg(0, signal.SIGKILL)  # both ranks: fork_job gave the job its own process group
            os.kill(os.getpid(), signal.SIGKILL)


def run(args: argparse.Namespace, workdir: pathlib.Path, crash_at: int | None) -> None:
    L.seed_everything(0, verbose=False)
    model = Net(dropout=args.dropout, big=args.big, fsdp2=args.fsdp2, plain_loader=args.plain_loader)
    record = Record(args.every)
    callbacks: list[Callback] = [record]
    plugins: list[Any] = []
    if args.mode == "plugin":
        plugins.append(FmstoreCheckpointIO())
        if args.position_from_start and hasattr(plugins[0], "data_position"):
            callbacks.append(plugins[0].data_position)
        callbacks.append(
            ModelCheckpoint(
                dirpath=workdir / "ckpts",
                monitor="train_loss",
                mode="min",
                save_top_k=2,
                every_n_train_steps=args.every,
                save_last=True,
            )
        )
    else:
        callbacks.append(FmstoreCheckpoint(workdir / "fmstore", every_n_train_steps=args.every))
    if crash_at is not None:
        callbacks.append(CrashAfterSave(crash_at, args.ranks > 1, args.settle_before_crash))
    if args.fsdp2:
        strategy: Any = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    else:
        strategy = "ddp" if args.ddp else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.ranks,
        strategy=strategy,
        max_steps=args.steps,
        max_epochs=-1,
        plugins=plugins,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=workdir,
    )
    trainer.fit(model, ckpt_path="last" if args.mode == "plugin" else None)
    final = full_state(model)
    if trainer.is_global_zero:
        save_file(final, workdir / "final.safetensors")
        save_file(record.weights, workdir / "record.safetensors")
        resumed = trainer.ckpt_path if args.mode == "plugin" else callbacks[1].resumed_step
        position = getattr(plugins[0] if args.mode == "plugin" else callbacks[1], "data_position", None)
        summary = {
            "start_step": record.start_step,
            "resumed": str(resumed) if resumed is not None else None,
            "skipped": getattr(position, "skipped", None),
            "skip_seconds": getattr(position, "skip_seconds", None),
        }
        (workdir / "summary.json").write_text(json.dumps(summary))


def exit_save(path: pathlib.Path) -> None:
    """Save through a plugin and leave without teardown(): fmstore.exiting must write the pointer."""
    torch.manual_seed(7)
    state = {"w": torch.randn(1 << 20), "global_step": 3}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": state["w"]}, path.with_suffix(".expected.safetensors"))
    FmstoreCheckpointIO(block=False).save_checkpoint(state, path)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=pathlib.Path, required=True)
    p.add_argument("--mode", choices=["plugin", "callback"], default="plugin")
    p.add_argument("--ddp", action="store_true", help="two ranks, strategy='ddp'")
    p.add_argument("--fsdp2", action="store_true", help="two ranks, ModelParallelStrategy + fully_shard")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--crash-at-step", type=int)
    p.add_argument("--then-reference", type=pathlib.Path)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--big", type=int, default=0)
    p.add_argument("--exit-save", type=pathlib.Path)
    p.add_argument("--plain-loader", action="store_true", help="a shuffled torch DataLoader with 2 workers")
    p.add_argument("--settle-before-crash", action="store_true", help="commit earlier saves before the kill")
    p.add_argument("--position-from-start", action="store_true", help="plugin: add its data_position too")
    p.add_argument("--log", type=pathlib.Path, help="stdout and stderr of the job's processes")
    args = p.parse_args(argv)
    args.ranks = WORLD if args.ddp or args.fsdp2 else 1
    return args


def job(args: argparse.Namespace, rank: int) -> None:
    """One rank of a job (in a forked process)."""
    torch.set_num_threads(1)  # two processes on two cores: no oversubscription
    if args.ranks > 1:
        os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD))
    run(args, args.dir, args.crash_at_step)
    if args.then_reference is not None:
        run(args, args.then_reference, None)
    if args.exit_save is not None and rank == 0:
        exit_save(args.exit_save)


def fork_job(argv: list[str]) -> int:
    """Run a job in forked processes (one per rank) in a new process group; its exit code (the
    first failing rank's, negative for a signal).  The first rank to fail stops the others."""
    args = parse(argv)
    ranks = args.ranks
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    if args.log is not None:
        args.log.parent.mkdir(parents=True, exist_ok=True)
    pids: list[int] = []
    for rank in range(ranks):
        pid = os.fork()
        if pid == 0:  # the rank: never returns into the caller's loop
            code = 1
            try:
                os.setpgid(0, pids[0] if pids else 0)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)  # the server's stdin carries the next jobs
                if args.log is not None:
                    out = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    os.dup2(out, 1)
                    os.dup2(out, 2)
                job(args, rank)
                code = 0
            except BaseException:  # noqa: BLE001 - reported by the exit code and the log
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            sys.exit(code)  # a normal exit: fmstore.exiting finishes what is in flight
        os.setpgid(pid, pids[0] if pids else pid)  # also here: whichever runs first
        pids.append(pid)
    codes: dict[int, int] = {}
    while len(codes) < ranks:
        pid, status = os.wait()
        if pid not in pids:
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and len(codes) < ranks:
            os.killpg(pids[0], signal.SIGKILL)  # a rank alone would wait for its peer forever
    bad = [codes[p] for p in pids if codes[p] != 0]
    return bad[0] if bad else 0


def serve() -> None:
    for line in sys.stdin:
        code = fork_job(json.loads(line))
        sys.stdout.write(json.dumps({"rc": code}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        rc = fork_job(sys.argv[1:])
        sys.exit(rc if rc >= 0 else 128 - rc)  # as a shell reports a signal
