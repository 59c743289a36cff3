"""The checkpoint half of ``make demo``: a small model trained with async checkpoints, killed
mid-run, resumed from its newest committed snapshot, then inspected.

The training runs in a child process that SIGKILLs itself (no clean-up, a save possibly
half-written); a second child resumes.  The resumed run's final weights are compared, bit
for bit, with a run that was never interrupted: model, optimizer, RNG and data position all
come back from the snapshot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from .checkpoint import Checkpointer, Level, Policy, RNGState
from .units import format_size

STEPS = 30


def policy(data: str) -> Policy:
    # Newest snapshot in host memory, every 5th step to the local directory, every 10th to
    # the "object" level (a directory here; an s3:// URL in real use).
    return Policy(
        host_memory=1, every=5, levels=[Level(os.path.join(data, "ckpt-object"), every=10, name="object")]
    )


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 32))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def batch(position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data loader: batch ``position`` of a deterministic stream."""
    g = torch.Generator().manual_seed(1000 + position)
    x = torch.randn(64, 32, generator=g)
    return x, x.roll(1, dims=1)


def training_state(model: torch.nn.Module, opt: torch.optim.Optimizer, position: int) -> dict:
    # The model, the optimizer and the RNG are Stateful: saved through state_dict(), restored
    # in place through load_state_dict() (a fresh optimizer included).
    return {"model": model, "optim": opt, "rng": RNGState(), "loader": {"position": position}}


def train(
    data: str | None, stop: int, *, resume: bool = False, crash_at: int | None = None
) -> dict[str, torch.Tensor]:
    """Train to step ``stop`` (checkpointing under ``data`` when given); the final weights."""
    model, opt = make_model()
    ck = Checkpointer(os.path.join(data, "ckpt-local"), keep_last=2, policy=policy(data)) if data else None
    start = 0
    if ck is not None and resume:
        # Model, optimizer and RNG are restored in place; the loader position comes back as a value.
        restored = ck.load(training_state(model, opt, 0))
        start = restored["loader"]["position"]
        print(f"  resumed from step {start}, read from level {ck.where(start)[0]!r}", flush=True)
    for step in range(start + 1, stop + 1):
        x, y = batch(step)
        noise = torch.randn(64, 32) * 0.01  # uses the RNG, so the RNG state must come back too
        loss = torch.nn.functional.mse_loss(model(x + noise), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if ck is not None:
            if step == crash_at:
                print(
                    f"  step {step}: loss {loss.item():.4f}; SIGKILL while step {step} is persisting",
                    flush=True,
                )
            handle = ck.save(step, training_state(model, opt, step))
            if step == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up: the save is half-way
            if step % 5 == 0:
                print(
                    f"  step {step}: loss {loss.item():.4f}  stall {handle.stall_seconds * 1e3:.1f} ms",
                    flush=True,
                )
    if ck is not None:
        ck.close()
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_child(data: str, *args: str) -> int:
    cmd = [sys.executable, "-m", "fmstore.demo_training", "--data", data, *args]
    return subprocess.run(cmd, check=False).returncode


def demo(data: str) -> int:
    """Train, crash, resume, compare with an uninterrupted run, inspect the snapshots."""
    for sub in ("ckpt-local", "ckpt-object"):
        shutil.rmtree(os.path.join(data, sub), ignore_errors=True)
    print(f"\nfmstore demo, part 2: training {STEPS} steps with async checkpoints (host memory every step,")
    print(f"  {data}/ckpt-local every 5th step (keep 2), {data}/ckpt-object every 10th)")
    rc = run_child(data, "--stop", str(STEPS), "--crash-at", "25")
    print(f"  the training process died (exit status {rc}: killed by signal {-rc})")
    if rc != -signal.SIGKILL:
        print("expected the training process to be killed")
        return 1
    t0 = time.perf_counter()
    rc = run_child(data, "--resume", "--stop", str(STEPS))
    if rc != 0:
        return rc
    print(f"  resumed run finished ({time.perf_counter() - t0:.1f} s)")

    expected = train(None, STEPS)
    with Checkpointer(os.path.join(data, "ckpt-local"), keep_last=2, policy=policy(data)) as ck:
        print("\nsnapshots:")
        for level in ("local", "object"):
            print(f"  {level:<7} steps {ck.steps(level)}")
        m = ck.manifest()
        files = sorted(m.referenced_files())
        total = sum(s.end - s.begin for e in m.tensors.values() for s in e.shards)
        print(f"  newest: step {m.step}, {len(m.tensors)} tensors, {format_size(total)} in {files}")
        got = ck.load()["model"]
    same = all(torch.equal(got[k], v) for k, v in expected.items())
    print(
        f"  resumed weights {'==' if same else '!='} weights of an uninterrupted {STEPS}-step run (bit-exact)"
    )
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop", type=int, default=STEPS)
    ap.add_argument("--crash-at", type=int, default=None)
    args = ap.parse_args(argv)
    train(args.data, args.stop, resume=args.resume, crash_at=args.crash_at)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
