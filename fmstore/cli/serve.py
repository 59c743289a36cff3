"""``fmstore serve ROOT [--step N] [--port 8000] ...``: serve the newest committed snapshot of a
train.py run (or, with ``--hf-config``, of a transformers causal LM) over HTTP (OpenAI-style
completions), loading each newer step as training commits it; ``--gpu-budget`` offloads weights
larger than the budget.
The server is :mod:`fmstore.integrations.serve` (the ``serve`` extra: fastapi, uvicorn); this
module only parses its options, so ``fmstore --help`` imports neither it nor torch."""

from __future__ import annotations

import argparse

from ._common import add_storage_options, resolve_root, storage_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a training run's newest snapshot over HTTP (completions), following new commits",
        description="Serve the newest committed snapshot of a fmstore.integrations.train run (or of a "
        "transformers causal LM: --hf-config): "
        "GET /health, GET /v1/models, POST /v1/completions (OpenAI-style, stream=true for SSE), "
        "POST /update_weights_from_disk, /pause_generation, /continue_generation.  Binds 127.0.0.1 "
        'unless --host is given.  Needs: pip install "fmstore[serve]".',
    )
    # The options are the server's own, defined once there; its module imports fastapi and torch,
    # so they are added here without importing it: see _arguments.
    _arguments(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "root",
        help="a checkpoint root of a train.py (or --hf-config model's) run (directory or URL), or a "
        "snapshot's directory",
    )
    p.add_argument("--step", type=int, help="the step to serve first (default: the newest committed)")
    p.add_argument(
        "--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--poll", type=float, default=2.0, help="seconds between looks for a newer committed step (0: never)"
    )
    p.add_argument("--size", choices=["1b", "base", "small", "tiny"],
                   help="train.py's --size of the run: gives the number of heads")  # fmt: skip
    p.add_argument(
        "--n-head", type=int, help="attention heads (default: train.py's size with the snapshot's d_model)"
    )
    p.add_argument(
        "--hf-config",
        metavar="PATH_OR_DIR",
        help="serve a transformers causal LM of this config.json (or its directory), with the tokenizer "
        "saved beside it, instead of train.py's GPT",
    )
    p.add_argument(
        "--prefix",
        default="model",
        help="the part of the snapshot's state holding the model (default: model, as train.py and "
        "fmstore.integrations.hf save it)",
    )
    p.add_argument("--device", help="where the model runs (default: cuda if available, else cpu)")
    p.add_argument(
        "--gpu-budget",
        metavar="SIZE",
        help="the most bytes of weights on the device (e.g. 8GiB); larger weights are offloaded to "
        "host memory and streamed to the device layer by layer",
    )
    p.add_argument("--max-tokens", type=int, default=256, help="the largest max_tokens a request may ask")
    p.add_argument("--max-prompt", type=int, default=4096, help="the longest prompt, in bytes of UTF-8")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument(
        "--token-env",
        default="FMSTORE_SERVE_TOKEN",
        help="the variable holding the bearer token (unset: none)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    args.root, args.step = resolve_root(args.root, args.step, args)
    try:
        from fmstore.integrations import serve
    except ModuleNotFoundError as e:  # the serve extra is missing: its message names it
        raise ConfigError(str(e)) from None
    return serve.run_args(args, storage_options(args))
