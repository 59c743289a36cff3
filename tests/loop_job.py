"""A hand-written training loop checkpointed by fmstore.integrations.loop (run by test_integration_loop).

python loop_job.py ROOT OUT [--steps N] [--sigterm-at K [--sigterm-rank R]] [--world W --port P]

SIGTERMs itself (rank R) during step K.  With --world W it starts W rank processes (gloo,
replicated model as under DDP) and exits with the highest exit status among them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import torch
from fmstore.integrations.loop import LoopCheckpointer
from safetensors.torch import save_file

from fmstore import RNGState


def run(args: argparse.Namespace) -> None:
    rank = args.rank
    if args.world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = LoopCheckpointer(args.root, {"model": model, "optim": opt, "rng": RNGState()}, every=3)
    start = ckpt.resume()
    print(f"rank {rank}: start {start}", flush=True)
    for step in range(start + 1, args.steps + 1):
        x = torch.randn(16, 8)  # from the RNG: it must be restored for a bit-exact resume
        model(x).sub(x.roll(1, 1)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step == args.sigterm_at and rank == args.sigterm_rank:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice arrives mid-step
        ckpt.step(step)
    ckpt.close()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sigterm-at", type=int, default=-1)
    ap.add_argument("--sigterm-rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--rank", type=int, default=None)
    args = ap.parse_args()
    if args.world == 1 or args.rank is not None:
        args.rank = args.rank or 0
        run(args)
        return
    procs = [
        subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--rank", str(r)])
        for r in range(args.world)
    ]
    raise SystemExit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
