"""Offload side by side (issue 14): training with the optimizer's states off the device, and
serving a model larger than the device budget; same model, same process, against the peers.

Part A (``--part train``): a stack of MLP blocks (``x + Linear(4h, h)(GELU(Linear(h, 4h)(x)))``)
sized by ``--params``, trained on random inputs (loss = mean square of the output).  Iteration
time (forward + backward + optimizer step, synchronized, median over ``--iters`` after
``--warmup``) of:

- ``gpu``: everything on the device; bf16 params with fp32 master weights kept beside them the
  standard way (apex O2 / DeepSpeed: fp32 copy of every param, grads cast to fp32, fused AdamW on
  the masters, masters copied back to the bf16 params); on a CPU plain fp32 AdamW;
- ``fsdp-cpu-offload``: FSDP2 ``fully_shard(..., offload_policy=CPUOffloadPolicy())`` on every
  block and on the root, one process (world size 1), fp32 sharded params on the host (the
  masters), bf16 compute (``MixedPrecisionPolicy``), AdamW on the host params;
- ``torchao``: torchao's ``CPUOffloadOptimizer(params, torch.optim.AdamW, fused=True,
  offload_gradients=False)``; the host copy has the params' dtype, so fp32 params under bf16
  autocast (fp32 masters, ``--torchao-params fp32``) or bf16 params (bf16 AdamW, no masters);
- ``fmstore`` / ``fmstore-sync``: ``fmstore.offload.OffloadedOptimizer`` over a
  ``TieredStore([HostTier, LocalTier])``, bf16 params on the device, fp32 masters + AdamW states
  in the store with ``--device-fraction`` of them kept on the device; ``overlap_backward`` on
  (``fmstore``) and off (``fmstore-sync``).

Beside them: pinned H2D and D2H bandwidth (1 GiB, same run; a CPU measures a plain memcpy), the
transfer bound of fmstore's step (12 B/param each way for the offloaded part: fp32 master + 2
moments; 8 B/param on a CPU run, whose fp32 params need no master), ratios of each
method against ``gpu`` and of fmstore against each peer.

Part B (``--part serve``): a ``LlamaForCausalLM`` built from a config sized by ``--serve-params``
(bf16), saved once to ``--dir`` and loaded fresh for each method, with a device budget of half the
weights' bytes; greedy generation of ``--new-tokens`` for ``--serve-batch`` prompts of
``--prompt-len`` tokens.  Tokens/s (whole ``generate``, and decode only: ``generate(N)`` minus
``generate(1)``) of ``fmstore`` (``offload_parameters(model, store=..., budget=..., prefetch=2)``),
accelerate's ``cpu_offload`` (streams every weight), ``device_map="auto"`` with ``max_memory``
(on a CPU: the rest to disk), and ``resident`` (all on the device, a reference where it fits);
against the PCIe bound: batch / (offloaded bytes / H2D bandwidth) tokens/s.

Methods run one at a time on a fresh model (the device's memory freed in between), ``--repeats``
rounds in an order rotated each round; a method that raises prints its error and the run goes on.
The fmstore methods are imported lazily: until ``fmstore.offload`` has them, they print
"skipped".

    PYTHONPATH=. .venv/bin/python bench/offload.py --part train      # CPU smoke run, < 2 min
    PYTHONPATH=. .venv/bin/python bench/offload.py --part serve
    PYTHONPATH=. python3 bench/offload.py --part train --params 2.15e9 --batch 8 --seq 512   # CUDA
    PYTHONPATH=. python3 bench/offload.py --part serve --serve-params 8e9 --new-tokens 16     # CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from common import copy_rate, free_port, machine_info  # bench/common.py

from fmstore import format_size
from fmstore.offload import OffloadedOptimizer, offload_parameters

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GB = 1e9
STATE_BPP = 12 if CUDA else 8  # fmstore's offloaded bytes per param: fp32 master (bf16 params) + 2 moments


class Skip(Exception):
    """A method that cannot run here (not importable, needs a GPU): printed, not a failure."""


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def free_device() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):  # cached pinned host blocks
            if hasattr(torch._C, name):
                getattr(torch._C, name)()
                break


def peak_reset() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak() -> str:
    return format_size(torch.cuda.max_memory_allocated()) if CUDA else "-"


def bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> tuple[float, float]:
    """(H2D, D2H) in bytes/s: a pinned ``nbytes`` tensor to and from the device, best of
    ``repeats``; on a CPU a plain memcpy of ``nbytes`` (both the same)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=CUDA)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)

    h2d = copy_rate(dev, host, repeats)
    d2h = copy_rate(host, dev, repeats) if CUDA else h2d
    del host, dev
    free_device()
    return h2d, d2h


