"""A save pauses Python's cyclic garbage collector, so its short-lived objects never reach the
old generation and trigger the full collections that stall training (fmstore/gcpause.py)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fmstore import Checkpointer, Policy
from fmstore.gcpause import paused_gc


class Collections:
    """The generations of the collections that start while ``recording`` is set."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.recording = threading.Event()

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and self.recording.is_set():
            self.seen.append(info["generation"])


@pytest.fixture
def collections() -> Iterator[Collections]:
    c = Collections()
    gc.callbacks.append(c)
    try:
        yield c
    finally:
        gc.callbacks.remove(c)


class Allocating:
    """A Stateful whose ``state_dict`` allocates (and keeps alive) thousands of tracked
    objects, as a save does for a large model: with the collector running, young collections
    would start among them."""

    def __init__(self, collections: Collections) -> None:
        self.collections = collections
        self.enabled: list[bool] = []
        self.kept: list[dict[str, int]] = []

    def state_dict(self) -> dict[str, Any]:
        self.enabled.append(gc.isenabled())
        self.collections.recording.set()
        self.kept = [{"i": i, "j": [i]} for i in range(5000)]  # type: ignore[dict-item]
        self.collections.recording.clear()
        return {"x": torch.ones(3)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


def test_no_collection_runs_inside_a_save(tmp_path: Any, collections: Collections) -> None:
    allocating = Allocating(collections)
    with Checkpointer(str(tmp_path), policy=Policy(host_memory=1, every=1000)) as ck:
        for step in range(1, 4):
            ck.save(step, {"a": allocating})
        assert allocating.enabled == [False] * 3
        assert collections.seen == [], f"collections of generations {collections.seen} ran inside save()"
        assert torch.equal(ck.load(step=3)["a"]["x"], torch.ones(3))
    assert gc.isenabled()


def test_the_collector_is_enabled_again_after_a_save(tmp_path: Any) -> None:
    with Checkpointer(str(tmp_path)) as ck:
        ck.save(1, {"w": torch.ones(3)}).wait()  # the persist pauses it too, while it builds items
        assert gc.isenabled()
        gc.disable()  # a program that runs without the collector keeps running without it
        try:
            ck.save(2, {"w": torch.ones(3)}).wait()
            assert not gc.isenabled()
        finally:
            gc.enable()


def test_pauses_nest() -> None:
    with paused_gc():
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
