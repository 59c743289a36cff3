"""The CUDA kernels (kernels/*.cu): they compile (on any machine with nvcc) and, on a GPU,
produce exactly the bytes of their CPU references in fmstore/codec/planes.py."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from fmstore.codec import kernels
from fmstore.codec import planes as cpu

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("name", sorted(kernels.SOURCES))
def test_cuda_sources_compile(name, tmp_path):
    """A syntax error in a .cu file fails here, also on a machine without a GPU."""
    cmd = kernels.nvcc_command(kernels.SOURCES[name], tmp_path / f"{name}.o", "sm_90", shared=False)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"{name}.o").stat().st_size > 0


def test_missing_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    with pytest.raises(kernels.KernelBuildError, match="nvcc was not found"):
        kernels.find_nvcc()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("width", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 1000, 1008, 1 << 20, (1 << 20) + 3])
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_planes_match_cpu(width, n, offset):
    from fmstore.codec import gpu as g

    torch.manual_seed(n + width)
    full = torch.randint(0, 256, (n * width + offset,), dtype=torch.uint8)
    host, dev = full[offset:], full.cuda()[offset:]  # offset 1: a misaligned device pointer
    planes = g.split(dev, width)
    assert torch.equal(planes.cpu(), cpu.split(host.contiguous(), width))
    assert torch.equal(g.merge(planes, width).cpu(), host)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 100_003])
def test_gpu_quantize_matches_cpu(n):
    from fmstore.codec import gpu as g
    from fmstore.codec import quant

    g_ = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g_) * torch.logspace(-8, 2, n if n else 1)[:n]  # wide dynamic range
    if n > 600:
        x[256:512] = 0.0  # an all-zero block
    codes, scales = quant.quantize(x)
    gc, gs = g.quantize(x.cuda())
    assert torch.equal(gc.cpu(), codes) and torch.equal(gs.cpu(), scales)
    assert torch.equal(g.dequantize(gc, gs).cpu(), quant.dequantize(codes, scales))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_libraries_build_and_export_their_functions(tmp_path, monkeypatch):
    """What load() does on first use (nvcc into the cache, ctypes signatures), here for sm_90."""
    monkeypatch.setenv("FMSTORE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_arch", lambda: "sm_90")
    monkeypatch.setattr(kernels, "_loaded", {})
    for name, functions in kernels.SIGNATURES.items():
        lib = kernels.load(name)
        for fn in functions:
            assert getattr(lib, fn).argtypes == functions[fn]
    assert len(list(tmp_path.glob("*.so"))) == len(kernels.SIGNATURES)


def _huff_cases():
    """(name, flat uint8 bytes, width): trained-like floats, skewed and flat bytes, one
    repeated value, a distribution whose plain Huffman code is longer than MAX_LEN, sizes
    around the chunk and sub-block edges."""
    from fmstore.codec import huffman

    g = torch.Generator().manual_seed(7)
    w = torch.randn(300_001, generator=g) * 0.02
    geo = torch.cat([torch.full((1 << k,), k, dtype=torch.uint8) for k in range(20)])  # 2**k of value k
    return [
        ("bf16", w.to(torch.bfloat16).view(torch.uint8), 2),
        ("fp16", w.to(torch.float16).view(torch.uint8), 2),
        ("fp32", w.view(torch.uint8), 4),
        ("fp32-odd", w[:12_345].view(torch.uint8), 4),
        ("bytes-random", torch.randint(0, 256, (huffman.CHUNK + 5,), generator=g, dtype=torch.uint8), 1),
        ("bytes-skewed", (torch.randn(2 * huffman.CHUNK + 1000, generator=g).abs() * 3).to(torch.uint8), 1),
        ("one-value", torch.full((5000,), 9, dtype=torch.uint8), 1),
        ("long-codes", geo[torch.randperm(geo.numel(), generator=g)], 1),
        ("empty", torch.empty(0, dtype=torch.uint8), 2),
        ("tiny", torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.uint8), 2),
        ("8-byte", torch.randn(5000, generator=g, dtype=torch.float64).view(torch.uint8), 8),
    ]


def test_huffman_cpu_round_trip_and_limits():
    """CPU reference (what CI runs): exact round trips, code lengths within MAX_LEN."""
    from fmstore.codec import huffman

    for name, data, width in _huff_cases():
        blob = huffman.encode(data, width)
        out = torch.empty_like(data)
        huffman.decode(blob, out, name=name)
        assert torch.equal(out, data), name
    counts = torch.tensor([1 << k for k in range(20)] + [0] * 236).numpy()
    lens = huffman.code_lengths(counts)
    # Plain Huffman gives these a 19-bit code; the limited one stays within MAX_LEN, complete.
    assert (lens[:20] > 0).all() and lens.max() <= huffman.MAX_LEN
    assert (2.0 ** -lens[lens > 0].astype(float)).sum() == 1


def _bf16_bytes():
    """800 kB of bf16 weights (three segments)."""
    gen = torch.Generator().manual_seed(3)
    a = (torch.randn(400_000, generator=gen) * 0.02).to(torch.bfloat16)
    b = a + (torch.randn(400_000, generator=gen) * 1e-4).to(torch.bfloat16)
    return b.view(torch.uint8)


def _flagged(clean: bytes, nbytes: int) -> bytes:
    """``clean`` with bit 0 of every FMH1 header's flags set (an XOR delta, as earlier versions
    wrote it)."""
    import numpy as np

    from fmstore.codec import huffman

    bad = bytearray(clean)
    for _, _, at, _ in huffman.read_directory(np.frombuffer(clean, dtype=np.uint8), nbytes):
        bad[at + 24] |= 1  # the flags word: after magic, version, nbytes, width, nchunks
    return bytes(bad)


def _damaged(clean: bytes, nbytes: int):
    """(stream with one bit flipped mid-payload, the error it must raise) for every chunk."""
    import numpy as np

    from fmstore.codec import huffman

    stream = np.frombuffer(clean, dtype=np.uint8)
    for i, (lo, hi, at, size) in enumerate(huffman.read_directory(stream, nbytes)):
        _, _, _, start, table = huffman.read_header(stream[at : at + size])
        per_plane = -(-((hi - lo) // 2) // huffman.CHUNK)
        for c in range(len(table)):
            off, stored = int(table[c, 0]), int(table[c, 1])
            bad = bytearray(clean)
            bad[at + start + off + stored // 2] ^= 0x10
            yield bad, rf"tensor 'w\.0': segment {i}, chunk {c} \(plane {c // per_plane}\)"


@pytest.mark.parametrize("path", ["native", "numpy"])
def test_huffman_cpu_decoders_agree(path, monkeypatch):
    """The compiled CPU decoder (fmhs_cpu.c) and the numpy reference decode every case to the
    original bytes, and both name the chunk of a flipped bit."""
    from fmstore.codec import CodecError, huffman, native

    if path == "numpy":
        monkeypatch.setenv("FMSTORE_NO_NATIVE", "1")
    elif native.load() is None:
        pytest.skip("no C compiler here")
    for name, data, width in _huff_cases():
        out = torch.empty_like(data)
        huffman.decode(huffman.encode(data, width), out, name=name)
        assert torch.equal(out, data), name
    bb = _bf16_bytes()
    for bad, want in list(_damaged(huffman.encode(bb, 2), bb.numel()))[:4]:
        with pytest.raises(CodecError, match=want):
            huffman.decode(bytes(bad), torch.empty_like(bb), name="w.0")


def test_huffman_cpu_damage():
    """CPU reference: a round trip, a stream flagged as an XOR delta (no longer decoded) is
    refused, and a flipped bit in any chunk's payload is reported with the tensor, segment,
    chunk and plane."""
    from fmstore.codec import CodecError, huffman

    bb = _bf16_bytes()
    clean = huffman.encode(bb, 2)
    out = torch.empty_like(bb)
    assert torch.equal(huffman.decode(clean, out), bb)
    with pytest.raises(CodecError, match="XOR delta"):
        huffman.decode(_flagged(clean, bb.numel()), out)
    cases = list(_damaged(clean, bb.numel()))
    assert len(cases) >= 6
    for bad, want in cases:
        with pytest.raises(CodecError, match=want):
            huffman.decode(bytes(bad), torch.empty_like(bb), name="w.0")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_huffman_matches_cpu(offset):
    """The GPU chain writes exactly the CPU reference's FMHS bytes, device-resident and
    through pinned memory; each side decodes the other's stream; a misaligned input
    (offset 1) takes the byte-wise paths."""
    from fmstore.codec import gpu as g
    from fmstore.codec import huffman

    big = (torch.randn(3_000_000, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    for name, data, width in _huff_cases() + [("bf16-segments", big.view(torch.uint8), 2)]:
        dev = torch.cat([torch.zeros(offset, dtype=torch.uint8), data]).cuda()[offset:]
        want = huffman.encode(data, width)
        assert g.huff_encode(dev, width).cpu().numpy().tobytes() == want, name
        assert g.huff_encode_to_host(dev, width).numpy().tobytes() == want, name
        back = torch.empty_like(dev)
        g.huff_decode(torch.frombuffer(bytearray(want), dtype=torch.uint8).cuda(), back, width, name=name)
        assert torch.equal(back.cpu(), data), name
        host = torch.empty_like(data)
        huffman.decode(want, host, name=name)
        assert torch.equal(host, data), name


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("group_bytes,first_bytes", [(1, 1), (1 << 20, 1), (64 << 20, 16 << 20)])
def test_gpu_huffman_pipeline_matches_cpu(group_bytes, first_bytes):
    """The to-host pipeline, whatever its grouping (down to one segment per group), over
    several tensors in one call (odd element counts, every width): each stream is the CPU
    reference's bytes."""
    from fmstore.codec import gpu as g
    from fmstore.codec import huffman

    gen = torch.Generator().manual_seed(3)
    tensors = [
        ((torch.randn(1_500_003, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8), 2),
        ((torch.randn(700_001, generator=gen) * 0.1).view(torch.uint8), 4),
        (torch.randint(0, 7, (600_000,), dtype=torch.uint8, generator=gen), 1),
        ((torch.randn(90_000, generator=gen)).to(torch.float64).view(torch.uint8), 8),
        (torch.empty(0, dtype=torch.uint8), 2),
    ]
    jobs = [(t.cuda(), w, None) for t, w in tensors]
    streams = g.huff_encode_many_to_host(jobs, group_bytes=group_bytes, first_bytes=first_bytes)
    assert len(streams) == len(tensors)
    for (t, w), got in zip(tensors, streams):
        assert got.numpy().tobytes() == huffman.encode(t, w), (t.numel(), w)


@gpu
@pytest.mark.gpu
def test_gpu_huffman_damage():
    """The GPU's stream equals the CPU's; a stream flagged as an XOR delta (no longer decoded)
    is refused; a flipped bit in any chunk's payload is reported with the tensor, segment and
    chunk by the GPU decoder too."""
    from fmstore.codec import CodecError, huffman
    from fmstore.codec import gpu as g

    bb = _bf16_bytes()
    clean = huffman.encode(bb, 2)
    assert g.huff_encode(bb.cuda(), 2).cpu().numpy().tobytes() == clean
    out = torch.empty_like(bb).cuda()
    up = torch.frombuffer(bytearray(clean), dtype=torch.uint8).cuda()
    assert torch.equal(g.huff_decode(up, out, 2).cpu(), bb)
    flagged = torch.frombuffer(bytearray(_flagged(clean, bb.numel())), dtype=torch.uint8).cuda()
    with pytest.raises(CodecError, match=r"tensor 'w\.0': segment 0, .*header is damaged"):
        g.huff_decode(flagged, out, 2, name="w.0")
    for bad, want in _damaged(clean, bb.numel()):
        with pytest.raises(CodecError, match=want):
            g.huff_decode(torch.frombuffer(bad, dtype=torch.uint8).cuda(), out, 2, name="w.0")
