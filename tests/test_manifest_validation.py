"""Hostile manifests and shard headers (issue 13, finding 7): every value a load trusts is
checked before it allocates or reads, and a violation is an fmstore error naming the manifest
or file and the tensor, from ``Checkpointer.load``, the snapshot reader and ``fmstore verify``.

Each test saves a real snapshot, edits its ``manifest.json`` (or a shard file's safetensors
header) and asserts the exact error class."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import bounded_allocations, run_cli, shard_file
from manifest_versions import v2_to_v3, v3_to_v2

from fmstore import Checkpointer, CorruptBlobError, Level, Policy
from fmstore.checkpoint import ManifestError, Root
from fmstore.checkpoint.manifest import MANIFEST
from fmstore.storage import Storage

STEP1, STEP2 = "step-0000000001", "step-0000000002"
#: The manifest version ``edit`` writes an edited manifest in (every test runs for 2 and 3).
WRITE = {"version": 3}


@pytest.fixture(autouse=True, params=[2, 3], ids=["v2", "v3"])
def manifest_version(request: pytest.FixtureRequest) -> int:
    WRITE["version"] = request.param
    return request.param


def shard_name_in(root: Path, step_dir: str = STEP1) -> str:
    return shard_file(root / step_dir).name


def manifest_path(root: Path, step_dir: str = STEP1) -> Path:
    return root / step_dir / MANIFEST


def edit(root: Path, change: Callable[[dict[str, Any]], None], step_dir: str = STEP1) -> None:
    path = manifest_path(root, step_dir)
    body = v3_to_v2(json.loads(path.read_bytes()))
    change(body)
    if WRITE["version"] == 3:  # (a value no integer column holds stays version 2)
        body = v2_to_v3(body) or body
    path.write_text(json.dumps(body))


def shard_of(body: dict[str, Any], name: str) -> dict[str, Any]:
    (shard,) = body["tensors"][name]["shards"]
    return shard


def guarded(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No shard byte is read and no tensor over 64 MiB is allocated inside (the hostile values
    below would otherwise read or allocate before failing)."""
    return bounded_allocations(monkeypatch, no_reads=True)


def snapshot(root: Path, step: int | None = None) -> Any:
    """Open a root's snapshot the way ``fmstore inspect``/``verify`` do (and close the root)."""
    with Root(root) as r:
        return r.snapshot(step)


def save(root: Path, state: dict[str, Any], step: int = 1, **kw: Any) -> None:
    with Checkpointer(root, **kw) as ck:
        ck.save(step, state).wait()


def load(root: Path, **kw: Any) -> Any:
    with Checkpointer(root) as ck:
        return ck.load(**kw)


# ----------------------------------------------------------------- a. chunk_size and chunks


def refused_everywhere(root: Path, load_pattern: str, text: str) -> None:
    """A load (naming the manifest), the snapshot reader and ``fmstore verify`` (exit 4) each
    refuse the manifest, the last two saying ``text``."""
    with pytest.raises(ManifestError, match=load_pattern) as err:
        load(root)
    assert str(manifest_path(root)) in str(err.value)
    with pytest.raises(ManifestError) as err:
        snapshot(root)
    assert text in str(err.value)
    out = run_cli("verify", root)
    assert out.returncode == 4 and text in out.stderr


