"""fmstore.serving.load_state_dict: a streaming load bit-exact to Checkpointer.load, bounded by its ring."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fmstore import Checkpointer, CorruptBlobError, LocalTier, TieredStore
from fmstore.checkpoint import ChecksumError, LoadMismatchError, Part, Root, SnapshotWriter, StateKeysError
from fmstore.serving import LoadStats, StreamingLoader, load_state_dict
from fmstore.storage import Storage

HAS_CUDA = torch.cuda.is_available()


class Net(torch.nn.Module):
    def __init__(self, big: int = 256) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(big, 64)
        self.norm = torch.nn.BatchNorm1d(64)
        self.emb = torch.nn.Embedding(100, 16).to(torch.bfloat16)
        self.register_buffer("ids", torch.arange(37, dtype=torch.int64))


def model(seed: int = 0, big: int = 256) -> Net:
    torch.manual_seed(seed)
    m = Net(big)
    with torch.no_grad():
        m.norm.running_mean.uniform_()
    return m


def save(root: Any, m: torch.nn.Module, step: int = 1, **kw: Any) -> None:
    opt = torch.optim.AdamW(m.parameters())
    m.lin(torch.randn(2, m.lin.in_features)).sum().backward()
    opt.step()
    ck = Checkpointer(root, **kw)
    try:
        ck.save(step, {"model": m, "optim": opt, "step": step}).wait()
    finally:
        ck.close()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


def check_like_checkpointer(root: Any, storage_options: dict[str, Any] | None = None, **kw: Any) -> None:
    with Checkpointer(root, storage_options=storage_options) as ck:
        ref = ck.load()
    sd = load_state_dict(root, prefix="model", storage_options=storage_options, **kw)
    assert sorted(sd) == sorted(ref["model"])
    for k, v in sd.items():
        assert same_bits(v, ref["model"][k]), k
    everything = load_state_dict(root, storage_options=storage_options, **kw)
    assert "model/lin.weight" in everything and "optim/state/lin.weight/exp_avg" in everything
    assert same_bits(
        everything["optim/state/lin.weight/exp_avg"], ref["optim"]["state"]["lin.weight"]["exp_avg"]
    )


@pytest.mark.parametrize("compression", [None, "lossless"])
def test_bit_exact_to_checkpointer_load(tmp_path: Path, compression: str | None) -> None:
    save(tmp_path / "ck", model(), compression=compression)
    check_like_checkpointer(tmp_path / "ck")
    check_like_checkpointer(tmp_path / "ck", ring_bytes="64KiB", threads=3)


@pytest.mark.s3
@pytest.mark.parametrize("compression", [None, "lossless"])
def test_bit_exact_to_checkpointer_load_s3(s3: Any, compression: str | None) -> None:
    url = s3.url(f"serve-{time.time_ns()}")
    opt = s3.storage_options
    m = model(1)
    with Checkpointer(url, storage_options=opt, compression=compression) as ck:
        ck.save(1, {"model": m, "step": 1}).wait()
    with Checkpointer(url, storage_options=opt) as ck:
        ref = ck.load()
    stats = LoadStats()
    sd = load_state_dict(url, prefix="model", storage_options=opt, ring_bytes="64KiB", stats=stats)
    assert sorted(sd) == sorted(ref["model"])
    assert all(same_bits(v, ref["model"][k]) for k, v in sd.items())
    assert stats.peak_ring_bytes <= 64 << 10


def test_step_and_newest(tmp_path: Path) -> None:
    save(tmp_path / "ck", model(0), step=1)
    save(tmp_path / "ck", model(5), step=2)
    newest = load_state_dict(tmp_path / "ck", prefix="model")
    first = load_state_dict(tmp_path / "ck", 1, prefix="model")
    assert same_bits(newest["norm.running_mean"], model(5).norm.running_mean)
    assert not same_bits(first["norm.running_mean"], newest["norm.running_mean"])
    with StreamingLoader(tmp_path / "ck", 1) as ld:
        assert ld.step == 1
        assert sorted(ld.names("model")) == sorted(model().state_dict())


def test_into_module_in_place(tmp_path: Path) -> None:
    src = model(3)
    save(tmp_path / "ck", src)
    dst = model(4)
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    assert load_state_dict(tmp_path / "ck", into=dst, prefix="model", ring_bytes="16KiB") is dst
    for k, v in dst.state_dict().items():
        assert v.data_ptr() == ptrs[k], k
        assert same_bits(v, src.state_dict()[k]), k
    # A dict of tensors is filled in place too.
    target = {k: torch.zeros_like(v) for k, v in src.state_dict().items()}
    out = load_state_dict(tmp_path / "ck", into=target, prefix="model")
    assert out is target and all(same_bits(target[k], v) for k, v in src.state_dict().items())


@pytest.mark.parametrize("compression", [None, "lossless"])
def test_tensor_larger_than_ring(tmp_path: Path, compression: str | None) -> None:
    big = torch.randn(512, 512)  # 1 MiB, 16 times the ring
    with Checkpointer(tmp_path / "ck", compression=compression) as ck:
        ck.save(1, {"model": {"w": big, "b": torch.arange(10)}}).wait()
    stats = LoadStats()
    # New CPU tensors are read straight into; a target (here a dict) goes through the ring.
    fresh = load_state_dict(tmp_path / "ck", prefix="model", ring_bytes="64KiB", threads=4)
    assert same_bits(fresh["w"], big) and same_bits(fresh["b"], torch.arange(10))
    sd = {"w": torch.zeros(512, 512), "b": torch.zeros(10, dtype=torch.int64)}
    load_state_dict(tmp_path / "ck", prefix="model", into=sd, ring_bytes="64KiB", threads=4, stats=stats)
    assert same_bits(sd["w"], big) and same_bits(sd["b"], torch.arange(10))
    assert stats.peak_ring_bytes <= 64 << 10
    assert stats.slots * stats.slot_bytes <= 64 << 10
    if compression is None:
        assert stats.peak_ring_bytes > 0 and stats.pieces >= 2 * (1 << 20) // stats.slot_bytes
    else:  # a coded tensor is staged whole, outside the ring (documented bound)
        assert stats.peak_staging_bytes >= sd["w"].numel() * 4 // 8


def test_resharded_from_two_ranks(tmp_path: Path) -> None:
    """Shards written by two ranks (dim 0 and dim 1 splits, as FSDP/DCP write) make whole tensors."""
    rows = torch.randn(6, 10)
    cols = torch.randn(4, 9).to(torch.float64)
    state = {"model": {"rows": rows.to("meta"), "cols": cols.to("meta")}}
    parts = [
        [Part("model/rows", rows[:4], (6, 10), (0, 0)), Part("model/cols", cols[:, :5], (4, 9), (0, 0))],
        [Part("model/rows", rows[4:], (6, 10), (4, 0)), Part("model/cols", cols[:, 5:], (4, 9), (0, 5))],
    ]
    storage = Storage(str(tmp_path / "ck"))
    writer = SnapshotWriter(storage)
    try:
        shards: dict[str, list[dict[str, Any]]] = {}
        files: dict[str, int] = {}
        for rank, ps in enumerate(parts):
            written = writer.write(3, ps, rank=rank, writer="feedbeef")
            for p, s in zip(ps, written.shards):
                shards.setdefault(p.name, []).append(s)
            files.update(written.files)
        writer.commit(3, state, shards, files, {}, world_size=2)
    finally:
        writer.close()
        storage.close()
    for ring in ("64KiB", "1KiB"):  # a slot smaller than a column block's rows, too
        sd = load_state_dict(tmp_path / "ck", prefix="model", ring_bytes=ring, threads=2)
        assert same_bits(sd["rows"], rows) and same_bits(sd["cols"], cols)
    with Checkpointer(tmp_path / "ck") as ck:
        ref = ck.load()["model"]
    assert same_bits(sd["cols"], ref["cols"])


def flip_byte(root: Path, name: str, at: int = 100) -> None:
    with Root(root) as r:
        shard = r.snapshot().tensor(name).shards[0]
    path = root / shard.file
    data = bytearray(path.read_bytes())
    data[shard.begin + at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("ring", ["512MiB", "16KiB"])  # a chunk in a slot; a chunk larger than a slot
def test_flipped_byte_raises_and_is_not_copied(tmp_path: Path, ring: str) -> None:
    src = model(7)
    save(tmp_path / "ck", src)
    flip_byte(tmp_path / "ck", "model/lin.weight")
    dst = model(8)
    before = dst.lin.weight.detach().clone()
    with pytest.raises(CorruptBlobError) as e:
        load_state_dict(tmp_path / "ck", into=dst, prefix="model", ring_bytes=ring)
    assert isinstance(e.value, ChecksumError)  # the reader's checksum error (a CorruptBlobError)
    assert "model/lin.weight" in str(e.value) and "shard" in str(e.value)
    assert e.value.file.endswith(".safetensors")
    # Every piece is verified before it is copied: the damaged tensor's chunk never reached
    # the target (other tensors may have been filled with their verified bytes).
    assert same_bits(dst.lin.weight, before)


def test_flipped_byte_in_coded_tensor_raises(tmp_path: Path) -> None:
    save(tmp_path / "ck", model(7), compression="lossless")
    flip_byte(tmp_path / "ck", "model/lin.weight", at=40)
    with pytest.raises(CorruptBlobError, match="lin.weight"):
        load_state_dict(tmp_path / "ck", prefix="model")


def test_wrong_keys_raise_before_reading(tmp_path: Path) -> None:
    save(tmp_path / "ck", model())
    for f in (tmp_path / "ck").glob("step-*/*.safetensors"):
        f.unlink()  # a read would fail: the key check must come first
    target = {k: torch.zeros_like(v) for k, v in model().state_dict().items()}
    target["extra"] = torch.zeros(3)
    del target["lin.bias"]
    with pytest.raises(StateKeysError) as e:
        load_state_dict(tmp_path / "ck", into=target, prefix="model")
    assert e.value.missing == ["extra"] and e.value.unexpected == ["lin.bias"]
    with pytest.raises(StateKeysError, match="prefix='model'"):
        load_state_dict(tmp_path / "ck", into=model())  # no prefix: the snapshot's names
    wrong = model()
    wrong.lin.weight.data = wrong.lin.weight.data.double()
    with pytest.raises(LoadMismatchError, match="lin.weight"):
        load_state_dict(tmp_path / "ck", into=wrong, prefix="model")
    with pytest.raises(CorruptBlobError, match="missing"):
        load_state_dict(tmp_path / "ck", prefix="model")


def test_result_does_not_alias_ring(tmp_path: Path) -> None:
    save(tmp_path / "ck", model())
    sd = load_state_dict(tmp_path / "ck", prefix="model", ring_bytes="8KiB")
    again = load_state_dict(tmp_path / "ck", prefix="model", ring_bytes="8KiB")
    ptrs = {v.untyped_storage().data_ptr() for v in sd.values()}
    assert len(ptrs) == len(sd)
    assert all(same_bits(sd[k], again[k]) for k in sd)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("compression", [None, "lossless"])
def test_cuda(tmp_path: Path, compression: str | None) -> None:
    src = model(9, big=1024)
    save(tmp_path / "ck", src, compression=compression)
    stats = LoadStats()
    sd = load_state_dict(tmp_path / "ck", prefix="model", device="cuda", ring_bytes="64KiB", stats=stats)
    assert all(v.device.type == "cuda" for v in sd.values())
    assert all(same_bits(sd[k], v) for k, v in src.state_dict().items())
    assert stats.peak_ring_bytes <= 64 << 10
    dst = model(10, big=1024).cuda()
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    load_state_dict(tmp_path / "ck", prefix="model", into=dst)
    torch.cuda.synchronize()
    for k, v in dst.state_dict().items():
        assert v.data_ptr() == ptrs[k] and same_bits(v, src.state_dict()[k]), k


# ----------------------------------------------------------------- the local cache of a remote root


def s3_root(s3: Any, seed: int = 2, **kw: Any) -> tuple[str, dict[str, Any], Net]:
    url, opt, m = s3.url(f"serve-cache-{time.time_ns()}"), s3.storage_options, model(seed)
    with Checkpointer(url, storage_options=opt, **kw) as ck:
        ck.save(1, {"model": m, "step": 1}).wait()
    return url, opt, m


def count_shard_reads(monkeypatch: pytest.MonkeyPatch, url: str, opt: dict[str, Any]) -> list[str]:
    """Every read of a shard file of the S3 storage's class (ranges, whole, versioned), listed."""
    with Storage(url, opt, create=False) as st:
        cls = type(st)
    calls: list[str] = []
    for verb in ("_read_ranges", "_read_bytes", "_read_with"):
        real = getattr(cls, verb)

        def counted(self: Any, rel: str, *a: Any, _real: Any = real, **k: Any) -> Any:
            if rel.endswith(".safetensors"):
                calls.append(rel)
            return _real(self, rel, *a, **k)

        monkeypatch.setattr(cls, verb, counted)
    return calls


