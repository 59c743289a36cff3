"""The fmstore command's snapshot commands ls, inspect, verify and diff, the snapshot reader
under them, and the manifest's codec entries (docs/cli.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from manifest_versions import v3_to_v2

from fmstore import Checkpointer
from fmstore.checkpoint import ManifestError, Root
from fmstore.checkpoint.manifest import MANIFEST


def make_root(root: str | Path, storage_options: dict | None = None, **kw: object) -> dict[int, dict]:
    """Two steps: step 2 changes the weight, keeps the frozen embedding (an incremental
    reference) and adds a tensor."""
    g = torch.Generator().manual_seed(0)
    states = {
        1: {
            "model": {"w": torch.randn(64, 32, generator=g), "emb": torch.randn(128, 16, generator=g)},
            "step": 1,
        },
    }
    s2 = {"model": {"w": states[1]["model"]["w"] + 0.5, "emb": states[1]["model"]["emb"]}, "step": 2}
    s2["model"]["bias"] = torch.arange(8, dtype=torch.bfloat16)
    states[2] = s2
    with Checkpointer(root, storage_options=storage_options, **kw) as ck:
        for step, st in states.items():
            ck.save(step, st)
    return states


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from fmstore.cli import build_parser\n"
        "build_parser().format_help()\n"
        "assert 'torch' not in sys.modules, 'fmstore --help imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=REPO))
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("fmstore ")
    for cmd in ("ls", "inspect", "verify", "diff"):
        assert run_cli(cmd, "--help").returncode == 0


def test_ls_lists_steps_references_and_incomplete(tmp_path: Path) -> None:
    make_root(tmp_path)
    (tmp_path / "step-0000000003").mkdir()  # a crash left it without a manifest
    (tmp_path / "step-0000000003" / "shard-r00000.safetensors").write_bytes(b"x" * 10)
    out = run_cli("ls", tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    body = out.json()
    assert [s["step"] for s in body["snapshots"]] == [1, 2] and body["incomplete"] == [3]
    s1, s2 = body["snapshots"]
    assert s1["tensors"] == 2 and s2["tensors"] == 3 and s1["referenced_bytes"] == 0
    assert s2["referenced_bytes"] == 128 * 16 * 4  # the unchanged embedding lives in step 1's file
    assert s2["codecs"] == ["raw"]
    text = run_cli("ls", tmp_path).stdout
    assert "incomplete (no manifest)" in text and "2 committed snapshot(s), 1 incomplete" in text


def test_inspect_names_tensors_shards_and_codecs(tmp_path: Path) -> None:
    make_root(tmp_path, compression="lossless")
    body = run_cli("inspect", tmp_path, "--json").json()
    assert body["step"] == 2
    by = {t["name"]: t for t in body["tensors"]}
    assert set(by) == {"model/w", "model/emb", "model/bias"}
    w = by["model/w"]
    assert w["dtype"] == "float32" and w["shape"] == [64, 32] and w["raw_bytes"] == 64 * 32 * 4
    assert w["codecs"] == ["planes-zstd/4"]
    assert w["shards"][0]["codec"] == [{"name": "planes-zstd", "configuration": {"width": 4}}]
    assert by["model/emb"]["shards"][0]["referenced"] and by["model/emb"]["shards"][0]["file"].startswith(
        "step-0000000001/"
    )
    one = run_cli("inspect", tmp_path, "--step", "1", "--tensor", "model/e*", "--json").json()
    assert [t["name"] for t in one["tensors"]] == ["model/emb"]
    text = run_cli("inspect", tmp_path, "--shards").stdout
    assert "model/bias" in text and "bfloat16" in text and "earlier step" in text


def test_verify_passes_then_names_a_flipped_byte(tmp_path: Path) -> None:
    make_root(tmp_path)
    good = run_cli("verify", tmp_path, "--all")
    assert good.returncode == 0 and "all intact: 2 step(s)" in good.stdout
    with Root(tmp_path) as root:
        shard = root.snapshot(2).tensor("model/w").shards[0]
    path = tmp_path / shard.file
    data = bytearray(path.read_bytes())
    data[shard.begin + 100] ^= 0x01
    path.write_bytes(bytes(data))
    bad = run_cli("verify", tmp_path, "--json")
    assert bad.returncode == 4
    (step,) = bad.json()["steps"]
    (problem,) = step["bad"]
    assert problem["tensor"] == "model/w" and problem["file"] == shard.file and problem["chunk"] == 0
    text = run_cli("verify", tmp_path, "--step", "2")
    assert text.returncode == 4 and "1 of 3 tensors DAMAGED" in text.stdout
    assert f"model/w: {shard.file}, chunk 0" in text.stderr
    assert run_cli("verify", tmp_path, "--step", "1").returncode == 0  # step 1 is intact


def test_verify_reads_a_shard_in_windows_and_names_the_first_bad_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshot.verify reads a raw shard back a window of checksum chunks at a time, through
    the storage layer, and checks it with the reader's chunk check: every byte is seen, and a
    damaged tensor is named with its first bad chunk."""
    from fmstore.checkpoint import snapshot as snapshot_module
    from fmstore.storage import Storage

    with Checkpointer(tmp_path, no_dist=True, compression=None) as ck:
        ck.save(1, {"w": torch.zeros(10 << 20)}).wait()  # 40 MiB: three 16 MiB checksum chunks
    with Root(tmp_path) as root:
        (shard,) = root.snapshot().tensor("w").shards
    cs = v3_to_v2(json.loads((tmp_path / shard.file).parent.joinpath(MANIFEST).read_bytes()))["tensors"]["w"][
        "shards"
    ][0]["chunk_size"]
    nchunks = -(-shard.stored_bytes // cs)
    assert not shard.codec and nchunks >= 3, "the test needs a raw shard of several checksum chunks"
    monkeypatch.setattr(snapshot_module, "VERIFY_WINDOW", cs)  # a window a chunk
    seen: list[int] = []
    real = Storage.read_ranges
    monkeypatch.setattr(
        Storage, "read_ranges", lambda self, rel, ranges: (seen.append(len(ranges[0][1])), real(self, rel, ranges))[1]
    )
    with Root(tmp_path) as root:
        done: list[int] = []
        assert root.snapshot().verify(threads=3, progress=done.append) == []
    assert sum(done) == shard.stored_bytes and max(seen) <= cs
    path = tmp_path / shard.file
    data = bytearray(path.read_bytes())
    for chunk in (nchunks - 1, 1):  # a later window and an earlier one
        data[shard.begin + chunk * cs + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with Root(tmp_path) as root:
        (problem,) = root.snapshot().verify(threads=3)
    assert problem.tensor == "w" and problem.file == shard.file and problem.chunk == 1
    assert f"chunk 1, bytes {shard.begin + cs}..{shard.begin + 2 * cs}" in problem.message


def test_diff_two_steps_and_two_roots(tmp_path: Path) -> None:
    states = make_root(tmp_path / "a")
    body = run_cli("diff", tmp_path / "a", "1", "2", "--json").json()
    rows = {r["tensor"]: r for r in body["tensors"]}
    assert rows["model/emb"]["status"] == "same"
    assert rows["model/w"]["status"] == "changed" and rows["model/w"]["max_abs"] == pytest.approx(
        0.5, abs=1e-6
    )
    want_rel = 0.5 / float(states[1]["model"]["w"].abs().max())
    assert rows["model/w"]["max_rel"] == pytest.approx(want_rel, rel=1e-5)
    assert rows["model/bias"]["status"] == "only in B"
    with Checkpointer(tmp_path / "b") as ck:
        ck.save(7, states[2])
    same = run_cli("diff", tmp_path / "a", tmp_path / "b", "--steps", "2", "7")
    assert same.returncode == 0 and "0 of 3 tensor(s) differ" in same.stdout


def test_not_found_and_usage_exit_codes(tmp_path: Path) -> None:
    missing = run_cli("ls", tmp_path / "nope")
    assert missing.returncode == 3 and str(tmp_path / "nope") in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1  # one line, no traceback
    make_root(tmp_path / "r")
    assert run_cli("inspect", tmp_path / "r", "--step", "9").returncode == 3
    assert run_cli("diff", tmp_path / "r", "1", "x").returncode == 2
    blobs = run_cli("blobs", tmp_path / "r")
    assert blobs.returncode != 0 and "fmstore ls" in blobs.stderr


def test_s3_root(s3, tmp_path: Path) -> None:
    url = s3.url(f"cli-{os.getpid()}")
    make_root(url, storage_options=s3.storage_options)
    body = run_cli("ls", url, "--json", env=s3.env).json()
    assert [s["step"] for s in body["snapshots"]] == [1, 2]
    assert run_cli("verify", url, "--all", env=s3.env).returncode == 0
    rows = run_cli("diff", url, "1", "2", "--json", env=s3.env).json()["tensors"]
    assert {r["tensor"]: r["status"] for r in rows}["model/w"] == "changed"
    names = [t["name"] for t in run_cli("inspect", url, "--json", env=s3.env).json()["tensors"]]
    assert names == ["model/bias", "model/emb", "model/w"]
    # import onto an S3 root: a safetensors file exported from it comes back as a new step
    out = tmp_path / "w.safetensors"
    assert run_cli("export", url, "--format", "safetensors", out, env=s3.env).returncode == 0
    again = s3.url(f"cli-import-{os.getpid()}")
    assert run_cli("import", out, again, "--step", "5", env=s3.env).returncode == 0
    assert [s["step"] for s in run_cli("ls", again, "--json", env=s3.env).json()["snapshots"]] == [5]


def test_snapshot_reads_slices_and_whole_state(tmp_path: Path) -> None:
    states = make_root(tmp_path)
    with Root(tmp_path) as root:
        snap = root.snapshot()
        w = states[2]["model"]["w"]
        assert torch.equal(snap.read("model/w", offsets=(10, 4), shape=(5, 6)), w[10:15, 4:10])
        state = snap.state()
        assert state["step"] == 2 and torch.equal(state["model"]["bias"], states[2]["model"]["bias"])


def test_version_1_manifest_still_loads_and_unknown_codec_is_refused(tmp_path: Path) -> None:
    states = make_root(tmp_path, compression="lossless")
    path = tmp_path / "step-0000000002" / MANIFEST
    body = v3_to_v2(json.loads(path.read_bytes()))  # edited as version 2 (an object per shard)
    legacy = json.loads(json.dumps(body))
    legacy["version"] = 1
    for entry in legacy["tensors"].values():
        for s in entry["shards"]:
            width = s["codec"][0]["configuration"]["width"]
            s["codec"] = [f"planes{width}", "zstd"]
    path.write_text(json.dumps(legacy))
    with Checkpointer(tmp_path) as ck:
        got = ck.load(step=2)
    assert torch.equal(got["model"]["w"], states[2]["model"]["w"])
    body["tensors"]["model/w"]["shards"][0]["codec"] = [{"name": "lz77", "configuration": {}}]
    path.write_text(json.dumps(body))
    with Checkpointer(tmp_path) as ck, pytest.raises(ManifestError, match="unknown codec 'lz77'"):
        ck.load(step=2)
    body["tensors"]["model/w"]["shards"][0]["codec"] = [{"name": "fmhs", "configuration": {"width": 2}}]
    path.write_text(json.dumps(body))  # a 2-byte codec on a float32 tensor
    with Checkpointer(tmp_path) as ck, pytest.raises(ManifestError, match="does not fit 4-byte elements"):
        ck.load(step=2)


def test_ls_after_cp_of_one_step_shows_carried_files_not_a_crash(tmp_path: Path) -> None:
    make_root(tmp_path / "src")
    assert run_cli("cp", tmp_path / "src", tmp_path / "dst", "--step", "2").returncode == 0
    body = run_cli("ls", tmp_path / "dst", "--json").json()
    assert [s["step"] for s in body["snapshots"]] == [2]
    assert body["incomplete"] == [] and body["carried"] == [1]  # step 1's file holds the embedding
    assert "files used by later steps" in run_cli("ls", tmp_path / "dst").stdout


def test_snapshot_tensor_names_are_not_globs(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"m": {"layers[0]": torch.ones(3), "layers0": torch.zeros(3)}})
    with Root(tmp_path) as root:
        snap = root.snapshot()
        assert snap.tensor("m/layers[0]").name == "m/layers[0]"  # "[0]" is no character class here
        assert [t.name for t in snap.tensors("m/layers[0]")] == ["m/layers0"]  # a pattern is one
