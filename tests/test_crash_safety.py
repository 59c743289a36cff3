"""A writer SIGKILLed mid-write never leaves a blob that ``get`` returns (LocalTier, S3).

Each writer overwrites one key with blobs whose values all equal the write's number.  After
the kill, a fresh tier must return either nothing (no write finished) or one whole blob, and
its listing must not show temporary or partial objects.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmstore import BlobNotFoundError, LocalTier, ObjectTier
from fmstore.keys import TMP_MARKER

HERE = Path(__file__).parent
KEY = "ckpt/blob"


def run_and_kill(spec: dict, *, min_writes_started: int, extra_delay: float) -> tuple[int, int]:
    """Start the writer, wait until write number ``min_writes_started`` began, wait a random
    bit more, SIGKILL it. Returns (last write started, last write finished)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "crash_writer.py"), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    started = finished = 0
    deadline = time.monotonic() + 120
    try:
        assert proc.stdout is not None
        while started < min_writes_started:
            line = proc.stdout.readline().decode()
            if not line:
                raise AssertionError(
                    f"writer died: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
                )
            if line.startswith("writing"):
                started = int(line.split()[1])
            elif line.startswith("wrote"):
                finished = int(line.split()[1])
            if time.monotonic() > deadline:
                raise AssertionError("writer too slow")
        time.sleep(extra_delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    for line in out.decode().splitlines():
        if line.startswith("writing"):
            started = int(line.split()[1])
        elif line.startswith("wrote"):
            finished = int(line.split()[1])
    return started, finished


def check_after_kill(tier, numel: int, started: int, finished: int) -> int | None:
    """The key holds nothing or one whole blob from a write that at least started."""
    assert tier.list() in ([], [KEY])
    try:
        got = tier.get(KEY)
    except BlobNotFoundError:
        assert finished == 0, f"write {finished} finished but the key is missing"
        return None
    assert got.dtype == torch.int32 and got.shape == (numel,)
    value = int(got[0])
    assert bool((got == value).all()), "torn blob: mixed values"
    assert finished <= value <= started, (value, finished, started)
    return value


@pytest.mark.slow
def test_local_tier_survives_sigkill(tmp_path):
    numel = 16 << 20  # 64 MiB per blob: each write takes long enough to be caught mid-way
    root = tmp_path / "local"
    spec = {"kind": "local", "path": str(root), "key": KEY, "numel": numel}
    rng = random.Random(1234)
    outcomes, kills = [], []
    for round_ in range(6):
        # Round 0 kills during the very first write: nothing may appear under the key.
        started, finished = run_and_kill(
            spec, min_writes_started=1 if round_ == 0 else 2, extra_delay=rng.uniform(0, 0.25)
        )
        kills.append((started, finished))
        tier = LocalTier(root)  # a new process's view; also removes dead writers' temp files
        outcomes.append(check_after_kill(tier, numel, started, finished))
        leftovers = [p.name for p in root.rglob("*") if TMP_MARKER in p.name]
        assert leftovers == [], leftovers
        tier.close()
    assert any(o is not None for o in outcomes)
    assert any(s > f for s, f in kills), f"no kill landed mid-write: {kills}"


@pytest.mark.slow
@pytest.mark.s3
def test_object_tier_survives_sigkill(s3):
    numel = 5 << 20  # 20 MiB, above the 8 MiB part size: each write is a multipart upload
    url = s3.url(f"crash-{os.getpid()}-{time.time_ns()}")
    spec = {
        "kind": "object",
        "url": url,
        "storage_options": s3.storage_options,
        "key": KEY,
        "numel": numel,
        "part_size": "8MiB",
    }
    rng = random.Random(99)
    outcomes, kills = [], []
    for round_ in range(4):
        started, finished = run_and_kill(
            spec, min_writes_started=1 if round_ == 0 else 2, extra_delay=rng.uniform(0, 0.4)
        )
        kills.append((started, finished))
        tier = ObjectTier(url, s3.storage_options)
        outcomes.append(check_after_kill(tier, numel, started, finished))
    assert any(o is not None for o in outcomes)
    assert any(s > f for s, f in kills), f"no kill landed mid-write: {kills}"
