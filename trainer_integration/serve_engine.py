"""The generation engine of ``fmstore serve`` and the swap of its weights.

- :class:`Engine`: one generation thread takes what is queued (up to ``max_batch`` requests),
  decodes them together and answers each with the step of the weights that produced it.  New
  weights are loaded *beside* the serving ones (a second model) and swapped in between batches,
  so a request never sees two versions and none fails while a snapshot loads; the swapped-out
  weights are then released (an offload handle removed).  Decoding recomputes each request's
  context (cropped to the model's context length, right-padded) every step: greedy
  (temperature 0) or sampled, from the model's logits at each request's last token, until
  ``max_tokens`` or an end-of-text id of the model's tokenizer.
- :class:`WeightsService`: which step is served: a watcher thread polls the root's committed
  steps (object stores send no notifications) and loads each newer one; explicit updates
  (``/update_weights_from_disk``) load a given step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from fmstore.integrations.serve_models import Snapshots, Weights
from fmstore.integrations.serve_text import ByteText

from fmstore import FmstoreError

__all__ = ["Completion", "Engine", "WeightsService"]

log = logging.getLogger("fmstore.serve")


@dataclass
class Completion:
    """One request's generation: what was asked, and the channel its output goes back through
    (an asyncio queue of the server's loop, fed from the generation thread)."""

    tokens: list[int]
    max_tokens: int
    temperature: float
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    decoder: Any = field(default_factory=lambda: ByteText().decoder())  # the model's text: ids -> str
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False  # the client went away: stop decoding it

    def send(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the server's loop is closed (shutting down): nobody is listening
            self.cancelled = True


class Engine:
    """The generation thread: batches of queued requests, decoded together by one weights version."""

    def __init__(self, weights: Weights, *, max_batch: int = 8, seed: int = 0) -> None:
        self.weights = weights
        self.max_batch = max_batch
        self._staged: Weights | None = None  # loaded beside, swapped in before the next batch
        self._queue: collections.deque[Completion] = collections.deque()
        self._cond = threading.Condition()
        self._paused = False
        self._busy = False  # a batch is being decoded
        self._inflight = 0  # its requests
        self._abort = False  # abort the batch in flight (update_weights_from_disk abort_all_requests)
        self._closed = False
        self._gen = torch.Generator().manual_seed(seed)
        self._thread = threading.Thread(target=self._run, name="fmstore-serve-generate", daemon=True)
        self._thread.start()

    # -- the HTTP side's calls (any thread)

    def submit(self, req: Completion) -> None:
        with self._cond:
            if self._closed:
                raise FmstoreError("the server is shutting down")
            self._queue.append(req)
            self._cond.notify_all()

    def stage(self, weights: Weights, *, timeout: float | None = None) -> bool:
        """Hand ``weights`` to the generation thread; True once it serves them (after the batch in
        flight: no timeout by default, a long batch must not make a good update report failure).
        The weights it replaces are released by the generation thread after the swap; weights
        never swapped in (replaced while staged, or the server closing) by whoever drops them."""
        with self._cond:
            replaced, self._staged = self._staged, weights
            self._cond.notify_all()
            swapped = self._cond.wait_for(lambda: self._staged is not weights or self._closed, timeout) and (
                self.weights is weights
            )
        if replaced is not None and replaced is not weights:
            replaced.release()
        return swapped

    def pause(self, timeout: float = 60.0) -> int:
        """New batches wait; returns (the requests queued) once the batch in flight has finished."""
        with self._cond:
            self._paused = True
            self._cond.wait_for(lambda: not self._busy, timeout)
            return len(self._queue)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def abort_all(self) -> int:
        """Finish every queued request and the batch in flight now (finish_reason "abort")."""
        with self._cond:
            dropped = list(self._queue)
            self._queue.clear()
            self._abort = self._busy
            n = len(dropped) + (self._inflight if self._busy else 0)
        for req in dropped:
            req.send("done", "abort")
        return n

    @property
    def paused(self) -> bool:
        return self._paused

    def queued(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        with self._cond:
            staged, self._staged = self._staged, None
        for w in (staged, self.weights):
            if w is not None:
                w.release()

    # -- the generation thread

    def _run(self) -> None:
        while True:
            retired: Weights | None = None
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closed or self._staged is not None or (self._queue and not self._paused)
                )
                if self._closed:
                    break
                if self._staged is not None:  # between batches: nothing in flight sees the swap
                    retired, self.weights, self._staged = self.weights, self._staged, None
                    self._cond.notify_all()
                if self._paused or not self._queue:
                    batch = []
                else:
                    batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                    self._busy, self._abort, self._inflight = True, False, len(batch)
                weights = self.weights
            if retired is not None and retired is not weights:
                try:  # no batch uses it any more: remove its offload before the next batch
                    retired.release()
                except Exception:
                    log.exception("releasing step %s failed", retired.step)
            if not batch:
                continue
            try:
                self._decode(batch, weights)
            except Exception as e:  # a bug must answer the requests, not kill the thread
                log.exception("generation failed")
                for req in batch:
                    req.send("error", f"generation failed: {type(e).__name__}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        for req in self._queue:
            req.send("error", "the server is shutting down")

    @torch.no_grad()  # not inference_mode: an offloaded model's fetch hooks run under it
    def _decode(self, batch: list[Completion], weights: Weights) -> None:
        """Greedy or sampled decoding of ``batch`` by ``weights``: each step runs the active
        requests' contexts (cropped to the model's context, right-padded and masked: causal
        attention keeps padding out of every real position) and takes each one's logits at its
        own last token; an end-of-text id ends a request (finish_reason "stop")."""
        family = weights.family
        seq_len = family.context(weights.model)
        eos = family.text.eos
        active = list(batch)
        for req in batch:
            req.send("start", weights)
        while active:
            if self._abort:
                for req in active:
                    req.send("done", "abort")
                return
            contexts = [(req.tokens + req.generated)[-seq_len:] for req in active]
            width = max(len(c) for c in contexts)
            idx = torch.zeros(len(active), width, dtype=torch.long)
            mask = torch.zeros(len(active), width, dtype=torch.long)
            for i, c in enumerate(contexts):
                idx[i, : len(c)] = torch.tensor(c)
                mask[i, : len(c)] = 1
            last = torch.tensor([len(c) - 1 for c in contexts])
            out = family.logits(weights.model, idx.to(weights.device), mask.to(weights.device))
            logits = out[torch.arange(len(active), device=out.device), last.to(out.device)].float().cpu()
            still = []
            for req, row in zip(active, logits):
                if req.temperature <= 0:
                    token = int(row.argmax())
                else:
                    probs = torch.softmax(row / req.temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=self._gen))
                stop = token in eos
                if not stop:  # an end-of-text id is no text, nor a completion token
                    req.generated.append(token)
                    text = req.decoder.step(token)
                    if text:
                        req.send("text", text)
                if req.cancelled:
                    continue
                if stop or len(req.generated) >= req.max_tokens:
                    tail = req.decoder.flush()
                    if tail:
                        req.send("text", tail)
                    req.send("done", "stop" if stop else "length")
                else:
                    still.append(req)
            active = still


class WeightsService:
    """Which step is served: the watcher thread that follows new commits, and explicit updates.

    The watcher loads a step newer than any it has seen committed (not merely newer than the one
    served), so an explicit update to an older step stays until training commits a newer one.  A
    step that fails to load is logged and not retried (its bytes will not change)."""

    def __init__(self, snapshots: Snapshots, engine: Engine, *, poll: float = 2.0, seen: int = -1) -> None:
        self.snapshots = snapshots
        self.engine = engine
        self.poll = poll
        self.seen = seen
        self.last_error: str | None = None
        self._update = threading.Lock()  # one load at a time: the watcher's or a request's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll > 0:
            self._thread = threading.Thread(target=self._watch, name="fmstore-serve-watch", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                steps = self.snapshots.steps()
            except Exception as e:  # storage unreachable for a while: keep serving, try again
                log.warning("listing %s failed: %s", self.snapshots.root, e)
                continue
            newer = [s for s in steps if s > self.seen]
            if newer:
                self.seen = newer[-1]
                ok, message = self.update(newer[-1])
                log.log(logging.INFO if ok else logging.WARNING, "watcher: %s", message)

    def update(self, step: int, version: str | None = None) -> tuple[bool, str]:
        """Load ``step`` beside the served weights and swap it in between batches; on any load
        error the served weights stay, and (False, the reason) is returned."""
        with self._update:
            t0 = time.perf_counter()
            try:
                weights = self.snapshots.load(step, version)
            except (FmstoreError, OSError, ValueError, RuntimeError) as e:
                self.last_error = f"step {step}: {type(e).__name__}: {e}"
                return (
                    False,
                    f"failed to load step {step} ({type(e).__name__}: {e}); "
                    f"still serving step {self.engine.weights.step}",
                )
            if not self.engine.stage(weights):
                return False, f"step {step} loaded but not swapped in (the server is stopping or stuck)"
            return True, f"serving step {step} (loaded in {time.perf_counter() - t0:.2f} s)"

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
