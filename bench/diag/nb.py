# ruff: noqa: E701, E702, E402  (a diagnosis script, kept as it ran on the H200; see README.md here)
import sys
import time

import torch

sys.path.insert(0, "bench")
import cupy as cp
import integration as bi

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


def timed(name, before=None, n=5):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        if before:
            before()
        step()
    torch.cuda.synchronize()
    print(f"{name:<44} {(time.perf_counter() - t0) / n * 1e3:7.1f} ms/step", flush=True)


side = torch.cuda.Stream()
try:
    print(
        "torch side stream flags",
        cp.cuda.runtime.streamGetFlags(side.cuda_stream),
        "current",
        cp.cuda.runtime.streamGetFlags(torch.cuda.current_stream().cuda_stream),
    )
except Exception as e:
    print("no streamGetFlags", e)
nb = cp.cuda.Stream(non_blocking=True)
ev = torch.cuda.Event()


def cupy_nb():
    ev.record(torch.cuda.current_stream())
    nb.wait_event(
        cp.cuda.Event.from_external(ev.cuda_event)
        if hasattr(cp.cuda.Event, "from_external")
        else cp.cuda.Event()
    )
    cp.cuda.runtime.memcpyAsync(dst.data_ptr(), src.data_ptr(), N, cp.cuda.runtime.memcpyDeviceToHost, nb.ptr)


timed("compute only")
timed("+ DMA on a cupy non-blocking stream", cupy_nb)
ts = torch.cuda.Stream()


def tdma():
    ts.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(ts):
        dst.copy_(src, non_blocking=True)


with torch.cuda.stream(torch.cuda.Stream()):  # compute on a non-default torch stream too
    timed("compute on a side stream + DMA on another", tdma)
