"""OffloadedOptimizer (issue 14): the wrapped optimizer's arithmetic on states kept in the tiered
store, spilling to a LocalTier; device "cpu" stands in for the GPU here, the GPU test runs the
same on CUDA with streams."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import gpu, rss_bytes

from fmstore import CapacityError, Checkpointer, ConfigError, HostTier, LocalTier, TieredStore
from fmstore.offload import OffloadedOptimizer

KW = {"lr": 3e-3, "weight_decay": 0.1}


def tiny_transformer(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return torch.nn.Sequential(
        torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.nn.Linear(32, 16)
    )


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, 32, generator=g) for _ in range(n)]


def spilling_store(tmp_path, host: str = "24KiB") -> TieredStore:
    """A host tier too small for the states, so some chunks live on the LocalTier."""
    return TieredStore([HostTier(capacity=host), LocalTier(tmp_path / "spill", fsync=False)])


def train(model, opt, xs, *, clip: float | None = None, sched=None) -> None:
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def step_beside_fp32_masters(model, opt, twin, masters, ropt, x) -> None:
    """One step of ``model`` under ``opt`` and the same step of its low-precision ``twin`` the
    manual way: gradients cast to the fp32 ``masters``, ``ropt`` steps them, copied back."""
    for m in (model, twin):
        m.zero_grad()
        m(x).float().pow(2).mean().backward()
    opt.step()
    for mp, p in zip(masters, twin.parameters()):
        mp.grad = p.grad.float()
    ropt.step()
    with torch.no_grad():
        for mp, p in zip(masters, twin.parameters()):
            p.copy_(mp)


def offloaded(model, store, **kw) -> OffloadedOptimizer:
    return OffloadedOptimizer(
        model.parameters(), torch.optim.AdamW, store=store, device="cpu", chunk_bytes="16KiB", **KW, **kw
    )


@pytest.mark.parametrize("fraction", [0.0, 0.5])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_steps_match_adamw(tmp_path, clip, fraction):
    model, ref = tiny_transformer(), tiny_transformer()
    store = spilling_store(tmp_path)
    opt = offloaded(model, store, device_fraction=fraction)
    ropt = torch.optim.AdamW(ref.parameters(), **KW)
    xs = batches(8)
    train(model, opt, xs, clip=clip)
    train(ref, ropt, xs, clip=clip)
    assert max_diff(model, ref) <= 1e-6
    where = {tier for key in store.keys() for tier in store.where(key)}
    if fraction < 1.0:
        assert where == {"host", "local"}, where  # spilled: both tiers hold states
    stats = opt.stats()
    assert stats["resident_chunks"] == round(fraction * stats["chunks"])
    sd, rsd = opt.state_dict(), ropt.state_dict()
    assert sd["param_groups"] == rsd["param_groups"]
    for i, st in rsd["state"].items():
        assert sd["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert torch.allclose(sd["state"][i][k], v, atol=1e-6, rtol=0), (i, k)
            assert sd["state"][i][k].device.type == "cpu"
    opt.close()


def test_lr_scheduler_drives_the_groups(tmp_path):
    model, ref = tiny_transformer(), tiny_transformer()
    opt = offloaded(model, spilling_store(tmp_path))
    ropt = torch.optim.AdamW(ref.parameters(), **KW)
    xs = batches(6)
    train(model, opt, xs, sched=torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.3))
    train(ref, ropt, xs, sched=torch.optim.lr_scheduler.StepLR(ropt, 2, gamma=0.3))
    assert max_diff(model, ref) <= 1e-6
    opt.close()


def test_overlap_backward_updates_during_backward(tmp_path):
    model, ref = tiny_transformer(), tiny_transformer()
    opt = offloaded(model, spilling_store(tmp_path), overlap_backward=True)
    ropt = torch.optim.AdamW(ref.parameters(), **KW)
    xs = batches(5)
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    model(xs[0]).pow(2).mean().backward()
    # The chunks were updated by the backward pass itself, before step().
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    opt.step()
    train(model, opt, xs[1:])
    train(ref, ropt, xs)
    assert max_diff(model, ref) <= 1e-6
    opt.zero_grad()
    model(xs[0]).sum().backward()
    with pytest.raises(ConfigError, match="call step"):
        model(xs[1]).sum().backward()
    opt.close()


def test_state_dict_round_trips_both_ways(tmp_path):
    model, ref = tiny_transformer(), tiny_transformer()
    opt = offloaded(model, spilling_store(tmp_path / "a"))
    ropt = torch.optim.AdamW(ref.parameters(), **KW)
    xs = batches(6)
    train(model, opt, xs[:3])
    train(ref, ropt, xs[:3])
    # ours -> a plain AdamW, and a plain AdamW's -> a fresh OffloadedOptimizer
    plain_model = copy.deepcopy(model)
    plain = torch.optim.AdamW(plain_model.parameters(), **KW)
    plain.load_state_dict(opt.state_dict())
    model2 = copy.deepcopy(ref)
    opt2 = offloaded(model2, spilling_store(tmp_path / "b"))
    opt2.load_state_dict(ropt.state_dict())
    for m, o in ((model, opt), (ref, ropt), (plain_model, plain), (model2, opt2)):
        train(m, o, xs[3:])
    assert max_diff(model, ref) <= 1e-6
    assert max_diff(plain_model, ref) <= 1e-6
    assert max_diff(model2, ref) <= 1e-6
    opt.close()
    opt2.close()


def test_resume_through_the_checkpointer(tmp_path):
    model = tiny_transformer()
    opt = offloaded(model, spilling_store(tmp_path / "a"))
    xs = batches(6)
    train(model, opt, xs[:3])
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(3, {"model": model, "optim": opt})
    train(model, opt, xs[3:])
    opt.close()

    fresh = tiny_transformer(seed=5)
    opt2 = offloaded(fresh, spilling_store(tmp_path / "b"))
    with Checkpointer(tmp_path / "ck") as ck:
        ck.load({"model": fresh, "optim": opt2})
    train(fresh, opt2, xs[3:])
    assert max_diff(fresh, model) <= 1e-6
    opt2.close()


def test_low_precision_parameters_keep_fp32_masters(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).bfloat16()
    twin = copy.deepcopy(model)
    masters = [p.detach().float().clone().requires_grad_() for p in twin.parameters()]
    ropt = torch.optim.AdamW(masters, **KW)
    opt = offloaded(model, spilling_store(tmp_path, host="8KiB"))
    for x in batches(5):
        step_beside_fp32_masters(model, opt, twin, masters, ropt, x.bfloat16())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert max_diff(model, twin) == 0.0
    sd = opt.state_dict()
    for i, mp in enumerate(masters):
        assert sd["state"][i]["master"].dtype == torch.float32
        assert torch.equal(sd["state"][i]["master"], mp.detach())
    opt.close()


def test_bad_input_fails_before_anything_is_touched(tmp_path):
    model = tiny_transformer()
    before = [p.detach().clone() for p in model.parameters()]
    store = spilling_store(tmp_path)
    with pytest.raises(ConfigError, match="not a leaf"):
        OffloadedOptimizer([model[1].weight * 2], store=store, device="cpu")
    with pytest.raises(ConfigError, match="element-wise"):
        OffloadedOptimizer(model.parameters(), torch.optim.Adafactor, store=store, device="cpu")
    with pytest.raises(ConfigError, match="LBFGS"):
        OffloadedOptimizer(model.parameters(), torch.optim.LBFGS, store=store, device="cpu", elementwise=True)
    with pytest.raises(ConfigError, match="device_fraction"):
        OffloadedOptimizer(model.parameters(), store=store, device="cpu", device_fraction=1.5)
    with pytest.raises(ConfigError, match="TieredStore"):
        OffloadedOptimizer(model.parameters(), store={}, device="cpu")  # type: ignore[arg-type]
    small = TieredStore([HostTier(capacity="4KiB")])
    with pytest.raises(CapacityError, match="durable tier"):
        OffloadedOptimizer(model.parameters(), store=small, device="cpu")
    assert len(store) == 0 and len(small) == 0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_is_flat_over_100_steps(tmp_path):
    model = tiny_transformer()
    store = spilling_store(tmp_path)
    opt = offloaded(model, store)
    xs = batches(4)
    train(model, opt, xs * 3)
    keys, rss = len(store), rss_bytes()
    pool = store.tiers[0].stats()
    train(model, opt, xs * 25)  # 100 steps more
    assert len(store) == keys
    assert store.tiers[0].stats()["used"] == pool["used"]
    assert not opt._loads and not opt._writes
    assert rss_bytes() < rss * 1.05, (rss, rss_bytes())
    opt.close()


@gpu
def test_cuda_bf16_fused_matches_fp32_masters(tmp_path):
    torch.manual_seed(0)
    dev = "cuda"
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)]).to(dev, torch.bfloat16)
    twin = copy.deepcopy(model)
    masters = [p.detach().float().clone().requires_grad_() for p in twin.parameters()]
    ropt = torch.optim.AdamW(masters, fused=True, **KW)
    store = TieredStore([HostTier(capacity="1MiB"), LocalTier(tmp_path / "spill")])
    opt = OffloadedOptimizer(
        model.parameters(), torch.optim.AdamW, store=store, device=dev, chunk_bytes="256KiB",
        fused=True, overlap_backward=True, **KW,
    )  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 256, device=dev, generator=g, dtype=torch.bfloat16)
        step_beside_fp32_masters(model, opt, twin, masters, ropt, x)
    torch.cuda.synchronize()
    assert max_diff(model, twin) == 0.0
    assert opt.stats()["bytes_to_device"] > 0
    opt.close()
