"""Where a slow training step spends its time: a sampling profiler of the training thread.

A daemon thread records, every ``interval`` seconds, the innermost frames of the thread that
created the sampler (``sys._current_frames``) with a timestamp, and how late it woke (a late
wake means another thread held the GIL).  ``report(t0, t1)`` aggregates the samples of a time
window (one step) by their innermost frames outside the standard library, most frequent first.
For bench/integration.py's ``--sample``; a diagnostic, not a benchmark.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from types import FrameType

SKIP = (os.sep + "threading.py", os.sep + "selectors.py", os.sep + "queue.py", os.sep + "contextlib.py")


def _where(frame: FrameType | None, depth: int) -> str:
    """The innermost ``depth`` frames, innermost first, as file:line function."""
    out: list[str] = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        if not code.co_filename.endswith(SKIP):
            name = code.co_filename.rsplit("site-packages" + os.sep, 1)[-1].rsplit("/work/", 1)[-1]
            out.append(f"{name}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " < ".join(out)


class StackSampler:
    def __init__(self, interval: float = 0.004, depth: int = 4) -> None:
        self.interval, self.depth = interval, depth
        self.target = threading.get_ident()
        self.samples: list[tuple[float, float, str]] = []  # (time, lateness, where)
        self.others: list[tuple[float, str]] = []  # (time, where the fmstore-persist thread is)
        # After a late wake (another thread held the GIL): where every thread is, by name.  The
        # holder has only just let go, so its frame is usually still the one that held it.
        self.late: list[tuple[float, float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nxt = time.perf_counter()
        while not self._stop.is_set():
            nxt += self.interval
            time.sleep(max(0.0, nxt - time.perf_counter()))
            now = time.perf_counter()
            frames = sys._current_frames()
            self.samples.append((now, now - nxt, _where(frames.get(self.target), self.depth)))
            persist = [t.ident for t in threading.enumerate() if t.name.startswith("fmstore-persist")]
            if persist and persist[0] in frames:
                self.others.append((now, _where(frames[persist[0]], 2)))
            if now - nxt > 0.02:
                names = {t.ident: t.name for t in threading.enumerate()}
                me = threading.get_ident()
                self.late.append(
                    (
                        now,
                        now - nxt,
                        [f"{names.get(i, i)}: {_where(f, 3)}" for i, f in frames.items() if i != me],
                    )
                )
            nxt = max(nxt, now)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, t0: float, t1: float, top: int = 6) -> str:
        window = [s for s in self.samples if t0 <= s[0] < t1]
        if not window:
            return "    (no samples)"
        counts = collections.Counter(w for _, _, w in window)
        late = sorted(s[1] for s in window)
        lines = [
            f"    {len(window)} samples; wake lateness median {late[len(late) // 2] * 1e3:.1f} ms, "
            f"max {late[-1] * 1e3:.1f} ms"
        ]
        for where, n in counts.most_common(top):
            lines.append(f"    {n * self.interval * 1e3:6.0f} ms  {where}")
        for t, lateness, where in [x for x in self.late if t0 <= x[0] < t1][:3]:
            lines.append(f"    woke {lateness * 1e3:.0f} ms late at +{(t - t0) * 1e3:.0f} ms; threads then:")
            lines += [f"      {w}" for w in where]
        persist = collections.Counter(w for t, w in self.others if t0 <= t < t1)
        for where, n in persist.most_common(2):
            lines.append(f"    persist thread {n * self.interval * 1e3:6.0f} ms  {where}")
        return "\n".join(lines)
