"""``fmstore cp``, ``fmstore gc`` and ``fmstore du`` (docs/cli.md): copies between local and S3
roots that carry incrementally referenced files, verify before they commit and resume after a
kill; garbage collection that deletes nothing in a dry run and exactly what it listed with
--yes; usage figures that add up to the bytes stored."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import shard_file, shard_rel

from fmstore import Checkpointer
from fmstore.checkpoint import Root
from fmstore.checkpoint.lease import LEASE
from fmstore.checkpoint.manifest import MANIFEST
from fmstore.cli import main
from fmstore.cli._copy import PAUSE_ENV
from fmstore.keys import TMP_MARKER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = "step-{:010d}"


def make_root(root: Any, storage_options: dict | None = None, *, seed: int = 0, **kw: Any) -> dict[int, dict]:
    """Three steps: the frozen embedding never changes (steps 20 and 30 reference step 10's
    file for it), the weight changes every step, the bias only at step 30."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(256, 64, generator=g)
    w = torch.randn(128, 64, generator=g)
    bias = torch.zeros(64, dtype=torch.bfloat16)
    states = {}
    with Checkpointer(root, storage_options=storage_options, incremental=True, **kw) as ck:
        for step in (10, 20, 30):
            if step == 30:
                bias = bias + 1
            state = {"model": {"emb": emb, "w": w.clone(), "bias": bias.clone()}, "step": step}
            ck.save(step, state).wait()
            states[step] = state
            w = w + 0.5
    return states


def cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str]:
    """``fmstore ARGS`` in this process: (exit status, stdout); stderr goes to ``cli.err``."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    cli.err = out.err  # type: ignore[attr-defined]
    return rc, out.out


def cli_json(capsys: pytest.CaptureFixture[str], *args: Any) -> Any:
    rc, out = cli(capsys, *args, "--json")
    assert rc == 0, out
    return json.loads(out)


def assert_loads(root: Any, states: dict[int, dict], storage_options: dict | None = None) -> None:
    with Checkpointer(root, storage_options=storage_options) as ck:
        for step, state in states.items():
            got = ck.load(step=step)
            assert got["step"] == step
            for name, t in state["model"].items():
                assert torch.equal(got["model"][name], t), (step, name)
    with Root(root, storage_options) as r:
        for step in states:
            assert r.snapshot(step).verify() == []


def tree(root: Path) -> dict[str, str]:
    """Every snapshot file under ``root`` (relative path -> sha256 of its bytes; the writer's
    lease left out: it says who wrote, not what)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            if n == LEASE and Path(dirpath) == Path(root):
                continue
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def shard_rel_local(root: Path, step: int) -> str:
    return f"{STEP.format(step)}/{shard_file(root / STEP.format(step)).name}"


