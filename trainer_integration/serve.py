"""Serve the newest committed snapshot of a training run, following training as it commits.

    fmstore serve ckpt/run1 --port 8000           # options: fmstore serve --help (fmstore/cli/serve.py)
    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "def ", "max_tokens": 32}'

The run is one of :mod:`fmstore.integrations.train` (a byte-level GPT saved by ``LoopCheckpointer``
with the state ``{"model": ..., "optim": ..., ...}``).  The model is built from the snapshot's
tensor shapes (``model/tok.weight``, ``model/pos.weight``, ``model/blocks.N.*``; the number of heads,
which no shape tells, from train.py's ``SIZES`` by ``d_model`` or from ``n_head=``), and only the
``model`` part is read: ``Checkpointer.load({"model": model}, step, strict=False)`` reads the regions
of the target's tensors alone, so the optimizer's moments never reach memory.  Text is UTF-8 bytes
as tokens; the context is cropped to the model's ``seq_len``.

Three parts, each a section below:

- **weights**: which step, the model built from it, :func:`_load_weights` (the one place that reads
  tensors: it will become the streaming loader of :mod:`fmstore.serving`);
- **engine**: one generation thread takes what is queued (up to ``max_batch`` requests), decodes them
  together and answers each with the step of the weights that produced it.  New weights are loaded
  *beside* the serving ones (a second model) and swapped in between batches, so a request never sees
  two versions and none fails while a snapshot loads.  A watcher thread polls the root's committed
  steps (object stores send no notifications) and loads each newer one;
- **app**: the HTTP API (FastAPI, served by uvicorn): ``/health``, ``/v1/models``, ``/v1/completions``
  (OpenAI's shape, ``stream`` as server-sent events), and SGLang's ``/update_weights_from_disk``,
  ``/pause_generation``, ``/continue_generation``.  An optional bearer token guards all but
  ``/health``.

Needs the ``serve`` extra (``pip install "fmstore[serve]"``): fastapi and uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import collections
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from fmstore.integrations import require

fastapi = require("fastapi", "serve", by=__name__)
uvicorn = require("uvicorn", "serve", by=__name__)
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from fmstore.integrations.train import GPT, SIZES, GPTConfig  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from fmstore import ConfigError, FmstoreError  # noqa: E402
from fmstore.checkpoint import Root, SnapshotNotFoundError  # noqa: E402
from fmstore.serving import load_state_dict  # noqa: E402

__all__ = ["Limits", "Weights", "Engine", "WeightsService", "create_app", "build_model", "serve", "run_args"]

log = logging.getLogger("fmstore.serve")

#: The largest request body read (bytes); a larger one gets 413 before anything parses it.
MAX_BODY = 1 << 20
#: The part of a snapshot's state that holds the model (train.py's ``LoopCheckpointer`` state).
MODEL = "model"
#: A snapshot's own directory under its root: ``ROOT/step-0000000012``.
STEP_DIR = re.compile(r"^step-(\d{10})$")


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Weights:
    """One loaded step: the model (in eval mode, never trained) and the step it came from."""

    model: GPT
    step: int
    version: str  # what responses name: the step, or the weight_version an update gave


def model_config(shapes: dict[str, list[int]], n_head: int | None = None) -> GPTConfig:
    """The :class:`GPTConfig` of a snapshot's ``model/...`` tensor shapes (names as flattened by
    fmstore: ``model/tok.weight``).  ``n_head`` (no shape tells it): given, or train.py's ``SIZES``
    entry with this ``d_model``."""
    try:
        vocab, d_model = shapes[f"{MODEL}/tok.weight"]
        seq_len = shapes[f"{MODEL}/pos.weight"][0]
    except (KeyError, ValueError) as e:
        raise ConfigError(f"the snapshot has no GPT model of fmstore.integrations.train (no {e})") from None
    layers = {int(m.group(1)) for k in shapes if (m := re.match(rf"{MODEL}/blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1 if layers else 0
    if n_head is None:
        known = [h for d, _, h in SIZES.values() if d == d_model]
        if not known:
            raise ConfigError(f"no train.py size has d_model={d_model}: give the number of heads (--n-head)")
        n_head = known[0]
    if d_model % n_head:
        raise ConfigError(f"d_model={d_model} is not divisible by n_head={n_head}")
    return GPTConfig(d_model=d_model, n_layer=n_layer, n_head=n_head, seq_len=seq_len, vocab=vocab)


def build_model(shapes: dict[str, list[int]], n_head: int | None = None) -> GPT:
    """An uninitialised-to-be-overwritten GPT of the snapshot's shape, in eval mode."""
    with torch.device("meta"):  # no random init: every tensor is overwritten by the load
        model = GPT(model_config(shapes, n_head))
    return model.to_empty(device="cpu").eval().requires_grad_(False)


