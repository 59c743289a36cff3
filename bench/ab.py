"""Two checkouts of fmstore side by side on the same data: save stall, time until durable and an
in-place load of the same GPU (or CPU) state, each checkout in fresh processes, alternating.

For refactors that must not change performance (issue 28): pass the tree before and the tree
after (e.g. two ``git archive`` extractions).  Each round runs one child per tree, in rotated
order; a child saves the state ``--saves`` times (one process, the root on ``--dir``), then
loads the last step in place; medians over children are compared.

    python3 bench/ab.py --before .snap_before --after .snap --state-size 8GiB --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, shutil, statistics, sys, time
import torch
from fmstore import Checkpointer
nbytes, saves, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dev = "cuda" if torch.cuda.is_available() else "cpu"
n = 64
per = nbytes // n // 2
gen = torch.Generator(device="cpu").manual_seed(0)
state = {f"w{i}": torch.randn(per, generator=gen).to(torch.bfloat16).to(dev) for i in range(n)}
stalls, durables = [], []
with Checkpointer(root) as ck:
    ck.reserve(state)
    for step in range(1, saves + 1):
        for t in state.values():
            t.add_(1)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = ck.save(step, state, block=False)
        stalls.append(time.perf_counter() - t0)
        h.wait()
        durables.append(time.perf_counter() - t0)
    target = {k: torch.empty_like(v) for k, v in state.items()}
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ck.load(target)
    if dev == "cuda":
        torch.cuda.synchronize()
    load = time.perf_counter() - t0
    assert all(torch.equal(target[k], state[k]) for k in state)
print(json.dumps({"stall": statistics.median(stalls), "durable": statistics.median(durables), "load": load,
                  "fmstore": __import__("fmstore").__file__}))
"""


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for u, m in units.items():
        if text.endswith(u):
            return int(float(text[: -len(u)]) * m)
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--state-size", default="1GiB")
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    nbytes = parse_size(a.state_size)
    trees = {"before": os.path.abspath(a.before), "after": os.path.abspath(a.after)}
    got: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for r in range(a.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            with tempfile.TemporaryDirectory(dir=a.dir) as root:
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([trees[name], os.environ.get("PYTHONPATH", "")]))
                t0 = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(nbytes), str(a.saves), root],
                    env=env, cwd=trees[name], capture_output=True, text=True,
                )  # fmt: skip
                if out.returncode:
                    print(name, out.stderr[-3000:], flush=True)
                    continue
                m = json.loads(out.stdout.strip().splitlines()[-1])
                assert m["fmstore"].startswith(trees[name]), m["fmstore"]
                got[name].append(m)
                print(f"round {r} {name:>6}: stall {m['stall'] * 1e3:8.1f} ms  durable {m['durable']:6.2f} s  "
                      f"load {m['load']:6.2f} s  ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    print(f"\n{nbytes / 2**30:.2f} GiB state, medians over {a.rounds} rounds (after / before):")
    for key, unit, scale in (("stall", "ms", 1e3), ("durable", "s", 1), ("load", "s", 1)):
        b = statistics.median(m[key] for m in got["before"]) * scale
        f = statistics.median(m[key] for m in got["after"]) * scale
        print(f"  {key:>8}: before {b:9.2f} {unit}  after {f:9.2f} {unit}  ratio {f / b:5.2f}")


if __name__ == "__main__":
    main()