@contextlib.contextmanager
def store_at(root: str, host_bytes: int) -> Iterator[Any]:
    """A ``TieredStore([HostTier(host_bytes), LocalTier(root/...)])``, closed and removed after."""
    import fmstore

    path = tempfile.mkdtemp(prefix="store-", dir=root)
    store = fmstore.TieredStore(
        [fmstore.HostTier(capacity=max(host_bytes, 1 << 20)), fmstore.LocalTier(path)]
    )
    try:
        yield store
    finally:
        store.close(flush=False)
        shutil.rmtree(path, ignore_errors=True)



# =============================================================================== Part A: training


class Block(torch.nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(h, 4 * h)
        self.down = torch.nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Stack(torch.nn.Module):
    def __init__(self, h: int, n: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(h) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def n_blocks(params: float, h: int) -> int:
    return max(1, round(params / (8 * h * h + 5 * h)))


def make_stack(a: argparse.Namespace, dtype: torch.dtype, device: str) -> Stack:
    torch.manual_seed(0)
    with torch.device(device):
        model = Stack(a.hidden, n_blocks(a.params, a.hidden))
    return model.to(dtype)


@dataclass
class Train:
    """What a method builds: the model, a step function and a teardown; notes for the table."""

    model: torch.nn.Module
    step: Callable[[torch.Tensor], torch.Tensor]
    close: Callable[[], None] = lambda: None
    note: str = ""
    h2d: float = 0.0  # bytes each step must bring to the device (the method's own traffic model)
    d2h: float = 0.0


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def plain_step(model: torch.nn.Module, opt: Any, autocast: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """One iteration as every method but the manual-master one runs it: forward (under bf16
    autocast if asked), backward, the optimizer's step, gradients set to None."""

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = loss_of(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def train_gpu(a: argparse.Namespace, n: int) -> Train:
    if not CUDA:
        model = make_stack(a, torch.float32, "cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, foreach=True)
        return Train(model, plain_step(model, opt), note="fp32 params, AdamW(foreach) on the CPU")
    model = make_stack(a, torch.bfloat16, DEVICE)
    params = [p for p in model.parameters()]
    masters = [p.detach().float() for p in params]
    for m in masters:
        m.grad = torch.empty_like(m)
    opt = torch.optim.AdamW(masters, lr=a.lr, fused=True)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = loss_of(model(x))
        loss.backward()
        grads = [p.grad for p in params]
        torch._foreach_copy_([m.grad for m in masters], grads)
        opt.step()
        torch._foreach_copy_(params, masters)
        for p in params:
            p.grad = None
        return loss

    return Train(
        model,
        step,
        note="bf16 params + fp32 masters on the device (grads cast, masters copied back), fused AdamW",
    )


_PG: dict[str, bool] = {}


def process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    port = free_port()
    if CUDA:
        torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl" if CUDA else "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}"
    )
    _PG["ours"] = True


def train_fsdp(a: argparse.Namespace, n: int) -> Train:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    process_group()
    model = make_stack(a, torch.float32, DEVICE)  # built on the device (fast init), sharded to the host
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if CUDA
        else MixedPrecisionPolicy()
    )
    policy = CPUOffloadPolicy(pin_memory=CUDA)  # a CPU run has no pinned memory
    for b in model.blocks:
        fully_shard(b, offload_policy=policy, mp_policy=mp)
    fully_shard(model, offload_policy=policy, mp_policy=mp)
    free_device()
    try:
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, fused=True)
        kind = "fused"
    except Exception:
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, foreach=True)
        kind = "foreach"

    step = plain_step(model, opt)

    # fp32 shards up for the forward and again for the backward (resharded after forward), fp32 grads down
    return Train(model, step, note=f"FSDP2 CPUOffloadPolicy, fp32 host params (masters), {'bf16' if CUDA else 'fp32'} compute, AdamW({kind}) on the host",
                 h2d=2 * 4 * n, d2h=4 * n)  # fmt: skip


