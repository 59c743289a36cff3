"""Manifest versions 1, 2 and 3 (issue 30): a snapshot whose manifests are written in each
version loads the same values, through ``Checkpointer.load``, the snapshot reader and the CLI;
and hostile version-3 shard tables (the columns themselves: their encoding, lengths, index
ranges and counts) are refused before anything is allocated or read for them."""

from __future__ import annotations

import base64
import json
import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import bounded_allocations, run_cli

from fmstore import Checkpointer
from fmstore.checkpoint import Manifest, ManifestError, Root
from fmstore.checkpoint.manifest import MANIFEST, VERSION
from fmstore.checkpoint.manifest_compat import to_json_v2

STEPS = ("step-0000000001", "step-0000000002")


def state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    return {
        "model": {"w": torch.randn(64, 33, generator=g) + step, "frozen": torch.randn(300, generator=g)},
        "coded": torch.randn(5000, generator=g).to(torch.bfloat16),  # lossless: planes-zstd
        "q": torch.randn(4096, generator=g) * step,  # quantized: int8-absmax
        "ids": torch.arange(11),
        "scalar": torch.tensor(3.5),
        "step": step,
    }


def save(root: Path) -> None:
    with Checkpointer(root, compression="lossless", quantize=["q"]) as ck:
        for step in (1, 2):  # the second references "frozen" in the first's file
            ck.save(step, state(step)).wait()


def rewrite(root: Path, version: int) -> None:
    for d in STEPS:
        path = root / d / MANIFEST
        m = Manifest.from_json(path.read_bytes(), where=str(path))
        path.write_bytes(m.to_json() if version == 3 else to_json_v2(m, version))


def values(root: Path) -> dict[int, dict[str, Any]]:
    with Checkpointer(root) as ck:
        return {step: ck.load(step=step) for step in (1, 2)}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_versions_1_2_and_3_load_the_same_values(tmp_path: Path) -> None:
    save(tmp_path)
    body = json.loads((tmp_path / STEPS[1] / MANIFEST).read_bytes())
    assert VERSION == 3 and body["version"] == 3 and "shards" in body  # what a save writes
    want = values(tmp_path)
    assert same(want[2]["model"]["frozen"], state(2)["model"]["frozen"])
    manifests = {}
    for version in (3, 2, 1, 3):  # and back: version 3 of a manifest read as version 1
        rewrite(tmp_path, version)
        assert json.loads((tmp_path / STEPS[0] / MANIFEST).read_bytes())["version"] == version
        assert same(values(tmp_path), want), version
        with Root(tmp_path) as r:
            snap = r.snapshot(2)
            assert same(snap.read("model/w"), want[2]["model"]["w"])
            assert snap.verify() == []
            manifests[version] = snap.manifest
        for cmd in ("inspect", "verify"):
            out = run_cli(cmd, str(tmp_path), "--step", "2")
            assert out.returncode == 0, (version, cmd, out.stderr)
    assert manifests[1] == manifests[2] == manifests[3]


# ---------------------------------------------------------------------- hostile version-3 tables


def column(body: dict[str, Any], name: str) -> np.ndarray:
    t, how, b64 = body["shards"][name]
    assert how == "deflate"
    return np.frombuffer(zlib.decompress(base64.b64decode(b64)), dtype=t).astype(np.int64)


def set_column(body: dict[str, Any], name: str, values: Any, dtype: str = "<i8") -> None:
    raw = zlib.compress(np.asarray(values, dtype=dtype).tobytes())
    body["shards"][name] = [dtype, "deflate", base64.b64encode(raw).decode()]


def set_digests(body: dict[str, Any], f: Any) -> None:
    body["shards"]["digests"] = base64.b64encode(f(base64.b64decode(body["shards"]["digests"]))).decode()


