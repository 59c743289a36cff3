"""TieredStore: placement, LRU demotion, promotion, prefetch, write-back, flush, bounds, errors."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from fmstore import (
    BlobNotFoundError,
    CapacityError,
    DeviceTier,
    FmstoreError,
    HostTier,
    LocalTier,
    ObjectTier,
    TieredStore,
)
from fmstore.blob import as_bytes_tensor

KiB = 1024


def blob(i: int, n: int = 1024) -> torch.Tensor:
    """``n`` bytes, all equal to ``i % 256``: identifiable and cheap."""
    return torch.full((n,), i % 256, dtype=torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes_tensor(a), as_bytes_tensor(b))


@pytest.fixture
def store(tmp_path):
    s = TieredStore([HostTier("4KiB", pinned=False), LocalTier(tmp_path / "local", "64KiB")])
    yield s
    s.close()


def test_put_goes_to_fastest_tier_and_lru_is_demoted(store):
    for i in range(4):
        store.put(f"k{i}", blob(i))
    assert all(store.where(f"k{i}") == ["host"] for i in range(4))
    store.get("k0")  # k0 is now the most recently used; k1 the least
    store.put("k4", blob(4))
    store.flush()
    assert store.where("k1") == ["local"]
    assert store.where("k0") == ["host"] and store.where("k4") == ["host"]
    for i in range(5):
        assert same(store.get(f"k{i}", promote=False), blob(i))


def test_get_promotes_unless_told_not_to(tmp_path):
    with TieredStore([HostTier("8KiB", pinned=False), LocalTier(tmp_path / "l")]) as s:
        s.put("big", blob(1, 6 * KiB))
        s.put("other", blob(2, 6 * KiB))  # pushes "big" down to local
        s.flush()
        assert s.where("big") == ["local"]
        assert same(s.get("big", promote=False), blob(1, 6 * KiB))
        assert s.where("big") == ["local"]
        assert same(s.get("big"), blob(1, 6 * KiB))
        s.flush()
        # Promoted as a cached copy: the local copy stays authoritative.
        assert s.where("big") == ["host", "local"]
        assert s.where("other") == ["local"]


def test_promote_false_store_never_promotes(tmp_path):
    with TieredStore([HostTier("8KiB", pinned=False), LocalTier(tmp_path / "l")], promote=False) as s:
        s.put("a", blob(1, 6 * KiB))
        s.put("b", blob(2, 6 * KiB))
        s.flush()
        s.get("a")
        assert s.where("a") == ["local"]


def test_demotion_cascades_down_the_chain(tmp_path):
    tiers = [
        HostTier("2KiB", pinned=False),
        LocalTier(tmp_path / "l", "3KiB"),
        ObjectTier(f"file://{tmp_path}/o"),
    ]
    with TieredStore(tiers, promote=False) as s:
        for i in range(8):
            s.put(f"k{i}", blob(i))
        s.flush()
        places = {f"k{i}": s.where(f"k{i}") for i in range(8)}
        assert places["k7"] == ["host"]
        assert places["k0"] == ["object"]
        assert sum(p == ["local"] for p in places.values()) == 2
        for i in range(8):
            assert same(s.get(f"k{i}"), blob(i))
        st = s.stats()
        used = {t["name"]: t["used"] for t in st["tiers"]}
        assert used["host"] <= 2 * KiB and used["local"] <= 3 * KiB
        assert st["tiers"][2]["moved_in"] == 4 * KiB  # 8 keys - 2 in host - 2 in local


def test_value_larger_than_a_tier_skips_it(tmp_path):
    with TieredStore([HostTier("1KiB", pinned=False), LocalTier(tmp_path / "l")]) as s:
        s.put("big", blob(3, 4 * KiB))
        assert s.where("big") == ["local"]
        assert same(s.get("big"), blob(3, 4 * KiB))
        assert s.where("big") == ["local"]  # promotion skips tiers it cannot fit


def test_value_larger_than_every_tier_is_refused(tmp_path):
    with TieredStore([HostTier("1KiB", pinned=False), LocalTier(tmp_path / "l", "2KiB")]) as s:
        with pytest.raises(CapacityError) as err:
            s.put("huge", blob(0, 8 * KiB))
        assert "huge" in str(err.value) and "host" in str(err.value)
        assert "huge" not in s


def test_full_store_raises_capacity_error(tmp_path):
    s = TieredStore([HostTier("2KiB", pinned=False), LocalTier(tmp_path / "l", "3KiB")], promote=False)
    stored = 0
    with pytest.raises(FmstoreError, match="full|no room"):
        for i in range(10):
            s.put(f"k{i}", blob(i))
            stored = i + 1
        s.flush()
    # Whatever put accepted is still readable: a failed move keeps the value in memory.
    for i in range(stored):
        assert same(s.get(f"k{i}"), blob(i))
    s.close(flush=False)


def test_prefetch_promotes_in_background(tmp_path):
    local = LocalTier(tmp_path / "l")
    for i in range(3):
        local.put(f"w{i}", blob(i, 2 * KiB))
    with TieredStore([HostTier("64KiB", pinned=False), local]) as s:
        assert s.where("w0") == ["local"]  # adopted from the durable tier
        handle = s.prefetch(["w0", "w1", "w2"])
        handle.wait(timeout=30)
        assert handle.done()
        assert all(s.where(f"w{i}") == ["host", "local"] for i in range(3))
        with pytest.raises(BlobNotFoundError):
            s.prefetch(["missing"]).wait(timeout=30)
        s.flush()  # the failed prefetch is reported by wait(), not again by flush()


def test_write_back_makes_every_put_durable_after_flush(tmp_path):
    with TieredStore([HostTier("64KiB", pinned=False), LocalTier(tmp_path / "l")], write_back=True) as s:
        for i in range(5):
            s.put(f"k{i}", blob(i))
        s.flush()
        assert all(s.where(f"k{i}") == ["host", "local"] for i in range(5))
        s.put("k0", blob(100))  # a new version replaces the durable copy too
        s.flush()
        assert s.where("k0") == ["host", "local"]
    reopened = TieredStore([HostTier("64KiB", pinned=False), LocalTier(tmp_path / "l")])
    assert same(reopened.get("k0"), blob(100))
    assert sorted(reopened.keys()) == [f"k{i}" for i in range(5)]
    reopened.close()


def test_overwrite_removes_stale_copies(tmp_path):
    with TieredStore([HostTier("2KiB", pinned=False), LocalTier(tmp_path / "l")], promote=False) as s:
        s.put("a", blob(1))
        s.put("b", blob(2))
        s.put("c", blob(3))  # "a" goes down to local
        s.flush()
        assert s.where("a") == ["local"]
        s.put("a", blob(9))  # new version in host; the old local copy must not survive
        s.flush()
        assert "a" not in s.tiers[1] or same(s.tiers[1].get("a"), blob(9))
    reopened = LocalTier(tmp_path / "l")
    if "a" in reopened:
        assert same(reopened.get("a"), blob(9))


def test_delete_removes_every_copy(store):
    store.put("x", blob(1))
    store.put("y", blob(2, 3 * KiB))
    store.put("z", blob(3, 3 * KiB))
    store.flush()
    store.get("x")
    store.delete("x")
    assert "x" not in store and store.where("x") == []
    with pytest.raises(BlobNotFoundError) as err:
        store.get("x")
    assert "'x'" in str(err.value)
    assert all("x" not in t for t in store.tiers)


def test_stats_report_usage_and_movement(store):
    store.put("a", blob(1, 3 * KiB))
    store.put("b", blob(2, 3 * KiB))
    store.flush()
    st = store.stats()
    host, local = st["tiers"]
    assert host["name"] == "host" and host["capacity"] == 4 * KiB and host["used"] == 3 * KiB
    assert local["used"] > 3 * KiB  # header included
    assert host["moved_out"] == 3 * KiB and local["moved_in"] == 3 * KiB
    assert st["keys"] == 2 and st["pending"] == 0 and st["inflight_bytes"] == 0


class SlowLocal(LocalTier):
    """A local tier whose writes take a while, so background moves pile up."""

    def _write(self, key, value, info):
        time.sleep(0.05)
        super()._write(key, value, info)


def test_inflight_memory_is_bounded(tmp_path):
    n = 16 * KiB
    bound = 3 * n
    s = TieredStore(
        [HostTier(4 * n, pinned=False), SlowLocal(tmp_path / "l")],
        max_inflight=bound,
        workers=8,
        promote=False,
    )
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, s.stats()["inflight_bytes"])
            time.sleep(0.002)

    w = threading.Thread(target=watch)
    w.start()
    for i in range(40):
        s.put(f"k{i}", blob(i, n))
    s.flush()
    stop.set()
    w.join()
    assert 0 < peak <= bound
    for i in range(40):
        assert same(s.get(f"k{i}", promote=False), blob(i, n))
    s.close()


def test_reads_of_keys_in_flight_are_served(tmp_path):
    s = TieredStore([HostTier("2KiB", pinned=False), SlowLocal(tmp_path / "l")], promote=False)
    s.put("a", blob(1))
    s.put("b", blob(2))
    s.put("c", blob(3))  # "a" is now moving down, slowly
    assert "in-flight" in s.where("a") or s.where("a") == ["local"]
    assert same(s.get("a"), blob(1))
    s.flush()
    assert s.where("a") == ["local"]
    s.close()


class FailingLocal(LocalTier):
    def _write(self, key, value, info):
        raise OSError("disk on fire")


def test_background_errors_surface_and_data_stays_readable(tmp_path):
    s = TieredStore([HostTier("2KiB", pinned=False), FailingLocal(tmp_path / "l")], promote=False)
    s.put("a", blob(1))
    s.put("b", blob(2))
    s.put("c", blob(3))
    with pytest.raises(FmstoreError, match="disk on fire"):
        s.flush()
    assert same(s.get("a"), blob(1))  # never lost: kept in memory
    s.close(flush=False)  # the tier is broken; the error was handled above


def test_concurrent_puts_and_gets_stay_bit_exact(tmp_path):
    tiers = [
        HostTier(8 * KiB, pinned=False),
        LocalTier(tmp_path / "l", 32 * KiB),
        ObjectTier(f"file://{tmp_path}/o"),
    ]
    s = TieredStore(tiers, max_inflight=8 * KiB)
    latest: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            key = f"k{rng.randrange(12)}"
            if rng.random() < 0.5:
                with lock:  # one writer per key at a time, so "latest" is well defined
                    v = rng.randrange(1, 250)
                    s.put(key, blob(v, rng.choice([512, 1024, 3000])))
                    latest[key] = v
            else:
                try:
                    got = s.get(key)
                except BlobNotFoundError:
                    continue
                if not bool((got == got[0]).all()):
                    errors.append(f"{key}: torn value")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.flush()
    assert not errors, errors[:3]
    for key, v in latest.items():
        got = s.get(key)
        assert int(got[0]) == v and bool((got == v).all())
    s.close()


def test_tier_names_must_be_unique(tmp_path):
    from fmstore import ConfigError

    with pytest.raises(ConfigError, match="unique"):
        TieredStore([LocalTier(tmp_path / "a"), LocalTier(tmp_path / "b")])
    TieredStore([LocalTier(tmp_path / "a", name="nvme0"), LocalTier(tmp_path / "b", name="nvme1")]).close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_device_host_local_chain(tmp_path):
    n = 1 << 20
    tiers = [DeviceTier("cuda:0", capacity=2 * n), HostTier(2 * n), LocalTier(tmp_path / "l")]
    with TieredStore(tiers) as s:
        values = {f"p{i}": torch.randn(n // 4, device="cuda") for i in range(6)}
        for k, v in values.items():
            s.put(k, v)
        s.flush()
        assert s.where("p5")[0] == "device:cuda:0"
        assert s.where("p0") == ["local"]
        for k, v in values.items():
            got = s.get(k, device="cuda")
            assert got.device.type == "cuda" and torch.equal(got, v)
        assert s.tiers[1].pinned


def test_failed_put_of_a_new_key_leaves_no_trace(tmp_path):
    with TieredStore([HostTier("1KiB", pinned=False)]) as s:
        with pytest.raises(CapacityError):
            s.put("big", blob(0, 4 * KiB))
        assert "big" not in s and s.where("big") == []
        with pytest.raises(BlobNotFoundError):
            s.get("big")


def test_failed_overwrite_keeps_the_old_value(tmp_path):
    s = TieredStore([HostTier("2KiB", pinned=False), SlowLocal(tmp_path / "l", "4KiB")], promote=False)
    s.put("a", blob(1))
    s.put("b", blob(2))
    s.put("c", blob(3))  # "a" is on its way down
    with pytest.raises(CapacityError):
        s.put("a", blob(9, 64 * KiB))  # fits no tier
    assert same(s.get("a"), blob(1))
    s.flush()
    assert same(s.get("a"), blob(1)) and s.where("a") == ["local"]
    s.close()


def test_overwrite_that_cannot_make_room_keeps_the_old_value():
    with TieredStore([HostTier("4KiB", pinned=False)]) as s:
        s.put("a", blob(1))
        s.put("b", blob(2, 2 * KiB))
        with pytest.raises(CapacityError, match="no slower tier"):
            s.put("a", blob(9, 3 * KiB))  # would need "b" evicted, and there is nowhere to put it
        assert same(s.get("a"), blob(1)) and same(s.get("b"), blob(2, 2 * KiB))