def train_torchao(a: argparse.Namespace, n: int) -> Train:
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError:
        try:
            from torchao.prototype.low_bit_optim import CPUOffloadOptimizer
        except ImportError as e:
            raise Skip(f"torchao not importable ({e})") from None
    if not CUDA:
        raise Skip("CPUOffloadOptimizer needs CUDA or XPU (it asserts so)")
    fp32 = a.torchao_params == "fp32"
    model = make_stack(a, torch.float32 if fp32 else torch.bfloat16, DEVICE)
    opt = CPUOffloadOptimizer(
        model.parameters(), torch.optim.AdamW, fused=True, offload_gradients=False, lr=a.lr
    )

    step = plain_step(model, opt, autocast=fp32)

    width = 4 if fp32 else 2
    note = ("fp32 params under bf16 autocast (fp32 masters on the host)" if fp32
            else "bf16 params, bf16 AdamW on the host (no fp32 masters)")  # fmt: skip
    return Train(model, step, note=note + ", fused AdamW on the host", h2d=width * n, d2h=width * n)


def train_fmstore(a: argparse.Namespace, n: int, overlap: bool, stack: contextlib.ExitStack) -> Train:
    model = make_stack(a, torch.bfloat16 if CUDA else torch.float32, DEVICE)
    states = STATE_BPP * n
    store = stack.enter_context(store_at(a.dir, int(states * (1 - a.device_fraction) * 1.25) + (64 << 20)))
    opt = OffloadedOptimizer(
        model.parameters(), torch.optim.AdamW, store=store, device=torch.device(DEVICE), lr=a.lr,
        device_fraction=a.device_fraction, overlap_backward=overlap, **({"fused": True} if CUDA else {}),
    )  # fmt: skip

    step = plain_step(model, opt)

    moved = states * (1 - a.device_fraction)
    note = (f"{'bf16 params, fp32 masters + ' if CUDA else 'fp32 params, '}AdamW states {format_size(states)} in the store, "
            f"{format_size(int(states * a.device_fraction))} on the device (F={a.device_fraction}), overlap_backward={overlap}")  # fmt: skip
    return Train(model, step, close=opt.close, note=note, h2d=moved, d2h=moved)


TRAIN = ["gpu", "fsdp-cpu-offload", "torchao", "fmstore", "fmstore-sync"]


def run_train_method(name: str, a: argparse.Namespace, n: int) -> tuple[list[float], str, str]:
    """(per-iteration seconds after warm-up, note, peak device memory)."""
    peak_reset()
    with contextlib.ExitStack() as stack:
        if name == "gpu":
            t = train_gpu(a, n)
        elif name == "fsdp-cpu-offload":
            t = train_fsdp(a, n)
        elif name == "torchao":
            t = train_torchao(a, n)
        else:
            t = train_fmstore(a, n, name == "fmstore", stack)
        stack.callback(t.close)
        g = torch.Generator(device=DEVICE).manual_seed(1)
        dtype = torch.bfloat16 if CUDA else torch.float32
        x = torch.randn(a.batch, a.seq, a.hidden, device=DEVICE, dtype=dtype, generator=g)
        times = []
        for i in range(a.warmup + a.iters):
            sync()
            t0 = time.perf_counter()
            loss = t.step(x)
            sync()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss).item():
            raise RuntimeError(f"loss is {loss.item()}")
        mem = peak()
        note = t.note
        if t.h2d:
            note += f"; moves {t.h2d / GB:.2f} GB H2D + {t.d2h / GB:.2f} GB D2H a step"
        del t, x, loss
    return times, note, mem


