"""The README's Python examples run as written, each in a new process (in order, in one working
directory: a later example may resume what an earlier one saved), and print what they claim;
then all of them again in the same directory, as a user re-running them would.

A line ending in ``# prints: TEXT`` must print exactly TEXT (the claims are checked in order)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLAIM = re.compile(r"#\s*prints:\s*(.+?)\s*$")


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.s3  # one example starts its own SeaweedFS
def test_readme_examples_run(tmp_path):
    blocks = readme_blocks()
    assert len(blocks) >= 4
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    claims_checked = 0
    for i, block in list(enumerate(blocks)) * 2:
        proc = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"README block {i}:\n{block}\n{proc.stderr}"
        claims = [m.group(1) for line in block.splitlines() if (m := CLAIM.search(line))]
        printed = [line.strip() for line in proc.stdout.splitlines()]
        for claim in claims:
            assert claim in printed, f"README block {i} claims {claim!r}; it printed {printed}"
            printed = printed[printed.index(claim) + 1 :]
            claims_checked += 1
    assert claims_checked >= 6
    assert os.path.isdir(tmp_path / "fmstore-data" / "readme-nvme")
