"""torch.distributed.checkpoint (DCP) through fmstore: ``dcp.save`` / ``dcp.async_save`` /
``dcp.load`` with :class:`FmstoreStorageWriter` and :class:`FmstoreStorageReader`.

Real DCP calls throughout: a model and AdamW state from ``get_state_dict`` in one process,
THREAD and PROCESS async saves (the PROCESS one in a spawned gloo rank, whose DCP daemon gets
the pickled writer), and DTensor + FSDP2 state saved on 2 gloo ranks, loaded in one process.
What DCP writes is an ordinary fmstore snapshot: ``Checkpointer`` reads it, and the DCP reader
reads what ``Checkpointer.save`` wrote.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import fail_shard_writes, quick_exit, shard_file, shard_name, shard_rel
from fmstore.integrations.dcp import FmstoreStorageReader, FmstoreStorageWriter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_checkpoint_distributed import _init, _spawn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from fmstore import Checkpointer, ConfigError, FmstoreError, RNGState, StorageError
from fmstore.checkpoint import MOMENTS, ChecksumError, UnsupportedValueError
from fmstore.checkpoint.manifest import ManifestError

# dcp.save / dcp.load in a process without torch.distributed say so with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (bit-exact comparison of any dtype: float8, bool, 0-d)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: Any, want: Any, where: str = "<root>") -> None:
    """Nested structures equal: same keys and types, tensors bit-exact with dtype and shape."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert (got.dtype, got.shape) == (want.dtype, want.shape), where
        assert torch.equal(bits(got), bits(want)), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}/{i}")
    else:
        assert got == want and type(got) is type(want), where


def blank(state: Any) -> Any:
    """A load target shaped like ``state``: zeroed tensors (same strides), values None."""
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: blank(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(blank(v) for v in state)
    return None


def at(tree: Any, name: str) -> Any:
    """The value at a '/'-joined path of a nested dict."""
    for part in name.split("/"):
        tree = tree[part]
    return tree


def trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def extras() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "tensors": {
            "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
            "fp16": torch.randn(7, generator=g).to(torch.float16),
            "i64": torch.randint(-(2**40), 2**40, (6,), generator=g),
            "bool": torch.rand(9, generator=g) > 0.5,
            "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
            "scalar": torch.tensor(2.5),
            "empty": torch.empty(0, 3),
            "view": torch.randn(3, 4, generator=g).t(),  # not contiguous
        },
        "step": 3,
        "lr": 0.125,
        "inf": float("inf"),
        "name": "run-a",
        "sizes": [1, 2, 3],
        "cfg": {"depth": 2, "tags": ["a", "b"], "pair": (1, "x")},
    }


