"""Reliability under storage faults (issue 13): what a failed save leaves behind and the error a
user sees."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from fmstore import Checkpointer, ConfigError, FmstoreError, StorageError
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