def rotated_rounds(
    names: list[str], a: argparse.Namespace, notes: dict[str, str], width: int, run: Callable[[str], Any]
) -> Iterator[tuple[int, str, Any]]:
    """(round, method, result) of ``run(method)`` for every method in ``--repeats`` rounds, the
    order rotated each round; a method that is skipped or fails is noted once and not run again."""
    for rnd in range(a.repeats):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            if notes.get(name, "").startswith(("skipped", "error")):
                continue
            try:
                result = run(name)
            except Skip as e:
                notes[name] = f"skipped: {e}"
                print(f"  round {rnd + 1}: {name:<{width}} skipped: {e}", flush=True)
                continue
            except Exception as e:
                notes[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"  round {rnd + 1}: {name:<{width}} {notes[name]}", flush=True)
                if a.verbose:
                    traceback.print_exc()
                continue
            finally:
                free_device()
            yield rnd, name, result


def part_train(a: argparse.Namespace, h2d: float, d2h: float) -> None:
    n_blk = n_blocks(a.params, a.hidden)
    n = n_blk * (8 * a.hidden**2 + 5 * a.hidden)
    states = STATE_BPP * n
    dev_part = states * a.device_fraction
    moved = states - dev_part
    print(f"model:   {n_blk} MLP blocks, h={a.hidden} (h->4h->h, GELU, residual), {n / 1e9:.3f} B params "
          f"({format_size(2 * n)} bf16); batch {a.batch} x seq {a.seq}; AdamW lr {a.lr}")  # fmt: skip
    what = "fp32 masters + 2 AdamW moments" if CUDA else "2 AdamW moments (fp32 params: no masters)"
    print(f"states:  {what} = {STATE_BPP} B/param = {format_size(states)}; fmstore's device part "
          f"(--device-fraction {a.device_fraction}) {format_size(int(dev_part))}, offloaded {format_size(int(moved))}")  # fmt: skip
    t_h2d, t_d2h = moved / h2d, moved / d2h
    bound_duplex, bound_serial = max(t_h2d, t_d2h), t_h2d + t_d2h
    print(f"bound:   fmstore moves {moved / GB:.2f} GB each way a step: H2D {t_h2d * 1e3:.1f} ms + D2H {t_d2h * 1e3:.1f} ms "
          f"-> {bound_duplex * 1e3:.1f} ms (both directions at once) / {bound_serial * 1e3:.1f} ms (one after the other)", flush=True)  # fmt: skip
    names = [m for m in TRAIN if not a.only or m in a.only.split(",")]
    rounds: dict[str, list[float]] = {m: [] for m in names}
    notes: dict[str, str] = {}
    for rnd, name, (times, note, mem) in rotated_rounds(names, a, notes, 17, lambda m: run_train_method(m, a, n)):
        med = statistics.median(times)
        rounds[name].append(med)
        notes[name] = note
        print(f"  round {rnd + 1}: {name:<17} {med * 1e3:9.1f} ms/iter (min {min(times) * 1e3:.1f}, max "
              f"{max(times) * 1e3:.1f}; peak device memory {mem})  {note}", flush=True)  # fmt: skip
    med = {m: statistics.median(v) for m, v in rounds.items() if v}
    print("\n== train: median over rounds of each round's median iteration ==")
    base = med.get("gpu")
    for m in names:
        if m not in med:
            print(f"{m:<17} {notes.get(m, '')}")
            continue
        line = f"{m:<17} {med[m] * 1e3:9.1f} ms/iter"
        line += f"  {med[m] / base:6.2f}x gpu" if base else "          "
        if m.startswith("fmstore"):
            line += f"  {med[m] / bound_duplex:6.2f}x transfer bound ({bound_duplex * 1e3:.1f} ms)"
        print(line + f"  ({len(rounds[m])} rounds)")
    for f in ("fmstore", "fmstore-sync"):
        if f in med:
            peers = [f"{med[f] / med[p]:.2f}x {p}" for p in names if p in med and not p.startswith("fmstore")]
            print(f"{f} vs peers (time ratio, < 1 is faster): " + (", ".join(peers) or "-"))
    print(
        f"ratios: time over time (lower is faster); the transfer bound: the offloaded {STATE_BPP} B/param each way "
        "over the measured bandwidth (pinned H2D/D2H; a CPU run: memcpy)"
    )


