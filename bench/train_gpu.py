"""The training job (``fmstore.integrations.train``) on one GPU: what checkpointing costs a step.

Runs, each a fresh ``torchrun --nproc-per-node 1`` (NCCL, FSDP2 with bf16 compute and fp32
masters, AdamW), on the same model and data:

- checkpoints off: the step time to compare with;
- the root every ``--k`` steps (a user's choice), with a pinned-copy measurement of the same
  bytes: the floor of a save's stall;
- the root every step (k = 1);
- a crash (SIGKILL with a save in flight) and a resume of the k run.

Prints each run's median step time, the overhead against "off", each save's stall and the time
until it was durable, and the resume's loss curve against the uninterrupted one.

    python3 bench/train_gpu.py --size 1b --root /tmp/fmstore-bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(root: Path, name: str, job: list[str], *extra: str) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    cmd += ["-m", "fmstore.integrations.train", "--root", str(root / name), *job, *extra]
    cmd += ["--log-file", str(root / f"{name}.jsonl")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("train:", "step "))]
    print(f"--- {name} (exit {proc.returncode}, {time.perf_counter() - t0:.0f} s)\n" + "\n".join(lines), flush=True)
    if proc.returncode not in (0, 1) or (proc.returncode and "crashing" not in proc.stdout):
        print(proc.stderr[-4000:], flush=True)
    return proc.stdout, time.perf_counter() - t0


def mean_step(out: str) -> float:
    m = re.search(r"mean step ([\d.]+) ms", out)
    return float(m.group(1)) if m else float("nan")


def raw_disk_write(root: Path, nbytes: int = 4 << 30) -> float:
    """GB/s of one file written in 64 MiB blocks and fsync'd: the disk's raw limit, this run."""
    block = os.urandom(64 << 20)
    path = root / "raw-write.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="/tmp/fmstore-bench-train")
    p.add_argument("--size", default="1b")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--crash-at-step", type=int, default=25)
    p.add_argument("--k1-steps", type=int, default=5)
    a = p.parse_args()
    root = Path(a.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    job = ["--size", a.size, "--seq-len", str(a.seq_len), "--global-batch", str(a.global_batch),
           "--dtype", "bfloat16", "--lr", "3e-4", "--threads", "8", "--log-every", "10", "--host-memory", "0",
           "--keep-last", "2"]  # fmt: skip
    disk = raw_disk_write(root)
    print(f"raw disk write (fsync'd, 4 GiB): {disk:.2f} GB/s", flush=True)
    off, _ = run(root, "off", job + ["--steps", str(a.steps)], "--no-checkpoint")
    every_k, _ = run(root, f"k{a.k}", job + ["--steps", str(a.steps), "--every", str(a.k)], "--measure-copy")
    shutil.rmtree(root / f"k{a.k}")  # the disk holds a few snapshots of a 1 B model, not all
    every_1, _ = run(root, "k1", job + ["--steps", str(a.k1_steps), "--every", "1"])
    shutil.rmtree(root / "k1")
    crash, _ = run(root, "crash", job + ["--steps", str(a.steps), "--every", str(a.k)], "--crash-at-step", str(a.crash_at_step))
    resumed, _ = run(root, "crash", job + ["--steps", str(a.steps), "--every", str(a.k)])
    base = mean_step(off)
    print("\n== summary ==")
    print(f"raw disk write {disk:.2f} GB/s")
    for name, out in (("off", off), (f"every {a.k}", every_k), ("every 1", every_1)):
        ms = mean_step(out)
        print(f"{name:>10}: mean step {ms:8.1f} ms (saves' stalls included)  overhead {100 * (ms / base - 1):+7.1f}%")
    ref = {r["step"]: r["loss"] for r in map(json.loads, (root / f"k{a.k}.jsonl").read_text().splitlines())}
    got: dict[int, float] = {}
    for r in map(json.loads, (root / "crash.jsonl").read_text().splitlines()):
        got[r["step"]] = r["loss"]
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref if s in got)
    print(f"crash at step {a.crash_at_step}, resumed: {len(got)} steps logged, largest relative loss "
          f"difference to the uninterrupted run {worst:.2e}; final loss {got.get(a.steps)} vs {ref.get(a.steps)}")  # fmt: skip


if __name__ == "__main__":
    main()
