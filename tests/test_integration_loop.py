"""The plain-loop helper: resume or start fresh, save every k steps, commit a final snapshot on
SIGTERM (also when only one rank of two is told), and a resumed run ends bit-exact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from fmstore import Checkpointer

JOB = Path(__file__).with_name("loop_job.py")


def job(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(JOB), str(root), str(out), *extra], capture_output=True, text=True, timeout=300
    )


def assert_same(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def test_sigterm_commits_a_final_snapshot_and_resume_is_bit_exact(tmp_path):
    ref = job(tmp_path / "ref", tmp_path / "ref.safetensors")
    assert ref.returncode == 0, ref.stderr
    with Checkpointer(tmp_path / "ref") as ck:
        assert ck.steps() == [3, 6, 9]  # every 3 steps

    first = job(tmp_path / "run", tmp_path / "run.safetensors", "--sigterm-at", "5")
    assert first.returncode == 143, first.stderr  # exits as a SIGTERM'd process reports
    assert "preempted: step 5 committed" in first.stderr
    with Checkpointer(tmp_path / "run") as ck:
        assert ck.steps() == [3, 5]  # step 5 is not a multiple of 3: the final snapshot
    second = job(tmp_path / "run", tmp_path / "run.safetensors")
    assert second.returncode == 0, second.stderr
    assert "start 5" in second.stdout
    assert_same(tmp_path / "run.safetensors", tmp_path / "ref.safetensors")

    fresh = job(tmp_path / "fresh", tmp_path / "fresh.safetensors", "--steps", "2")
    assert fresh.returncode == 0 and "start 0" in fresh.stdout  # nothing committed: a fresh start


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path):
    port = str(free_port())
    ref = job(tmp_path / "ref", tmp_path / "ref.safetensors", "--world", "2", "--port", port)
    assert ref.returncode == 0, ref.stderr
    port = str(free_port())
    run = job(
        tmp_path / "run",
        tmp_path / "run.safetensors",
        "--world",
        "2",
        "--port",
        port,
        "--sigterm-at",
        "4",
        "--sigterm-rank",
        "1",
    )
    assert run.returncode == 143, run.stderr
    with Checkpointer(tmp_path / "run") as ck:
        assert ck.steps() == [3, 4]
        assert ck.manifest(4).world_size == 2
    port = str(free_port())
    again = job(tmp_path / "run", tmp_path / "run.safetensors", "--world", "2", "--port", port)
    assert again.returncode == 0, again.stderr
    assert_same(tmp_path / "run.safetensors", tmp_path / "ref.safetensors")