def test_a_chunk_size_and_chunk_count_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(1 << 20)  # 4 MiB: one 16 MiB checksum chunk
    save(tmp_path, {"w": w})
    good = manifest_path(tmp_path).read_bytes()

    # -1: before, no chunk was hashed at all and a flipped data byte loaded silently.
    shard = shard_file(tmp_path / STEP1)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    edit(tmp_path, lambda b: shard_of(b, "w").update(chunk_size=-1))
    refused_everywhere(tmp_path, r"tensor 'w'.*chunk_size -1", "chunk_size -1")
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))

    # 1: before, one hash job per byte (> 6 GiB for these 4 MiB); now refused before any read.
    edit(tmp_path, lambda b: shard_of(b, "w").update(chunk_size=1))
    with monkeypatch.context() as m:
        m.setattr(Storage, "read_ranges", lambda *a: pytest.fail("read before validation"))
        with pytest.raises(ManifestError, match=r"tensor 'w'.*chunk_size 1 "):
            load(tmp_path)

    # A chunk size in bounds with the wrong number of digests (before: a ChecksumError).
    edit(tmp_path, lambda b: shard_of(b, "w").update(chunk_size=4096))
    with pytest.raises(ManifestError, match=r"tensor 'w'.*1 chunk digests .* \(want 1024\)"):
        load(tmp_path)

    # Another valid chunk size covering the same bytes in as many chunks still loads.
    manifest_path(tmp_path).write_bytes(good)
    edit(tmp_path, lambda b: shard_of(b, "w").update(chunk_size=8 << 20))
    assert torch.equal(load(tmp_path)["w"], w)


@pytest.mark.parametrize(
    ("kw", "codec"),
    [({"compression": "lossless"}, "planes-zstd"), ({"quantize": ["w"]}, "int8-absmax")],
)
def test_a_chunk_checks_of_coded_shards_are_validated(tmp_path: Path, kw: dict[str, Any], codec: str) -> None:
    save(tmp_path, {"w": torch.randn(3000)}, **kw)
    body = v3_to_v2(json.loads(manifest_path(tmp_path).read_bytes()))
    assert shard_of(body, "w")["codec"][0]["name"] == codec  # chunk-checked codecs
    load(tmp_path)
    edit(tmp_path, lambda b: shard_of(b, "w").update(chunk_size=-1))
    with pytest.raises(ManifestError, match=r"tensor 'w'.*chunk_size -1"):
        load(tmp_path)  # before: no chunk checked, loaded
    edit(tmp_path, lambda b: shard_of(b, "w").update(chunk_size=1 << 24, chunks=[]))
    with pytest.raises(ManifestError, match=r"tensor 'w'.*0 chunk digests"):
        load(tmp_path)  # before: a ChecksumError


# ----------------------------------------------------------------- b. shapes and byte ranges


