# ruff: noqa: E701, E702, E402  (a diagnosis script, kept as it ran on the H200; see README.md here)
import sys
import time

import torch

sys.path.insert(0, "bench")
import integration as bi

from fmstore import Checkpointer, Policy
from fmstore.checkpoint import staging

m = bi.make_model("1b")
o = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
x = torch.randint(0, 32000, (16, 1024), device="cuda")


def step():
    m(input_ids=x, labels=x).loss.backward()
    o.step()
    o.zero_grad(set_to_none=True)


for _ in range(3):
    step()


def timed(name, before=None, n=5):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        if before:
            before()
        step()
    torch.cuda.synchronize()
    print(f"{name:<40} {(time.perf_counter() - t0) / n * 1e3:7.1f} ms/step", flush=True)


timed("compute only")
ck = Checkpointer("/tmp/feed", policy=Policy(host_memory=1, every=10**6))
c = [0]


def save():
    c[0] += 1
    ck.save(c[0], {"model": m, "optim": o}, block=False)


for mb in (64, 16):
    staging.FEED_BYTES = mb << 20
    timed(f"fmstore save(block=False), {mb} MiB groups", save, n=6)
    timed("  again", save, n=6)
