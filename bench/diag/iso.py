# ruff: noqa: E701, E702, E402  (a diagnosis script, kept as it ran on the H200; see README.md here)
import sys
import threading
import time

import torch

sys.path.insert(0, "bench")
import integration as bi

from fmstore import Checkpointer, Policy

m = bi.make_model("1b")
o = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
x = torch.randint(0, 32000, (16, 1024), device="cuda")


def step():
    m(input_ids=x, labels=x).loss.backward()
    o.step()
    o.zero_grad(set_to_none=True)


for _ in range(3):
    step()
N = 6 << 30
src = torch.empty(N, dtype=torch.uint8, device="cuda")
dst = torch.empty(N, dtype=torch.uint8, pin_memory=True)
side = torch.cuda.Stream()


def timed(name, before=None, n=6):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        if before:
            before()
        step()
    torch.cuda.synchronize()
    print(f"{name:<34} {(time.perf_counter() - t0) / n * 1e3:7.1f} ms/step", flush=True)


timed("E1 compute only")


def one_copy():
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dst.copy_(src, non_blocking=True)


timed("E2 + one 6 GiB D2H on a side stream", one_copy)


def fed():
    side.wait_stream(torch.cuda.current_stream())

    def run():
        with torch.cuda.stream(side):
            evs = []
            for a in range(0, N, 64 << 20):
                dst[a : a + (64 << 20)].copy_(src[a : a + (64 << 20)], non_blocking=True)
                e = torch.cuda.Event()
                e.record(side)
                evs.append(e)
                if len(evs) > 1:
                    evs.pop(0).synchronize()

    threading.Thread(target=run).start()


timed("E3 + fed in 64 MiB groups", fed)


def noitem():
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dst.copy_(src, non_blocking=True)


m.config._attn_implementation = "sdpa"
import transformers.masking_utils as mu

mu.find_packed_sequence_indices = lambda position_ids: None  # no .item() sync in the forward
timed("E4 = E2 without forward's .item()", noitem)
timed("E1b compute only, no .item()")
ck = Checkpointer("/tmp/iso", policy=Policy(host_memory=1, every=10**6))
c = [0]


def save():
    c[0] += 1
    ck.save(c[0], {"model": m, "optim": o}, block=False)


timed("E5 fmstore save(block=False)", save, n=8)
timed("E5 again", save, n=8)
