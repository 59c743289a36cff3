"""``make demo``: the main job, end to end, on this machine's CPUs.

1. :mod:`fmstore.integrations.train` on 2 processes (torchrun, FSDP2 over gloo) with async
   checkpoints (host memory every step, ``./fmstore-data/demo/ckpt`` every ``--every`` steps),
   one rank SIGKILLed mid-run with a save in flight;
2. the same command resumed on 1 process from the newest committed snapshot, to the end;
3. an uninterrupted 2-process run of the same job, for comparison;
4. the summary: the loss curve before and after the crash against the uninterrupted one (a
   text table, and ``loss.png`` when matplotlib is installed), the checkpoint stall against
   the step time, and the snapshot listing from ``fmstore ls``.

Nothing outside ``--data`` (default ``./fmstore-data/demo``) is touched; no server, no GPU.

    python -m fmstore.integrations.demo [--steps 60] [--every 10] [--crash-at-step 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fmstore.integrations.train import read_log

from fmstore.storage import remove_local

__all__ = ["main"]


def _run(cmd: list[str], label: str) -> tuple[int, float, str]:
    print(f"\n$ {' '.join(cmd[2:] if cmd[1] == '-m' else cmd)}   # {label}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:  # the job's own lines, without torchrun's warnings
        lines.append(line)
        if line.startswith(("train:", "step ")):
            print("  " + line, end="", flush=True)
    return proc.wait(), time.perf_counter() - t0, "".join(lines)


def _train(data: Path, name: str, ranks: int, args: argparse.Namespace, *extra: str) -> list[str]:
    job = ["-m", "fmstore.integrations.train", "--root", str(data / name), "--steps", str(args.steps)]
    job += ["--every", str(args.every), "--log-every", str(args.log_every)]
    job += ["--log-file", str(data / f"{name}.jsonl"), *extra]
    if ranks == 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *job]


def _plot(path: Path, run: dict[int, dict[str, Any]], ref: dict[int, dict[str, Any]], resumed_at: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = sorted(ref)
    ax.plot(steps, [ref[s]["loss"] for s in steps], color="0.6", lw=3, label="uninterrupted (2 ranks)")
    before = [s for s in sorted(run) if s <= resumed_at]
    after = [s for s in sorted(run) if s > resumed_at]
    ax.plot(before, [run[s]["loss"] for s in before], color="C0", lw=1.2, label="before the crash (2 ranks)")
    ax.plot(after, [run[s]["loss"] for s in after], color="C3", lw=1.2, label="resumed (1 rank)")
    ax.axvline(resumed_at, color="C3", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title("crash, resume on another world size: the curve continues")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fmstore.integrations.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fmstore-data/demo", help="everything the demo writes goes here")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10, help="the root takes every k-th step")
    p.add_argument("--crash-at-step", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    data = Path(args.data)
    remove_local(data)  # a fresh run each time: committed steps are never overwritten
    data.mkdir(parents=True)
    t_start = time.perf_counter()

    code, secs, out = _run(_train(data, "ckpt", 2, args, "--crash-at-step", str(args.crash_at_step)),
                           f"2 ranks, one SIGKILLed at step {args.crash_at_step}")  # fmt: skip
    if code == 0 or f"crashing at step {args.crash_at_step}" not in out:
        print(out[-3000:], file=sys.stderr)
        print(f"demo: the first run was to be killed at step {args.crash_at_step}; it was not", file=sys.stderr)
        return 1
    print(f"  -> killed (torchrun exit status {code}) after {secs:.1f} s", flush=True)
    code, secs, out = _run(_train(data, "ckpt", 1, args), "the same command on 1 process: resumes")
    if code != 0:
        print(out[-3000:], file=sys.stderr)
        return 1
    resumed_at = int(out.split("resumed from step ")[1].split(",")[0]) if "resumed from step " in out else 0
    code, secs, out = _run(_train(data, "reference", 2, args), "an uninterrupted run, for comparison")
    if code != 0:
        print(out[-3000:], file=sys.stderr)
        return 1

    run, ref = read_log(data / "ckpt.jsonl"), read_log(data / "reference.jsonl")
    print("\n== loss curve (every row: the loss logged at that step) ==")
    print(f"{'step':>5}  {'ranks':>5}  {'this run':>9}  {'uninterrupted':>13}  {'rel. diff':>9}")
    for step in sorted(ref):
        if step % args.log_every and step not in (1, resumed_at, resumed_at + 1):
            continue
        r, u = run[step], ref[step]
        mark = "   <- resumed here on 1 rank" if step == resumed_at + 1 else ""
        print(f"{step:>5}  {r['world']:>5}  {r['loss']:>9.4f}  {u['loss']:>13.4f}  "
              f"{abs(r['loss'] - u['loss']) / u['loss']:>9.1e}{mark}")  # fmt: skip
    worst = max(abs(run[s]["loss"] - ref[s]["loss"]) / ref[s]["loss"] for s in ref)
    same_batches = all(run[s]["batch"] == ref[s]["batch"] for s in ref)
    print(f"largest relative difference {worst:.1e} (float32 sums in another order on 1 rank); "
          f"same batches at every step: {same_batches}")  # fmt: skip
    png = data / "loss.png"
    if _plot(png, run, ref, resumed_at):
        print(f"plot: {png}")
    else:
        print("plot: pip install matplotlib (fmstore[demo]) to draw loss.png")

    stalls = [r["stall_s"] for s, r in sorted(run.items()) if s < args.steps]
    steps_s = [r["step_s"] - r["stall_s"] for r in run.values()]
    med_stall, med_step = statistics.median(stalls), statistics.median(steps_s)
    print("\n== checkpoint cost (a save every step: host memory; the root every "
          f"{args.every} steps) ==")  # fmt: skip
    print(f"median step {med_step * 1e3:.1f} ms, median save stall {med_stall * 1e3:.1f} ms "
          f"({100 * med_stall / med_step:.0f}% of a step), worst stall {max(stalls) * 1e3:.1f} ms")  # fmt: skip

    print("\n== snapshots: fmstore ls", data / "ckpt", "==", flush=True)
    subprocess.run([sys.executable, "-m", "fmstore.cli", "ls", str(data / "ckpt")], check=False)
    print(f"\ndemo done in {time.perf_counter() - t_start:.0f} s; everything is under {data}/ "
          f"(fmstore inspect {data / 'ckpt'} shows one snapshot's tensors)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