def claim_huge(body: dict[str, Any], name: str, n: int = 10**12, files: bool = False) -> None:
    """Tensor ``name`` claims ``n`` float32 elements, with a byte range and chunk digests to
    match; ``files``: the manifest's sizes of its own files too."""
    body["tensors"][name]["shape"] = [n]
    s = shard_of(body, name)
    s.update(lengths=[n], end=s["begin"] + 4 * n, chunks=s["chunks"] * -(-4 * n // s["chunk_size"]))
    if files:
        body["files"] = {f: s["end"] for f in body["files"]}


def test_b_huge_shapes_are_refused_before_any_allocation_or_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = 10**12
    raw = tmp_path / "raw"
    save(raw, {"w": torch.randn(1000)})
    good = manifest_path(raw).read_bytes()
    SHARD = shard_name_in(raw)
    size = (raw / STEP1 / SHARD).stat().st_size

    def hostile(change: Callable[[dict[str, Any]], Any]) -> None:
        manifest_path(raw).write_bytes(good)
        edit(raw, change)

    with guarded(monkeypatch):
        hostile(lambda b: claim_huge(b, "w"))
        with pytest.raises(ManifestError, match=rf"tensor 'w'.*lie outside the file \({size} bytes"):
            load(raw)
        with pytest.raises(ManifestError, match="lie outside the file"):
            snapshot(raw)

        # Consistent with its own files list: the real size is checked, before the allocation.
        hostile(lambda b: claim_huge(b, "w", files=True))
        with pytest.raises(CorruptBlobError, match=rf"{STEP1}/{SHARD}.*tensor 'w'.*the file has {size}"):
            load(raw)
        with Root(raw) as root, pytest.raises(CorruptBlobError, match="tensor 'w'"):
            root.snapshot().read("w")

        # A shape its shards do not cover, and dims that are not ints >= 0.
        hostile(lambda b: b["tensors"]["w"].update(shape=[huge]))
        with pytest.raises(ManifestError, match=r"tensor 'w'.*hold 1000 of the 1000000000000 elements"):
            load(raw)
        hostile(lambda b: b["tensors"]["w"].update(shape=[1000.0]))
        with pytest.raises(ManifestError, match=r"tensor 'w'.*not a list of ints >= 0"):
            load(raw)

    # A coded shard cannot decode into more than its codec's format allows.
    coded = tmp_path / "coded"
    save(coded, {"w": torch.zeros(1000)}, compression="lossless")
    edit(coded, lambda b: (b["tensors"]["w"].update(shape=[huge]), shard_of(b, "w").update(lengths=[huge])))
    with (
        guarded(monkeypatch),
        pytest.raises(ManifestError, match=r"tensor 'w'.*cannot decode to 4000000000000"),
    ):
        load(coded)


def test_b_range_in_an_earlier_snapshots_file_is_checked_against_its_real_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = torch.randn(500)
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"frozen": frozen, "w": torch.randn(10)}).wait()
        ck.save(2, {"frozen": frozen, "w": torch.randn(10)}).wait()
    old = f"{STEP1}/{shard_name_in(tmp_path)}"
    assert shard_of(v3_to_v2(json.loads(manifest_path(tmp_path, STEP2).read_bytes())), "frozen")["file"] == old
    edit(tmp_path, lambda b: claim_huge(b, "frozen"), STEP2)
    snapshot(tmp_path, 2)  # valid as far as the manifest can tell: the file is not its own
    size = (tmp_path / old).stat().st_size
    with guarded(monkeypatch):
        with pytest.raises(CorruptBlobError, match=rf"{old}.*tensor 'frozen'.*the file has {size}"):
            load(tmp_path)
        with Root(tmp_path) as root:
            with pytest.raises(CorruptBlobError, match=rf"{old}.*tensor 'frozen'"):
                root.snapshot(2).read("frozen")
            (problem,) = root.snapshot(2).verify(["frozen"])
    assert problem.tensor == "frozen" and problem.file == old and "truncated" in problem.message
    out = run_cli("verify", tmp_path, "--step", "2")
    assert out.returncode == 4 and "frozen" in out.stderr


# ----------------------------------------------------------------- c. the state tree


def test_c_state_tree_is_validated(tmp_path: Path) -> None:
    save(tmp_path, {"w": torch.ones(3), "opt": {"lr": 0.1}})
    good = v3_to_v2(json.loads(manifest_path(tmp_path).read_bytes()))
    good = v2_to_v3(good) if WRITE["version"] == 3 else good
    path = manifest_path(tmp_path)

    def with_tree(tree: Any) -> None:
        path.write_text(json.dumps({**good, "tree": tree}))

    def nested(depth: int) -> dict[str, Any]:
        node: dict[str, Any] = {"t": "tensor", "name": "w"}
        for _ in range(depth):
            node = {"t": "list", "items": [node]}
        return node

    with_tree(nested(300))  # before: loaded (deeper trees overflowed the stack)
    with pytest.raises(ManifestError, match=r"state tree at '0/0/.*nested deeper than 200") as err:
        load(tmp_path)
    assert str(path) in str(err.value)
    with pytest.raises(ManifestError, match="nested deeper than 200"):
        snapshot(tmp_path)

    # Too deep for the JSON parser itself (before: a RecursionError).
    raw = json.dumps(good)
    depth = 100_000
    deep = '{"t":"list","items":[' * depth + '{"t":"value","v":1}' + "]}" * depth
    path.write_text(raw.replace(json.dumps(good["tree"]), deep))
    with pytest.raises(ManifestError, match="nested too deeply"):
        load(tmp_path)
    out = run_cli("inspect", tmp_path)
    assert out.returncode == 4 and "nested too deeply" in out.stderr

    # A leaf naming a tensor the table does not have (before: silently left out).
    tree = json.loads(json.dumps(good["tree"]))
    tree["items"][0][1]["name"] = "nope"
    with_tree(tree)
    with pytest.raises(ManifestError, match=r"state tree at 'w'.*names tensor 'nope'"):
        load(tmp_path)
    with pytest.raises(ManifestError, match="names tensor 'nope'"):
        load(tmp_path, state={"w": torch.zeros(3), "opt": {"lr": 0.0}})

    # Unknown node kinds and malformed nodes (before: a plain FmstoreError, a KeyError).
    tree = json.loads(json.dumps(good["tree"]))
    tree["items"][1][1]["items"][0][1] = {"t": "pickle", "v": "..."}
    with_tree(tree)
    with pytest.raises(ManifestError, match=r"state tree at 'opt/lr'.*unknown node kind 'pickle'"):
        load(tmp_path)
    with_tree({"t": "dict"})
    with pytest.raises(ManifestError, match="state tree at '<root>'.*items are not"):
        load(tmp_path)


