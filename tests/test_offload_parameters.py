"""Parameter offload (fmstore.offload.offload_parameters): results match the plain model, in
inference and training, within the device budget, with prefetch used and nothing growing."""

from __future__ import annotations

import copy
import gc
import math
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import rss_bytes
from torch import nn

import fmstore
from fmstore import HostTier, LocalTier, TieredStore
from fmstore.offload import OffloadedParameters, offload_parameters

ATOL = 1e-6
# Host tier smaller than the models: some units spill to the local tier.
HOST_CAPACITY = 8 * 1024


class Attention(nn.Module):
    """Hand-written causal self-attention (nn.MultiheadAttention reads out_proj.weight
    without calling out_proj, which parameter offload cannot see)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=2)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.BatchNorm1d(32),  # buffers (running stats) stay on the device, updated in training
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 8),
    )


def mlp_data() -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    return x, lambda out: out.square().mean()


def transformer_data() -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    target = torch.randint(0, 11, (3, 5), generator=g)
    return ids, lambda out: nn.functional.cross_entropy(out.reshape(-1, 11), target.reshape(-1))


MODELS = {"mlp": (mlp, mlp_data), "transformer": (TinyTransformer, transformer_data)}


def unit_bytes(model: nn.Module) -> list[int]:
    return [
        sum(p.numel() * p.element_size() for p in m._parameters.values() if p is not None)
        for m in model.modules()
        if any(p is not None for p in m._parameters.values())
    ]


def budget_for(model: nn.Module) -> int:
    """Room for the largest unit and about two more: prefetch has to fit, but not everything."""
    sizes = sorted(unit_bytes(model), reverse=True)
    assert sum(sizes) > sum(sizes[:3]), "the model must not fit the budget whole"
    return sum(sizes[:3])


@pytest.fixture
def store(tmp_path: Path):
    s = TieredStore(
        [HostTier(capacity=HOST_CAPACITY, pinned=False), LocalTier(tmp_path / "spill", fsync=False)]
    )
    yield s
    s.close(flush=False)


def pair(kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ref = MODELS[kind][0]()
    return ref, copy.deepcopy(ref)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_matches_plain_model(store: TieredStore, kind: str, mode: str) -> None:
    ref, model = pair(kind)
    ref.eval()
    model.eval()
    x, _ = MODELS[kind][1]()
    h = offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        expected = ref(x)
        for _ in range(3):  # the first forward records the order; later ones prefetch by it
            assert_close(model(x), expected)
    s = h.stats()
    assert s["units"] == len(unit_bytes(ref))
    assert s["peak_resident_bytes"] <= h.budget
    assert s["prefetch_hits"] > 0
    assert s["resident_bytes"] == 0  # everything released after its forward
    store.flush()
    tiers = store.stats()["tiers"]
    assert tiers[1]["entries"] > 0, "nothing spilled to the local tier"  # type: ignore[index]
    assert tiers[0]["entries"] > 0 and tiers[0]["used"] <= HOST_CAPACITY  # type: ignore[index]


@pytest.mark.parametrize("kind", MODELS)
def test_gradients_match_and_accumulate_on_host(store: TieredStore, kind: str) -> None:
    ref, model = pair(kind)
    x, loss_fn = MODELS[kind][1]()
    h = offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    for _ in range(2):  # two backward passes: gradients accumulate
        loss_fn(ref(x)).backward()
        out = model(x)
        # weights saved for the backward are tokens, not tensors
        assert sum(u.unpacks_due for u in h._units) > 0
        fetches = h.stats()["fetches"]
        loss_fn(out).backward()
        assert h.stats()["fetches"] > fetches, "the backward fetched no weights"
        assert all(u.unpacks_due == 0 for u in h._units)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.is_leaf and p.device.type == "cpu", name
        assert p.grad is not None and p.grad.device.type == "cpu", name
        assert_close(p.grad, q.grad)
    s = h.stats()
    assert s["peak_resident_bytes"] <= h.budget
    assert s["prefetch_hits"] > 0


@pytest.mark.parametrize("kind", MODELS)
def test_adamw_training_matches_plain_model(store: TieredStore, kind: str) -> None:
    ref, model = pair(kind)
    x, loss_fn = MODELS[kind][1]()
    h = offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            loss_fn(m(x)).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p, q)
    for b, c in zip(model.buffers(), ref.buffers()):  # BatchNorm running stats
        assert_close(b, c)
    # The store holds the updated values (written back automatically before each fetch; sync()
    # catches up on the units not fetched since the last step).
    h.sync()
    for u in h._units:
        flat = store.get(next(iter(u.keys.values())))
        expect = torch.cat([s.param.detach().reshape(-1) for s in u.slots])
        assert torch.equal(flat, expect), u.name
    assert h.stats()["writebacks"] >= 5 * len(h._units)
    assert h.stats()["peak_resident_bytes"] <= h.budget
    with torch.no_grad():
        model.eval()
        ref.eval()
        assert_close(model(x), ref(x))


def test_prefetch_zero_and_tight_budget(store: TieredStore) -> None:
    ref, model = pair("transformer")
    x, loss_fn = transformer_data()
    budget = max(unit_bytes(model))  # one unit at a time
    h = offload_parameters(model, store=store, device="cpu", budget=budget, prefetch=0)
    loss_fn(ref(x)).backward()
    loss_fn(model(x)).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad)
    s = h.stats()
    assert s["prefetch_hits"] == 0 and s["prefetches"] == 0
    assert s["peak_resident_bytes"] <= budget


def test_graph_dropped_without_backward(store: TieredStore) -> None:
    _, model = pair("mlp")
    x, loss_fn = mlp_data()
    h = offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    loss = loss_fn(model(x))
    assert sum(u.unpacks_due for u in h._units) > 0
    del loss
    gc.collect()
    assert all(u.unpacks_due == 0 for u in h._units)


def test_no_growth_over_100_steps(store: TieredStore) -> None:
    _, model = pair("transformer")
    x, loss_fn = transformer_data()
    h = offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(x)).backward()
        opt.step()

    def footprint() -> tuple[object, ...]:
        store.flush()  # demotions in flight hold host buffers for a while
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
            warnings.simplefilter("ignore")
            # uint8 tensors are the host tier's buffers, which vary with which units it holds
            tensors = sum(
                1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dtype != torch.uint8
            )
        hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
        return (
            len(store),
            store.stats()["keys"],
            tensors,
            hooks,
            len(h._resident) + len(h._pending) <= len(h._units),
            len(h._ptrs) <= len(h._units),
            len(h._hook_ctx),
            len(h._handles),
            sum(u.unpacks_due for u in h._units),
        )

    for _ in range(3):  # optimizer state and the recorded order come into being
        step()
    before, rss = footprint(), rss_bytes()
    for _ in range(100):
        step()
    assert footprint() == before
    assert rss_bytes() < rss * 1.05, (rss, rss_bytes())
    assert h.stats()["peak_resident_bytes"] <= h.budget


def test_remove_restores_plain_model(store: TieredStore) -> None:
    ref, model = pair("mlp")
    x, loss_fn = mlp_data()
    h = offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    loss_fn(model(x)).backward()
    loss_fn(ref(x)).backward()  # BatchNorm's running stats move the same way
    h.remove()
    h.remove()  # idempotent
    assert len(store) == 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(isinstance(p, nn.Parameter) and p.is_leaf for p in model.parameters())
    with torch.no_grad():
        ref.eval()
        model.eval()
        assert_close(model(x), ref(x))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad)
    # offloading again is allowed after remove()
    h2 = offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    h2.remove()


def offloaded_mlp_in_eval(
    store: TieredStore,
) -> tuple[nn.Module, nn.Module, torch.Tensor, OffloadedParameters]:
    """The mlp pair in eval mode, the second offloaded with room for all of it, and an input."""
    ref, model = pair("mlp")
    ref.eval()
    model.eval()
    x, _ = mlp_data()
    return ref, model, x, offload_parameters(model, store=store, device="cpu", budget=budget_for(model))


def test_failing_forward_and_unit_called_alone(store: TieredStore) -> None:
    ref, model, x, h = offloaded_mlp_in_eval(store)
    with pytest.raises(RuntimeError):
        model(torch.randn(6, 15))  # wrong width: the first unit's forward raises
    # nothing left entered or counted as in a forward (prefetches of the next units may wait)
    assert not h._hook_ctx and not h._resident and all(u.active == 0 for u in h._units)
    assert all(isinstance(p, nn.Parameter) for m in model.modules() for p in m._parameters.values())
    with torch.no_grad():
        assert_close(model(x), ref(x))
    # a unit called on its own, with gradients: still fetched, packed and sent to the host
    y = torch.randn(6, 32)
    model[5](y).sum().backward()
    ref[5](y).sum().backward()
    assert_close(model[5].weight.grad, ref[5].weight.grad)
    assert all(u.unpacks_due == 0 for u in h._units)


def test_dropped_model_is_collected(store: TieredStore) -> None:
    _, model = pair("mlp")
    x, loss_fn = mlp_data()
    h = offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    loss_fn(model(x)).backward()
    alive = weakref.ref(model)
    del model, h
    gc.collect()
    assert alive() is None  # no global registry or hook keeps an offloaded model alive


def test_update_between_forward_and_backward_is_an_error(store: TieredStore) -> None:
    _, model = pair("mlp")
    x, loss_fn = mlp_data()
    offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn(model(x)).backward()
    loss = loss_fn(model(x))
    opt.step()  # as plain autograd would, refuse to differentiate through changed weights
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


class Mixed(nn.Module):
    """A unit with parameters of two dtypes (one blob each) and children with parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.scale = nn.Parameter(torch.rand(8, dtype=torch.float64) + 0.5)
        self.inner = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x @ self.w.t()) * self.scale.float()


