"""``fmstore export`` (safetensors, Hugging Face folders, zarr v3) and ``fmstore import``:
real GPT-2 weights round-trip bit-exact through transformers, safetensors and zarr."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fmstore import Checkpointer
from fmstore.checkpoint import Root
from fmstore.cli import main

cli = run_cli  # conftest: `python -m fmstore.cli ARGS` in a fresh process

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

transformers = pytest.importorskip("transformers")
zarr = pytest.importorskip("zarr")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact: dtype, shape and every byte."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
        )
    )


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=256, n_positions=64)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    return model, opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A root with step 3 = {"model": GPT-2, "optim": AdamW after a step, "extra": {...}}."""
    base = tmp_path_factory.mktemp("export")
    model, opt = gpt2()
    g = torch.Generator().manual_seed(1)
    extra = {
        "bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, 3, generator=g).half(),
        "ids": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "big": torch.randn(2048, 1024, generator=g),  # 8 MiB: two 4 MiB zarr chunks
    }
    root = base / "root"
    with Checkpointer(root) as ck:
        ck.save(3, {"model": model, "optim": opt, "extra": extra}).wait()
    cfg_dir = base / "cfg"
    model.config.save_pretrained(cfg_dir)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"base": base, "root": root, "cfg": cfg_dir, "weights": weights, "extra": extra}


def check_model(out: Path, weights: dict[str, torch.Tensor]) -> None:
    from transformers import GPT2LMHeadModel

    loaded = GPT2LMHeadModel.from_pretrained(out)
    sd = loaded.state_dict()
    assert set(sd) == set(weights)
    for k, v in weights.items():
        assert same(sd[k], v), k
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # tied again


# ------------------------------------------------------------------ hf


def test_export_hf_loads_in_transformers(saved):
    out = saved["base"] / "hf-one"
    r = cli(
        "export",
        str(saved["root"]),
        str(out),
        "--format",
        "hf",
        "--select",
        "model/*",
        "--config",
        str(saved["cfg"]),
    )
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert "prefix 'model/' stripped" in r.stdout
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert (
        meta["format"] == "pt" and meta["fmstore_step"] == "3" and meta["fmstore_root"] == str(saved["root"])
    )
    assert keys == set(saved["weights"])  # the tied lm_head.weight is there, as its own tensor
    check_model(out, saved["weights"])


def test_export_hf_sharded(saved, capsys):
    out = saved["base"] / "hf-sharded"
    rc = main(
        ["export", str(saved["root"]), str(out), "-f", "hf", "--select", "model/*"]
        + ["--max-shard-size", "100KB", "--config", str(saved["cfg"] / "config.json"), "--json"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.safetensors" not in shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(saved["weights"])
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in saved["weights"].values()
    )
    for name in shards:  # each file at most 100 kB, or one tensor alone
        with safe_open(out / name, "pt") as f:
            keys = list(f.keys())
        size = os.path.getsize(out / name)
        assert size <= 100_000 + 8192 or len(keys) == 1, (name, size, keys)
        assert all(index["weight_map"][k] == name for k in keys)
    assert summary["tensors"] == len(saved["weights"]) and len(summary["files"]) == len(shards) + 2
    check_model(out, saved["weights"])


def test_export_hf_config_from_meta(saved, tmp_path, capsys):
    root = tmp_path / "r"
    model, _ = gpt2()
    with Checkpointer(root) as ck:
        ck.save(1, {"model": model}, meta={"hf_config": model.config.to_dict()}).wait()
    out = tmp_path / "hf"
    assert main(["export", str(root), str(out), "-f", "hf"]) == 0
    assert json.loads((out / "config.json").read_text())["n_embd"] == 64
    check_model(out, {k: v.detach() for k, v in model.state_dict().items()})


# ------------------------------------------------------------------ safetensors


def test_export_safetensors_bit_exact(saved):
    out = saved["base"] / "all.safetensors"
    r = cli("export", str(saved["root"]), str(out), "--format", "safetensors", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    snap = Root(saved["root"]).snapshot(3)
    names = [t.name for t in snap.tensors()]
    assert summary["prefix"] == "" and summary["tensors"] == len(
        names
    )  # model/, optim/, extra/: none stripped
    got = load_file(out)
    assert set(got) == set(names)
    for n in names:
        assert same(got[n], snap.read(n)), n
    assert got["extra/bf16"].dtype == torch.bfloat16 and same(got["extra/bf16"], saved["extra"]["bf16"])


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def test_safetensors_layout_is_the_librarys(tmp_path):
    """The streamed file is what safetensors' save_file writes for the same tensors: same
    header (metadata order aside) and the same data bytes, for every dtype it knows."""
    g = torch.Generator().manual_seed(2)
    state = {
        "f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "f32": torch.randn(4, generator=g),
        "a_f32": torch.randn(2, 2, generator=g),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "f16": torch.randn(7, generator=g).half(),
        "i64": torch.arange(3),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, False]),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(1.0),
        "empty": torch.empty(0, 4),
    }
    root = tmp_path / "r"
    with Checkpointer(root) as ck:
        ck.save(1, state).wait()
    out = tmp_path / "x.safetensors"
    assert main(["export", str(root), str(out), "-f", "safetensors"]) == 0
    mine = out.read_bytes()
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    ref = tmp_path / "ref.safetensors"
    save_file(state, ref, metadata=meta)
    h1, d1 = _split(mine)
    h2, d2 = _split(ref.read_bytes())
    assert h1 == h2 and d1 == d2 and len(mine) == os.path.getsize(ref)
    got = load_file(out)
    for k, v in state.items():
        assert same(got[k], v), k


