"""Fault injection shared by tests/test_faults.py and bench/fault_campaign.py: a checkpoint writer
SIGKILLed at chosen points of its save loop, and the checks a fresh reader makes afterwards.

Run as a script, this module is a *zygote*: it imports torch and fmstore once, then forks one
writer per JSON line it reads, so a kill costs a fork instead of a 1.3 s interpreter start.  A
writer saves :func:`state_at` step after step and announces on stdout ``phase <p> <step>``
before each phase of a save (``staging``, ``shard``, ``manifest``, ``retention``) and
``committed <step>`` once ``handle.wait()`` returned.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_writer import state_at as base_state  # noqa: E402

from fmstore import Checkpointer  # noqa: E402

PHASES = ("staging", "shard", "manifest", "retention")
HERE = Path(__file__).parent


def state_at(step: int) -> dict[str, Any]:
    """ckpt_writer's state (``w`` all equal to the step, an unchanging ``frozen``, ``nested``)
    plus 1 MiB of noise seeded by the step: a compressed shard still has real bytes to write,
    and a tensor of another step, or a torn one, differs everywhere."""
    noise = torch.randn(1 << 18, generator=torch.Generator().manual_seed(step))
    return {**base_state(step), "noise": noise}


def same(a: Any, b: Any) -> bool:
    """Exactly equal states: same structure and types, tensors equal in dtype, shape and bits."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


# ----------------------------------------------------------------- the child side


def write_forever(spec: dict[str, Any]) -> None:
    """Save ``state_at(step)`` from ``spec["start"]`` on, announcing every phase (in a writer)."""
    ck = Checkpointer(spec["root"], **spec["options"])
    step = spec["start"]
    write, level = ck.storage.write, ck.levels[0]
    retention = level.apply_retention

    def announced_write(rel: str, *args: Any, **kwargs: Any) -> int:
        if rel.endswith(".safetensors") or rel.endswith("manifest.json"):
            print(f"phase {'manifest' if rel.endswith('.json') else 'shard'} {step}", flush=True)
        return write(rel, *args, **kwargs)

    def announced_retention() -> None:
        print(f"phase retention {step}", flush=True)
        retention()

    ck.storage.write = announced_write  # type: ignore[method-assign]
    level.apply_retention = announced_retention  # type: ignore[method-assign]
    while True:
        state = state_at(step)
        print(f"phase staging {step}", flush=True)
        ck.save(step, state).wait()
        print(f"committed {step}", flush=True)
        step += 1


def serve() -> None:
    """The zygote: fork a writer per spec line on stdin; report ``child PID`` and ``exit PID STATUS``."""
    print("ready", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                write_forever(json.loads(line))
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails
                print(f"error {type(e).__name__}: {e}".replace("\n", " "), flush=True)
            finally:
                os._exit(code)
        print(f"child {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {status}", flush=True)


# ----------------------------------------------------------------- the parent side


class Zygote:
    """The zygote process and the lines it and its writers print, one writer at a time."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        self.stderr: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.child: int | None = None
        assert self.next(120) == "ready"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())
        self.lines.put("eof")

    def next(self, timeout: float = 60) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no word from the writer in {timeout} s; {self.stderr_tail()}") from None
        if line.startswith("error") or line == "eof":
            raise AssertionError(f"writer: {line}; {self.stderr_tail()}")
        return line

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return "stderr: " + self.stderr.read().decode(errors="replace")[-3000:]

    def spawn(self, spec: dict[str, Any]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(spec) + "\n").encode())
        self.proc.stdin.flush()
        line = self.next()
        assert line.startswith("child "), line
        self.child = int(line.split()[1])
        return self.child

    def kill_child(self) -> list[str]:
        """SIGKILL the writer; the lines it printed before it died (its death checked)."""
        assert self.child is not None
        pid, self.child = self.child, None
        os.kill(pid, signal.SIGKILL)
        out = []
        while not (line := self.next()).startswith("exit "):
            out.append(line)
        status = int(line.split()[2])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (line, out)
        return out

    def close(self) -> None:
        if self.child is not None:
            try:
                self.kill_child()
            except (AssertionError, ProcessLookupError):
                pass
        self.proc.kill()
        self.proc.wait(30)
        self.stderr.close()


@dataclass
class Tally:
    """What a series of kills of one configuration found."""

    kills: int = 0
    mid_save: int = 0  # kills that landed while a save was in flight (announced, not committed)
    phases: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    checked: int = 0  # committed snapshots loaded and compared after the kills
    lost: list[int] = field(default_factory=list)  # reported committed, gone though retention had no cause
    wrong: list[int] = field(default_factory=list)  # loaded, but not the values saved
    errors: list[str] = field(default_factory=list)  # a committed snapshot that failed to load


def kill_once(zygote: Zygote, spec: dict[str, Any], phase: str, rng: random.Random) -> tuple[list[int], bool]:
    """Start a writer, SIGKILL it a random moment (0-3 ms) after it announces ``phase`` of a
    randomly chosen save; returns (steps it reported committed, whether a save was in flight)."""
    zygote.spawn(spec)
    target = spec["start"] + rng.randrange(3)
    lines = []
    while True:
        line = zygote.next()
        lines.append(line)
        kind, *rest = line.split()
        if kind == "phase" and rest[0] == phase and int(rest[1]) >= target:
            break
    delay = rng.uniform(0, 0.003)
    if delay:
        threading.Event().wait(delay)  # the random part of the kill time
    lines += zygote.kill_child()
    committed = [int(line.split()[1]) for line in lines if line.startswith("committed")]
    started = [int(line.split()[2]) for line in lines if line.startswith("phase")]
    return committed, max(started) > max(committed, default=-1)


def check_root(root: str, storage_options: dict[str, Any] | None, reported: set[int], keep_last: int, tally: Tally) -> int:
    """Load every committed step of ``root`` and compare it with what was saved; a step the writer
    reported committed must be there unless ``keep_last`` newer ones are.  Returns the newest step."""
    with Checkpointer(root, storage_options=storage_options) as ck:
        steps = ck.steps()
        for step in steps:
            try:
                ok = same(ck.load(step=step), state_at(step))
            except Exception as e:  # noqa: BLE001 - counted: a committed snapshot must load
                tally.errors.append(f"step {step}: {type(e).__name__}: {e}")
                continue
            tally.checked += 1
            if not ok:
                tally.wrong.append(step)
    tally.lost += [s for s in sorted(reported) if s not in steps and sum(t > s for t in steps) < keep_last]
    reported.difference_update(tally.lost)
    return max(steps, default=-1)


def kill_series(
    zygote: Zygote, root: str, options: dict[str, Any], kills: int, seed: int, tally: Tally | None = None
) -> Tally:
    """``kills`` writers on ``root`` (Checkpointer ``options``, which name ``keep_last``), each
    SIGKILLed in a phase taken in turn from :data:`PHASES`, each kill followed by
    :func:`check_root`.  A restarted writer goes on from the newest committed step + 1, so it
    re-saves the step a killed one was writing."""
    tally = tally or Tally()
    rng = random.Random(seed)
    reported: set[int] = set()
    newest = -1
    storage_options = options.get("storage_options")
    for i in range(kills):
        phase = PHASES[i % len(PHASES)]
        committed, in_flight = kill_once(zygote, {"root": root, "options": options, "start": newest + 1}, phase, rng)
        tally.kills += 1
        tally.phases[phase] += 1
        tally.mid_save += in_flight
        reported.update(committed)
        newest = check_root(root, storage_options, reported, options["keep_last"], tally)
    return tally


if __name__ == "__main__":
    serve()