def cached_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


@pytest.mark.s3
@pytest.mark.parametrize("compression", [None, "lossless"])
def test_cache_second_load_reads_locally(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str | None
) -> None:
    url, opt, m = s3_root(s3, compression=compression)
    cache = tmp_path / "cache"
    first = LoadStats()
    sd = load_state_dict(url, prefix="model", storage_options=opt, cache=cache, stats=first)
    assert all(same_bits(sd[k], v) for k, v in m.state_dict().items())
    assert first.remote_bytes_read > 0 and first.cache_hits == 0 and first.cache_bytes_read == 0
    with Root(url, opt) as r:
        shard_files = {s.file for e in r.snapshot().manifest.tensors.values() for s in e.shards}
    assert len(cached_files(cache)) == len(shard_files) > 0  # filled (the loader's close waits)
    reads = count_shard_reads(monkeypatch, url, opt)
    second = LoadStats()
    sd = load_state_dict(url, prefix="model", storage_options=opt, cache=str(cache), stats=second)
    assert all(same_bits(sd[k], v) for k, v in m.state_dict().items())
    assert second.remote_bytes_read == 0 and reads == []
    assert second.cache_hits > 0 and second.cache_bytes_read >= second.read_bytes > 0
    # A store of one LocalTier serves as well (and is not closed by the load).
    with TieredStore([LocalTier(cache)]) as store:
        sd = load_state_dict(url, storage_options=opt, cache=store, ring_bytes="64KiB")
        assert same_bits(sd["model/lin.weight"], m.lin.weight) and reads == []
        assert len(store) == len(shard_files)


