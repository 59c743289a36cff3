"""Step time of a Lightning run and a Hugging Face Trainer run with checkpoints, against the same
run without checkpoints and against each trainer's own saving: same model, same data, one process.

fmstore saves a host-memory snapshot every step and a durable one (local disk) every ``--k``
steps (``Policy(host_memory=1, every=k)``), through ``FmstoreCheckpoint`` (Lightning) and
``FmstoreCallback`` (HF), with the device-to-host copy overlapping the next forward and backward.
The peers save at the same durable interval: Lightning's ``ModelCheckpoint`` with its default
``TorchCheckpointIO`` and with ``AsyncCheckpointIO``, and the Trainer's own ``save_steps=k``.

The model is a GPT-2 built from a config (``--size``: ``tiny`` for a smoke run, ``small`` for a
CPU, ``1b`` = 1.07 B parameters for a GPU), trained in bf16 on a GPU (fp32 on a CPU) with AdamW
on random tokens.  Per run: the mean step time over a window of ``--saves`` whole durable
cycles (from step k on; ``--steps`` after ``--warmup`` is the warm-up run's), synchronized at both
ends, so every run pays for the same number of durable saves, and the median of the per-step
times.  A discarded warm-up run
first, then ``--repeats`` rounds of every run in an order rotated each round; the medians over
rounds are compared with the run without checkpoints.  Raw limits measured in the same process: the training state's copy to
pinned host memory (GPU) or to host memory (CPU), and an fsync'd write of the same bytes to
``--dir``.  Also: how long a host-memory save waits while a durable persist is in flight.

    PYTHONPATH=. .venv/bin/python bench/integration.py --size small --steps 30 --k 10
    PYTHONPATH=. python3 bench/integration.py --size 1b --steps 60 --k 20      # CUDA machine
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from common import machine_info  # bench/common.py

from fmstore import Checkpointer, Policy, format_size

SIZES = {  # GPT-2 configs: (n_embd, n_layer, n_head, vocab, seq, batch)
    "tiny": (64, 2, 2, 256, 64, 4),
    "small": (256, 4, 4, 8192, 256, 8),
    "1b": (2048, 20, 16, 32000, 1024, 16),
}
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def make_model(size: str, device: str | None = None) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    d, layers, heads, vocab, seq, _ = SIZES[size]
    cfg = GPT2Config(n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=seq)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(device or DEVICE):  # built where it trains: no 4 GB fp32 copy on the host
            model = GPT2LMHeadModel(cfg)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, the same for every run."""

    def __init__(self, size: str, n: int) -> None:
        _, _, _, vocab, seq, _ = SIZES[size]
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


@dataclass
class Result:
    trainer: str
    name: str
    mean: float  # s per step
    median: float
    note: str = ""
    slowest: str = ""


class StepTimes:
    """Per-step wall times (host side), synchronized at the end of the warm-up and of the last step."""

    def __init__(self, warmup: int, steps: int, sample: bool = False) -> None:
        self.warmup, self.last = warmup, warmup + steps
        self.marks: list[float] = []
        self.steps: list[int] = []
        self.sampler: Any = None
        if sample:  # --sample: where the slowest steps' time goes (the training thread's stacks)
            from stack_sampler import StackSampler  # bench/stack_sampler.py

            self.sampler = StackSampler()

    def mark(self, step: int) -> None:
        if step in (self.warmup, self.last):
            sync()
        if step >= self.warmup:
            self.marks.append(time.perf_counter())
            self.steps.append(step)

    def result(self, trainer: str, name: str, note: str = "") -> Result:
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        # Where the time goes: the three slowest steps (a durable save's step, a stall).
        slow = sorted(zip(steps, self.steps[1:]), reverse=True)[:3]
        slowest = ", ".join(f"step {s} {t * 1e3:.0f} ms" for t, s in slow)
        if self.sampler is not None:
            self.sampler.stop()
            mid = sorted(zip(steps, self.steps[1:]))[len(steps) // 2]
            for t, s in [*slow, mid]:
                i = self.steps.index(s)
                slowest += f"\n  step {s} ({t * 1e3:.0f} ms):\n" + self.sampler.report(
                    self.marks[i - 1], self.marks[i]
                )
        return Result(
            trainer,
            name,
            (self.marks[-1] - self.marks[0]) / len(steps),
            statistics.median(steps),
            note,
            slowest,
        )


# ---------------------------------------------------------------------------- Lightning


def run_lightning(name: str, args: argparse.Namespace, workdir: str) -> Result:
    import lightning.pytorch as pl
    from fmstore.integrations.lightning import FmstoreCheckpoint
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    times = StepTimes(args.warmup, args.steps, args.sample and name != "none")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model(args.size)

        def training_step(self, batch: dict[str, torch.Tensor], idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=CUDA)

    class Timer(Callback):
        def on_train_batch_end(self, trainer: Any, *a: Any) -> None:
            times.mark(trainer.global_step)

    callbacks: list[Any] = []
    plugins: list[Any] = []
    checkpointing = True
    if name == "none":
        checkpointing = False
    elif name == "fmstore":
        callbacks.append(
            FmstoreCheckpoint(
                os.path.join(workdir, "fmstore"),
                every_n_train_steps=1,
                policy=Policy(host_memory=1, every=args.k),
                keep_last=1,
                resume=False,
            )
        )
    else:  # the peers: ModelCheckpoint every k steps, sync torch.save or AsyncCheckpointIO
        callbacks.append(
            ModelCheckpoint(dirpath=os.path.join(workdir, name), every_n_train_steps=args.k, save_top_k=1)
        )
        if name == "AsyncCheckpointIO":
            plugins.append(AsyncCheckpointIO())
    callbacks.append(Timer())  # last: after the checkpoint callbacks of the same hook
    _, _, _, _, _, batch = SIZES[args.size]
    loader = torch.utils.data.DataLoader(
        Tokens(args.size, batch * (args.warmup + args.steps)), batch_size=batch
    )
    trainer = pl.Trainer(
        accelerator="gpu" if CUDA else "cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        callbacks=callbacks,
        plugins=plugins,
        default_root_dir=workdir,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), loader)
    out = times.result("lightning", name)
    t0 = time.perf_counter()
    trainer.strategy.teardown()  # waits for async writes (AsyncCheckpointIO's, fmstore's)
    out.note = f"then {time.perf_counter() - t0:.2f} s to finish writing"
    del trainer
    return out


