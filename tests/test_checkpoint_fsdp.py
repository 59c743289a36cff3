"""FSDP2 (``fully_shard``) training state through the Checkpointer, with real processes.

Four ranks train a small model sharded with ``fully_shard`` and Adam for a few steps, save
model and optimizer ``state_dict()``s (DTensors, saved without gathering) with the newest
snapshot also kept in host memory, restore it from there in place, then the snapshot loads
into a fresh FSDP2 model and optimizer on 2 ranks; every parameter and Adam moment matches
the full tensors gathered at save, and training continues identically.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, quick_exit
from safetensors.torch import load_file, save_file
from test_checkpoint_distributed import _init

from fmstore import Checkpointer, Policy

pytestmark = pytest.mark.slow
fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard


def build(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 7), torch.nn.LayerNorm(7)
    )
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, optim: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        model(x).pow(2).mean().backward()
        optim.step()
        optim.zero_grad()


def full_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer tensor, gathered (a collective: all ranks call it)."""
    out = {}
    for k, v in model.state_dict().items():
        out[f"model.{k}"] = v.full_tensor().clone()
    for idx, st in optim.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{idx}.{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


@quick_exit
def _save_worker(rank: int, world: int, port: int, root: str) -> None:
    _init(rank, world, port)
    try:
        model, optim = build(world)
        train(model, optim, 3, seed=1)
        assert type(next(iter(model.state_dict().values()))).__name__ == "DTensor"
        ref = full_state(model, optim)
        if rank == 0:
            save_file(ref, os.path.join(root, "..", "reference.safetensors"))
        with Checkpointer(root, policy=Policy(host_memory=1)) as ck:
            state = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 3}
            info = ck.save(3, state).wait()
            assert info.levels == ["host", "local"]
            # Keep training, then roll back from host memory: no storage read.
            train(model, optim, 2, seed=2)
            for lvl in ck.levels:
                lvl.storage.read_ranges = None  # any storage read would fail
            target = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 0}
            out = ck.load(target)
            assert out["step"] == 3
            optim.load_state_dict(out["optim"])
            got = full_state(model, optim)
            for k, v in ref.items():
                assert torch.equal(got[k], v), k
            dist.barrier()
    finally:
        dist.destroy_process_group()


@quick_exit
def _load_worker(rank: int, world: int, port: int, root: str) -> None:
    _init(rank, world, port)
    try:
        model, optim = build(world)
        train(model, optim, 1, seed=5)  # populate optimizer state, different values
        ref = load_file(os.path.join(root, "..", "reference.safetensors"))
        with Checkpointer(root) as ck:
            target = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 0}
            out = ck.load(target)
            model.load_state_dict(out["model"])
            optim.load_state_dict(out["optim"])
        got = full_state(model, optim)
        assert set(got) == set(ref)
        for k, v in ref.items():
            assert torch.equal(got[k], v), k
        train(model, optim, 1, seed=9)  # the restored state trains on
        for p in model.parameters():
            assert torch.isfinite(p.full_tensor()).all()
    finally:
        dist.destroy_process_group()


def test_fsdp2_save_on_4_load_on_2(tmp_path):
    import torch.multiprocessing as mp

    root = str(tmp_path / "ckpt")
    os.makedirs(root)
    mp.spawn(_save_worker, args=(4, free_port(), root), nprocs=4, join=True)
    with Checkpointer(root) as ck:
        m = ck.manifest(3)
        assert m.world_size == 4
        assert len(m.tensors["model/0.weight"].shards) == 4  # saved sharded, not gathered
    mp.spawn(_load_worker, args=(2, free_port(), root), nprocs=2, join=True)


@quick_exit
def _save_stateful_worker(rank: int, world: int, port: int, root: str) -> None:
    from fmstore import RNGState

    _init(rank, world, port)
    try:
        model, optim = build(world)
        train(model, optim, 2, seed=1)
        ref = full_state(model, optim)
        torch.manual_seed(100 + rank)  # each rank's own RNG stream
        with Checkpointer(root) as ck:
            ck.save(2, {"model": model, "optim": optim, "rng": RNGState()}).wait()
        draws = torch.rand(4)  # what each rank draws next
        if rank == 0:
            save_file(ref, os.path.join(root, "..", "reference.safetensors"))
        save_file({"draws": draws}, os.path.join(root, "..", f"draws-{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@quick_exit
def _load_stateful_worker(rank: int, world: int, port: int, root: str) -> None:
    from fmstore import RNGState

    _init(rank, world, port)
    try:
        model, optim = build(world)  # fresh: the optimizer has no state
        with Checkpointer(root) as ck:
            ck.load({"model": model, "optim": optim, "rng": RNGState()})
        assert torch.equal(
            torch.rand(4), load_file(os.path.join(root, "..", f"draws-{rank}.safetensors"))["draws"]
        )
        ref = load_file(os.path.join(root, "..", "reference.safetensors"))
        got = full_state(model, optim)
        for k, v in ref.items():
            assert torch.equal(got[k], v), k
    finally:
        dist.destroy_process_group()


def test_fsdp2_stateful_model_and_fresh_optimizer_load_sharded_and_plain(tmp_path):
    """FSDP2 model and optimizer saved as Stateful objects (through DCP's state_dict functions:
    parameter names as keys, DTensors kept sharded) on 2 ranks; they load into a fresh FSDP2
    model and optimizer on 2 ranks (each rank's RNG its own) and into a plain model on 1 process."""
    import torch.multiprocessing as mp

    from fmstore import RNGState

    root = str(tmp_path / "ckpt")
    os.makedirs(root)
    mp.spawn(_save_stateful_worker, args=(2, free_port(), root), nprocs=2, join=True)
    with Checkpointer(root) as ck:
        m = ck.manifest(2)
        assert len(m.tensors["model/0.weight"].shards) == 2
        assert "optim/state/0.weight/exp_avg" in m.tensors  # keyed by parameter name
        assert {"rng/rank-0/torch", "rng/rank-1/torch"} <= set(m.tensors)
    mp.spawn(_load_stateful_worker, args=(2, free_port(), root), nprocs=2, join=True)

    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 7), torch.nn.LayerNorm(7)
    )
    optim = torch.optim.Adam(plain.parameters(), lr=1e-2)
    with Checkpointer(root) as ck:
        ck.load({"model": plain, "optim": optim, "rng": RNGState()})
    ref = load_file(os.path.join(tmp_path, "reference.safetensors"))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, ref[f"model.{k}"]), k
    for idx, st in optim.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ref[f"optim.{idx}.{k}"]), (idx, k)
