"""Reliability under storage faults (issue 13): what a failed save leaves behind and the error a
user sees."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import hold_writes

from fmstore import Checkpointer, ConfigError, FmstoreError, Policy, StorageError, WaitTimeoutError
from fmstore.checkpoint import SnapshotNotFoundError
from fmstore.checkpoint.storage import RootNotFoundError


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_failed_commit_removes_its_shard_and_names_step_and_file(tmp_path, monkeypatch):
    """ENOSPC at the manifest: the step's shard file goes too (before, it stayed, and on a
    full disk every later save failed), and the error names the step, the file and the root."""
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"w": torch.ones(1000)}).wait()
        before = files_under(tmp_path)
        write = ck.storage.write

        def full_at_manifest(rel, segments):
            if rel.endswith("manifest.json"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(rel, segments)

        monkeypatch.setattr(ck.storage, "write", full_at_manifest)
        with pytest.raises(StorageError) as err:
            ck.save(2, {"w": torch.zeros(1000)}).wait()
        assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
        assert isinstance(err.value, FmstoreError) and isinstance(err.value.__cause__, OSError)
        message = str(err.value)
        assert "step 2" in message and "step-0000000002/manifest.json" in message
        assert repr(str(tmp_path)) in message or str(tmp_path) in message
        assert files_under(tmp_path) == before  # nothing of step 2 is left
        monkeypatch.undo()
        ck.save(3, {"w": torch.full((1000,), 3.0)}).wait()
        assert ck.steps() == [1, 3]
        assert torch.equal(ck.load()["w"], torch.full((1000,), 3.0))


def test_a_failure_after_the_commit_keeps_the_committed_snapshot(tmp_path, monkeypatch):
    """Retention failing after the manifest is written: the step is committed, so its shard
    must stay (deleting it would break a committed snapshot)."""
    with Checkpointer(tmp_path, keep_last=1) as ck:
        ck.save(1, {"w": torch.ones(10)}).wait()

        def broken_retention() -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(ck.levels[0], "apply_retention", broken_retention)
        with pytest.raises(StorageError, match="step 2"):
            ck.save(2, {"w": torch.full((10,), 2.0)}).wait()
        monkeypatch.undo()
        assert 2 in ck.steps()
        assert torch.equal(ck.load(step=2)["w"], torch.full((10,), 2.0))


def test_a_root_that_is_a_file_is_a_clear_error(tmp_path):
    root = tmp_path / "ckpt"
    root.write_text("not a directory")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        Checkpointer(root)


@pytest.mark.s3
def test_a_missing_bucket_is_an_error_not_an_empty_checkpoint(s3):
    """Before, steps() of a misspelt bucket was [], and a job resuming "if there is a
    checkpoint" started from scratch."""
    url = f"s3://{s3.bucket}-misspelt/run"
    with pytest.raises(RootNotFoundError, match="no bucket") as err:
        Checkpointer(url, storage_options=s3.storage_options)
    assert url in str(err.value)
    assert s3.storage_options["secret"] not in str(err.value)


@pytest.mark.s3
def test_wrong_credentials_are_an_fmstore_error_naming_the_url(s3):
    url = f"s3://{s3.bucket}/run-wrong-key"
    options = {**s3.storage_options, "secret": "not-the-secret-key"}
    with pytest.raises(StorageError, match="denied") as err:
        Checkpointer(url, storage_options=options)
    assert url in str(err.value) and "not-the-secret-key" not in str(err.value)


def test_a_load_that_loses_a_race_with_retention_loads_the_newer_step(tmp_path):
    """A reader reads step 1's manifest, then the writer commits step 2 and retention
    (keep_last=1) deletes step 1 before the reader reads its shard.  Before, the load failed
    with "shard file ... is missing" (CorruptBlobError); now it loads the newest step."""
    writer = Checkpointer(tmp_path, keep_last=1)
    writer.save(1, {"w": torch.ones(1000)}).wait()
    reader = Checkpointer(tmp_path)
    level = reader.levels[0]
    read_manifest = level.manifest
    raced: list[int] = []

    def manifest_then_retention(step=None):
        m = read_manifest(step)
        if not raced:  # the first read only: the writer commits step 2 meanwhile
            raced.append(m.step)
            writer.save(2, {"w": torch.full((1000,), 2.0)}).wait()
        return m

    level.manifest = manifest_then_retention
    out = reader.load()
    assert raced == [1] and writer.steps() == [2]
    assert torch.equal(out["w"], torch.full((1000,), 2.0))
    # Asked for step 1 by name, it is gone: "not found", never "corrupt".
    raced.clear()
    writer.save(3, {"w": torch.full((1000,), 3.0)}).wait()
    raced.append(0)  # no more races
    with pytest.raises(SnapshotNotFoundError):
        reader.load(step=1)
    writer.close()
    reader.close()


