"""The writer lease's lifetime (issue 26, item 5): a Checkpointer gives its root up when it is
closed or dropped, and the torch DCP writer claims the root like any other writer.

Before: a Checkpointer dropped without ``close()`` kept its lease (a local lock, or an S3
lease object its renewer thread kept fresh) until the process ended, so a notebook re-running
``ck = Checkpointer(root)`` could never save again; ``FmstoreStorageWriter`` wrote and committed
under a root another job held.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import hold_writes, root_held_by_another_job
from fmstore.integrations.dcp import FmstoreStorageReader, FmstoreStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import SavePlan

from fmstore import Checkpointer, WriterConflictError
from fmstore.checkpoint import lease as lease_module
from fmstore.checkpoint.lease import LEASE


def state(value: float) -> dict[str, Any]:
    return {"w": torch.full((1000,), value), "nested": {"step": int(value)}}


@contextmanager
def refcount_only() -> Iterator[None]:
    """Inside, no cyclic collection runs: what is freed is freed by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ----------------------------------------------------------------- a dropped Checkpointer


def test_dropped_checkpointer_is_freed_and_releases_its_root_by_refcount(tmp_path):
    """The notebook cell run twice, without close() and without gc.collect()."""
    with refcount_only():
        ck = Checkpointer(tmp_path)
        ck.save(1, state(1)).wait()
        dropped = weakref.ref(ck)
        del ck
        assert dropped() is None  # nothing (thread, pool, registry, cycle) keeps it alive
        ck = Checkpointer(tmp_path)
        ck.save(2, state(2)).wait()  # before: WriterConflictError, "another Checkpointer of this process"
    assert ck.steps() == [1, 2]
    assert torch.equal(ck.load(step=1)["w"], state(1)["w"])
    ck.close()


def test_dropped_checkpointer_with_a_save_in_flight_commits_it_and_the_new_one_waits(tmp_path, monkeypatch):
    """``ck.save(1, s); del ck; gc.collect(); ck = Checkpointer(root); ck.save(2, s)`` with step 1
    still being written: step 1 is committed (a returned save is a promise) and the new
    checkpointer's claim waits for it, then takes the root."""
    ck = Checkpointer(tmp_path)
    held = hold_writes(monkeypatch, ck.storage)
    handle = ck.save(1, state(1))
    assert held.writing.wait(60)  # the persist of step 1 is stuck in its write
    dropped = weakref.ref(ck)
    del ck
    gc.collect()
    assert dropped() is None  # its persist in flight does not keep it alive either

    waiting = threading.Event()
    wait_orphan = lease_module._wait_orphan

    def observed(released: threading.Event, url: str) -> None:
        waiting.set()
        wait_orphan(released, url)

    monkeypatch.setattr(lease_module, "_wait_orphan", observed)
    second = Checkpointer(tmp_path)
    errors: list[BaseException] = []

    def save_two() -> None:
        try:
            second.save(2, state(2)).wait()
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    saver = threading.Thread(target=save_two)
    saver.start()
    assert waiting.wait(60)  # the claim waits for the dropped one (not refused, not racing it)
    assert second.steps() == []  # step 1 is not committed yet: the claim really waits
    held.release.set()
    saver.join(60)
    assert not saver.is_alive() and not errors, errors
    assert handle.wait().step == 1  # the handle of the dropped one still works
    assert second.steps() == [1, 2]
    assert torch.equal(second.load(step=1)["w"], state(1)["w"])
    second.close()


def test_dropped_checkpointer_whose_staging_is_in_flight_is_freed(tmp_path):
    """A ``block=False`` save's staging callbacks hold the checkpointer weakly."""
    with refcount_only():
        ck = Checkpointer(tmp_path)
        handle = ck.save(1, state(1), block=False)
        dropped = weakref.ref(ck)
        del ck
        handle.wait()
        assert dropped() is None
    with Checkpointer(tmp_path) as again:
        again.save(2, state(2)).wait()
        assert again.steps() == [1, 2]


DROP_AND_EXIT = textwrap.dedent(
    """
    import sys, threading, torch
    from fmstore import Checkpointer
    ck = Checkpointer(sys.argv[1])
    exiting = threading.Event()
    # Exit hooks run newest first: this one before fmstore's drain (registered by Checkpointer).
    threading._register_atexit(exiting.set)
    write = ck.storage.write
    def at_exit(rel, segments, **kw):
        assert exiting.wait(60)  # written only once the interpreter is exiting
        return write(rel, segments, **kw)
    ck.storage.write = at_exit
    ck.save(1, {"w": torch.ones(1000), "step": 1})
    del ck  # dropped with its persist in flight, then the interpreter exits
    """
)