def test_mixed_dtypes_and_nested_units(store: TieredStore) -> None:
    ref, model = (lambda m: (m, copy.deepcopy(m)))(nn.Sequential(Mixed(), nn.ReLU(), Mixed()))
    x = torch.randn(4, 8)
    mixed = 8 * 8 * 4 + 8 * 8
    h = offload_parameters(model, store=store, device="cpu", budget=mixed + (8 * 8 + 8) * 4)
    assert len(store) == 6  # two blobs per Mixed, one per Linear
    for _ in range(2):
        ref(x).square().sum().backward()
        model(x).square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == q.dtype
        assert_close(p.grad, q.grad)
    assert h.stats()["peak_resident_bytes"] <= h.budget
    # a Linear inside a Mixed is on the device together with it: the chain must fit
    with pytest.raises(fmstore.ConfigError, match="enclosing"):
        offload_parameters(copy.deepcopy(ref), store=store, device="cpu", budget=mixed, key_prefix="q")


def test_sync_and_sync_all(store: TieredStore) -> None:
    ref, model, x, h = offloaded_mlp_in_eval(store)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            p.mul_(0.5)  # seen through the version counter
            q.mul_(0.5)
        assert h.sync() == len(h._units) and h.sync() == 0
        assert_close(model(x), ref(x))
        for p, q in zip(model.parameters(), ref.parameters()):
            p.data.add_(1.0)  # hidden from autograd: only sync_all() writes it
            q.add_(1.0)
        h.sync_all()
        assert_close(model(x), ref(x))