def test_a_shard_deleted_under_a_named_step_is_not_found_not_corrupt(tmp_path):
    """The step asked for by name is deleted (retention) between its manifest and its shard:
    SnapshotNotFoundError, never CorruptBlobError (which means damaged bytes)."""
    writer = Checkpointer(tmp_path, keep_last=1)
    writer.save(1, {"w": torch.ones(1000)}).wait()
    reader = Checkpointer(tmp_path)
    level = reader.levels[0]
    read_manifest = level.manifest

    def manifest_then_retention(step=None):
        m = read_manifest(step)
        if m.step == 1:
            writer.save(2, {"w": torch.zeros(1000)}).wait()
        return m

    level.manifest = manifest_then_retention
    with pytest.raises(SnapshotNotFoundError, match="deleted while"):
        reader.load(step=1)
    writer.close()
    reader.close()


def test_waits_that_run_out_are_fmstore_errors(tmp_path, monkeypatch):
    """A timed-out handle.wait() is an fmstore error (before: the built-in TimeoutError), still
    a TimeoutError; the save goes on and commits."""
    with Checkpointer(tmp_path) as ck:
        held = hold_writes(monkeypatch, ck.storage)
        handle = ck.save(1, {"w": torch.ones(3)})
        with pytest.raises(WaitTimeoutError, match="step 1 not committed after 0.05 s") as err:
            handle.wait(timeout=0.05)
        assert isinstance(err.value, TimeoutError)
        held.release.set()
        assert handle.wait().step == 1


def test_a_kernel_build_error_is_an_fmstore_error() -> None:
    from fmstore.kernels import KernelBuildError

    assert issubclass(KernelBuildError, FmstoreError) and issubclass(KernelBuildError, RuntimeError)


@pytest.mark.s3
def test_a_frozen_s3_server_fails_calls_within_the_bound(tmp_path):
    """A server that accepts connections and never answers (SIGSTOP): steps() (load() lists
    the same way) and construction fail with a StorageError naming the URL within a bound set by
    read_timeout and S3_ATTEMPTS (before: botocore's 60 s reads, retried, blocked for 7
    minutes).  read_timeout is 1 s here, through storage_options, which also checks that a
    user's config_kwargs win; the default bound is measured in docs/RELIABILITY.md."""
    from fmstore.testing import start_seaweedfs
    from fmstore.tiers.object import S3_ATTEMPTS

    with start_seaweedfs(str(tmp_path / "weed"), bucket="fmstore-frozen") as server:
        url = "s3://fmstore-frozen/run"
        opts = {**server.storage_options(), "config_kwargs": {"read_timeout": 1}}
        ck = Checkpointer(url, storage_options=opts)
        ck.save(1, {"w": torch.ones(10)}).wait()
        bound = 3 * S3_ATTEMPTS + 5  # about 2 x read_timeout an attempt, s3fs' backoff, slack
        os.killpg(server.process.pid, signal.SIGSTOP)
        try:
            for call in (ck.steps, lambda: Checkpointer(url, storage_options=opts)):
                t0 = time.monotonic()
                with pytest.raises(StorageError) as err:
                    call()
                assert time.monotonic() - t0 < bound, call
                assert url in str(err.value) and server.secret_key not in str(err.value)
        finally:
            os.killpg(server.process.pid, signal.SIGCONT)
        assert ck.steps() == [1]  # answering again: nothing was lost
        ck.close()


@pytest.mark.parametrize("memory", [1, 0], ids=["host-memory", "no-host-memory"])
def test_when_busy_skip_never_waits_for_a_stuck_persist(tmp_path, monkeypatch, memory):
    """when_busy='skip': with step 2's persist stuck, step 4's save returns at once with a
    warning instead of waiting (the default, 'wait', waits); host memory still keeps it."""
    policy = Policy(host_memory=memory, every=2)
    with Checkpointer(tmp_path, policy=policy, when_busy="skip") as ck:
        held = hold_writes(monkeypatch, ck.storage)
        durable = ck.save(2, {"w": torch.full((10,), 2.0)})
        assert held.writing.wait(60)
        with pytest.warns(UserWarning, match=r"step 4 is not written to \['local'\].*when_busy='skip'"):
            h = ck.save(4, {"w": torch.full((10,), 4.0)})
        assert h.done() and h.wait().levels == (["host"] if memory else [])
        assert not durable.done()
        if memory:
            assert torch.equal(ck.load(step=4)["w"], torch.full((10,), 4.0))
        held.release.set()
        assert durable.wait().levels[-1] == "local"
        monkeypatch.undo()
        assert ck.steps(level="local") == [2]
        assert ck.save(6, {"w": torch.zeros(10)}).wait().levels[-1] == "local"  # not busy: written


def test_when_busy_is_checked():
    with pytest.raises(ConfigError, match="when_busy must be 'wait' or 'skip'"):
        Checkpointer("unused-root", when_busy="drop")