def disk_bytes(root: Path) -> int:
    """The bytes of every file under ``root`` (the writer's lease too: du counts every file)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def dst_options(s3: Any) -> list[str]:
    opts = s3.storage_options
    return [
        "--dst-storage-option",
        f"key={opts['key']}",
        "--dst-storage-option",
        f"secret={opts['secret']}",
        "--dst-storage-option",
        f"endpoint_url={s3.endpoint}",
    ]


# ---------------------------------------------------------------------- cp


@pytest.mark.s3
def test_cp_local_to_s3_to_local_round_trip(tmp_path: Path, s3: Any, capsys, monkeypatch) -> None:
    states = make_root(tmp_path / "src")
    url = s3.url(f"cp-{time.time_ns()}")
    # Local -> S3: the destination's credentials and endpoint as --dst-storage-option.
    body = cli_json(capsys, "cp", tmp_path / "src", url, "--all", *dst_options(s3))
    assert [s["step"] for s in body["steps"]] == [10, 20, 30]
    assert all(s["status"] == "copied" for s in body["steps"])
    assert body["steps"][0]["files_copied"] == 1 and body["steps"][1]["files_skipped"] == 1
    assert_loads(url, states, s3.storage_options)
    # S3 -> local: credentials from the standard AWS variables.
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    body = cli_json(capsys, "cp", url, tmp_path / "back", "--all")
    assert all(s["status"] == "copied" for s in body["steps"])
    assert_loads(tmp_path / "back", states)
    assert tree(tmp_path / "back") == tree(tmp_path / "src")  # byte-identical, manifests too
    # du of the S3 copy agrees with the local source, but for the source's writer.lease (its
    # writer's claim on the root, which cp does not copy; du counts every file).
    local, remote = cli_json(capsys, "du", tmp_path / "src"), cli_json(capsys, "du", url)
    lease = (tmp_path / "src" / "writer.lease").stat().st_size
    assert local["totals"]["other_bytes"] == lease and remote["totals"]["other_bytes"] == 0
    assert remote["totals"] == {
        **local["totals"],
        "other_bytes": 0,
        "total_bytes": local["totals"]["total_bytes"] - lease,
    }
    assert remote["steps"] == local["steps"]
    # gc on S3: a crash-left object of an older step is listed, then deleted; nothing else.
    fs = s3.filesystem()
    crash = f"{url.removeprefix('s3://')}/{STEP.format(15)}/crash-left.safetensors"
    fs.pipe_file(crash, b"x" * 1234)
    body = cli_json(capsys, "gc", url)
    assert [(d["dir"], d["bytes"]) for d in body["dirs"]] == [(STEP.format(15), 1234)]
    assert fs.exists(crash)  # a dry run
    cli_json(capsys, "gc", url, "--yes")
    fs.invalidate_cache()
    assert not fs.exists(crash)
    # (gc --yes held the root's lease meanwhile; on S3 a released lease is deleted)
    assert cli_json(capsys, "du", url)["totals"] == remote["totals"]
    assert_loads(url, states, s3.storage_options)


def test_cp_single_step_carries_the_referenced_file(tmp_path: Path, capsys) -> None:
    states = make_root(tmp_path / "src")
    body = cli_json(capsys, "cp", tmp_path / "src", tmp_path / "dst", "--step", 20)
    (step,) = body["steps"]
    assert step["status"] == "copied"
    files = {f["file"]: f["action"] for f in step["files"]}
    with Root(tmp_path / "src") as src:
        carried, own = shard_rel(src.storage, 10), shard_rel(src.storage, 20)
    assert files == {carried: "copied", own: "copied"}
    # The earlier file is there under its own path; step 10 itself is not committed.
    assert (tmp_path / "dst" / carried).stat().st_size == (tmp_path / "src" / carried).stat().st_size
    assert not (tmp_path / "dst" / STEP.format(10) / MANIFEST).exists()
    with Root(tmp_path / "dst") as r:
        assert r.steps() == [20]
    assert_loads(tmp_path / "dst", {20: states[20]})
    # gc keeps the carried file: the committed step 20 references it.
    assert cli_json(capsys, "gc", tmp_path / "dst", "--yes")["files"] == 0
    assert (tmp_path / "dst" / carried).exists()
    du = cli_json(capsys, "du", tmp_path / "dst")
    assert du["totals"]["retained_bytes"] == (tmp_path / "dst" / carried).stat().st_size
    # The default is the newest step; then the rest, the carried file verified, not copied.
    body = cli_json(capsys, "cp", tmp_path / "src", tmp_path / "dst")
    assert [s["step"] for s in body["steps"]] == [30] and body["steps"][0]["files_skipped"] == 1
    rc, out = cli(capsys, "cp", tmp_path / "src", tmp_path / "dst", "--all")
    assert rc == 0
    assert "step 10: copied 0 file(s), 0 B; skipped 1 already there, verified" in out
    assert "step 20: already committed at the destination (identical manifest): skipped" in out
    assert_loads(tmp_path / "dst", states)
    assert tree(tmp_path / "dst") == tree(tmp_path / "src")


def test_cp_coded_shards_are_verified_by_decoding(tmp_path: Path, capsys) -> None:
    states = make_root(tmp_path / "src", compression="lossless")
    body = cli_json(capsys, "cp", tmp_path / "src", tmp_path / "dst", "--all")
    assert [s["status"] for s in body["steps"]] == ["copied"] * 3
    assert_loads(tmp_path / "dst", states)
    # A coded shard damaged at the destination (same size) of a step not committed there yet
    # is copied again, not skipped and not committed broken.
    dst2 = tmp_path / "dst2"
    cli_json(capsys, "cp", tmp_path / "src", dst2, "--step", 10)
    with Root(dst2) as r:
        coded = [s for t in r.snapshot(10).tensors() for s in t.shards if s.codec]
    assert coded
    (dst2 / STEP.format(10) / MANIFEST).unlink()  # uncommit it, so the file may be replaced
    f = dst2 / coded[0].file
    data = bytearray(f.read_bytes())
    data[(coded[0].begin + coded[0].end) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    body = cli_json(capsys, "cp", tmp_path / "src", dst2, "--step", 10)
    assert body["steps"][0]["files"][0]["action"] == "copied"
    assert_loads(dst2, {10: states[10]})


@pytest.mark.s3
def test_cp_multipart_files_to_and_from_s3(tmp_path: Path, s3: Any, capsys) -> None:
    """A file of several parts (12 MiB in 5 MiB parts): a multipart upload, windowed read-back."""
    big = torch.randn(3 << 20, generator=torch.Generator().manual_seed(1))  # 12 MiB
    with Checkpointer(tmp_path / "src") as ck:
        ck.save(1, {"big": big}).wait()
    url = s3.url(f"cp-mp-{time.time_ns()}")
    body = cli_json(capsys, "cp", tmp_path / "src", url, "--part-size", "5MiB", *dst_options(s3))
    assert body["steps"][0]["bytes_copied"] > 12 << 20
    opts = s3.storage_options
    src_opts = [
        "-o",
        f"key={opts['key']}",
        "-o",
        f"secret={opts['secret']}",
        "-o",
        f"endpoint_url={s3.endpoint}",
    ]
    body = cli_json(capsys, "cp", url, tmp_path / "back", "--part-size", "5MiB", *src_opts)
    assert body["steps"][0]["status"] == "copied"
    assert tree(tmp_path / "back") == tree(tmp_path / "src")
    with Root(url, s3.storage_options) as r:
        assert r.snapshot(1).verify() == []


def _interrupted_cp(tmp_path: Path, src: Path, dst: str, extra: list[str], env: dict[str, str]) -> None:
    """Run ``fmstore cp`` in a subprocess, wait for it to finish its first file (the test-only
    pause hook creates the marker), and SIGKILL it there."""
    marker = tmp_path / "paused"
    full = dict(os.environ, PYTHONPATH=REPO, **env, **{PAUSE_ENV: str(marker)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmstore.cli", "cp", str(src), dst, "--step", "20", *extra],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "cp never reached its first file"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_cp_killed_midway_commits_nothing_and_resumes(tmp_path: Path, kind: str, request, capsys) -> None:
    states = make_root(tmp_path / "src")
    if kind == "s3":
        s3 = request.getfixturevalue("s3")
        dst, extra, env, opts = (
            s3.url(f"cp-kill-{time.time_ns()}"),
            dst_options(s3),
            s3.env,
            s3.storage_options,
        )
    else:
        dst, extra, env, opts = str(tmp_path / "dst"), [], {}, None
    _interrupted_cp(tmp_path, tmp_path / "src", dst, extra, env)
    with Root(tmp_path / "src") as src:
        carried, own = shard_rel(src.storage, 10), shard_rel(src.storage, 20)
    with Root(dst, opts) as r:
        assert r.steps() == []  # killed: nothing committed, no manifest anywhere
        assert r.storage.exists(carried) and not r.storage.exists(own)
        assert not r.storage.exists(f"{STEP.format(20)}/{MANIFEST}")
    body = cli_json(capsys, "cp", tmp_path / "src", dst, "--step", 20, *extra)
    files = {f["file"]: f["action"] for f in body["steps"][0]["files"]}
    assert files == {carried: "skipped", own: "copied"}
    assert_loads(dst, {20: states[20]}, opts)


def test_cp_resume_recopies_a_damaged_file(tmp_path: Path, capsys) -> None:
    states = make_root(tmp_path / "src")
    _interrupted_cp(tmp_path, tmp_path / "src", str(tmp_path / "dst"), [], {})
    carried = shard_file(tmp_path / "dst" / STEP.format(10))
    data = bytearray(carried.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit off: found by the chunk check
    carried.write_bytes(bytes(data))
    body = cli_json(capsys, "cp", tmp_path / "src", tmp_path / "dst", "--step", 20)
    assert [f["action"] for f in body["steps"][0]["files"]] == ["copied", "copied"]
    assert_loads(tmp_path / "dst", {20: states[20]})


def test_cp_resume_clears_a_dead_copys_temp_file(tmp_path: Path, capsys) -> None:
    states = make_root(tmp_path / "src")
    _interrupted_cp(tmp_path, tmp_path / "src", str(tmp_path / "dst"), [], {})
    # What a kill in the middle of the second file leaves locally: a temporary file of a
    # dead writer (pid 2**22 + 1 exceeds Linux's pid_max, so it is surely dead).
    d = tmp_path / "dst" / STEP.format(20)
    d.mkdir(exist_ok=True)
    own = shard_file(tmp_path / "src" / STEP.format(20)).name
    tmp = d / f".{own}{TMP_MARKER}{(1 << 22) + 1}-deadbeef"
    tmp.write_bytes(b"partial")
    cli_json(capsys, "cp", tmp_path / "src", tmp_path / "dst", "--step", 20)
    assert not tmp.exists()
    assert_loads(tmp_path / "dst", {20: states[20]})


def test_cp_of_a_damaged_source_commits_nothing(tmp_path: Path, capsys) -> None:
    make_root(tmp_path / "src")
    f = shard_file(tmp_path / "src" / STEP.format(30))
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # in the last tensor's bytes
    f.write_bytes(bytes(data))
    rc, _ = cli(capsys, "cp", tmp_path / "src", tmp_path / "dst", "--step", 30)
    assert rc == 4 and "checksum" in cli.err  # type: ignore[attr-defined]
    assert not (tmp_path / "dst" / STEP.format(30) / MANIFEST).exists()


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_write_streamed_writes_part_by_part(tmp_path: Path, kind: str, request) -> None:
    from fmstore.storage import Storage

    if kind == "s3":
        s3 = request.getfixturevalue("s3")
        st = Storage(s3.url(f"ws-{time.time_ns()}"), s3.storage_options, concurrency=2)
    else:
        st = Storage(tmp_path / "ws", concurrency=2)
    data = os.urandom((11 << 20) + 123)
    calls = []

    def fill(offset: int, buf: memoryview) -> None:
        calls.append((offset, len(buf)))
        buf[:] = data[offset : offset + len(buf)]

    try:
        assert st.write_streamed("d/f.bin", len(data), fill, part_size=5 << 20) == len(data)
        assert sorted(calls) == [(0, 5 << 20), (5 << 20, 5 << 20), (10 << 20, (1 << 20) + 123)]
        assert st.read_bytes("d/f.bin") == data and st.list_dir("d") == ["f.bin"]

        def broken(offset: int, buf: memoryview) -> None:
            if offset:
                raise OSError("source gone")
            buf[:] = b"x" * len(buf)

        with pytest.raises(OSError, match="source gone"):
            st.write_streamed("d/g.bin", len(data), broken, part_size=5 << 20)
        assert not st.exists("d/g.bin") and st.list_dir("d") == ["f.bin"]  # nothing half-written
        if kind == "local":
            assert os.listdir(tmp_path / "ws" / "d") == ["f.bin"]  # the temporary file is gone
    finally:
        st.close()


def fixed_shard_names(root: Path) -> None:
    """Rename a root's shard files to the one name every writer used before names carried the
    writer's hash (``shard-r00000.safetensors``), manifests too: two such roots collide."""
    for d in sorted(root.glob("step-*")):
        for f in d.glob("*-shard-r00000.safetensors"):
            f.rename(d / "shard-r00000.safetensors")
    for m in root.glob(f"step-*/{MANIFEST}"):
        text = re.sub(r"[0-9a-f]{8}-shard-r00000\.safetensors", "shard-r00000.safetensors", m.read_text())
        m.write_text(text)