@pytest.mark.s3
@pytest.mark.parametrize("ring", ["512MiB", "16KiB"])  # into a target: a chunk larger than a slot, too
def test_cache_damaged_entry_falls_back_and_is_refreshed(s3: Any, tmp_path: Path, ring: str) -> None:
    url, opt, m = s3_root(s3)
    cache = tmp_path / "cache"
    load_state_dict(url, prefix="model", storage_options=opt, cache=cache)
    with Root(url, opt) as r:
        shard = r.snapshot().tensor("model/lin.weight").shards[0]
        good = r.storage.read_bytes(shard.file)
    (path,) = [p for p in cached_files(cache) if p.name == Path(shard.file).name + ".safetensors"]
    data = bytearray(path.read_bytes())
    at = len(data) - len(good) + shard.begin + 100  # the tier's header, then the file's bytes
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    dst, stats = model(11), LoadStats()
    with pytest.warns(RuntimeWarning, match="dropped"):
        load_state_dict(
            url, into=dst, prefix="model", storage_options=opt, cache=cache, ring_bytes=ring, stats=stats
        )
    assert all(same_bits(v, m.state_dict()[k]) for k, v in dst.state_dict().items())
    assert stats.remote_bytes_read > 0
    assert path.read_bytes()[-len(good) :] == good  # refilled from the root
    again = LoadStats()
    sd = load_state_dict(url, prefix="model", storage_options=opt, cache=cache, stats=again)
    assert same_bits(sd["lin.weight"], m.lin.weight) and again.remote_bytes_read == 0


