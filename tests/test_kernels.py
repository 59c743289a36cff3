"""The CUDA kernels (kernels/*.cu): they compile (on any machine with nvcc) and, on a GPU,
produce exactly the bytes of their CPU references in fmstore/codec/planes.py."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import kernels
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
@pytest.mark.parametrize("n", [0, 1, 3, 4, 1000, 1 << 20, (1 << 20) + 3])
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_planes_and_xor_match_cpu(width, n, offset):
    from fmstore.codec import gpu as g

    torch.manual_seed(n + width)
    full = torch.randint(0, 256, (n * width + offset,), dtype=torch.uint8)
    host, dev = full[offset:], full.cuda()[offset:]  # offset 1: a misaligned device pointer
    planes = g.split(dev, width)
    assert torch.equal(planes.cpu(), cpu.split(host.contiguous(), width))
    assert torch.equal(g.merge(planes, width).cpu(), host)
    other = torch.randint(0, 256, host.shape, dtype=torch.uint8)
    assert torch.equal(g.xor(dev, other.cuda()).cpu(), cpu.xor(host.contiguous(), other))


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
