"""Does an XOR-delta stage pay (it was in the CPU chain, unused; measured with this, removed)?  Bytes of a training state encoded with the lossless CPU
chain (byte planes + zstd) alone, against the same chain on the XOR with the previous
snapshot's bytes of the same tensor, on a real (small) training run: a GPT-2 from a config
trained on this Python installation's standard-library sources as bytes, AdamW.

    PYTHONPATH=. .venv/bin/python bench/xor_delta.py --steps 60 --every 10
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
from common import machine_info  # bench/common.py

from fmstore.codec import as_bytes_tensor, decode, encode


def xor(data: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bytewise ``data ^ base``: what the removed XOR stage computed (fmstore no longer has it)."""
    return torch.bitwise_xor(data, base, out=out)


def corpus(limit: int = 8 << 20) -> torch.Tensor:
    out, n = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        b = p.read_bytes()
        out.append(b)
        n += len(b)
        if n >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(out)), dtype=torch.uint8).long()


def flat(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            if torch.is_tensor(v) and v.numel() > 1:
                out[f"optim/{i}/{k}"] = v.detach().clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    machine_info(".", "cpu")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=256, n_positions=128))
    model.to(getattr(torch, args.dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    data = corpus()
    g = torch.Generator().manual_seed(0)
    prev = None
    total = {"raw": 0, "chain": 0, "xor": 0}
    print(f"{'step':>5} {'loss':>7} {'raw':>10} {'chain':>10} {'xor+chain':>10}  xor/chain")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, data.numel() - 129, (16,), generator=g)
        x = torch.stack([data[i : i + 128] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % args.every:
            continue
        cur = flat(model, opt)
        if prev is not None:
            raw = chain = delta_bytes = 0
            t_plain = t_delta = 0.0
            for name, t in cur.items():
                b = as_bytes_tensor(t).reshape(-1)
                w = t.element_size()
                base = as_bytes_tensor(prev[name]).reshape(-1)
                raw += b.numel()
                plain = encode(b, w)
                delta = encode(xor(b, base), w)  # what the removed XOR stage wrote
                base_enc = encode(base, w)
                chain += plain.nbytes
                delta_bytes += delta.nbytes
                # Restoring a delta needs its base decoded first (one link; longer chains more).
                out = torch.empty_like(b)
                t0 = time.perf_counter()
                decode(b"".join(bytes(x) for x in plain.segments), out)
                t_plain += time.perf_counter() - t0
                blob_b, blob_d = (
                    b"".join(bytes(x) for x in base_enc.segments),
                    b"".join(bytes(x) for x in delta.segments),
                )
                t0 = time.perf_counter()
                got_base = decode(blob_b, torch.empty_like(b))
                decode(blob_d, out)
                xor(out, got_base, out=out)
                t_delta += time.perf_counter() - t0
                assert torch.equal(out, b)
            for k, v in zip(total, (raw, chain, delta_bytes)):
                total[k] += v
            total["t_plain"] = total.get("t_plain", 0.0) + t_plain
            total["t_delta"] = total.get("t_delta", 0.0) + t_delta
            print(
                f"{step:>5} {loss.item():7.3f} {raw:>10} {chain:>10} {delta_bytes:>10}  {delta_bytes / chain:.3f}"
                f"   restore {t_plain * 1e3:6.1f} ms plain, {t_delta * 1e3:6.1f} ms delta (+ base)"
            )
        prev = cur
    r = total
    print(
        f"total: raw {r['raw']} B, chain {r['chain']} B ({r['raw'] / r['chain']:.3f}x), "
        f"xor+chain {r['xor']} B ({r['raw'] / r['xor']:.3f}x); xor saves {1 - r['xor'] / r['chain']:.1%} of the chain's bytes; "
        f"a restore decodes {r['t_delta'] / r['t_plain']:.2f}x as long (and reads the base's bytes too)"
    )


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