@pytest.mark.s3
def test_cache_bounded_evicts_least_recent(s3: Any, tmp_path: Path) -> None:
    (url1, opt, _), (url2, _, m2) = s3_root(s3, 3), s3_root(s3, 4)
    cache = tmp_path / "cache"
    load_state_dict(url1, prefix="model", storage_options=opt, cache=cache)
    one = cached_files(cache)
    bound = sum(p.stat().st_size for p in one) * 3 // 2  # room for one root's files, not two
    load_state_dict(url2, prefix="model", storage_options=opt, cache=cache, cache_bytes=bound)
    two = cached_files(cache)  # the first root's files were evicted to make room
    assert two and not set(two) & set(one)
    stats = LoadStats()
    sd = load_state_dict(
        url2, prefix="model", storage_options=opt, cache=cache, cache_bytes=bound, stats=stats
    )
    assert stats.remote_bytes_read == 0 and all(same_bits(sd[k], v) for k, v in m2.state_dict().items())


@pytest.mark.s3
def test_cache_shares_an_incremental_snapshots_older_files(s3: Any, tmp_path: Path) -> None:
    url, opt = s3.url(f"serve-cache-{time.time_ns()}"), s3.storage_options
    save(url, model(3), step=1, storage_options=opt)
    save(url, model(4), step=2, storage_options=opt)  # unchanged tensors stay in step 1's file
    with Checkpointer(url, storage_options=opt) as ck:
        ref = ck.load(step=2)["model"]
    cache = tmp_path / "cache"
    load_state_dict(url, 1, prefix="model", storage_options=opt, cache=cache)
    assert len(cached_files(cache)) == 1
    load_state_dict(url, 2, prefix="model", storage_options=opt, cache=cache)
    assert len(cached_files(cache)) == 2  # step 1's file is cached once, under its own step
    stats = LoadStats()
    sd = load_state_dict(url, 2, prefix="model", storage_options=opt, cache=cache, stats=stats)
    assert stats.remote_bytes_read == 0 and all(same_bits(sd[k], v) for k, v in ref.items())


def test_cache_ignored_for_local_root(tmp_path: Path) -> None:
    save(tmp_path / "ck", model())
    stats = LoadStats()
    load_state_dict(tmp_path / "ck", prefix="model", cache=tmp_path / "cache", stats=stats)
    assert not (tmp_path / "cache").exists() or not cached_files(tmp_path / "cache")
    assert stats.cache_hits == stats.cache_bytes_read == stats.remote_bytes_read == 0