# ------------------------------------------------------------------ zarr


def read_zarr(arr) -> torch.Tensor:
    """The documented way back: the stored array viewed as its ``fmstore_dtype``."""
    import numpy as np

    return torch.from_numpy(np.asarray(arr[...]).copy()).view(getattr(torch, arr.attrs["fmstore_dtype"]))


def test_export_zarr(saved):
    out = saved["base"] / "all.zarr"
    r = cli("export", str(saved["root"]), str(out), "--format", "zarr", "--prefix", "")
    assert r.returncode == 0, r.stderr
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == 3
    assert group.attrs["fmstore"]["step"] == 3
    snap = Root(saved["root"]).snapshot(3)
    for t in snap.tensors():
        arr = group[t.name]
        assert arr.attrs["fmstore_name"] == t.name
        assert same(read_zarr(arr), snap.read(t.name)), t.name
    bf = group["extra/bf16"]
    assert str(bf.dtype) == "uint16" and bf.attrs["fmstore_dtype"] == "bfloat16"
    assert torch.equal(torch.from_numpy(bf[...]), saved["extra"]["bf16"].view(torch.uint16))
    big = group["extra/big"]
    assert big.chunks == (1024, 1024) and big.nchunks == 2  # 4 MiB chunks along dim 0
    assert str(group["model/transformer.wte.weight"].dtype) == "float32"


def test_export_in_pieces(saved, tmp_path, monkeypatch):
    """Tensors larger than a piece are read in row ranges (zarr: whole chunks each), with a
    small read-ahead window: still bit-exact."""
    from fmstore.cli import _export_formats, _export_io

    monkeypatch.setattr(_export_io, "PIECE_BYTES", 300_000)
    monkeypatch.setattr(_export_io, "WINDOW_BYTES", 500_000)
    monkeypatch.setattr(_export_formats, "ZARR_CHUNK_BYTES", 100_000)
    calls = []
    real = _export_io.Feed._read
    monkeypatch.setattr(_export_io.Feed, "_read", lambda self, p: calls.append(p) or real(self, p))
    big = saved["extra"]["big"]
    st = tmp_path / "big.safetensors"
    assert main(["export", str(saved["root"]), str(st), "-f", "safetensors", "--select", "extra/big"]) == 0
    assert same(load_file(st)["big"], big)
    assert sum(p.item.name == "extra/big" for p in calls) >= 20
    calls.clear()
    z = tmp_path / "big.zarr"
    assert main(["export", str(saved["root"]), str(z), "-f", "zarr", "--select", "extra/*"]) == 0
    arr = zarr.open_group(str(z), mode="r")["big"]
    assert arr.chunks == (24, 1024) and same(read_zarr(arr), big)
    rows = [p.stop - p.start for p in calls if p.item.name == "extra/big"]
    assert len(rows) > 1 and all(n % 24 == 0 for n in rows[:-1])


# ------------------------------------------------------------------ import