def _load_weights(root: str, step: int, model: GPT, *, storage_options: dict[str, Any] | None = None) -> None:
    """Fill ``model`` in place with the ``model`` part of committed snapshot ``step`` of ``root``.

    Through fmstore's streaming loader: only the model's tensors are read (the optimizer's are
    neither read nor allocated), the keys are checked before anything is read (never a
    half-loaded model), every piece is verified before it is copied (a damaged one raises
    CorruptBlobError), and host memory stays within the loader's ring."""
    load_state_dict(root, step, into=model, prefix=MODEL, storage_options=storage_options)


class Snapshots:
    """The committed steps of a root, and the model of one of them (read beside the served one)."""

    def __init__(
        self, root: str, *, n_head: int | None = None, storage_options: dict[str, Any] | None = None
    ):
        self.root = root
        self.n_head = n_head
        self.storage_options = storage_options
        # Listing and manifests: a reader that never creates or writes anything under the root
        # (nor claims its writer lease: the training job keeps saving).
        self._root = Root(root, storage_options)
        self._lock = threading.Lock()  # the watcher and an update request list and load alike

    def steps(self) -> list[int]:
        with self._lock:
            return self._root.steps()

    def load(self, step: int, version: str | None = None) -> Weights:
        with self._lock:
            shapes = {k: list(v.shape) for k, v in self._root.snapshot(step).manifest.tensors.items()}
            model = build_model(shapes, self.n_head)
            _load_weights(self.root, step, model, storage_options=self.storage_options)
        return Weights(model, step, version or str(step))

    def close(self) -> None:
        self._root.close()


# ----------------------------------------------------------------------------- engine


@dataclass
class Completion:
    """One request's generation: what was asked, and the channel its output goes back through
    (an asyncio queue of the server's loop, fed from the generation thread)."""

    tokens: list[int]
    max_tokens: int
    temperature: float
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
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
        flight: no timeout by default, a long batch must not make a good update report failure)."""
        with self._cond:
            self._staged = weights
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._staged is not weights or self._closed, timeout) and (
                self.weights is weights
            )

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

    # -- the generation thread

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closed or self._staged is not None or (self._queue and not self._paused)
                )
                if self._closed:
                    break
                if self._staged is not None:  # between batches: nothing in flight sees the swap
                    self.weights, self._staged = self._staged, None
                    self._cond.notify_all()
                if self._paused or not self._queue:
                    continue
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self._busy, self._abort, self._inflight = True, False, len(batch)
                weights = self.weights
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

    @torch.inference_mode()
    def _decode(self, batch: list[Completion], weights: Weights) -> None:
        """Greedy or sampled decoding of ``batch`` by ``weights``: each step runs the active
        requests' contexts (cropped to seq_len, right-padded: causal attention keeps padding out
        of every real position) and takes each one's logits at its own last token."""
        seq_len = weights.model.cfg.seq_len
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
            for i, c in enumerate(contexts):
                idx[i, : len(c)] = torch.tensor(c)
            last = torch.tensor([len(c) - 1 for c in contexts])
            logits = weights.model(idx)[torch.arange(len(active)), last].float()
            still = []
            for req, row in zip(active, logits):
                if req.temperature <= 0:
                    token = int(row.argmax())
                else:
                    probs = torch.softmax(row / req.temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=self._gen))
                req.generated.append(token)
                text = req.decoder.decode(bytes([token]))
                if text:
                    req.send("text", text)
                if req.cancelled:
                    continue
                if len(req.generated) >= req.max_tokens:
                    tail = req.decoder.decode(b"", final=True)
                    if tail:
                        req.send("text", tail)
                    req.send("done", "length")
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


# ----------------------------------------------------------------------------- app


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 256
    max_prompt: int = 4096  # bytes of UTF-8: the tokens
    max_body: int = MAX_BODY


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server does not use

    model: str | None = None
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    stream: bool = False


class UpdateWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True  # no cache to flush: every batch recomputes its contexts
    step: int | None = Field(default=None, ge=0)  # fmstore's extension: a step of model_path's root


