"""Serve the newest committed snapshot of a training run, following training as it commits.

    fmstore serve ckpt/run1 --port 8000           # options: fmstore serve --help (fmstore/cli/serve.py)
    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "def ", "max_tokens": 32}'

The run is one of :mod:`fmstore.integrations.train` (a byte-level GPT saved by ``LoopCheckpointer``
with the state ``{"model": ..., "optim": ..., ...}``), or, with ``--hf-config``, a transformers
causal LM (saved by hf.py's ``FmstoreCallback`` or ``Checkpointer.save(step, {"model": model})``).
Only the ``model`` part is read, by fmstore's streaming loader; with ``--gpu-budget`` weights larger
than the budget are offloaded to host memory and streamed to the device layer by layer.

The parts, each a module:

- :mod:`~fmstore.integrations.serve_models`: the model built from a snapshot (train.py's GPT, or a
  transformers causal LM) and the load of its weights; :mod:`~fmstore.integrations.serve_text`:
  text as tokens (bytes, or the model's tokenizer); :mod:`~fmstore.integrations.serve_offload`:
  weights on the device, or offloaded over ``--gpu-budget``;
- :mod:`~fmstore.integrations.serve_engine`: the batching generation thread, the swap of new
  weights between batches, the watcher that follows training's commits;
- this module, the **app**: the HTTP API (FastAPI, served by uvicorn): ``/health``, ``/v1/models``,
  ``/v1/completions`` (OpenAI's shape, ``stream`` as server-sent events), and SGLang's
  ``/update_weights_from_disk``, ``/pause_generation``, ``/continue_generation``; request
  validation; an optional bearer token guarding all but ``/health``; and the runner
  (:func:`serve`, :func:`run_args`, which ``fmstore serve`` calls).

Needs the ``serve`` extra (``pip install "fmstore[serve]"``): fastapi and uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fmstore.integrations import require

fastapi = require("fastapi", "serve", by=__name__)
uvicorn = require("uvicorn", "serve", by=__name__)
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from fmstore.integrations.serve_engine import Completion, Engine, WeightsService  # noqa: E402
from fmstore.integrations.serve_models import (  # noqa: E402
    MODEL,
    CausalLM,
    GPTFamily,
    Snapshots,
    Weights,
    build_model,
    load_weights,
    model_config,
)
from fmstore.integrations.serve_offload import default_device, offload_info, parse_budget  # noqa: E402
from fmstore.integrations.train import SIZES  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from fmstore import ConfigError, FmstoreError  # noqa: E402
from fmstore.checkpoint import SnapshotNotFoundError  # noqa: E402

__all__ = [
    "Limits",
    "Weights",
    "Engine",
    "WeightsService",
    "Snapshots",
    "Server",
    "GPTFamily",
    "CausalLM",
    "create_app",
    "build_model",
    "model_config",
    "load_weights",
    "serve",
    "run_args",
    "MODEL",
]

log = logging.getLogger("fmstore.serve")

#: The largest request body read (bytes); a larger one gets 413 before anything parses it.
MAX_BODY = 1 << 20
#: A snapshot's own directory under its root: ``ROOT/step-0000000012``.
STEP_DIR = re.compile(r"^step-(\d{10})$")


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
        w = engine.weights
        out: dict[str, Any] = {"status": "ok", "step": w.step}
        if w.offload is not None:  # only then: a plain server's answer stays as it was
            out["offload"] = offload_info(w.offload, w.model)
        return out

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        w = engine.weights
        return {
            "object": "list",
            "data": [{
                "id": model_id(w), "object": "model", "created": started, "owned_by": "fmstore",
                "root": service.snapshots.root, "fmstore_step": w.step, "weight_version": w.version,
                "max_model_len": w.family.context(w.model), "fmstore_model": w.family.kind,
            }],
            "fmstore_step": w.step,
            "device": str(w.device),
            "offload": offload_info(w.offload, w.model),
        }  # fmt: skip

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Any:
        size = len(body.prompt.encode("utf-8"))
        if size > limits.max_prompt:
            return _error(400, f"prompt: {size} bytes, at most {limits.max_prompt}", "prompt")
        if body.max_tokens > limits.max_tokens:
            return _error(400, f"max_tokens: {body.max_tokens}, at most {limits.max_tokens}", "max_tokens")
        text = engine.weights.family.text  # one family for the server's life: every step's
        prompt = text.encode(body.prompt)
        if not prompt:
            return _error(400, "prompt: no tokens", "prompt")
        req = Completion(
            prompt, body.max_tokens, body.temperature, asyncio.get_running_loop(), decoder=text.decoder()
        )
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
    hf_config: str | None = None,
    prefix: str = MODEL,
    device: str | None = None,
    gpu_budget: int | str | None = None,
) -> Server:
    """Load ``step`` (default: the newest committed) of ``root`` and return the server, not yet
    running: ``.run()`` serves until stopped (SIGINT/SIGTERM, or ``.stop()`` from another thread).

    ``hf_config``: serve a transformers causal LM of this config (file or directory, with its
    tokenizer) instead of train.py's GPT; ``prefix``: the part of the snapshot's state holding
    the model; ``device`` (default cuda if available, else cpu); ``gpu_budget``: the bytes of
    weights allowed on the device, offloaded beyond (:mod:`~fmstore.integrations.serve_offload`)."""
    if hf_config is not None and n_head is not None:
        raise ConfigError(
            "--n-head/--size are train.py's GPT's; a transformers model's config tells its heads"
        )
    family = CausalLM(hf_config, prefix=prefix) if hf_config is not None else GPTFamily(n_head, prefix=prefix)
    snapshots = Snapshots(
        root,
        family=family,
        device=device or default_device(),
        budget=parse_budget(gpu_budget),
        storage_options=storage_options,
    )
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
        hf_config=args.hf_config,
        prefix=args.prefix,
        device=args.device,
        gpu_budget=args.gpu_budget,
    )
    w = server.engine.weights
    auth = f"bearer token from ${args.token_env}" if os.environ.get(args.token_env) else "no token"
    n = sum(p.numel() for p in w.model.parameters())
    where = f"on {w.device}" + (
        f", offloaded within {w.offload.budget} bytes" if w.offload is not None else ""
    )
    print(f"fmstore serve: step {w.step} of {args.root} ({n / 1e6:.2f} M parameters, {where}), "
          f"http://{args.host}:{args.port}, {auth}", file=sys.stderr, flush=True)  # fmt: skip
    server.run()
    return 0