def test_import_roundtrip(saved, tmp_path, capsys):
    out = tmp_path / "hf"
    assert (
        main(
            [
                "export",
                str(saved["root"]),
                str(out),
                "-f",
                "hf",
                "--select",
                "model/*",
                "--max-shard-size",
                "150KB",
                "--config",
                str(saved["cfg"]),
            ]
        )
        == 0
    )
    assert (out / "model.safetensors.index.json").exists()
    root = tmp_path / "imported"
    capsys.readouterr()
    r = cli("import", str(out), str(root), "--step", "5")
    assert r.returncode == 0, r.stderr
    assert "imported 29 tensor(s)" in r.stdout and "as step 5" in r.stdout
    with Checkpointer(root) as ck:
        state = ck.load()
        meta = ck.manifest(5).meta
    assert set(state) == {"model"} and set(state["model"]) == set(saved["weights"])
    for k, v in saved["weights"].items():
        assert same(state["model"][k], v), k
    assert meta["hf_config"]["n_embd"] == 64
    # ... and loads into a fresh model through the checkpointer, strict
    model, _ = gpt2()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with Checkpointer(root) as ck:
        ck.load({"model": model})
    for k, v in model.state_dict().items():
        assert same(v, saved["weights"][k]), k
    # back out again: the config comes from the snapshot's meta
    again = tmp_path / "hf-again"
    assert main(["export", str(root), str(again), "-f", "hf"]) == 0
    assert json.loads((again / "config.json").read_text())["n_layer"] == 2
    check_model(again, saved["weights"])
    # the step exists now: refused, nothing changed
    r = cli("import", str(out), str(root), "--step", "5")
    assert r.returncode != 0 and "step 5 is already committed" in r.stderr
    assert Root(root).steps() == [5]


def test_import_errors(saved, tmp_path, capsys):
    root = tmp_path / "r"
    assert main(["import", str(tmp_path / "missing"), str(root), "--step", "1"]) == 3
    assert "no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["import", str(empty), str(root), "--step", "1"]) == 3
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["import", str(bad), str(root), "--step", "1"]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert not os.path.exists(root) or Root(root).steps() == []


def test_import_single_file_prefix(saved, tmp_path):
    st = tmp_path / "w.safetensors"
    assert main(["export", str(saved["root"]), str(st), "-f", "safetensors", "--select", "optim/*"]) == 0
    root = tmp_path / "r"
    assert main(["import", str(st), str(root), "--step", "1", "--prefix", "opt/"]) == 0
    snap = Root(root).snapshot(1)
    orig = Root(saved["root"]).snapshot(3)
    want = {"opt/" + t.name.removeprefix("optim/"): t.name for t in orig.tensors("optim/*")}
    assert {t.name for t in snap.tensors()} == set(want)  # "state/0/exp_avg" nests, names come out the same
    for new, old in want.items():
        assert same(snap.read(new), orig.read(old))


# ------------------------------------------------------------------ errors and safety


def test_missing_root_exits_3(tmp_path):
    missing = tmp_path / "no-such-root"
    r = cli("export", str(missing), str(tmp_path / "out"), "-f", "hf")
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("fmstore: error:")
    assert not (tmp_path / "out").exists()


def test_existing_out_is_not_touched(saved, tmp_path):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    r = cli("export", str(saved["root"]), str(out), "-f", "safetensors")
    assert r.returncode != 0 and "--force" in r.stderr and out.read_bytes() == b"keep me"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"old")
    assert main(["export", str(saved["root"]), str(folder), "-f", "hf", "--select", "model/*"]) != 0
    assert (folder / "model.safetensors").read_bytes() == b"old"
    # --force replaces an earlier export of the same format ...
    assert (
        main(["export", str(saved["root"]), str(folder), "-f", "hf", "--select", "model/*", "--force"]) == 0
    )
    assert set(load_file(folder / "model.safetensors")) == set(saved["weights"])
    # ... but not a folder that is something else, nor a file with a folder
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export", str(saved["root"]), str(other), "-f", "hf", "--force"]) != 0
    assert main(["export", str(saved["root"]), str(out), "-f", "zarr", "--force"]) != 0
    assert (
        main(["export", str(saved["root"]), str(out), "-f", "safetensors", "--force"]) != 0
    )  # not safetensors
    assert (other / "notes.txt").read_text() == "mine" and out.read_bytes() == b"keep me"
    st = tmp_path / "w2.safetensors"
    assert main(["export", str(saved["root"]), str(st), "-f", "safetensors", "--select", "extra/*"]) == 0
    assert (
        main(["export", str(saved["root"]), str(st), "-f", "safetensors", "--select", "model/*", "--force"])
        == 0
    )
    assert set(load_file(st)) == set(saved["weights"])
    assert sorted(os.listdir(tmp_path)) == [
        "hf",
        "home",
        "w.safetensors",
        "w2.safetensors",
    ]  # no temporary left