# ================================================================================ Part B: serving


def llama_config(a: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    if CUDA and a.serve_hidden is None:
        h, inter, heads, kv, vocab = 4096, 14336, 32, 8, 128256  # Llama-3 8B shapes
    else:
        h = a.serve_hidden or 512
        inter, heads, kv, vocab = (7 * h) // 2 // 64 * 64, max(1, h // 64), max(1, h // 128), 8192
    per_layer = 2 * h * h + 2 * h * (h // heads * kv) + 3 * h * inter + 2 * h
    layers = max(1, round((a.serve_params - 2 * vocab * h) / per_layer))
    return LlamaConfig(
        hidden_size=h, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
        num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=max(2048, a.prompt_len + a.new_tokens),
        tie_word_embeddings=False,
    )  # fmt: skip


def save_model(a: argparse.Namespace, path: str) -> int:
    """Build the model from its config (on the device when there is one: fast init), save it to
    ``path``; the weights' bytes."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(a)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # small weights: a random init's logits are flat and greedy is noise
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.cpu().save_pretrained(path)
    del model
    free_device()
    print(f"model:   Llama {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, "
          f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size}: "
          f"{nbytes / 2 / 1e9:.3f} B params, {format_size(nbytes)} bf16", flush=True)  # fmt: skip
    return nbytes


def load(path: str, **kw: Any) -> torch.nn.Module:
    import transformers
    from packaging.version import Version
    from transformers import LlamaForCausalLM

    # "dtype" from transformers 4.56 on; before, an unknown keyword lands in the config, silently
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = LlamaForCausalLM.from_pretrained(path, **{key: torch.bfloat16}, **kw)
    model.eval()
    return model


@dataclass
class Serve:
    model: torch.nn.Module
    close: Callable[[], None] = lambda: None
    offloaded: float = 0.0  # bytes each forward brings to the device
    note: str = ""
    extra: list[Any] = field(default_factory=list)


def serve_fmstore(
    a: argparse.Namespace, path: str, nbytes: int, budget: int, stack: contextlib.ExitStack
) -> Serve:
    model = load(path)
    store = stack.enter_context(store_at(a.dir, nbytes + (256 << 20)))
    h = offload_parameters(model, store=store, device=torch.device(DEVICE), budget=budget, prefetch=2)
    return Serve(model, close=h.remove, offloaded=nbytes - budget,
                 note=f"offload_parameters(budget {format_size(budget)}, prefetch=2)")  # fmt: skip


def serve_cpu_offload(
    a: argparse.Namespace, path: str, nbytes: int, budget: int, stack: contextlib.ExitStack
) -> Serve:
    from accelerate import cpu_offload

    model = load(path)
    cpu_offload(model, execution_device=torch.device(DEVICE))
    return Serve(model, offloaded=nbytes, note="accelerate cpu_offload: every weight streamed, no budget")


def serve_device_map(
    a: argparse.Namespace, path: str, nbytes: int, budget: int, stack: contextlib.ExitStack
) -> Serve:
    if CUDA:
        model = load(path, device_map="auto", max_memory={0: budget, "cpu": 4 * nbytes + (8 << 30)})
        note = f'device_map="auto", max_memory={{0: {format_size(budget)}, "cpu": ...}}'
    else:  # no device: the budget is host memory, the rest goes to disk
        folder = tempfile.mkdtemp(prefix="offload-", dir=a.dir)
        stack.callback(shutil.rmtree, folder, True)
        model = load(path, device_map="auto", max_memory={"cpu": budget}, offload_folder=folder)
        note = (
            f'device_map="auto", max_memory={{"cpu": {format_size(budget)}}}, the rest to disk (no GPU here)'
        )
    on_dev = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == DEVICE)
    placed = getattr(model, "hf_device_map", {})
    kinds = sorted({str(v) for v in placed.values()})
    return Serve(model, offloaded=nbytes - on_dev if CUDA else nbytes - budget,
                 note=f"{note}; placed on {kinds}, {format_size(on_dev)} resident")  # fmt: skip


def serve_resident(
    a: argparse.Namespace, path: str, nbytes: int, budget: int, stack: contextlib.ExitStack
) -> Serve:
    if CUDA and nbytes > torch.cuda.mem_get_info()[0] * 0.8:
        raise Skip("the weights do not fit on the device")
    model = load(path).to(DEVICE)
    return Serve(model, offloaded=0, note="all weights on the device (no offload; the reference)")


SERVE: dict[str, Callable[..., Serve]] = {
    "fmstore": serve_fmstore,
    "cpu_offload": serve_cpu_offload,
    "device_map": serve_device_map,
    "resident": serve_resident,
}


def generate(model: torch.nn.Module, ids: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    sync()
    return time.perf_counter() - t0, out[:, ids.shape[1] :].cpu()


def run_serve_method(name: str, a: argparse.Namespace, path: str, nbytes: int, budget: int) -> dict[str, Any]:
    peak_reset()
    with contextlib.ExitStack() as stack:
        s = SERVE[name](a, path, nbytes, budget, stack)
        stack.callback(s.close)
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(1, s.model.config.vocab_size, (a.serve_batch, a.prompt_len), generator=g).to(
            DEVICE
        )
        generate(s.model, ids, 2)  # warm-up
        t1, _ = generate(s.model, ids, 1)  # prefill + 1 token
        tn, toks = generate(s.model, ids, a.new_tokens)
        out = dict(
            total=a.serve_batch * a.new_tokens / tn,
            decode=a.serve_batch * (a.new_tokens - 1) / max(tn - t1, 1e-9),
            prefill=t1,
            tokens=toks,
            offloaded=s.offloaded,
            note=s.note,
            mem=peak(),
        )
        del s, ids
    return out


def part_serve(a: argparse.Namespace, h2d: float) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = tempfile.mkdtemp(prefix="llama-", dir=a.dir)
    try:
        nbytes = save_model(a, path)
        budget = int(nbytes * a.budget_fraction)
        print(f"budget:  {format_size(budget)} on the device ({a.budget_fraction} of the weights); batch {a.serve_batch} "
              f"x prompt {a.prompt_len}, {a.new_tokens} new tokens, greedy, KV cache", flush=True)  # fmt: skip
        names = [m for m in SERVE if not a.only or m in a.only.split(",")]
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
        notes: dict[str, str] = {}
        serve = lambda m: run_serve_method(m, a, path, nbytes, budget)  # noqa: E731
        for rnd, name, r in rotated_rounds(names, a, notes, 12, serve):
            rounds[name].append(r)
            notes[name] = r["note"]
            print(f"  round {rnd + 1}: {name:<12} {r['total']:8.2f} tok/s whole generate, {r['decode']:8.2f} tok/s "
                  f"decode (prefill+1 token {r['prefill'] * 1e3:.0f} ms; peak device memory {r['mem']})  {r['note']}",
                  flush=True)  # fmt: skip
        print("\n== serve: median over rounds; bound = batch / (offloaded bytes / H2D bandwidth) ==")
        med: dict[str, float] = {}
        ref_tokens = next((rounds[m][0]["tokens"] for m in names if rounds[m]), None)
        for m in names:
            if not rounds[m]:
                print(f"{m:<12} {notes.get(m, '')}")
                continue
            med[m] = statistics.median(r["decode"] for r in rounds[m])
            total = statistics.median(r["total"] for r in rounds[m])
            off = rounds[m][0]["offloaded"]
            line = f"{m:<12} {med[m]:9.2f} tok/s decode ({total:8.2f} whole)"
            if off > 0:
                bound = a.serve_batch / (off / h2d)
                line += f"  bound {bound:9.2f} tok/s ({format_size(int(off))} offloaded): {med[m] / bound:5.2f}x bound"
            else:
                line += "  (nothing offloaded: no transfer bound)"
            if ref_tokens is not None:
                same = (rounds[m][0]["tokens"] == ref_tokens).float().mean().item()
                line += f"  tokens same as first method's: {same:.0%}"
            print(line + f"  ({len(rounds[m])} rounds)")
        if "fmstore" in med:
            peers = [f"{med['fmstore'] / med[p]:.2f}x {p}" for p in names if p in med and p != "fmstore"]
            print("fmstore vs peers (decode tokens/s ratio, > 1 is faster): " + (", ".join(peers) or "-"))
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ============================================================================================ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["train", "serve", "both"], default="train")
    ap.add_argument(
        "--dir", default="fmstore-data/bench-offload", help="the store's disk tier, the saved model"
    )
    ap.add_argument(
        "--only",
        default="",
        help=f"comma-separated methods (train: {','.join(TRAIN)}; serve: {','.join(SERVE)})",
    )
    ap.add_argument(
        "--repeats", type=int, default=2 if CUDA else 3, help="rounds of every method, order rotated"
    )
    ap.add_argument("--verbose", action="store_true", help="print a failing method's traceback")
    ap.add_argument("--bw-bytes", type=float, default=float(1 << 30), help="size of the bandwidth probe")
    t = ap.add_argument_group("train")
    t.add_argument("--params", type=float, default=2.15e9 if CUDA else 20e6)
    t.add_argument("--hidden", type=int, default=4096 if CUDA else 512)
    t.add_argument("--batch", type=int, default=8 if CUDA else 2)
    t.add_argument("--seq", type=int, default=512 if CUDA else 64)
    t.add_argument("--iters", type=int, default=8)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument(
        "--device-fraction", type=float, default=0.25, help="fmstore: share of the states kept on the device"
    )
    t.add_argument("--torchao-params", choices=["fp32", "bf16"], default="fp32",
                   help="torchao's param dtype (its host copy has the same): fp32 + autocast = fp32 masters")  # fmt: skip
    s = ap.add_argument_group("serve")
    s.add_argument("--serve-params", type=float, default=8e9 if CUDA else 30e6)
    s.add_argument(
        "--serve-hidden", type=int, default=None, help="default: Llama-3 8B shapes on CUDA, 512 on CPU"
    )
    s.add_argument("--serve-batch", type=int, default=4)
    s.add_argument("--prompt-len", type=int, default=128 if CUDA else 32)
    s.add_argument("--new-tokens", type=int, default=16 if CUDA else 8)
    s.add_argument(
        "--budget-fraction", type=float, default=0.5, help="device budget as a share of the weights' bytes"
    )
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    machine_info(a.dir, DEVICE)
    h2d, d2h = bandwidth(int(a.bw_bytes))
    what = "pinned H2D / D2H" if CUDA else "host memcpy (no GPU)"
    print(
        f"raw:     {what} {h2d / GB:.1f} / {d2h / GB:.1f} GB/s ({format_size(int(a.bw_bytes))} tensor, best of 5)",
        flush=True,
    )
    try:
        if a.part in ("train", "both"):
            part_train(a, h2d, d2h)
        if a.part in ("serve", "both"):
            part_serve(a, h2d)
    finally:
        if _PG:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    main()
