"""One conformance suite, run against every tier kind (device, host, local, object incl. real S3)."""

from __future__ import annotations

import threading

import pytest
import torch

from fmstore import BlobNotFoundError, CapacityError, InvalidKeyError
from fmstore.blob import as_bytes_tensor

# Every dtype a checkpoint can hold, including the ones safetensors has no code for.
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs and all) viewed as ``dtype``: bit-exactness is what is tested."""
    g = torch.Generator().manual_seed(seed)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def assert_same(got: object, want: torch.Tensor | bytes) -> None:
    if isinstance(want, bytes):
        assert isinstance(got, bytes) and got == want
        return
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert torch.equal(as_bytes_tensor(got).cpu(), as_bytes_tensor(want).cpu())


def test_every_dtype_round_trips_bit_exact(make_tier):
    tier = make_tier()
    for i, dtype in enumerate(DTYPES):
        t = random_tensor(dtype, (3, 5), seed=i)
        tier.put(f"dtypes/{i}", t)
        assert_same(tier.get(f"dtypes/{i}"), t)
        info = tier.stat(f"dtypes/{i}")
        assert info.dtype == dtype and info.shape == (3, 5) and info.nbytes == t.numel() * t.element_size()


def test_odd_shapes_bytes_and_views(make_tier):
    tier = make_tier()
    cases: dict[str, torch.Tensor | bytes] = {
        "zero-d": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 7, dtype=torch.bfloat16),
        "empty-1d": torch.empty(0, dtype=torch.int8),
        "bytes": b"\x00\x01fmstore\xff",
        "no-bytes": b"",
        "four-d": random_tensor(torch.float32, (2, 3, 1, 4)),
    }
    for key, value in cases.items():
        tier.put(key, value)
    for key, value in cases.items():
        assert_same(tier.get(key), value)
    # A non-contiguous view is stored as its values, in logical order.
    base = random_tensor(torch.float32, (4, 6), seed=7)
    tier.put("transposed", base.t())
    assert_same(tier.get("transposed"), base.t().contiguous())


def test_get_returns_a_copy_the_caller_owns(make_tier):
    tier = make_tier()
    t = torch.arange(10, dtype=torch.int32)
    tier.put("k", t)
    t += 100  # changing the source after put does not change the stored blob
    got = tier.get("k")
    assert torch.equal(got.cpu(), torch.arange(10, dtype=torch.int32))
    got += 1  # nor does changing what get returned
    assert torch.equal(tier.get("k").cpu(), torch.arange(10, dtype=torch.int32))


@pytest.mark.slow
def test_large_blob_256mib(make_tier):
    tier = make_tier()
    n = 256 << 20
    t = torch.randint(0, 256, (n,), dtype=torch.uint8)
    tier.put("large/blob", t)
    assert tier.stat("large/blob").nbytes == n
    got = tier.get("large/blob")
    assert torch.equal(got.cpu(), t)
    del got
    tier.delete("large/blob")
    assert tier.used == 0


def test_overwrite_replaces_value_and_size(make_tier):
    tier = make_tier()
    tier.put("k", torch.zeros(1000, dtype=torch.float32))
    used_big = tier.used
    tier.put("k", torch.ones(10, dtype=torch.bfloat16))
    assert_same(tier.get("k"), torch.ones(10, dtype=torch.bfloat16))
    assert tier.used < used_big
    assert tier.list() == ["k"]


def test_delete_and_missing_keys(make_tier):
    tier = make_tier()
    tier.put("a/b", torch.ones(3))
    tier.delete("a/b")
    assert "a/b" not in tier and tier.list() == [] and tier.used == 0
    for call in (tier.get, tier.stat, tier.delete):
        with pytest.raises(BlobNotFoundError) as err:
            call("a/b")
        assert "a/b" in str(err.value)
        assert isinstance(err.value, KeyError)
    tier.delete("a/b", missing_ok=True)


def test_listing(make_tier):
    tier = make_tier()
    keys = ["model/layer1.weight", "model/layer0.weight", "optim/step", "model"]
    for k in keys:
        tier.put(k, torch.ones(2))
    assert tier.list() == sorted(keys)
    assert tier.list("model/") == ["model/layer0.weight", "model/layer1.weight"]
    assert len(tier) == 4 and "optim/step" in tier
    if make_tier.durable:  # a new tier object over the same storage sees the same blobs
        again = make_tier()
        assert again.list() == sorted(keys)
        assert again.used == tier.used
        assert_same(again.get("model"), torch.ones(2))


def test_capacity_errors(make_tier):
    tier = make_tier(capacity="4KiB")
    with pytest.raises(CapacityError) as err:
        tier.put("too/big", torch.zeros(8192, dtype=torch.uint8))
    assert "too/big" in str(err.value) and tier.name in str(err.value)
    assert tier.list() == [] and tier.used == 0
    tier.put("a", torch.zeros(2048, dtype=torch.uint8))
    with pytest.raises(CapacityError) as err:
        tier.put("b", torch.zeros(3000, dtype=torch.uint8))
    assert "'b'" in str(err.value) and "no room" in str(err.value)
    assert tier.list() == ["a"]
    tier.put("a", torch.zeros(3000, dtype=torch.uint8))  # overwrite: the old copy's room counts
    assert tier.used <= tier.capacity


@pytest.mark.parametrize("bad", ["", "/abs/key", "a/../b", "..", "a//b", "./a", "a\\b", "x.fmstore-tmp-1"])
def test_bad_keys_are_refused(make_tier, bad):
    tier = make_tier()
    with pytest.raises(InvalidKeyError):
        tier.put(bad, torch.ones(1))
    with pytest.raises(InvalidKeyError):
        tier.get(bad)


def test_reader_never_sees_a_partial_blob(make_tier):
    """A reader racing a writer that overwrites one key gets only whole blobs."""
    tier = make_tier()
    n = 1 << 20 if make_tier.kind == "object-s3" else 4 << 20
    tier.put("race", torch.full((n,), 0, dtype=torch.int32))
    stop = threading.Event()
    errors: list[str] = []
    seen: set[int] = set()

    def reader() -> None:
        while not stop.is_set():
            try:
                got = tier.get("race").cpu()
            except Exception as e:  # a reader must never fail either
                errors.append(f"read failed: {type(e).__name__}: {e}")
                return
            first = int(got[0])
            if got.numel() != n or not bool((got == first).all()):
                errors.append(f"torn read: first={first}, distinct={torch.unique(got)[:5].tolist()}")
                return
            seen.add(first)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for r in readers:
        r.start()
    rounds = 6 if make_tier.kind == "object-s3" else 20
    for i in range(1, rounds + 1):
        tier.put("race", torch.full((n,), i, dtype=torch.int32))
    stop.set()
    for r in readers:
        r.join()
    assert not errors, errors
    assert seen, "the readers never completed a read"


def test_get_onto_a_device(make_tier):
    tier = make_tier()
    t = random_tensor(torch.bfloat16, (8, 8))
    tier.put("k", t)
    targets = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    for dev in targets:
        got = tier.get("k", device=dev)
        assert got.device == torch.device(dev)
        assert_same(got, t)
    tier.put("b", b"raw")
    assert tier.get("b", device="cpu") == b"raw"  # bytes stay bytes