def training_state(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    model, opt = trained(seed)
    msd, osd = get_state_dict(model, opt)
    return model, opt, {"model": msd, "optim": osd, **extras()}


def check_round_trip(
    state: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer, **load: Any
) -> None:
    """``dcp.load`` into a fresh model and optimizer (DCP's get/set_state_dict flow) and blank
    extras gives back exactly the saved state."""
    model2, opt2 = trained(seed=99)
    msd, osd = get_state_dict(model2, opt2)
    target = {
        "model": msd,
        "optim": osd,
        **blank({k: v for k, v in state.items() if k not in ("model", "optim")}),
    }
    dcp.load(target, **load)
    set_state_dict(model2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    assert_same(model2.state_dict(), model.state_dict())
    assert_same(opt2.state_dict(), opt.state_dict())
    assert_same(
        {k: v for k, v in target.items() if k not in ("model", "optim")},
        {k: v for k, v in state.items() if k not in ("model", "optim")},
    )


# ----------------------------------------------------------------------------- one process


def test_save_load_round_trip_bit_exact(tmp_path):
    model, opt, state = training_state()
    root = str(tmp_path / "ckpt")
    md = dcp.save(state, storage_writer=FmstoreStorageWriter(root), no_dist=True)
    assert isinstance(md.state_dict_metadata["model.0.weight"], TensorStorageMetadata)
    assert Checkpointer(root).steps() == [0]  # no step given, none committed: step 0
    check_round_trip(state, model, opt, storage_reader=FmstoreStorageReader(root), no_dist=True)
    # DCP converts dtypes on load (its reader copy_()s): so does this one.
    target = {"tensors": {"bf16": torch.zeros(5, 3), "fp16": torch.zeros(7, dtype=torch.float64)}}
    dcp.load(target, storage_reader=FmstoreStorageReader(root, 0), no_dist=True)
    assert torch.equal(target["tensors"]["bf16"], state["tensors"]["bf16"].float())
    assert torch.equal(target["tensors"]["fp16"], state["tensors"]["fp16"].double())


def test_async_save_thread(tmp_path):
    model, opt, state = training_state()
    root = str(tmp_path / "ckpt")
    fut = dcp.async_save(
        state,
        storage_writer=FmstoreStorageWriter(root, 4),
        async_checkpointer_type=AsyncCheckpointerType.THREAD,
    )
    fut.result(timeout=120)
    assert Checkpointer(root).steps() == [4]
    check_round_trip(state, model, opt, storage_reader=FmstoreStorageReader(root))


def _process_worker(rank: int, world: int, port: int, root: str) -> None:
    _init(rank, world, port)
    try:
        model, opt, state = training_state()
        writer = FmstoreStorageWriter(root, 5)
        process = AsyncCheckpointerType.PROCESS
        dcp.async_save(state, storage_writer=writer, async_checkpointer_type=process).result(timeout=300)
        check_round_trip(state, model, opt, storage_reader=FmstoreStorageReader(root))
        # The daemon got a pickled copy: the parent's writer never opened its storage.
        assert writer._res is None
        # Step left to the writer (decided in the daemon) and nothing changed: all referenced.
        dcp.async_save(
            state, storage_writer=FmstoreStorageWriter(root), async_checkpointer_type=process
        ).result(timeout=300)
        with Checkpointer(root, no_dist=True) as ck:
            assert ck.steps() == [5, 6]
            assert ck.manifest(6).files == {}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_async_save_process(tmp_path):
    root = str(tmp_path / "ckpt")
    _spawn(_process_worker, 1, root)  # PROCESS needs torch.distributed initialized
    model, opt, state = training_state()
    check_round_trip(state, model, opt, storage_reader=FmstoreStorageReader(root, 6))


def test_checkpointer_reads_dcp_snapshot(tmp_path):
    _, _, state = training_state()
    root = str(tmp_path / "ckpt")
    dcp.save(state, storage_writer=FmstoreStorageWriter(root, 10))
    with Checkpointer(root) as ck:
        assert ck.steps() == [10] and ck.latest() == 10
        manifest = ck.manifest(10)
        assert manifest.world_size == 1
        assert manifest.meta["dcp"]["fqns"]["model.0.weight"] == "model/0.weight"
        assert manifest.meta["dcp"]["fqns"]["step"] is None  # a value, in the tree
        out = ck.load()
    # The nested state dict, as DCP was given it (its flattening turns dict keys into str).
    assert_same(out, state)
    # Shard files are plain safetensors files.
    (shard,) = manifest.files
    with safe_open(os.path.join(root, shard), "pt") as f:
        assert torch.equal(f.get_tensor("model/0.weight"), state["model"]["0.weight"])


def test_reader_loads_checkpointer_snapshot(tmp_path):
    model, opt = trained()
    root = str(tmp_path / "ckpt")
    with Checkpointer(root) as ck:  # Stateful values and per-rank RNG state holding numpy arrays
        ck.save(7, {"model": model, "optim": opt, "step": 7, "rng": RNGState()}).wait()
    reader = FmstoreStorageReader(root)
    md = reader.read_metadata().state_dict_metadata
    assert isinstance(md["model.0.weight"], TensorStorageMetadata)
    assert isinstance(md["optim.state.0.weight.exp_avg"], TensorStorageMetadata)  # keyed as DCP keys it
    assert isinstance(md["rng.torch"], TensorStorageMetadata)
    assert isinstance(md["step"], BytesStorageMetadata)
    model2, opt2 = trained(seed=99)
    msd, osd = get_state_dict(model2, opt2)
    target = {"model": msd, "optim": osd, "step": 0}
    dcp.load(target, storage_reader=reader)
    set_state_dict(model2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    assert target["step"] == 7
    assert_same(model2.state_dict(), model.state_dict())
    assert_same(opt2.state_dict(), opt.state_dict())


def test_incremental_and_lossless(tmp_path):
    model, opt, state = training_state()
    root = str(tmp_path / "inc")
    for _ in range(2):
        dcp.save(state, storage_writer=FmstoreStorageWriter(root))
    ck = Checkpointer(root)
    assert ck.steps() == [0, 1]
    unchanged = ck.manifest(1)
    assert unchanged.files == {}  # no tensor bytes written: every shard points into step 0
    assert {s.file for e in unchanged.tensors.values() for s in e.shards} == {shard_rel(ck.storage, 0)}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    state["model"], state["optim"] = get_state_dict(model, opt)
    dcp.save(state, storage_writer=FmstoreStorageWriter(root))
    changed = ck.manifest(2)
    written = [n for n, e in changed.tensors.items() if e.shards[0].file.startswith("step-0000000002/")]
    assert written == ["model/0.weight"]
    check_round_trip(state, model, opt, storage_reader=FmstoreStorageReader(root))
    assert_same(ck.load(step=1), ck.load(step=0))
    ck.close()

    lossless = str(tmp_path / "lossless")
    dcp.save(state, storage_writer=FmstoreStorageWriter(lossless, 1, compression="lossless"))
    with Checkpointer(lossless) as ck2:
        entry = ck2.manifest(1).tensors["model/0.weight"]
    assert entry.shards[0].codec == [{"name": "planes-zstd", "configuration": {"width": 4}}]
    check_round_trip(state, model, opt, storage_reader=FmstoreStorageReader(lossless))

    # Lossy only where asked: Adam's moments as blockwise int8, the weights untouched.
    quantized = str(tmp_path / "quantized")
    dcp.save(state, storage_writer=FmstoreStorageWriter(quantized, 1, quantize=MOMENTS))
    with Checkpointer(quantized) as ck3:
        m = ck3.manifest(1)
        out = ck3.load()
    assert m.tensors["optim/state/0.weight/exp_avg"].shards[0].codec == [
        {"name": "int8-absmax", "configuration": {"block": 256}}
    ]
    assert m.tensors["model/0.weight"].shards[0].codec == []
    assert_same(out["model"], state["model"])
    moment = state["optim"]["state"]["0.weight"]["exp_avg"]
    got = out["optim"]["state"]["0.weight"]["exp_avg"]
    assert not torch.equal(got, moment) and torch.allclose(got, moment, atol=moment.abs().max().item() / 100)


def test_failed_write_commits_nothing(tmp_path, monkeypatch):
    _, _, state = training_state()
    root = tmp_path / "ckpt"
    fail_shard_writes(monkeypatch)  # as a directory in the shard file's place would
    with pytest.raises(CheckpointException) as info:
        dcp.save(state, storage_writer=FmstoreStorageWriter(root, 3))
    error = info.value.failures[0][0]  # fmstore's error naming the file, the OS's as its cause
    assert type(error) is StorageError and error.errno == errno.EISDIR
    assert isinstance(error.__cause__, IsADirectoryError) and re.search(shard_name(), str(error))
    assert Checkpointer(str(root)).steps() == []
    assert not (root / "step-0000000003" / "manifest.json").exists()
    monkeypatch.undo()
    dcp.save(state, storage_writer=FmstoreStorageWriter(root, 3))  # nothing was committed: free
    assert Checkpointer(str(root)).steps() == [3]


@pytest.mark.parametrize(
    "key, value",
    [("obj", {1, 2}), ("pair", (torch.ones(2), torch.zeros(2))), ("blob", bytearray(b"\x80pickle"))],
    ids=["set", "tuple-of-tensors", "bytearray"],  # bytes and BytesIO are stored: see below
)
def test_non_json_value_refused(tmp_path, key, value):
    root = str(tmp_path / "ckpt")
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.ones(3), key: value}, storage_writer=FmstoreStorageWriter(root, 1))
    error = info.value.failures[0][0]
    assert type(error) is UnsupportedValueError
    assert repr(key) in str(error)
    assert Checkpointer(root).steps() == []


def test_flipped_byte_raises_checksum_error(tmp_path):
    _, _, state = training_state()
    root = str(tmp_path / "ckpt")
    dcp.save(state, storage_writer=FmstoreStorageWriter(root, 1))
    shard = Checkpointer(root).manifest(1).tensors["model/0.weight"].shards[0]
    with open(os.path.join(root, shard.file), "r+b") as f:
        f.seek(shard.begin + 5)
        byte = f.read(1)
        f.seek(shard.begin + 5)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointException) as info:
        dcp.load(blank(state), storage_reader=FmstoreStorageReader(root))
    error = info.value.failures[0][0]
    assert type(error) is ChecksumError
    assert "'model/0.weight'" in str(error)