# ---------------------------------------------------------------------------- Hugging Face


def run_hf(name: str, args: argparse.Namespace, workdir: str) -> Result:
    from fmstore.integrations.hf import FmstoreCallback
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times = StepTimes(args.warmup, args.steps, args.sample and name != "none")

    class Timer(TrainerCallback):
        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            times.mark(state.global_step)

    _, _, _, _, _, batch = SIZES[args.size]
    save = {"none": dict(save_strategy="no"), "fmstore": dict(save_strategy="steps", save_steps=1)}.get(
        name, dict(save_strategy="steps", save_steps=args.k, save_total_limit=1)
    )
    callbacks: list[Any] = []
    if name == "fmstore":
        callbacks.append(
            FmstoreCallback(
                os.path.join(workdir, "fmstore"), policy=Policy(host_memory=1, every=args.k), keep_last=1
            )
        )
    callbacks.append(Timer())
    targs = TrainingArguments(
        output_dir=os.path.join(workdir, "hf-out"),
        per_device_train_batch_size=batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        optim="adamw_torch_fused" if CUDA else "adamw_torch",
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        use_cpu=not CUDA,
        dataloader_num_workers=0,
        max_grad_norm=0.0,
        **save,
    )
    trainer = Trainer(
        model=make_model(args.size),
        args=targs,
        train_dataset=Tokens(args.size, batch * (args.warmup + args.steps)),
        callbacks=callbacks,
    )
    trainer.train()
    out = times.result("hf", name)
    if name == "fmstore":
        t0 = time.perf_counter()
        callbacks[0].close()
        out.note = f"then {time.perf_counter() - t0:.2f} s to finish writing"
    del trainer
    return out


# ---------------------------------------------------------------------------- raw limits


def state_bytes(size: str) -> int:
    n = sum(p.numel() for p in make_model(size, "meta").parameters())
    return n * torch.empty(0, dtype=DTYPE).element_size() * 3  # weights + AdamW's two moments


