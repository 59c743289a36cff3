"""The training job the Hugging Face integration tests run in subprocesses: a tiny GPT-2 trained
by the real ``transformers.Trainer``, its checkpoints taken over by ``FmstoreCallback``.

    python tests/hf_job.py --root SNAPSHOTS --output-dir TRAINER_OUT --out RESULT_DIR
        [--max-steps 15] [--save-steps 3] [--eval-steps 0] [--logging-steps 2] [--crash-at-step N]
        [--cuda]   (on a GPU, in fp16 with a grad scaler: for manual checks there, not run by CI)

It always resumes through ``callback.resume(trainer)`` (None on a fresh start) and writes
``RESULT_DIR/params.safetensors`` (the final parameters) and ``RESULT_DIR/result.json``.
``--crash-at-step N``: the process SIGKILLs itself from the background persist of step N once
that snapshot's shard file is written and just before its manifest (the commit) is: a save in
flight, its partial directory left on disk, as a crash leaves it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from fmstore.integrations.hf import FmstoreCallback
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from fmstore.checkpoint.level import SnapshotLevel

VOCAB, SEQ = 64, 16


class RandomTokens(torch.utils.data.Dataset):
    """Deterministic random token sequences (the same for every run with the same seed)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def crash_before_commit(step: int) -> None:
    """Make the commit of ``step`` kill this process (fault injection into fmstore, not the Trainer)."""
    commit = SnapshotLevel.commit

    def dying_commit(self: SnapshotLevel, s: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if s == step:
            print(f"crashing at the commit of step {s}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(self, s, *args, **kwargs)

    SnapshotLevel.commit = dying_commit  # type: ignore[method-assign]


def make_trainer(
    root: str,
    output_dir: str,
    *,
    max_steps: int = 15,
    save_steps: int = 3,
    eval_steps: int = 0,
    logging_steps: int = 2,
    n_layer: int = 2,
    keep_last: int | None = None,
    **args: object,
) -> tuple[Trainer, FmstoreCallback]:
    """The job's Trainer (a 2-layer GPT-2, 6 steps an epoch) with an ``FmstoreCallback`` on ``root``."""
    torch.manual_seed(0)
    config = GPT2Config(  # dropouts left at 0.1: the RNG matters
        n_embd=32, n_head=2, n_layer=n_layer, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    options: dict[str, object] = {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "eval_strategy": "steps" if eval_steps else "no",
        "eval_steps": eval_steps or None,
        "per_device_eval_batch_size": 4,
        "logging_steps": logging_steps,
        "seed": 42,
        "use_cpu": True,
        "report_to": [],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    training_args = TrainingArguments(**{**options, **args})
    callback = FmstoreCallback(root, keep_last=keep_last)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=RandomTokens(24, seed=1),
        eval_dataset=RandomTokens(8, seed=2) if eval_steps else None,
        callbacks=[callback],
    )
    return trainer, callback


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=15)
    p.add_argument("--save-steps", type=int, default=3)
    p.add_argument("--eval-steps", type=int, default=0, help="0: no evaluation")
    p.add_argument("--logging-steps", type=int, default=2)
    p.add_argument("--crash-at-step", type=int, default=None)
    p.add_argument("--cuda", action="store_true", help="train on the GPU in fp16 (a grad scaler too)")
    a = p.parse_args()
    torch.set_num_threads(1)  # the same float summation order in every run
    if a.crash_at_step is not None:
        crash_before_commit(a.crash_at_step)

    trainer, callback = make_trainer(
        a.root,
        a.output_dir,
        max_steps=a.max_steps,
        save_steps=a.save_steps,
        eval_steps=a.eval_steps,
        logging_steps=a.logging_steps,
        **({"use_cpu": False, "fp16": True} if a.cuda else {}),
    )
    with callback.checkpointer as ck:
        committed = ck.latest()
        resume = callback.resume(trainer)
        print(f"resuming from step {committed}" if resume is not None else "fresh start", flush=True)
        trainer.train(resume_from_checkpoint=resume)
        if not trainer.is_world_process_zero():
            return  # under torchrun: the ranks hold the same parameters; rank 0 writes them
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        params = {n: t.detach().contiguous() for n, t in trainer.model.named_parameters()}
        save_file(params, str(out / "params.safetensors"))
        result = {
            "resumed_from": committed if resume is not None else None,
            "resume_folder": resume,
            "global_step": trainer.state.global_step,
            "total_flos": trainer.state.total_flos,
            "steps": ck.steps(),
            "log_history": trainer.state.log_history,
        }
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