def _snapshot(model: nn.Module) -> list[tuple[int, torch.Tensor]]:
    return [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]


def _untouched(model: nn.Module, snap: list[tuple[int, torch.Tensor]], store: TieredStore) -> None:
    assert len(store) == 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    for p, (ptr, value) in zip(model.parameters(), snap):
        assert p.data_ptr() == ptr and torch.equal(p.detach(), value)


def test_bad_inputs_raise_config_error_before_touching_anything(store: TieredStore) -> None:
    _, model = pair("mlp")
    snap = _snapshot(model)
    cases: list[tuple[dict[str, object], str]] = [
        ({"budget": budget_for(model), "prefetch": -1}, "prefetch"),
        ({"budget": 3000}, "'2' (Linear)"),  # names the too-large module
        ({"budget": "lots"}, "budget"),
        ({"budget": None}, "budget"),
        ({"budget": budget_for(model), "key_prefix": "../x"}, "key"),
    ]
    for kwargs, words in cases:
        with pytest.raises(fmstore.ConfigError) as info:
            offload_parameters(model, store=store, device="cpu", **kwargs)  # type: ignore[arg-type]
        assert type(info.value) is fmstore.ConfigError
        assert words in str(info.value)
        _untouched(model, snap, store)

    # a parameter that is not a leaf
    bad = copy.deepcopy(model)
    w = bad[0].weight
    bad[0]._parameters["weight"] = w * 2
    snap_bad = _snapshot(bad)
    with pytest.raises(fmstore.ConfigError, match="not a leaf") as info:
        offload_parameters(bad, store=store, device="cpu", budget=budget_for(model))
    assert type(info.value) is fmstore.ConfigError
    _untouched(bad, snap_bad, store)

    # tied parameters
    tied = copy.deepcopy(model)
    tied[5].weight = tied[2].weight
    snap_tied = _snapshot(tied)
    with pytest.raises(fmstore.ConfigError, match="shared") as info:
        offload_parameters(tied, store=store, device="cpu", budget=budget_for(model))
    _untouched(tied, snap_tied, store)

    # a model already offloaded (or containing, or inside, an offloaded one)
    h = offload_parameters(model, store=store, device="cpu", budget=budget_for(model))
    keys, snap_on = store.keys(), _snapshot(model)
    for target in (model, model[2], nn.Sequential(model)):
        with pytest.raises(fmstore.ConfigError, match="already offloaded") as info:
            offload_parameters(target, store=store, device="cpu", budget=budget_for(model), key_prefix="p2")
        assert type(info.value) is fmstore.ConfigError
        assert store.keys() == keys
        for p, (ptr, value) in zip(model.parameters(), snap_on):
            assert p.data_ptr() == ptr and torch.equal(p.detach(), value)
    # the same key prefix as a model still offloaded
    _, other = pair("mlp", seed=3)
    with pytest.raises(fmstore.ConfigError, match="already holds"):
        offload_parameters(other, store=store, device="cpu", budget=budget_for(model))
    assert store.keys() == keys
    h.remove()