def raw_limits(nbytes: int, workdir: str) -> dict[str, float]:
    """Seconds to copy ``nbytes`` of device memory to (pinned) host memory, and to write and
    fsync them to ``workdir``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=CUDA)
    dst.copy_(src)
    sync()
    copies = []
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        copies.append(time.perf_counter() - t0)
    path = os.path.join(workdir, "raw.bin")
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        view = memoryview(dst.numpy())
        for a in range(0, nbytes, 64 << 20):
            f.write(view[a : a + (64 << 20)])
        os.fsync(f.fileno())
    write = time.perf_counter() - t0
    os.unlink(path)
    del src, dst
    return {"copy": min(copies), "write": write}


def host_save_wait(workdir: str, nbytes: int = 512 << 20) -> tuple[float, float]:
    """(seconds a host-memory save takes while step 4's durable persist is in flight, seconds a
    host-memory save takes alone), with ``Policy(host_memory=1, every=4)``."""
    state = {"w": torch.randn(nbytes // 4, device=DEVICE)}
    root = os.path.join(workdir, "policy")
    shutil.rmtree(root, ignore_errors=True)
    with Checkpointer(root, policy=Policy(host_memory=1, every=4)) as ck:
        ck.save(1, state).wait()
        ck.save(2, state)
        t0 = time.perf_counter()
        ck.save(3, state)
        alone = time.perf_counter() - t0
        durable = ck.save(4, state)
        t0 = time.perf_counter()
        ck.save(5, state)
        behind = time.perf_counter() - t0
        assert not durable.done() or behind < alone * 5, "step 4 finished before step 5 was measured"
        durable.wait()
    shutil.rmtree(root, ignore_errors=True)
    return behind, alone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--k",
        default="auto",
        help="durable checkpoint every k steps; auto: enough steps for the raw write of the state "
        "to take at most half of them (from the run without checkpoints)",
    )
    ap.add_argument("--trainer", choices=["lightning", "hf", "both"], default="both")
    ap.add_argument("--dir", default="fmstore-data/bench-integration")
    ap.add_argument(
        "--repeats", type=int, default=1, help="rounds of every run, the order rotated each round"
    )
    ap.add_argument(
        "--saves",
        type=int,
        default=1,
        help="the measured window: this many whole durable cycles of k steps, from step k on",
    )
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument(
        "--sample",
        action="store_true",
        help="sample the training thread's stack every 4 ms; print where the slowest steps went",
    )
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    machine_info(args.dir, DEVICE)
    nbytes = state_bytes(args.size)
    raw = raw_limits(nbytes, args.dir)
    d, layers, *_ = SIZES[args.size]
    print(
        f"model:   GPT-2 {args.size} (n_embd {d}, {layers} layers), {DTYPE}, AdamW; state {format_size(nbytes)}; "
        f"warm-up run {args.steps} steps after {args.warmup}; durable every k={args.k} steps"
    )
    print(
        f"raw:     state to {'pinned ' if CUDA else ''}host memory {raw['copy'] * 1e3:.1f} ms "
        f"({nbytes / raw['copy'] / 1e9:.1f} GB/s); fsync'd write {raw['write']:.2f} s "
        f"({nbytes / raw['write'] / 1e9:.2f} GB/s)",
        flush=True,
    )
    behind, alone = host_save_wait(args.dir)
    print(
        f"policy:  a host-memory save with a 512 MiB durable persist in flight {behind * 1e3:.1f} ms, alone {alone * 1e3:.1f} ms"
    )
    runs = {
        "lightning": ["none", "fmstore", "TorchCheckpointIO", "AsyncCheckpointIO"],
        "hf": ["none", "fmstore", "Trainer.save"],
    }
    fixed_k = None if args.k == "auto" else int(args.k)
    for trainer in ["lightning", "hf"] if args.trainer == "both" else [args.trainer]:
        runner = run_lightning if trainer == "lightning" else run_hf

        def one(name: str, k: int, trainer: str = trainer, runner: Any = runner) -> Result:
            args.k = k
            workdir = os.path.join(args.dir, f"{trainer}-{name}")
            shutil.rmtree(workdir, ignore_errors=True)
            os.makedirs(workdir)
            try:
                return runner(name, args, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
                gc.collect()
                if CUDA:
                    torch.cuda.empty_cache()

        # A warm-up run, discarded (a process's first run is slower: allocator, threads); it
        # also gives the step time that k is chosen from.
        steps = args.steps
        warm = one("none", 10)
        k = fixed_k or max(2, math.ceil(2 * raw["write"] / warm.mean))
        # The window is --saves whole durable cycles (the peers save only every k): from just
        # after the save at step k (its write runs on into the window) to the save at step
        # (saves + 1) k (whose write would run on after it).
        warmup = args.warmup
        args.warmup = max(warmup, k)
        args.steps = args.saves * k
        print(f"{trainer}: k={k}, {args.steps} steps after {args.warmup}", flush=True)
        names = [n for n in runs[trainer] if not args.only or n in args.only.split(",") or n == "none"]
        rounds: dict[str, list[Result]] = {name: [] for name in names}
        for rnd in range(args.repeats):
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:  # rotated each round
                r = one(name, k)
                rounds[name].append(r)
                print(
                    f"  round {rnd + 1}: {trainer} {name:<18} {r.mean * 1e3:8.1f} ms/step  {r.note}"
                    f"  slowest: {r.slowest}",
                    flush=True,
                )
        args.steps, args.warmup = steps, warmup
        none = statistics.median(r.mean for r in rounds["none"])
        for name in names:
            mean = statistics.median(r.mean for r in rounds[name])
            median = statistics.median(r.median for r in rounds[name])
            print(
                f"{trainer:<10} {name:<18} {mean * 1e3:8.1f} ms/step (median step {median * 1e3:7.1f})  "
                f"{mean / none:5.3f}x no checkpoints  k={k if name != 'none' else '-'}  ({len(rounds[name])} runs)",
                flush=True,
            )
    print("ratios: median over rounds of the mean step time, over the same trainer's run without checkpoints")


if __name__ == "__main__":
    main()
