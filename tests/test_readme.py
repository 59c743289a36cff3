"""The README's Python examples run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_examples_run(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        if "start_seaweedfs" in block:  # needs a server; covered by the S3 fixture tests
            continue
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert os.path.isdir(tmp_path / "fmstore-data" / "readme-nvme")
