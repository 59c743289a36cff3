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
ker = cp.RawKernel(
    r"""extern "C" __global__ void cp16(const uint4* s, uint4* d, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) d[i] = s[i]; }""",
    "cp16",
)


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
for prio in (-1, 0):
    s = torch.cuda.Stream(priority=prio)

    def dma(s=s):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)

    timed(f"+ DMA copy, stream priority {prio}", dma)
side = torch.cuda.Stream()
for blocks in (16, 64, 264):

    def zc(blocks=blocks):
        side.wait_stream(torch.cuda.current_stream())
        with cp.cuda.ExternalStream(side.cuda_stream):
            ker((blocks,), (512,), (src.data_ptr(), dst.data_ptr(), N // 16))

    side.synchronize()
    torch.cuda.synchronize()
    a = time.perf_counter()
    zc()
    side.synchronize()
    t = time.perf_counter() - a
    print(f"zero-copy kernel {blocks} blocks alone: {N / t / 1e9:.1f} GB/s", flush=True)
    src.random_(0, 255)
    zc()
    side.synchronize()
    assert torch.equal(dst[: 1 << 20], src[: 1 << 20].cpu()) and torch.equal(
        dst[-(1 << 20) :], src[-(1 << 20) :].cpu()
    )
    timed(f"+ zero-copy kernel, {blocks} blocks", zc)