def test_cp_never_overwrites_a_committed_step(tmp_path: Path, capsys) -> None:
    make_root(tmp_path / "a", seed=0)
    other = make_root(tmp_path / "b", seed=1)  # another run: the same steps, other values
    for run in ("a", "b"):  # as older roots were written: both runs' files have the same names
        fixed_shard_names(tmp_path / run)
    cli_json(capsys, "cp", tmp_path / "b", tmp_path / "dst", "--step", 10)
    before = tree(tmp_path / "dst")
    rc, out = cli(capsys, "cp", tmp_path / "a", tmp_path / "dst", "--step", 10)
    assert rc == 1 and "DIFFERENT manifest: skipped, not overwritten" in out
    assert tree(tmp_path / "dst") == before
    # Step 20 of run a references its step 10 file, which the destination holds from run b
    # (same size, other bytes) and a committed step references: stop, overwrite nothing.
    rc, _ = cli(capsys, "cp", tmp_path / "a", tmp_path / "dst", "--step", 20)
    assert rc == 4 and "not overwritten" in cli.err  # type: ignore[attr-defined]
    assert not (tmp_path / "dst" / STEP.format(20) / MANIFEST).exists()
    assert_loads(tmp_path / "dst", {10: other[10]})
    # The same run again: identical, skipped, exit 0.
    rc, out = cli(capsys, "cp", tmp_path / "b", tmp_path / "dst", "--step", 10)
    assert rc == 0 and "identical manifest" in out


