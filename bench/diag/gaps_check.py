"""Round trip of a block=False save with the "gaps" pacing (staging.FEED): the deferred
device-to-host copies queued at once with idle kernels between groups (H200 check)."""

import torch

from fmstore import Checkpointer, Policy
from fmstore.checkpoint import staging

staging.FEED = "gaps"
g = torch.Generator(device="cuda").manual_seed(0)
m = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, device="cuda") for _ in range(8)])
o = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
m(torch.randn(64, 2048, device="cuda")).sum().backward()
o.step()
want = {k: v.detach().clone() for k, v in m.state_dict().items()}
with Checkpointer("/tmp/gaps-check", policy=Policy(host_memory=1, every=10**6)) as ck:
    h = ck.save(1, {"model": m, "optim": o}, block=False)
    m(torch.randn(64, 2048, device="cuda")).sum().backward()
    o.step()  # waits for the staged copies before changing the parameters
    h.wait()
    back = ck.load(step=1)["model"]
    same = all(torch.equal(back[k].cuda(), want[k]) for k in want)
    print(f"gaps pacing round trip: {len(want)} tensors equal: {same}")
    assert same