def test_failed_export_leaves_nothing(saved, tmp_path, monkeypatch):
    from fmstore.checkpoint import ChecksumError
    from fmstore.checkpoint.snapshot import Snapshot

    real = Snapshot.read
    seen = []

    def flaky(self, name, **kw):
        seen.append(name)
        if len(seen) == 10:
            raise ChecksumError(f"tensor {name!r} does not match its checksum (injected)")
        return real(self, name, **kw)

    monkeypatch.setattr(Snapshot, "read", flaky)
    for fmt, name in [("safetensors", "x.safetensors"), ("hf", "hf"), ("zarr", "z.zarr")]:
        seen.clear()
        assert main(["export", str(saved["root"]), str(tmp_path / name), "-f", fmt]) == 4  # corrupt
        assert os.listdir(tmp_path) == [], fmt  # neither OUT nor a temporary


def test_killed_export_leaves_no_out_and_its_temporary_is_cleaned(saved, tmp_path):
    """A SIGKILL mid-export leaves only a hidden temporary; the next export removes it."""
    import signal
    import time

    out = tmp_path / "big.safetensors"
    slow = (
        "import sys, time; from fmstore.checkpoint.snapshot import Snapshot; real = Snapshot.read\n"
        "def read(self, name, **kw):\n"
        "    print('reading', name, flush=True); time.sleep(0.2); return real(self, name, **kw)\n"
        "Snapshot.read = read\n"
        "from fmstore.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", slow, "export", str(saved["root"]), str(out), "-f", "safetensors"],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    for _ in range(3):  # a few tensors in: the temporary exists and is being written
        assert p.stdout.readline().startswith("reading")
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = os.listdir(tmp_path)
    assert not out.exists() and len(left) == 1 and left[0].startswith(".big.safetensors.fmstore-tmp-")
    live = tmp_path / f".big.safetensors.fmstore-tmp-{os.getpid()}-cafecafe"  # a live writer's: kept
    live.write_bytes(b"in progress")
    assert main(["export", str(saved["root"]), str(out), "-f", "safetensors"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["big.safetensors", live.name])
    assert set(load_file(out)) == {t.name for t in Root(saved["root"]).snapshot(3).tensors()}


def test_prefix_and_select_errors(saved, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert main(["export", str(saved["root"]), out, "-f", "safetensors", "--prefix", "model/"]) == 2
    assert "does not start with --prefix 'model/'" in capsys.readouterr().err
    assert main(["export", str(saved["root"]), out, "-f", "safetensors", "--select", "nothing/*"]) == 3
    assert "matches --select 'nothing/*'" in capsys.readouterr().err
    assert main(["export", str(saved["root"]), out, "-f", "safetensors", "--step", "99"]) == 3
    assert main(["export", str(saved["root"]), out, "-f", "hf", "--max-shard-size", "big"]) == 2
    assert main(["export", str(saved["root"]), out, "-f", "zarr", "--config", "c.json"]) == 2
    assert not os.listdir(tmp_path)
    # an explicit prefix on a selection that has it; '' keeps the names
    for prefix, names, again in [
        ("extra/", set(saved["extra"]), []),
        ("", {f"extra/{k}" for k in saved["extra"]}, ["--force"]),
    ]:
        args = ["export", str(saved["root"]), out, "-f", "safetensors", "--select", "extra/*"]
        assert main([*args, "--prefix", prefix, *again]) == 0
        assert set(load_file(out)) == names


def test_help_and_no_torch_at_import():
    r = cli("export", "--help")
    assert r.returncode == 0 and "fmstore_dtype" in r.stdout and "bfloat16" in r.stdout and "auto" in r.stdout
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, fmstore.cli.export, fmstore.cli.import_; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert r.stdout.strip() == "False", r.stderr


# ------------------------------------------------------------------ S3


@pytest.mark.s3
def test_export_from_s3(s3, saved, tmp_path):
    url = s3.url(f"export-{os.getpid()}-{tmp_path.name}")
    model, _ = gpt2()
    with Checkpointer(url, storage_options=s3.storage_options) as ck:
        ck.save(2, {"model": model}).wait()
    env = {k: v for k, v in s3.env.items() if k.startswith("AWS_")} or {
        "AWS_ACCESS_KEY_ID": s3.storage_options["key"],
        "AWS_SECRET_ACCESS_KEY": s3.storage_options["secret"],
    }
    out = tmp_path / "from-s3.safetensors"
    r = cli(
        "export", url, str(out), "-f", "safetensors", "-o", f"endpoint_url={s3.endpoint}", "--json", env=env
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step"] == 2
    got = load_file(out)
    want = model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert same(got[k], v), k
    r = cli(
        "export",
        s3.url("no-such-prefix"),
        str(tmp_path / "o"),
        "-f",
        "hf",
        "-o",
        f"endpoint_url={s3.endpoint}",
        env=env,
    )
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1
