"""``make demo``'s job (``python -m fmstore.integrations.demo``), shortened: 2 ranks killed
mid-run, resumed on 1, compared with an uninterrupted run; the summary, the plot and the
listing it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_demo_crashes_resumes_on_one_rank_and_summarises(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    data = tmp_path / "fmstore-data" / "demo"
    # Killed right after step 15's save started: it waited for step 10's persist (committed);
    # 15's own may commit before the kill or not.
    args = ["--data", str(data), "--steps", "18", "--every", "5", "--crash-at-step", "15", "--log-every", "4"]
    out = subprocess.run(
        [sys.executable, "-m", "fmstore.integrations.demo", *args],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "rank 1 crashing at step 15" in text
    assert re.search(r"resumed from step (10|15)\b", text) and "<- resumed here on 1 rank" in text
    worst = float(re.search(r"largest relative difference (\S+)", text).group(1))
    assert worst <= 1e-4  # the tolerance train.py states for another world size
    assert "same batches at every step: True" in text
    assert re.search(r"median step [\d.]+ ms, median save stall [\d.]+ ms", text)
    assert "committed snapshot(s) under" in text  # fmstore ls
    png = data / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in data.iterdir()) == ["ckpt", "ckpt.jsonl", "loss.png", "reference", "reference.jsonl"]