# ----------------------------------------------------------------- d. dtypes


@pytest.mark.parametrize("dtype", ["float33", ["float32"], None])
def test_d_unknown_dtype_names_the_tensor(tmp_path: Path, dtype: Any) -> None:
    save(tmp_path, {"enc": {"w": torch.ones(4)}})
    edit(tmp_path, lambda b: b["tensors"]["enc/w"].update(dtype=dtype))
    refused_everywhere(tmp_path, r"tensor 'enc/w'.*dtype", "enc/w")


# ----------------------------------------------------------------- e. shard safetensors headers


def test_e_a_sealed_manifest_checks_each_header_by_its_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest as its writer wrote it is sealed and records its files' header digests: a
    load parses a shard file's header only where its digest differs (a damaged header is then
    found as before); an edited manifest is not sealed, and its files get the whole check."""
    from fmstore.checkpoint import shardfile
    from fmstore.checkpoint.manifest import Manifest, is_sealed

    state = {"a": torch.randn(100), "b": torch.randn(50)}
    save(tmp_path, state)
    raw = manifest_path(tmp_path).read_bytes()
    m = Manifest.from_json(raw, where="test")
    assert m.sealed and set(m.headers) == set(m.files) and len(m.files) == 1
    assert not is_sealed(raw[:-40] + (b"0" if raw[-40:-39] != b"0" else b"1") + raw[-39:])  # one digit
    assert not is_sealed(raw.replace(b'"step":1,', b'"step":2,'))  # the body

    parsed: list[str] = []
    real = shardfile.header_entries
    monkeypatch.setattr(shardfile, "header_entries", lambda h: parsed.append("parsed") or real(h))
    got = load(tmp_path)
    assert parsed == [] and all(torch.equal(got[k], v) for k, v in state.items())

    # Tensor b's entry renamed in the header (same length): the digest differs, the header is
    # parsed and the rename found.
    shard = shard_file(tmp_path / STEP1)
    good = shard.read_bytes()
    hlen = int.from_bytes(good[:8], "little")
    assert good[8 : 8 + hlen].count(b'"b"') == 1
    shard.write_bytes(good[:8] + good[8 : 8 + hlen].replace(b'"b"', b'"x"') + good[8 + hlen :])
    with pytest.raises(CorruptBlobError, match=r"header has 'x'.*where the manifest has tensor 'b'"):
        load(tmp_path)
    assert parsed == ["parsed"]
    shard.write_bytes(good)

    # The manifest re-written by hand (the same content, other bytes): not sealed, checked whole.
    edit(tmp_path, lambda body: None)
    assert not Manifest.from_json(manifest_path(tmp_path).read_bytes(), where="test").sealed
    parsed.clear()
    got = load(tmp_path)
    assert parsed == ["parsed"] and all(torch.equal(got[k], v) for k, v in state.items())


def test_e_shard_headers_are_checked_once_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"a": torch.randn(100), "b": torch.randn(50), "c": torch.arange(7)}
    save(tmp_path, state)
    shard = shard_file(tmp_path / STEP1)
    rel = f"{STEP1}/{shard.name}"
    good = shard.read_bytes()
    hlen = int.from_bytes(good[:8], "little")

    # A valid load reads each file's header once (one read at offset 0), not once per tensor.
    heads = []
    real = Storage.read_ranges

    def counting(self: Storage, file: str, ranges: Any) -> None:
        heads.extend(file for off, _ in ranges if off == 0)
        real(self, file, ranges)

    with monkeypatch.context() as m:
        m.setattr(Storage, "read_ranges", counting)
        got = load(tmp_path)
    assert heads == [rel] and all(torch.equal(got[k], v) for k, v in state.items())

    def damage(new: bytes) -> None:
        shard.write_bytes(new)

    # The header no longer lists tensor b's range (same length: the data is where it was).
    header = good[8 : 8 + hlen].decode()
    offs = json.loads(header)["b"]["data_offsets"]
    moved = header.replace(f"[{offs[0]},{offs[1]}]", f"[{offs[0]},{offs[1] - 4:{len(str(offs[1]))}d}]")
    assert len(moved) == hlen and moved != header
    damage(good[:8] + moved.encode() + good[8 + hlen :])
    with pytest.raises(CorruptBlobError, match=rf"{rel}.*header lists no tensor .*tensor 'b'"):
        load(tmp_path)  # before: loaded
    with Root(tmp_path) as root:
        problems = root.snapshot().verify()
    assert {p.tensor for p in problems} == {"a", "b", "c"} and {p.file for p in problems} == {rel}
    out = run_cli("verify", tmp_path)
    assert out.returncode == 4 and "header lists no tensor" in out.stderr

    # A header length over the limit, or past the end of the file.
    damage((200_000_000).to_bytes(8, "little") + good[8:])
    with pytest.raises(CorruptBlobError, match=rf"{rel}.*bad safetensors header"):
        load(tmp_path)
    damage((len(good)).to_bytes(8, "little") + good[8:])
    with pytest.raises(CorruptBlobError, match=rf"{rel}.*bad safetensors header"):
        load(tmp_path)

    # A header that is not JSON.
    damage(good[:8] + b"x" + good[9:])
    with pytest.raises(CorruptBlobError, match=rf"{rel}.*header is not JSON"):
        load(tmp_path)
    damage(good)
    load(tmp_path)


# ----------------------------------------------------------------- fallback to another level


@pytest.mark.parametrize(
    ("change", "said"),
    [({"file": "../x.safetensors"}, "x.safetensors"), ({"chunk_size": 1}, "chunk_size 1")],
    ids=["bad-file", "chunk-size"],
)
def test_a_manifest_failing_validation_falls_back_to_the_next_level(
    tmp_path: Path, change: dict[str, Any], said: str
) -> None:
    """Like a damaged shard (README: "a damaged copy ... is skipped, with a warning, for the
    next level"), with and without a target state (whose tree is read first)."""
    policy = Policy(levels=[Level(tmp_path / "archive", name="archive")])
    state = {"w": torch.randn(100)}
    with Checkpointer(tmp_path / "nvme", policy=policy) as ck:
        ck.save(1, state).wait()
    edit(tmp_path / "nvme", lambda b: shard_of(b, "w").update(change))
    with Checkpointer(tmp_path / "nvme", policy=policy) as ck:
        with pytest.warns(UserWarning, match=rf"level 'local' is damaged.*{said}.*from 'archive'"):
            assert torch.equal(ck.load()["w"], state["w"])
        target = {"w": torch.zeros(100)}
        with pytest.warns(UserWarning, match=rf"level 'local' is damaged.*{said}"):
            ck.load(target)
        assert torch.equal(target["w"], state["w"])
        with pytest.raises(ManifestError, match=said):
            ck.load(level="local")
