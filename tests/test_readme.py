"""The README's Python examples run as written, each in a new process (in order, in one working
directory: a later example may resume what an earlier one saved), and print what they claim;
then all of them again in the same directory, as a user re-running them would.

Each process is forked from one that has imported torch and fmstore (what every example
imports: 2 s a start, a minute over the 28 runs) and ends as a script does, its exit hooks run
(fmstore finishes saves in flight at exit).

A line ending in ``# prints: TEXT`` must print exactly TEXT (the claims are checked in order)."""

from __future__ import annotations

import json
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


#: The forking server: imports what the examples import, then for each JSON line on stdin
#: forks a child that runs the block as ``__main__`` in ``cwd`` with stdout and stderr to files
#: and exits as a script would; prints each child's exit code.
ZYGOTE = r"""
import json, os, sys, traceback
import torch, fmstore, fmstore.checkpoint
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        for fd, path in ((1, job["out"]), (2, job["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.stdin = open(os.devnull)
        code = 0
        try:
            exec(compile(job["code"], "<README block>", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.s3  # one example starts its own SeaweedFS
def test_readme_examples_run(tmp_path):
    blocks = readme_blocks()
    assert len(blocks) >= 4
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    assert zygote.stdout.readline() == "ready\n"
    out, err = tmp_path.parent / "readme-stdout", tmp_path.parent / "readme-stderr"
    claims_checked = 0
    try:
        for i, block in list(enumerate(blocks)) * 2:
            job = {"cwd": str(tmp_path), "out": str(out), "err": str(err), "code": block}
            zygote.stdin.write(json.dumps(job) + "\n")
            zygote.stdin.flush()
            reply = zygote.stdout.readline()
            assert reply, f"the forking server died at README block {i}: {err.read_text()}"
            code = int(reply)
            assert code == 0, f"README block {i}:\n{block}\n{err.read_text()}"
            claims = [m.group(1) for line in block.splitlines() if (m := CLAIM.search(line))]
            printed = [line.strip() for line in out.read_text().splitlines()]
            for claim in claims:
                assert claim in printed, f"README block {i} claims {claim!r}; it printed {printed}"
                printed = printed[printed.index(claim) + 1 :]
                claims_checked += 1
    finally:
        zygote.stdin.close()
        zygote.wait(60)
    assert claims_checked >= 6
    assert os.path.isdir(tmp_path / "fmstore-data" / "readme-nvme")