def targeted(good: dict[str, Any]) -> list[tuple[str, Any]]:
    """(what, change) pairs: each change breaks the table one way."""
    n = good["shards"]["rows"]

    def huge_rows(b: dict[str, Any]) -> None:
        b["shards"]["rows"] = 10**15

    def col(name: str, f: Any, dtype: str = "<i8") -> Any:
        return lambda b: set_column(b, name, f(column(b, name)), dtype)

    return [
        ("rows claims 10**15", huge_rows),
        ("rows a float", lambda b: b["shards"].update(rows=float(n))),
        ("dims 1000", lambda b: b["shards"].update(dims=1000)),
        ("a column's type", lambda b: b["shards"]["begin"].__setitem__(0, "<f8")),
        ("a column not base64", lambda b: b["shards"]["size"].__setitem__(2, "!!!")),
        ("a column's encoding unknown", lambda b: b["shards"]["size"].__setitem__(1, "gzip")),
        ("a column not deflated", lambda b: b["shards"]["size"].__setitem__(2, base64.b64encode(b"xx").decode())),
        ("a column one long", col("begin", lambda c: np.concatenate([c, c]))),
        ("a column inflating far past its size", col("begin", lambda c: np.zeros(10**7, dtype=np.int64))),
        ("a column one short", col("begin", lambda c: c[:-1])),
        ("a file index past the files", col("file", lambda c: c + 5)),
        ("a negative file index", col("file", lambda c: c - 1)),
        ("a codec index past the codecs", col("codec", lambda c: c + 9)),
        ("a tensor index past the tensors", col("tensor", lambda c: c + 10**6)),
        ("rows out of tensor order", col("tensor", lambda c: c[::-1])),
        ("a negative size", col("size", lambda c: c - 10**12)),
        ("a huge size", col("size", lambda c: c + (1 << 61))),
        ("a huge begin", col("begin", lambda c: c + (1 << 62))),
        ("negative chunk counts", col("nchunks", lambda c: c - 1)),
        ("wrapping chunk counts", col("nchunks", lambda c: c + (1 << 62))),
        ("a shard past its shape", col("lengths", lambda c: c * 1000)),
        ("a negative offset", col("offsets", lambda c: c - 1)),
        ("chunk_size 1", col("chunk_size", lambda c: c * 0 + 1)),
        ("digests cut short", lambda b: set_digests(b, lambda raw: raw[:-16])),
        ("digests one byte long", lambda b: set_digests(b, lambda raw: raw + b"x")),
        ("digests not text", lambda b: b["shards"].update(digests=7)),
        ("digests and hex chunks both", lambda b: b["shards"].update(chunks="0" * 32)),
        ("a checksum for a row past the table", lambda b: b["shards"]["checksums"]["other"].append([n, "x"])),
        ("checksums derived another way", lambda b: b["shards"]["checksums"].update(derived="md5")),
        ("checksums short (as a list)", lambda b: b["shards"].update(checksums=["xxh3_128:0"] * (n - 1))),
        ("codecs without raw", lambda b: b["shards"]["codecs"].__setitem__(0, [{"name": "x"}])),
        ("a file outside the root", lambda b: b["shards"]["files"].__setitem__(0, "../x.safetensors")),
        ("a name twice", lambda b: b["tensors"]["names"].__setitem__(1, b["tensors"]["names"][0])),
        ("names and shapes differ", lambda b: b["tensors"]["shapes"].pop()),
        ("a huge shape", lambda b: b["tensors"]["shapes"].__setitem__(0, [10**12, 10**12])),
        ("no table", lambda b: b.pop("shards")),
    ]


def test_hostile_version_3_tables_are_refused_before_any_allocation_or_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(tmp_path)
    path = tmp_path / STEPS[1] / MANIFEST
    good = path.read_bytes()
    for what, change in targeted(json.loads(good)):
        body = json.loads(good)
        change(body)
        path.write_text(json.dumps(body))
        with bounded_allocations(monkeypatch, no_reads=True), pytest.raises(ManifestError) as err:
            with Checkpointer(tmp_path) as ck:
                ck.load(step=2)
        assert str(path) in str(err.value), what
    path.write_bytes(good)


def test_fuzzed_version_3_tables_fail_cleanly_or_load_the_saved_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random damage to the table's columns (a value changed, bytes flipped in the base64):
    each load either raises an fmstore error or, where the damage left it valid, loads; never
    another exception, never a large allocation."""
    from fmstore import FmstoreError

    save(tmp_path)
    path = tmp_path / STEPS[1] / MANIFEST
    good = path.read_bytes()
    rng = random.Random(30)
    names = ["tensor", "file", "begin", "size", "offsets", "lengths", "chunk_size", "nchunks", "codec"]
    outcomes = {"refused": 0, "loaded": 0}
    for _ in range(60):
        body = json.loads(good)
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(names)
            if rng.random() < 0.5:
                try:
                    c = column(body, name)
                except (ValueError, zlib.error):  # an earlier change gave it another type or bytes
                    continue
                if len(c):
                    c = c.copy()
                    c[rng.randrange(len(c))] = rng.choice([-1, 0, 1, 2, 4096, 1 << 31, 1 << 62, -(1 << 62)])
                    set_column(body, name, c)
            else:
                t, how, b64 = body["shards"][name]
                raw = bytearray(base64.b64decode(b64))
                if raw:  # (in the deflate stream: the inflate fails or gives other values)
                    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
                body["shards"][name] = [rng.choice([t, t, "<i1", "<i2", "<i4"]), how, base64.b64encode(raw).decode()]
        path.write_text(json.dumps(body))
        try:
            with bounded_allocations(monkeypatch):
                with Checkpointer(tmp_path) as ck:
                    ck.load(step=2)
            outcomes["loaded"] += 1
        except FmstoreError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 40, outcomes
    path.write_bytes(good)


@pytest.mark.parametrize("version", [2, 3])
def test_a_dtype_the_shard_header_contradicts_is_refused(tmp_path: Path, version: int) -> None:
    """A damaged manifest giving a raw tensor another dtype of the same size (int64 read as
    float64) keeps every byte range and checksum: the shard file's safetensors header, which
    names each entry's dtype and shape, is what refuses it, naming the tensor and file.  (A
    coded tensor's entry is U8 bytes: its header has no dtype to compare.)"""
    from fmstore import CorruptBlobError

    with Checkpointer(tmp_path) as ck:  # raw bytes: no codec
        ck.save(1, state(1)).wait()
    path = tmp_path / STEPS[0] / MANIFEST
    m = Manifest.from_json(path.read_bytes(), where=str(path))
    path.write_bytes(m.to_json() if version == 3 else to_json_v2(m, version))
    body = json.loads(path.read_bytes())
    if version == 3:
        body["tensors"]["dtypes"][body["tensors"]["names"].index("ids")] = "float64"
    else:
        body["tensors"]["ids"]["dtype"] = "float64"
    path.write_text(json.dumps(body))
    with Checkpointer(tmp_path) as ck, pytest.raises(CorruptBlobError) as err:
        ck.load(step=1)
    assert "'ids'" in str(err.value) and "shard-r00000.safetensors" in str(err.value), err.value