def test_checkpoint_ids_steps_and_pickling(tmp_path):
    root = str(tmp_path / "ckpt")
    W, R = FmstoreStorageWriter, FmstoreStorageReader
    assert W.validate_checkpoint_id(f"{root}/step-0000000042") and R.validate_checkpoint_id(
        "s3://b/run/step-7"
    )
    assert not W.validate_checkpoint_id(root) and not W.validate_checkpoint_id(f"{root}/step-x1")
    with pytest.raises(ConfigError, match="not-a-step"):
        W(root).reset(f"{root}/not-a-step")
    with pytest.raises(ConfigError, match="compression"):
        W(root, compression="lz4")
    state = {"w": torch.arange(6.0), "step": 1}
    # The checkpoint id names root and step (the writer's own root is not used then).
    dcp.save(state, checkpoint_id=f"{root}/step-0000000042", storage_writer=W(tmp_path / "unused"))
    dcp.save(state, checkpoint_id=f"{root}/step-7", storage_writer=W(root))  # torchtitan's folder names
    assert os.path.isdir(os.path.join(root, "step-0000000007"))
    writer = W(root)
    dcp.save(state, storage_writer=writer)  # the step after the newest
    assert Checkpointer(root).steps() == [7, 42, 43]
    with pytest.raises(CheckpointException) as info:
        dcp.save(state, storage_writer=W(root, 43))
    assert type(info.value.failures[0][0]) is FmstoreError and "43" in str(info.value.failures[0][0])
    # A used writer pickles as configuration only (DCP's PROCESS async save sends it).
    copy = pickle.loads(pickle.dumps(writer))
    assert copy._res is None and copy.root == root and copy.step is None
    dcp.save({"w": torch.arange(6.0) + 1, "step": 2}, storage_writer=copy)
    target = {"w": torch.zeros(6), "step": 0}
    dcp.load(target, checkpoint_id=f"{root}/step-0000000007", storage_reader=R(tmp_path / "unused"))
    assert torch.equal(target["w"], torch.arange(6.0)) and target["step"] == 1
    dcp.load(target, storage_reader=R(root))  # the latest
    assert torch.equal(target["w"], torch.arange(6.0) + 1) and target["step"] == 2