def test_cp_missing_step_is_not_found(tmp_path: Path, capsys) -> None:
    make_root(tmp_path / "src")
    rc, _ = cli(capsys, "cp", tmp_path / "src", tmp_path / "dst", "--step", 11)
    assert rc == 3 and not (tmp_path / "dst" / STEP.format(11)).exists()
    rc, _ = cli(capsys, "cp", tmp_path / "nowhere", tmp_path / "dst")
    assert rc == 3


# ---------------------------------------------------------------------- gc and du


def crash_left(root: Path, step: int, nbytes: int = 1000) -> Path:
    d = root / STEP.format(step)
    d.mkdir()
    (d / "crash-left.safetensors").write_bytes(os.urandom(nbytes))
    return d


def test_gc_dry_run_changes_nothing_and_yes_deletes_exactly_the_listing(tmp_path: Path, capsys) -> None:
    states = make_root(tmp_path)
    crash_left(tmp_path, 15)  # older than the newest committed step: left by a crash
    crash_left(tmp_path, 99)  # newer: may be being written now, never touched
    before = tree(tmp_path)
    body = cli_json(capsys, "gc", tmp_path, "--keep-last", 1)
    assert tree(tmp_path) == before  # the dry run deleted nothing
    assert body["dry_run"] and body["uncommitted"] == [10, 20] and body["left_alone"] == [99]
    listed = {f["file"] for d in body["dirs"] for f in d["files"]}
    assert listed == {
        f"{STEP.format(10)}/{MANIFEST}",  # step 10's shard file stays: step 30 references emb there
        f"{STEP.format(15)}/crash-left.safetensors",
        f"{STEP.format(20)}/{MANIFEST}",
        shard_rel_local(tmp_path, 20),
    }
    sizes = {f["file"]: f["bytes"] for d in body["dirs"] for f in d["files"]}
    assert body["bytes"] == sum(sizes.values()) == sum((tmp_path / f).stat().st_size for f in listed)
    rc, text = cli(capsys, "gc", tmp_path, "--keep-last", 1)  # the text form, still a dry run
    assert rc == 0 and "run again with --yes" in text and tree(tmp_path) == before
    done = cli_json(capsys, "gc", tmp_path, "--keep-last", 1, "--yes")
    assert not done["dry_run"] and {f["file"] for d in done["dirs"] for f in d["files"]} == listed
    after = tree(tmp_path)
    assert set(before) - set(after) == listed and set(after) <= set(before)
    assert all(after[f] == before[f] for f in after)
    assert not (tmp_path / STEP.format(15)).exists() and not (tmp_path / STEP.format(20)).exists()
    with Root(tmp_path) as r:
        assert r.steps() == [30]
    assert_loads(tmp_path, {30: states[30]})
    assert cli_json(capsys, "gc", tmp_path)["files"] == 0  # nothing left to collect