def test_dropped_checkpointer_with_a_save_in_flight_at_exit_commits_it(tmp_path):
    """The exit drain waits for a dropped checkpointer's persist too (it is registered apart
    from the checkpointer, which is gone)."""
    proc = subprocess.run(
        [sys.executable, "-c", DROP_AND_EXIT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "failed" not in proc.stderr and "NOT" not in proc.stderr, proc.stderr
    with Checkpointer(tmp_path) as ck:
        assert ck.steps() == [1] and ck.load()["step"] == 1


def test_closed_checkpointer_releases_its_root(tmp_path):
    first = Checkpointer(tmp_path)
    first.save(1, state(1)).wait()
    first.close()
    with Checkpointer(tmp_path) as second:
        second.save(2, state(2)).wait()
        assert second.steps() == [1, 2]
    del first


def test_an_open_checkpointer_of_this_process_is_still_refused(tmp_path):
    """Releasing on drop does not weaken the refusal of a second live writer."""
    with Checkpointer(tmp_path) as first:
        first.save(1, state(1)).wait()
        with Checkpointer(tmp_path) as second:
            with pytest.raises(WriterConflictError, match="another Checkpointer of this process"):
                second.save(2, state(2))


@pytest.mark.s3
def test_dropped_s3_checkpointer_stops_renewing_and_releases_its_lease(s3):
    url = s3.url(f"drop-{time.time_ns()}")
    opts = {"storage_options": s3.storage_options, "lease_ttl": 2.0}
    with refcount_only():
        ck = Checkpointer(url, **opts)
        ck.save(1, state(1)).wait()
        lease = ck.levels[0].lease
        assert lease is not None and lease._renewer is not None
        renewer = lease._renewer
        dropped = weakref.ref(ck)
        del ck, lease
        assert dropped() is None  # the renewer thread refers to its lease only
        assert not renewer.is_alive()  # stopped (joined) by the finalizer
        # The lease object is deleted, not left to expire.
        assert not s3.filesystem().exists(f"{url.removeprefix('s3://')}/{LEASE}")
        t0 = time.monotonic()
        ck = Checkpointer(url, **opts)
        ck.save(2, state(2)).wait()  # before: refused once it saw the dropped one renew
    assert time.monotonic() - t0 < 2.0  # claimed at once: nothing to wait out
    assert ck.steps() == [1, 2]
    lease = ck.levels[0].lease
    assert lease is not None and lease._renewer is not None
    renewer = lease._renewer
    ck.close()
    assert not renewer.is_alive()  # closing stops it too
    assert not s3.filesystem().exists(f"{url.removeprefix('s3://')}/{LEASE}")


# ----------------------------------------------------------------- the DCP writer


def dcp_state(value: float) -> dict[str, Any]:
    return {"model": {"w": torch.full((64, 8), value), "b": torch.arange(8.0) + value}, "epoch": int(value)}


def files_under(root: str, s3: Any = None) -> list[str]:
    if s3 is None:
        return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))
    fs = s3.filesystem()
    return sorted(fs.find(root.removeprefix("s3://")))


def check_dcp_refused_then_saves(root: str, s3: Any = None) -> None:
    options = {"storage_options": s3.storage_options} if s3 is not None else {}
    holder_opts = {**options, "lease_ttl": 2.0} if s3 is not None else {}
    with root_held_by_another_job(root, **holder_opts) as holder:
        before = files_under(root, s3)
        with pytest.raises(CheckpointException) as info:
            dcp.save(dcp_state(2), storage_writer=FmstoreStorageWriter(root, 2, **options), no_dist=True)
        error = info.value.failures[0][0]  # DCP wraps each rank's error
        assert type(error) is WriterConflictError
        assert f"pid {holder.pid}" in str(error)  # names the holder
        after = files_under(root, s3)
        # Nothing written: the same files (on S3 only the holder's lease object was renewed).
        assert after == before
        assert Checkpointer(root, **options).steps() == [1]
    # The holder is gone: two saves in a row through DCP, then a load of each.
    for step in (2, 3):
        dcp.save(dcp_state(step), storage_writer=FmstoreStorageWriter(root, **options), no_dist=True)
    assert Checkpointer(root, **options).steps() == [1, 2, 3]
    for step in (2, 3):
        target = {"model": {"w": torch.zeros(64, 8), "b": torch.zeros(8)}, "epoch": 0}
        dcp.load(target, storage_reader=FmstoreStorageReader(root, step, **options), no_dist=True)
        want = dcp_state(step)
        assert torch.equal(target["model"]["w"], want["model"]["w"])
        assert torch.equal(target["model"]["b"], want["model"]["b"]) and target["epoch"] == step
    # Released after each save: a Checkpointer of this process (another writer) may take over.
    with Checkpointer(root, **options) as ck:
        ck.save(4, state(4)).wait()


def test_dcp_writer_is_refused_while_another_job_holds_the_root(tmp_path):
    check_dcp_refused_then_saves(str(tmp_path / "ckpt"))


@pytest.mark.s3
def test_dcp_writer_is_refused_while_another_job_holds_the_s3_root(s3):
    check_dcp_refused_then_saves(s3.url(f"dcp-lease-{time.time_ns()}"), s3)


def test_dcp_writer_holds_the_root_from_plan_to_commit_and_a_dropped_one_releases_it(tmp_path):
    root = str(tmp_path / "ckpt")
    writer = FmstoreStorageWriter(root, 1)
    writer.reset()
    writer.set_up_storage_writer(True)
    writer.prepare_global_plan([SavePlan([])])  # the coordinator has claimed the root
    with Checkpointer(root) as ck:
        with pytest.raises(WriterConflictError, match="another Checkpointer of this process"):
            ck.save(1, state(1))
        with refcount_only():
            dropped = weakref.ref(writer)
            del writer  # a save that never finished, its writer dropped
            assert dropped() is None
        ck.save(1, state(1)).wait()
        assert ck.steps() == [1]