@gpu
@pytest.mark.gpu
def test_cuda_tensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {
        "w": torch.randn(1024, 1024, generator=g).to("cuda", torch.bfloat16),
        "t": torch.randn(256, 64, generator=g).cuda().t(),  # a non-contiguous CUDA view
        "step": 1,
    }
    root = str(tmp_path / "ckpt")
    dcp.save(state, storage_writer=FmstoreStorageWriter(root, 1, compression="lossless"))
    target = blank(state)
    dcp.load(target, storage_reader=FmstoreStorageReader(root))
    assert target["w"].device.type == "cuda"
    assert_same(target, state)


# ----------------------------------------------------------------------------- two ranks


def gathered(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """{'/'-joined path: full tensor} of a state's tensors (a collective for DTensors)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(gathered(v, f"{prefix}{k}/"))
    elif isinstance(state, torch.Tensor):
        full = state.full_tensor() if hasattr(state, "full_tensor") else state
        out[prefix.rstrip("/")] = full.detach().clone()
    return out


@quick_exit
def _sharded_worker(rank: int, world: int, port: int, root: str) -> None:
    from test_checkpoint_fsdp import build, train
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    _init(rank, world, port)
    try:
        g = torch.Generator().manual_seed(5)
        w, cols, bias = (
            torch.randn(9, 4, generator=g).bfloat16(),
            torch.randn(5, 3, generator=g),
            torch.randn(4, generator=g),
        )
        mesh = init_device_mesh("cpu", (world,))
        model, optim = build(world)  # FSDP2: fully_shard on a CPU mesh
        train(model, optim, 2, seed=1)
        msd, osd = get_state_dict(model, optim)
        state = {
            "dt": {
                "w": distribute_tensor(w, mesh, [Shard(0)]),  # 9 rows: uneven
                "cols": distribute_tensor(cols, mesh, [Shard(1)]),
                "bias": bias,  # plain: replicated, written once
            },
            "fsdp": {"model": msd, "optim": osd},
            "step": 1,
            "note": "two ranks",
        }
        full = gathered(state)
        if rank == 0:
            save_file(full, os.path.join(root, "..", "reference.safetensors"))
        dcp.save(state, storage_writer=FmstoreStorageWriter(root, 1))
        # Resume: train on, then load the snapshot back in place, resharded where it differs
        # (reads start inside saved chunks).
        train(model, optim, 1, seed=2)
        msd, osd = get_state_dict(model, optim)
        target = {
            "dt": {
                "w": distribute_tensor(torch.zeros_like(w), mesh, [Shard(1)]),
                "cols": distribute_tensor(torch.zeros_like(cols), mesh, [Shard(0)]),
            },
            "fsdp": {"model": msd, "optim": osd},
        }
        dcp.load(target, storage_reader=FmstoreStorageReader(root, 1))
        set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd)
        back = gathered(
            {"dt": target["dt"], "fsdp": dict(zip(("model", "optim"), get_state_dict(model, optim)))}
        )
        for name, t in back.items():
            assert torch.equal(bits(t), bits(full[name])), name
        # Rank 1 cannot write its shard file; rank 0 writes its own, and nothing is committed.
        if rank == 1:
            mp = pytest.MonkeyPatch()
            fail_shard_writes(mp)
        dist.barrier()
        with pytest.raises(CheckpointException) as info:
            dcp.save(state, storage_writer=FmstoreStorageWriter(root, 2, incremental=False))
        assert list(info.value.failures) == [1]
        error = info.value.failures[1][0]
        # (gathered from rank 1 pickled: the errno survives, the __cause__ does not)
        assert type(error) is StorageError and error.errno == errno.EISDIR
        if rank == 1:
            mp.undo()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_save_on_2_ranks_loads_on_1(tmp_path):
    root = str(tmp_path / "ckpt")
    os.makedirs(root)
    _spawn(_sharded_worker, 2, root)
    ref = load_file(str(tmp_path / "reference.safetensors"))
    shard_file(os.path.join(root, "step-0000000002"))  # rank 0's own file is there
    with Checkpointer(root) as ck:
        assert ck.steps() == [1]  # step 2 failed on rank 1: not committed
        manifest = ck.manifest(1)
        assert manifest.world_size == 2
        assert len(manifest.tensors["dt/w"].shards) == 2 and len(manifest.tensors["dt/bias"].shards) == 1
        assert len(manifest.files) == 2
        whole = ck.load()
    assert whole["step"] == 1 and whole["note"] == "two ranks"
    assert whole["fsdp"]["optim"]["param_groups"][0]["lr"] == 1e-2
    for name, want in ref.items():
        assert torch.equal(bits(at(whole, name)), bits(want)), name
    # The same snapshot through dcp.load in one process, into plain tensors.
    target = blank(whole)
    dcp.load(target, storage_reader=FmstoreStorageReader(root))
    assert_same(target, whole)


@quick_exit
def _async_save_worker(rank: int, world: int, port: int, root: str) -> None:
    """FSDP2 on ``world`` gloo ranks, trained two steps, ``dcp.async_save`` through fmstore's
    writer (step 7; rank 0 writes the gathered state beside the root)."""
    from test_checkpoint_fsdp import build, train

    _init(rank, world, port)
    try:
        model, optim = build(world)
        train(model, optim, 2, seed=1)
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd, "step": 7}
        full = gathered({"model": msd, "optim": osd})
        if rank == 0:
            save_file(full, os.path.join(root, "..", "reference.safetensors"))
        thread = AsyncCheckpointerType.THREAD
        dcp.async_save(
            state, storage_writer=FmstoreStorageWriter(root, 7), async_checkpointer_type=thread
        ).result(timeout=300)
    finally:
        dist.destroy_process_group()


@quick_exit
def _load_worker(rank: int, world: int, port: int, root: str) -> None:
    """The snapshot ``_async_save_worker`` wrote, loaded by ``dcp.load`` into FSDP2 on ``world``
    ranks (a fresh model and optimizer): every tensor, gathered, equals the saved one."""
    from test_checkpoint_fsdp import build

    _init(rank, world, port)
    try:
        model, optim = build(world)
        msd, osd = get_state_dict(model, optim)  # (fresh: no optimizer state yet)
        target = {"model": msd, "optim": osd, "step": 0}
        dcp.load(target, storage_reader=FmstoreStorageReader(root, 7))
        set_state_dict(model, optim, model_state_dict=target["model"], optim_state_dict=target["optim"])
        msd, osd = get_state_dict(model, optim)
        back = gathered({"model": msd, "optim": osd})
        want = load_file(os.path.join(root, "..", "reference.safetensors"))
        assert set(back) == set(want) and target["step"] == 7
        for name, t in back.items():
            assert torch.equal(bits(t), bits(want[name])), name
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_async_save_on_4_ranks_loads_on_2(tmp_path):
    """Issue 16's DCP run on gloo CPU processes: ``dcp.async_save`` through
    ``FmstoreStorageWriter`` on 4 ranks (FSDP2), ``dcp.load`` on 2, bit exact."""
    root = str(tmp_path / "ckpt")
    os.makedirs(root)
    _spawn(_async_save_worker, 4, root)
    with Checkpointer(root) as ck:
        assert ck.steps() == [7] and ck.manifest(7).world_size == 4
    _spawn(_load_worker, 2, root)


# ----------------------------------------------------------------------------- DCP's metadata
# On the pattern of torch's own checks of what dcp.save returns and read_metadata gives back
# (FileSystemWriter.finish fills version and storage_meta; its checkpoint_id loads again).


def test_save_returns_metadata_naming_the_step(tmp_path):
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

    root = str(tmp_path / "ckpt")
    W, R = FmstoreStorageWriter, FmstoreStorageReader
    state = {"w": torch.arange(6.0), "step": 1}
    md = dcp.save(state, storage_writer=W(root))  # the coordinator picks step 0
    assert md.version == CURRENT_DCP_VERSION
    sm = md.storage_meta
    assert sm is not None and sm.checkpoint_id == f"{root}/step-0000000000"
    assert W.validate_checkpoint_id(sm.checkpoint_id) and R.validate_checkpoint_id(sm.checkpoint_id)
    assert isinstance(sm.save_id, str) and sm.save_id
    # A second save through another writer: the next step, another save id.
    md2 = dcp.save({"w": torch.arange(6.0) + 1, "step": 2}, storage_writer=W(root))
    assert md2.storage_meta.checkpoint_id == f"{root}/step-0000000001"
    assert md2.storage_meta.save_id != sm.save_id
    # Given as an id (torchtitan's short form) or as the writer's step: named as the directory is.
    md3 = dcp.save(state, checkpoint_id=f"{root}/step-7", storage_writer=W(tmp_path / "unused"))
    assert md3.storage_meta.checkpoint_id == f"{root}/step-0000000007"
    assert dcp.save(state, storage_writer=W(root, 9)).storage_meta.checkpoint_id == f"{root}/step-0000000009"
    # The id goes back into dcp.load as it is, through a reader of another root.
    target = {"w": torch.zeros(6), "step": 0}
    dcp.load(target, checkpoint_id=sm.checkpoint_id, storage_reader=R(tmp_path / "unused"))
    assert torch.equal(target["w"], torch.arange(6.0)) and target["step"] == 1
    # The reader's Metadata: the save's id and version, and a load id of its own.
    back = R(root, 0).read_metadata()
    assert back.version == CURRENT_DCP_VERSION
    assert (back.storage_meta.checkpoint_id, back.storage_meta.save_id) == (sm.checkpoint_id, sm.save_id)
    again = R(root, 0).read_metadata().storage_meta.load_id
    assert back.storage_meta.load_id and back.storage_meta.load_id != again


# ----------------------------------------------------------------------------- ShardedTensor
# On the pattern of torch's ShardedTensor checkpoint tests: a ChunkShardingSpec that puts
# several chunks on one rank, saved, then loaded into another sharding and a plain tensor.


def _sharded(rows: int, cols: int, dim: int, chunks: int, fill: torch.Tensor | None = None) -> Any:
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    spec = ChunkShardingSpec(dim=dim, placements=["rank:0/cpu"] * chunks)
    st = sharded_tensor.zeros(spec, rows, cols)
    if fill is not None:
        for shard in st.local_shards():
            off, ln = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(fill[off[0] : off[0] + ln[0], off[1] : off[1] + ln[1]])
    return st


def _local(st: Any, rows: int, cols: int) -> torch.Tensor:
    """The whole tensor, assembled from a 1-rank ShardedTensor's local shards."""
    out = torch.full((rows, cols), float("nan"))
    for shard in st.local_shards():
        off, ln = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        out[off[0] : off[0] + ln[0], off[1] : off[1] + ln[1]] = shard.tensor
    return out


@pytest.mark.filterwarnings("ignore:Please use DTensor instead")
def test_sharded_tensor_several_chunks_on_one_rank(tmp_path, one_rank_group):
    g = torch.Generator().manual_seed(7)
    rows_full, cols_full = torch.randn(7, 5, generator=g), torch.randn(4, 6, generator=g)
    root = str(tmp_path / "ckpt")
    state = {
        "rows": _sharded(7, 5, 0, 2, rows_full),  # 2 uneven chunks of rows (4 + 3) on rank 0
        "cols": _sharded(4, 6, 1, 3, cols_full),  # 3 chunks of columns
        "plain": torch.arange(4.0),
    }
    dcp.save(state, storage_writer=FmstoreStorageWriter(root, 1))
    with Checkpointer(root) as ck:
        m = ck.manifest(1)
        assert [s.offsets for s in m.tensors["rows"].shards] == [[0, 0], [4, 0]]
        assert len(m.tensors["cols"].shards) == 3
        assert len(m.files) == 1  # all of rank 0's chunks in its one shard file
        whole = ck.load()
    assert torch.equal(whole["rows"], rows_full) and torch.equal(whole["cols"], cols_full)
    # Into another sharding (3 row chunks, 2 column chunks: reads start inside saved chunks).
    target = {"rows": _sharded(7, 5, 0, 3), "cols": _sharded(4, 6, 1, 2), "plain": torch.zeros(4)}
    dcp.load(target, storage_reader=FmstoreStorageReader(root))
    assert torch.equal(_local(target["rows"], 7, 5), rows_full)
    assert torch.equal(_local(target["cols"], 4, 6), cols_full)
    # Into plain tensors.
    plain = {"rows": torch.zeros(7, 5), "cols": torch.zeros(4, 6)}
    dcp.load(plain, storage_reader=FmstoreStorageReader(root))
    assert torch.equal(plain["rows"], rows_full) and torch.equal(plain["cols"], cols_full)
    # A quantized save of such a tensor: the codec goes by the tensor's name, not its chunk's.
    dcp.save(state, storage_writer=FmstoreStorageWriter(root, 2, quantize="rows"))
    with Checkpointer(root) as ck:
        m2 = ck.manifest(2)
        assert [s.codec[0]["name"] for s in m2.tensors["rows"].shards] == ["int8-absmax"] * 2
        assert all(s.codec == [] for s in m2.tensors["cols"].shards)
        assert torch.equal(ck.load(step=2)["cols"], cols_full)


# ----------------------------------------------------------------------------- bytes values

_UNPICKLED: list[str] = []


def _unpickled() -> str:
    _UNPICKLED.append("ran")  # what unpickling the stored bytes would run
    return "unpickled"


class _Bomb:
    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _unpickled, ()


def test_bytes_values_round_trip_never_unpickled(tmp_path):
    # DCP and torchtitan keep some state as bytes/BytesIO (torchtitan: a BytesIO of
    # torch.save(list)).  These come back exactly, as bytes fmstore never interprets: a pickle
    # among them whose unpickling would run code stays bytes.
    _UNPICKLED.clear()
    bomb = pickle.dumps(_Bomb())
    losses = io.BytesIO()
    torch.save([0.5, 0.25], losses)  # left at its end, as torchtitan leaves it
    at_two = io.BytesIO(b"\x00\x01\x02\x03")
    at_two.seek(2)
    state = {
        "w": torch.arange(6.0),
        "bomb": bomb,
        "not_pickle": b"\x80\x02 not a pickle \xff",
        "empty": b"",
        "train": {"losses": losses, "at_two": at_two},
        "step": 4,
    }
    root = str(tmp_path / "ckpt")
    dcp.save(state, storage_writer=FmstoreStorageWriter(root, 1))
    target = {
        "w": torch.zeros(6),
        "bomb": b"",
        "not_pickle": b"",
        "empty": b"x",
        "train": {"losses": io.BytesIO(), "at_two": io.BytesIO()},
        "step": 0,
    }
    dcp.load(target, storage_reader=FmstoreStorageReader(root))
    assert _UNPICKLED == []
    assert type(target["bomb"]) is bytes and target["bomb"] == bomb
    assert target["not_pickle"] == state["not_pickle"] and target["empty"] == b""
    for key in ("losses", "at_two"):
        got, want = target["train"][key], state["train"][key]
        assert type(got) is io.BytesIO and got.getvalue() == want.getvalue() and got.tell() == want.tell()
    assert torch.equal(target["w"], torch.arange(6.0)) and target["step"] == 4
    target["train"]["losses"].seek(0)  # the owner decodes its own bytes, as torchtitan does
    assert torch.load(target["train"]["losses"], weights_only=True) == [0.5, 0.25]
    # Stored as raw U8 entries of the shard file, marked in the manifest; Checkpointer.load
    # (which knows no DCP kinds) gives the bytes as uint8 tensors.
    with Checkpointer(root) as ck:
        m = ck.manifest(1)
        whole = ck.load()
    assert m.meta["dcp"]["bytes"] == {
        "bomb": {"type": "bytes"},
        "not_pickle": {"type": "bytes"},
        "empty": {"type": "bytes"},
        "train/losses": {"type": "BytesIO", "pos": len(losses.getvalue())},
        "train/at_two": {"type": "BytesIO", "pos": 2},
    }
    assert bytes(whole["bomb"].numpy()) == bomb and whole["bomb"].dtype == torch.uint8
    (shard,) = m.files
    with safe_open(os.path.join(root, shard), "pt") as f:
        assert bytes(f.get_tensor("not_pickle").numpy()) == state["not_pickle"]
    assert _UNPICKLED == []


def test_bytes_value_checked_like_a_tensor(tmp_path):
    root = str(tmp_path / "ckpt")
    dcp.save({"blob": b"0123456789" * 10, "w": torch.ones(3)}, storage_writer=FmstoreStorageWriter(root, 1))
    shard = Checkpointer(root).manifest(1).tensors["blob"].shards[0]
    with open(os.path.join(root, shard.file), "r+b") as f:
        f.seek(shard.begin + 3)
        f.write(b"X")
    with pytest.raises(CheckpointException) as info:
        dcp.load({"blob": b"", "w": torch.zeros(3)}, storage_reader=FmstoreStorageReader(root))
    error = info.value.failures[0][0]
    assert type(error) is ChecksumError and "'blob'" in str(error)


def test_bytes_marks_in_manifest_checked(tmp_path):
    root = str(tmp_path / "ckpt")
    dcp.save({"blob": io.BytesIO(b"abc"), "w": torch.ones(3)}, storage_writer=FmstoreStorageWriter(root, 1))
    path = os.path.join(root, "step-0000000001", "manifest.json")
    body = json.loads(open(path, "rb").read())
    body["meta"]["dcp"]["bytes"]["blob"]["pos"] = 9  # beyond its 3 bytes
    with open(path, "w") as f:
        json.dump(body, f)
    with pytest.raises(ManifestError, match="'blob'"):
        FmstoreStorageReader(root).read_metadata()
    body["meta"]["dcp"]["bytes"] = {"w": {"type": "bytes"}}  # a float32 tensor marked as bytes
    with open(path, "w") as f:
        json.dump(body, f)
    with pytest.raises(ManifestError, match="'w'"):
        FmstoreStorageReader(root).read_metadata()
