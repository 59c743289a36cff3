"""The training job fmstore exists for: a GPT-style byte-level language model trained with FSDP2,
checkpointed through fmstore, killed, and resumed on the same or another number of ranks.

    torchrun --nproc-per-node 2 -m fmstore.integrations.train --root ckpt/run1 --steps 200
    python -m fmstore.integrations.train --root ckpt/run1          # one process, no torchrun

The corpus is real text already on the machine: the Python installation's own standard-library
sources (``--corpus DIR`` picks another folder), read as bytes (a 256-symbol vocabulary, no
tokenizer, nothing downloaded), so the loss curve means something.  The data order is a pure
function of ``--seed`` and the global batch: each epoch is a seeded permutation of the corpus's
windows, the global batch of step ``s`` is the next ``--global-batch`` windows of that stream,
and rank ``r`` of ``W`` takes its ``1/W`` slice.  The loader's position is part of every
snapshot, so a resume on any world size (the global batch divisible by it) sees exactly the
batches the uninterrupted run would have.

Checkpoints go through :class:`fmstore.integrations.loop.LoopCheckpointer` with a
:class:`fmstore.Policy`: the newest snapshot in host memory every step (``--host-memory``), the
root every ``--every`` steps, and an optional object level (``--object s3://bucket/run``,
credentials and endpoint from the standard AWS variables) every ``--object-every`` steps.  A rerun
of the same command resumes from the newest committed snapshot.  ``--crash-at-step N`` SIGKILLs
one rank (``--crash-rank``, default the last) right after step N's save has started, as a node
failure would.

Exactness: on the same world size, the resumed run is bit-identical to an uninterrupted one
(CPU, fixed thread count, no dropout; RNG states are in the snapshot anyway).  On another world
size the global batch, data order and learning rate are the same, but the gradient is summed in
another order (one process's matmul over 8 samples against a reduce-scatter of two halves), so
the loss curves agree to float32 rounding, growing slowly with the steps; the tests allow a
relative 1e-4 over 20 steps.

One line per ``--log-every`` steps on rank 0 (step, loss, tokens/s, the checkpoint stall, what
was committed where); a progress bar instead when stderr is a terminal; ``--log-file`` appends
one JSON object per step (loss, the global batch's window indices, timings) for tools and tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fmstore import Level, Policy, RNGState
from fmstore.errors import ConfigError
from fmstore.integrations.loop import LoopCheckpointer

__all__ = ["GPT", "GPTConfig", "Batches", "load_corpus", "main", "SIZES"]

#: Model sizes by name: (d_model, n_layer, n_head).  With a 256-byte vocabulary the parameters are
#: about 12 * n_layer * d_model**2: 0.1 M, 3.2 M, 85 M, 1.0 B.
SIZES = {"tiny": (64, 2, 4), "small": (256, 4, 8), "base": (768, 12, 12), "1b": (2048, 20, 16)}


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class GPTConfig:
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 64
    vocab: int = 256


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A decoder-only transformer (pre-norm, learned positions, no dropout: a resumed run must
    be a pure function of the snapshot)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ----------------------------------------------------------------------------- data


def load_corpus(folder: str | None = None, limit: int = 4 << 20) -> torch.Tensor:
    """Up to ``limit`` bytes of the ``.py`` files under ``folder`` (default: the standard
    library's sources), in sorted path order, as a uint8 tensor: the same bytes on every rank
    and every run on this machine."""
    root = Path(folder or sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or not path.is_file():
            continue
        data = path.read_bytes()
        chunks.append(data[: limit - total])
        total += len(chunks[-1])
        if total >= limit:
            break
    if total < 1 << 16:
        raise ConfigError(f"the corpus under {str(root)!r} holds {total} bytes of .py files; need at least 64 KiB")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


class Batches:
    """The deterministic, resumable order of training windows: epoch ``e`` is a permutation of
    the corpus's ``seq_len + 1``-byte windows seeded by ``(seed, e)``; each step takes the next
    ``global_batch`` of them.  Stateful: its position is saved with the model."""

    def __init__(self, corpus: torch.Tensor, seq_len: int, global_batch: int, seed: int) -> None:
        self.corpus, self.seq_len, self.global_batch, self.seed = corpus, seq_len, global_batch, seed
        self.windows = (len(corpus) - 1) // seq_len
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.windows, generator=g)

    def next_indices(self) -> list[int]:
        """The window indices of the next global batch (advances the position)."""
        out: list[int] = []
        while len(out) < self.global_batch:
            take = min(self.global_batch - len(out), self.windows - self.offset)
            out += self._perm[self.offset : self.offset + take].tolist()
            self.offset += take
            if self.offset == self.windows:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return out

    def tensors(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.tensor(indices) * self.seq_len
        rows = torch.stack([self.corpus[s : s + self.seq_len + 1] for s in starts.tolist()]).long()
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "windows": self.windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "global_batch", "windows"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"the snapshot's data loader has {key}={state.get(key)!r}, this run {getattr(self, key)!r}: "
                    "resuming would change the data order (pass the flags the run started with)"
                )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)


# ----------------------------------------------------------------------------- set-up


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fmstore.integrations.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="fmstore-data/train", help="checkpoint root (directory or URL)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--d-model", type=int, help="overrides --size")
    p.add_argument("--n-layer", type=int, help="overrides --size")
    p.add_argument("--n-head", type=int, help="overrides --size")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step over all ranks")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", help="folder of .py files (default: the standard library)")
    p.add_argument("--corpus-bytes", type=int, default=4 << 20)
    p.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp", help="with several ranks")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (fixed: exactness)")
    p.add_argument("--every", type=int, default=10, help="the root takes every k-th step")
    p.add_argument("--host-memory", type=int, default=1, help="newest snapshots kept in host memory")
    p.add_argument("--object", help="an object level, e.g. s3://bucket/run (AWS variables for credentials)")
    p.add_argument("--object-every", type=int, default=50)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--no-checkpoint", action="store_true", help="train without fmstore (for step-time baselines)")
    p.add_argument("--crash-at-step", type=int, help="SIGKILL one rank right after this step's save started")
    p.add_argument("--crash-rank", type=int, help="the rank to kill (default: the last)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--log-file", help="append one JSON object per step (rank 0)")
    p.add_argument("--measure-copy", action="store_true",
                   help="at the end, time one pinned device-to-host copy of the checkpointed tensors (CUDA)")  # fmt: skip
    args = p.parse_args(argv)
    d, n_layer, n_head = SIZES[args.size]
    args.d_model = args.d_model or d
    args.n_layer = args.n_layer or n_layer
    args.n_head = args.n_head or n_head
    return args


def _init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device; a process group when launched by torchrun."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _wrap(model: GPT, args: argparse.Namespace, device: torch.device, world: int) -> nn.Module:
    if not dist.is_initialized():
        return model
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.dtype == "bfloat16" else None
    kw: dict[str, Any] = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def _policy(args: argparse.Namespace) -> Policy:
    levels = [Level(args.object, every=args.object_every, name="object")] if args.object else []
    return Policy(host_memory=args.host_memory, every=args.every, levels=levels)


def _schedule(args: argparse.Namespace) -> Any:
    def factor(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _Committed:
    """Which saves have committed where, collected without waiting (for the log line)."""

    def __init__(self) -> None:
        self.pending: list[Any] = []
        self.latest: dict[str, int] = {}

    def add(self, handle: Any) -> None:
        if handle is not None:
            self.pending.append(handle)

    def poll(self) -> str:
        still = []
        for h in self.pending:
            if h.done():
                for level in h.wait().levels:
                    self.latest[level] = max(self.latest.get(level, -1), h.step)
            else:
                still.append(h)
        self.pending = still
        return " ".join(f"{lvl}@{s}" for lvl, s in sorted(self.latest.items(), key=lambda kv: kv[1])) or "-"


def _progress(total: int, start: int, rank: int) -> Any:
    if rank != 0 or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _pinned_copy_seconds(model: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> float:
    """The raw floor of a save's stall: one copy of this rank's model and optimizer tensors
    into pinned host buffers (allocated first, outside the timing), the second of two runs."""
    local = []
    for value in [*model.state_dict().values(), *(v for st in opt.state.values() for v in st.values())]:
        if isinstance(value, torch.Tensor) and value.is_cuda:
            local.append(value.to_local() if hasattr(value, "to_local") else value)
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in local]
    best = float("inf")
    for _ in range(2):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for buf, t in zip(buffers, local):
            buf.copy_(t, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _resume(ckpt: LoopCheckpointer, world: int, rank: int) -> int:
    """Restore the newest snapshot (0: none).  Saved on fewer ranks, the snapshot holds no RNG
    state for the new ranks (the model has no dropout: nothing random is drawn), so those keep
    their seeded generators and everything else is restored."""
    ck = ckpt.checkpointer
    step = ck.latest()
    saved = ck.manifest(step).world_size if step is not None else world
    if rank < saved:  # this rank's generators are in the snapshot
        return ckpt.resume(step)
    print(f"train: step {step} was saved by {saved} rank(s); rank {rank} keeps its own RNG seed", flush=True)
    full = ckpt.state
    ckpt.state = {k: v for k, v in full.items() if k != "rng"}
    try:
        return ckpt.resume(step)
    finally:
        ckpt.state = full


# ----------------------------------------------------------------------------- the loop


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the job; returns rank 0's summary (last loss, steps run, mean stall)."""
    torch.set_num_threads(args.threads)
    rank, world, device = _init_distributed()
    if args.global_batch % world:
        raise ConfigError(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
    per_rank = args.global_batch // world
    torch.manual_seed(args.seed)
    cfg = GPTConfig(args.d_model, args.n_layer, args.n_head, args.seq_len)
    with torch.device(device):  # built where it trains: a 1 B model initialised on the CPU takes minutes
        model = GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model = _wrap(model, args, device, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(args))
    data = Batches(load_corpus(args.corpus, args.corpus_bytes), args.seq_len, args.global_batch, args.seed)
    state = {"model": model, "optim": opt, "sched": sched, "data": data, "rng": RNGState()}
    ckpt = None
    start = 0
    if not args.no_checkpoint:
        ckpt = LoopCheckpointer(args.root, state, policy=_policy(args), keep_last=args.keep_last)
        start = _resume(ckpt, world, rank)
    log = open(args.log_file, "a") if args.log_file and rank == 0 else None  # noqa: SIM115 - closed below
    if rank == 0:
        how = f"resumed from step {start}" if start else "fresh start"
        print(
            f"train: {n_params / 1e6:.2f} M parameters, {world} rank(s) on {device.type} ({args.parallel if world > 1 else 'single'}), "
            f"corpus {len(data.corpus) / 2**20:.1f} MiB, {how}, checkpoints in {args.root}",
            flush=True,
        )
    committed, bar = _Committed(), _progress(args.steps, start, rank)
    stalls: list[float] = []
    handles: list[Any] = []
    first_stall = 0.0
    step_times: list[float] = []
    losses: list[float] = []
    tic = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        indices = data.next_indices()
        x, y = data.tensors(indices[rank * per_rank : (rank + 1) * per_rank])
        x, y = x.to(device), y.to(device)
        # bf16 through autocast in a single process; under a process group FSDP2's mixed precision does it.
        autocast = args.dtype == "bfloat16" and not dist.is_initialized()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        global_loss = loss.detach().float() * (per_rank / args.global_batch)
        if world > 1:
            dist.all_reduce(global_loss)
        value = float(global_loss)
        t1 = time.perf_counter()
        last = step == args.steps
        handle = None
        if ckpt is not None:  # the last step is committed everywhere before the job ends
            handle = ckpt.finish(step) if last else ckpt.step(step)
        stall = time.perf_counter() - t1
        if step == start + 1:
            first_stall = stall  # the first step() pins the saves' host memory (LoopCheckpointer)
        committed.add(handle)
        if handle is not None and not last:
            stalls.append(stall)
            handles.append(handle)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's time, not its launch's
        step_times.append(time.perf_counter() - t0)
        if args.crash_at_step == step and rank == (args.crash_rank if args.crash_rank is not None else world - 1):
            print(f"train: rank {rank} crashing at step {step} (its save in flight)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        losses.append(value)
        if rank == 0:
            step_s = time.perf_counter() - t0
            if log is not None:
                record = {"step": step, "loss": value, "batch": indices, "world": world,
                          "step_s": step_s, "stall_s": stall, "lr": sched.get_last_lr()[0]}  # fmt: skip
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3f}", stall=f"{stall * 1e3:.1f}ms")
                bar.update(1)
            elif step % args.log_every == 0 or step == args.steps:
                tokens = args.global_batch * args.seq_len * (step - start) / (time.perf_counter() - tic)
                print(
                    f"step {step:>5}/{args.steps}  loss {value:.4f}  {tokens / 1e3:8.1f} k tok/s  "
                    f"ckpt stall {stall * 1e3:6.1f} ms  committed {committed.poll()}",
                    flush=True,
                )
    if bar is not None:
        bar.close()
    if ckpt is not None:
        ckpt.close()
    saves = [(h.step, h.stall_seconds, getattr(h, "persist_seconds", None), h.nbytes) for h in handles if h.done()]
    warm = sorted(step_times[3:]) or sorted(step_times)
    copy_s = _pinned_copy_seconds(model, opt, device) if args.measure_copy and device.type == "cuda" else None
    if rank == 0 and warm:
        timed = step_times[:-1] or step_times  # every step but the last, which waits to be durable
        print(f"train: median step {1e3 * warm[len(warm) // 2]:.1f} ms, mean step {1e3 * sum(timed) / len(timed):.1f} ms "
              f"with the saves' stalls, over {len(timed)} steps (checkpoints {'off' if ckpt is None else 'on'})",
              flush=True)  # fmt: skip
        if ckpt is not None:
            print(f"train: checkpointing's time at the first step (pinning the saves' host memory): "
                  f"{1e3 * first_stall:.1f} ms", flush=True)  # fmt: skip
        for step, stall_s, persist_s, nbytes in saves:
            durable = "in host memory only" if persist_s is None else f"durable after {persist_s:.2f} s"
            print(f"train: save of step {step}: {nbytes / 2**30:.2f} GiB on this rank, stall {1e3 * stall_s:.1f} ms, "
                  f"{durable}", flush=True)  # fmt: skip
        if copy_s is not None:
            total = sum(n for *_, n in saves[:1]) or 0
            print(f"train: one pinned device-to-host copy of this rank's checkpointed tensors: {1e3 * copy_s:.1f} ms"
                  + (f" ({total / copy_s / 1e9:.1f} GB/s)" if total else ""), flush=True)  # fmt: skip
    summary = {
        "start": start,
        "steps": args.steps,
        "final_loss": losses[-1] if losses else None,
        "mean_stall_ms": 1e3 * sum(stalls) / len(stalls) if stalls else None,
        "seconds": time.perf_counter() - tic,
    }
    if rank == 0:
        print(f"train: done at step {args.steps}; committed {committed.poll()}", flush=True)
    if log is not None:
        log.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> int:
    train(parse(argv))
    return 0


def read_log(path: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """A ``--log-file``'s records by step, the last record of a step winning (a resumed run
    repeats the steps after its newest commit)."""
    out: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


if __name__ == "__main__":
    sys.exit(main())