def _error(
    status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


class _BodyLimit:
    """Rejects a body over ``limit`` bytes with 413 before the app reads it (declared by
    Content-Length or streamed in chunks alike)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        messages, total = [], 0
        while not too_big:
            message = await receive()
            messages.append(message)
            total += len(message.get("body", b""))
            too_big = total > self.limit
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        if too_big:
            return await _error(413, f"the request body exceeds {self.limit} bytes", "body")(
                scope, receive, send
            )

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def create_app(
    engine: Engine,
    service: WeightsService,
    *,
    name: str,
    limits: Limits = Limits(),
    token: str | None = None,
) -> Any:
    """The ASGI app over ``engine`` and ``service``; ``name`` is the model's name (the root's)."""
    app = FastAPI(title="fmstore serve", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    def model_id(weights: Weights) -> str:
        return f"{name}@step-{weights.step}"

    @app.middleware("http")
    async def bearer(request: Request, call_next: Callable[..., Any]) -> Any:
        if token and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            # compare_digest: the time taken tells nothing of the token
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                message = "a valid bearer token is required (Authorization: Bearer ...)"
                resp = _error(401, message, "authorization", "authentication_error")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return resp
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # 400 naming the field, without echoing the input (pydantic's default would: a prompt may be long)
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = "body" if first.get("type") == "json_invalid" else ".".join(loc) or "body"
        return _error(400, f"{param}: {first.get('msg', 'invalid request')}", param)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "step": engine.weights.step}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        w = engine.weights
        cfg = w.model.cfg
        return {
            "object": "list",
            "data": [{
                "id": model_id(w), "object": "model", "created": started, "owned_by": "fmstore",
                "root": service.snapshots.root, "fmstore_step": w.step, "weight_version": w.version,
                "max_model_len": cfg.seq_len,
            }],
            "fmstore_step": w.step,
        }  # fmt: skip

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Any:
        prompt = body.prompt.encode("utf-8")
        if len(prompt) > limits.max_prompt:
            return _error(400, f"prompt: {len(prompt)} bytes, at most {limits.max_prompt}", "prompt")
        if body.max_tokens > limits.max_tokens:
            return _error(400, f"max_tokens: {body.max_tokens}, at most {limits.max_tokens}", "max_tokens")
        req = Completion(list(prompt), body.max_tokens, body.temperature, asyncio.get_running_loop())
        try:
            engine.submit(req)
        except FmstoreError as e:
            return _error(503, str(e), None, "server_error")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        kind, weights = await req.out.get()  # ("start", the weights decoding it)
        if kind != "start":
            req.cancelled = True
            return _error(
                503 if kind == "done" else 500, f"request not served: {weights}", None, "server_error"
            )

        def usage() -> dict[str, int]:
            n = len(req.generated)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        def chunk(text: str, finish: str | None, **more: Any) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_id(weights),
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                    "fmstore_step": weights.step, **more}  # fmt: skip

        if body.stream:

            async def events() -> AsyncIterator[bytes]:
                try:
                    while True:
                        kind, value = await req.out.get()
                        if kind == "text":
                            yield f"data: {json.dumps(chunk(value, None))}\n\n".encode()
                        elif kind == "done":
                            yield f"data: {json.dumps(chunk('', value, usage=usage()))}\n\n".encode()
                            break
                        else:  # the stream has started (200 sent): report the error in it
                            error = {"error": {"message": value, "type": "server_error"}}
                            yield f"data: {json.dumps(error)}\n\n".encode()
                            break
                    yield b"data: [DONE]\n\n"
                finally:
                    req.cancelled = True  # a client gone away stops being decoded

            return StreamingResponse(
                events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        parts: list[str] = []
        try:
            while True:
                kind, value = await req.out.get()
                if kind == "text":
                    parts.append(value)
                elif kind == "done":
                    return chunk("".join(parts), value, usage=usage())
                else:
                    return _error(500, value, None, "server_error")
        finally:
            req.cancelled = True

    @app.post("/update_weights_from_disk")
    async def update_weights(body: UpdateWeightsRequest) -> dict[str, Any]:
        def answer(ok: bool, message: str, paused: int = 0) -> dict[str, Any]:
            return {"success": ok, "message": message, "num_paused_requests": paused}

        if body.load_format not in (None, "auto", "fmstore"):
            return answer(
                False, f"load_format {body.load_format!r} is not supported (null, 'auto' or 'fmstore')"
            )
        path = body.model_path.rstrip("/")
        root, _, last = path.rpartition("/")
        own = STEP_DIR.match(last)
        if not own:
            root = path
        if _norm(root) != _norm(service.snapshots.root):
            served = service.snapshots.root
            message = f"model_path {body.model_path!r} is neither the served root {served!r} nor its step's"
            return answer(False, message)
        step = int(own.group(1)) if own else body.step
        if own and body.step is not None and body.step != step:
            return answer(False, f"model_path names step {step} but step is {body.step}")
        loop = asyncio.get_running_loop()
        if step is None:
            steps = await loop.run_in_executor(None, service.snapshots.steps)
            if not steps:
                return answer(False, f"no committed snapshot under {service.snapshots.root!r}")
            step = steps[-1]
        aborted = engine.abort_all() if body.abort_all_requests else 0
        # In a worker thread: the load takes seconds for a large model, requests keep being served.
        ok, message = await loop.run_in_executor(None, service.update, step, body.weight_version)
        return answer(ok, message, aborted)

    @app.post("/pause_generation")
    async def pause() -> dict[str, Any]:
        queued = await asyncio.get_running_loop().run_in_executor(None, engine.pause)
        return {
            "success": True,
            "message": "generation paused; the batch in flight has finished",
            "queued": queued,
        }

    @app.post("/continue_generation")
    async def resume() -> dict[str, Any]:
        engine.resume()
        return {"success": True, "message": "generation continued", "queued": engine.queued()}

    return _BodyLimit(app, limits.max_body)


def _norm(path: str) -> str:
    """A root as compared: URLs as given, local paths absolute (``file://`` dropped)."""
    path = path.rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://") :]
    return path if "://" in path else os.path.abspath(path)


# ----------------------------------------------------------------------------- running


@dataclass
class Server:
    """A running server's parts, for :func:`serve`'s caller (the tests stop it with ``stop``)."""

    engine: Engine
    service: WeightsService
    snapshots: Snapshots
    app: Any
    uvicorn: Any

    def run(self) -> None:
        try:
            self.uvicorn.run()
        finally:
            self.close()

    def stop(self) -> None:
        self.uvicorn.should_exit = True

    def close(self) -> None:
        self.service.close()
        self.engine.close()
        self.snapshots.close()


def serve(
    root: str,
    *,
    step: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    poll: float = 2.0,
    n_head: int | None = None,
    limits: Limits = Limits(),
    max_batch: int = 8,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    log_level: str = "info",
) -> Server:
    """Load ``step`` (default: the newest committed) of ``root`` and return the server, not yet
    running: ``.run()`` serves until stopped (SIGINT/SIGTERM, or ``.stop()`` from another thread)."""
    snapshots = Snapshots(root, n_head=n_head, storage_options=storage_options)
    try:
        steps = snapshots.steps()
        if step is None:
            if not steps:
                raise SnapshotNotFoundError(f"no committed snapshot under {root!r} to serve")
            step = steps[-1]
        weights = snapshots.load(step)
    except BaseException:
        snapshots.close()
        raise
    engine = Engine(weights, max_batch=max_batch)
    service = WeightsService(snapshots, engine, poll=poll, seen=max([step, *steps]))
    name = root.rstrip("/").rsplit("/", 1)[-1] or root
    app = create_app(engine, service, name=name, limits=limits, token=token)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
    return Server(engine, service, snapshots, app, uvicorn.Server(config))


def run_args(args: argparse.Namespace, storage_options: dict[str, Any] | None = None) -> int:
    """Serve as ``fmstore serve``'s parsed options say (fmstore/cli/serve.py defines them, so the
    command's ``--help`` needs neither torch nor fastapi); returns when the server stops."""
    for opt in ("max_tokens", "max_prompt", "max_batch"):
        if getattr(args, opt) < 1:
            raise ConfigError(f"--{opt.replace('_', '-')} must be at least 1")
    n_head = args.n_head or (SIZES[args.size][2] if args.size else None)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    token = os.environ.get(args.token_env) or None
    server = serve(
        args.root,
        step=args.step,
        host=args.host,
        port=args.port,
        poll=args.poll,
        n_head=n_head,
        limits=Limits(args.max_tokens, args.max_prompt),
        max_batch=args.max_batch,
        token=token,
        storage_options=storage_options,
        log_level=args.log_level,
    )
    w = server.engine.weights
    auth = f"bearer token from ${args.token_env}" if os.environ.get(args.token_env) else "no token"
    n = sum(p.numel() for p in w.model.parameters())
    print(f"fmstore serve: step {w.step} of {args.root} ({n / 1e6:.2f} M "
          f"parameters), http://{args.host}:{args.port}, {auth}", file=sys.stderr, flush=True)  # fmt: skip
    server.run()
    return 0