def test_capacity_error_from_the_store_leaves_it_empty(tmp_path: Path) -> None:
    _, model = pair("mlp")
    snap = _snapshot(model)
    small = TieredStore([HostTier(capacity=3000, pinned=False)])  # not every unit fits
    try:
        with pytest.raises(fmstore.CapacityError):
            offload_parameters(model, store=small, device="cpu", budget=budget_for(model))
        _untouched(model, snap, small)
    finally:
        small.close(flush=False)


def test_handle_type_and_stats_keys(store: TieredStore) -> None:
    _, model = pair("mlp")
    with offload_parameters(model, store=store, device="cpu", budget="64KiB") as h:
        assert isinstance(h, OffloadedParameters)
        assert {"peak_resident_bytes", "units", "fetches", "prefetch_hits"} <= set(h.stats())
        assert h.budget == 64 * 1024
    assert len(store) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_stays_under_budget(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dim, layers, rows = 512, 16, 16
    ref = nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(layers)])
    model = copy.deepcopy(ref)
    unit = (dim * dim + dim) * 4
    budget = 3 * unit  # the model is 16 units
    store = TieredStore([HostTier(capacity=6 * unit), LocalTier(tmp_path / "spill")])
    x = torch.randn(rows, dim)
    try:
        h = offload_parameters(model, store=store, device="cuda", budget=budget)
        xd = x.cuda()
        # Warm up first: cuBLAS workspaces (one per stream and thread, the backward's included)
        # come from the caching allocator and stay allocated; they are not parameters.
        model(xd).square().mean().backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        h.reset_peak()
        out = model(xd)
        out.square().mean().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        # Activations: every layer keeps its input and its GELU input for the backward (rows x
        # dim fp32 each), plus a few gradient buffers of that size.  Units: a weight's gradient
        # is on the device until it is copied to the host, a released unit may still be in use
        # by the backward, and a side-stream buffer is reusable only once the main stream is
        # past it: three units of slack, far below the 16 of the whole model.
        act = rows * dim * 4
        allowance = (2 * layers + 8) * act + 3 * unit
        assert peak <= budget + allowance, (peak, budget, allowance)
        assert peak < layers * unit  # the whole model was never on the device
        s = h.stats()
        assert s["peak_resident_bytes"] <= budget
        assert s["prefetch_hits"] > 0
        ref(x).square().mean().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert p.grad is not None and p.grad.device.type == "cpu"
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
        # and a few AdamW steps on the host match
        opt, opt_ref = torch.optim.AdamW(model.parameters()), torch.optim.AdamW(ref.parameters())
        for _ in range(3):
            opt.step()
            opt_ref.step()
            opt.zero_grad()
            opt_ref.zero_grad()
            model(xd).square().mean().backward()
            ref(x).square().mean().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(model(xd).cpu(), ref(x), atol=1e-5, rtol=1e-4)
        h.remove()
    finally:
        store.close(flush=False)