def test_gc_without_keep_last_collects_only_crash_leftovers(tmp_path: Path, capsys) -> None:
    make_root(tmp_path)
    crash_left(tmp_path, 25, 4096)
    before = tree(tmp_path)
    body = cli_json(capsys, "gc", tmp_path)
    assert body["uncommitted"] == [] and [d["dir"] for d in body["dirs"]] == [STEP.format(25)]
    assert body["dirs"][0]["whole"] and body["bytes"] == 4096 and tree(tmp_path) == before
    cli_json(capsys, "gc", tmp_path, "--yes")
    assert set(before) - set(tree(tmp_path)) == {f"{STEP.format(25)}/crash-left.safetensors"}
    # No committed snapshot at all: nothing is collected (every directory may be in progress).
    empty = tmp_path / "empty"
    empty.mkdir()
    crash_left(empty, 1)
    assert cli_json(capsys, "gc", empty, "--yes")["files"] == 0 and (empty / STEP.format(1)).exists()


def test_du_adds_up_to_the_bytes_on_disk(tmp_path: Path, capsys) -> None:
    make_root(tmp_path)
    crash_left(tmp_path, 15, 3000)
    (tmp_path / "notes.txt").write_bytes(b"x" * 17)
    body = cli_json(capsys, "du", tmp_path)
    t = body["totals"]
    assert t["total_bytes"] == disk_bytes(tmp_path)
    assert sum(v for k, v in t.items() if k != "total_bytes") == t["total_bytes"]
    assert t["incomplete_bytes"] == 3000 and t["other_bytes"] == 17 + (tmp_path / LEASE).stat().st_size
    steps = {s["step"]: s for s in body["steps"]}
    assert sum(s["own_bytes"] for s in steps.values()) == t["own_bytes"]
    assert sum(s["manifest_bytes"] for s in steps.values()) == t["manifest_bytes"]
    emb = 256 * 64 * 4
    bias = 64 * 2
    assert steps[10]["referenced_bytes"] == 0 and steps[10]["shared_bytes"] == emb + bias
    assert steps[20]["referenced_bytes"] == emb + bias and steps[30]["referenced_bytes"] == emb
    assert steps[30]["shared_bytes"] == 0
    # Dropping step 10 alone frees only its manifest: later steps reference its file.
    assert steps[10]["freed_if_dropped"] == steps[10]["manifest_bytes"]
    (inc,) = body["incomplete"]
    assert inc["step"] == 15 and inc["bytes"] == 3000 and not inc["newer_than_newest_committed"]
    rc, text = cli(capsys, "du", tmp_path)
    assert rc == 0 and f"({t['total_bytes']} bytes)" in text and "left by a crash" in text
