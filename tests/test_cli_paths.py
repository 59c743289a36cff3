"""The fmstore command on the paths users give it (issue 26): a snapshot's own directory or URL
wherever ``ROOT --step N`` goes, ``ls`` of a path holding no snapshots, output piped into a
reader that goes away, ``du``'s total of every file, the listing commands without torch, and
``gc --yes`` under the root's writer lease (docs/cli.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, run_cli

from fmstore import Checkpointer, WriterConflictError
from fmstore.checkpoint.manifest import _ITEMSIZE, MANIFEST, step_dir
from fmstore.cli import EXIT_BROKEN_PIPE, build_parser, main

S100, S200 = step_dir(100), step_dir(200)


def make_root(
    root: str | Path, storage_options: dict | None = None, *, tensors: int = 0, compression: str | None = None
) -> None:
    """Steps 100 and 200: step 200 changes ``w`` and references the frozen ``emb`` in step 100's
    file; ``tensors`` adds that many small tensors (a long ``inspect --json``)."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(64, 16, generator=g)
    w = torch.randn(32, 8, generator=g)
    extra = {f"t{i:05d}": torch.full((4,), float(i)) for i in range(tensors)}
    with Checkpointer(root, storage_options=storage_options, compression=compression) as ck:
        for step in (100, 200):
            ck.save(step, {"model": {"emb": emb, "w": w + step, **extra}, "step": step})


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    make_root(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def ok(*args: Any, env: dict[str, str] | None = None) -> Any:
    out = run_cli(*args, env=env)
    assert out.returncode == 0, out.stderr
    return out.json() if "--json" in args else out.stdout


# ----------------------------------------------------------------- 1. a snapshot's own directory


def test_every_command_takes_a_snapshots_own_directory(ckpt: Path, tmp_path: Path) -> None:
    """Before: each said "no committed snapshot under 'ckpt/step-0000000100'" (exit 3)."""
    snap = ckpt / S100
    body = ok("inspect", snap, "--json")
    assert body["step"] == 100 and body["root"] == str(ckpt)
    assert ok("inspect", f"{snap}/", "--json")["step"] == 100  # as a shell completes it
    assert ok("inspect", snap, "--step", "100", "--json")["step"] == 100  # the same step: fine
    assert [s["step"] for s in ok("verify", snap, "--json")["steps"]] == [100]
    out = tmp_path / "w.safetensors"
    assert ok("export", snap, out, "--format", "safetensors", "--json")["step"] == 100
    diff = ok("diff", snap, ckpt / S200, "--json")
    assert (diff["a"], diff["b"]) == ({"root": str(ckpt), "step": 100}, {"root": str(ckpt), "step": 200})
    copied = ok("cp", ckpt / S200, tmp_path / "backup", "--json")
    assert [s["step"] for s in copied["steps"]] == [200] and copied["src"] == str(ckpt)
    assert [s["step"] for s in ok("ls", tmp_path / "backup", "--json")["snapshots"]] == [200]
    # ls of a snapshot's directory lists that snapshot alone, as ls ROOT --step N does.
    listed = ok("ls", snap, "--json")
    assert [s["step"] for s in listed["snapshots"]] == [100] and listed["root"] == str(ckpt)
    assert listed == ok("ls", ckpt, "--step", "100", "--json")
    text = ok("ls", snap)
    assert "1 committed snapshot(s) under" in text and "\n200 " not in text


def test_a_snapshot_directory_and_another_step_is_a_usage_error(ckpt: Path, tmp_path: Path) -> None:
    snap = ckpt / S100
    cases = [
        ("inspect", snap, "--step", "200"),
        ("ls", snap, "--step", "200"),
        ("verify", snap, "--step", "200"),
        ("verify", snap, "--all"),
        ("export", snap, tmp_path / "x.safetensors", "-f", "safetensors", "--step", "200"),
        ("diff", snap, ckpt / S200, "--steps", "200", "200"),
        ("diff", snap, "100", "200"),  # ROOT A B takes the root
        ("cp", snap, tmp_path / "dst", "--step", "200"),
        ("cp", snap, tmp_path / "dst", "--all"),
        ("cp", ckpt, tmp_path / "dst" / S100),  # DST_ROOT named like a step: a nested root
        ("gc", snap),  # gc and du work on a whole root, never a snapshot's directory as one
        ("du", snap),
    ]
    for args in cases:
        out = run_cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("fmstore: error: ") and "Traceback" not in out.stderr, args
    assert "step 100 of root" in run_cli("inspect", snap, "--step", "200").stderr
    assert not (tmp_path / "dst").exists()  # refused before anything was written


def test_a_missing_step_directory_names_the_step_and_the_root(ckpt: Path) -> None:
    out = run_cli("inspect", ckpt / step_dir(999))
    assert out.returncode == 3
    assert f"no committed snapshot for step 999 under {str(ckpt)!r} (have [100, 200])" in out.stderr


def test_a_root_named_like_a_step_directory_stays_a_root(tmp_path: Path) -> None:
    root = tmp_path / step_dir(7)
    make_root(root)
    assert [s["step"] for s in ok("ls", root, "--json")["snapshots"]] == [100, 200]
    assert ok("inspect", root, "--json")["step"] == 200


@pytest.mark.s3
def test_s3_snapshot_url(s3: Any, tmp_path: Path) -> None:
    url = s3.url(f"cli-paths-{os.getpid()}-{tmp_path.name}")
    make_root(url, s3.storage_options)
    body = ok("inspect", f"{url}/{S100}", "--json", env=s3.env)
    assert body["step"] == 100 and body["root"].rstrip("/").endswith(url.split("://", 1)[1])
    assert [s["step"] for s in ok("verify", f"{url}/{S100}/", "--json", env=s3.env)["steps"]] == [100]
    assert [s["step"] for s in ok("ls", f"{url}/{S200}", "--json", env=s3.env)["snapshots"]] == [200]
    assert run_cli("inspect", f"{url}/{S100}", "--step", "200", env=s3.env).returncode == 2


# ----------------------------------------------------------------- 2. ls of a path without snapshots


def test_ls_of_a_path_without_snapshots_is_not_found(tmp_path: Path) -> None:
    """Before: "no snapshots", exit status 0."""
    (tmp_path / "empty").mkdir()
    for args in (("ls", tmp_path / "empty"), ("ls", tmp_path / "empty", "--json")):
        out = run_cli(*args)
        assert out.returncode == 3 and out.stdout == ""
        assert out.stderr == f"fmstore: error: no snapshots under {str(tmp_path / 'empty')!r}\n"
    make_root(tmp_path / "ckpt")
    out = run_cli("ls", tmp_path / "ckpt", "--step", "5")
    assert out.returncode == 3 and "no step 5 under" in out.stderr


# ----------------------------------------------------------------- 3. a reader that goes away


@contextmanager
def gone_reader() -> Iterator[int]:
    """The write end of a pipe whose reader has gone already (``| head`` that exited): every
    write to it fails, whenever the writer gets to it (no race with the reader)."""
    r, w = os.pipe()
    os.close(r)
    try:
        yield w
    finally:
        os.close(w)


def assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr


def test_output_into_a_reader_gone_away_ends_quietly(ckpt: Path) -> None:
    """Before: ``fmstore ls ckpt | head -1`` ended in a BrokenPipeError traceback."""
    env = dict(os.environ, PYTHONPATH=REPO)
    for args, want in (
        (["ls", ckpt], EXIT_BROKEN_PIPE),
        (["ls", ckpt, "--json"], EXIT_BROKEN_PIPE),
        (["inspect", ckpt / S200], EXIT_BROKEN_PIPE),
        (["verify", ckpt], EXIT_BROKEN_PIPE),
        (["diff", ckpt, "100", "200"], EXIT_BROKEN_PIPE),
        (["du", ckpt], EXIT_BROKEN_PIPE),
        (["gc", ckpt], EXIT_BROKEN_PIPE),
        (["--help"], 0),  # argparse drops its own write errors
    ):
        with gone_reader() as w:
            out = subprocess.run(
                [sys.executable, "-m", "fmstore.cli", *map(str, args)],
                stdout=w,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=300,
            )
        assert out.returncode == want, (args, out.stderr)
        assert_quiet(out.stderr)


def test_a_reader_that_stops_after_one_line(tmp_path: Path) -> None:
    """``| head -1`` for real: the reader takes one line and closes while the command still has
    far more than a pipe holds to write."""
    make_root(tmp_path / "big", tensors=1500)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmstore.cli", "inspect", str(tmp_path / "big"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"{\n"
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == EXIT_BROKEN_PIPE
    assert_quiet(stderr)
    assert stderr == ""


# ----------------------------------------------------------------- 4. du counts every file


def test_du_total_is_every_file_under_the_root(ckpt: Path) -> None:
    """Before: the root's writer.lease was left out of the total and the file count."""
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert ckpt / "writer.lease" in files  # the checkpointer's claim on the root
    body = ok("du", ckpt, "--json")
    assert body["files"] == len(files)
    assert body["totals"]["total_bytes"] == sum(p.stat().st_size for p in files)
    assert body["totals"]["other_bytes"] == (ckpt / "writer.lease").stat().st_size
    parts = [v for k, v in body["totals"].items() if k != "total_bytes"]
    assert sum(parts) == body["totals"]["total_bytes"]
    assert "other" in ok("du", ckpt).splitlines()[-1]


# ----------------------------------------------------------------- 5. no torch for listing


def test_listing_commands_import_no_torch(ckpt: Path, tmp_path: Path) -> None:
    """Before: ``fmstore ls`` of a one-step root took seconds, all of it ``import torch``.  A
    compressed snapshot too: its manifest names codecs, whose registry is torch-free."""
    packed = tmp_path / "packed"
    make_root(packed, compression="lossless")
    (ckpt / step_dir(50)).mkdir()  # something for gc's dry run to list
    (ckpt / step_dir(50) / "x.safetensors").write_bytes(b"x" * 10)
    code = (
        "import sys\n"
        "from fmstore.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, f'{sys.argv[1:]} imported torch'\n"
    )
    for args in (
        ["ls", ckpt],
        ["ls", ckpt, "--json"],
        ["ls", ckpt / S100],
        ["inspect", ckpt],
        ["inspect", ckpt / S100, "--shards", "--json"],
        ["du", ckpt],
        ["gc", ckpt],
        ["gc", ckpt, "--keep-last", "1", "--json"],
        ["ls", packed],
        ["inspect", packed, "--shards", "--json"],
        ["du", packed],
    ):
        out = subprocess.run(
            [sys.executable, "-c", code, *map(str, args)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=REPO),
            timeout=300,
        )
        assert out.returncode == 0, (args, out.stderr)
    assert (ckpt / step_dir(50) / "x.safetensors").exists()  # a dry run deletes nothing


def test_manifest_dtype_sizes_are_torchs() -> None:
    """Manifests are read without torch from a table of dtype sizes: each is torch's own."""
    for name, size in _ITEMSIZE.items():
        assert getattr(torch, name).itemsize == size, name


# ----------------------------------------------------------------- 6. gc --yes takes the writer lease

HOLDER = """\
import json, sys
import torch
from fmstore import Checkpointer
root, options = sys.argv[1], json.loads(sys.argv[2])
ck = Checkpointer(root, **options)
ck.save(300, {"model": {"w": torch.ones(8)}}).wait()
print("holding", flush=True)
sys.stdin.read()  # until the test closes stdin
ck.close()
"""


@contextmanager
def holding_job(root: str, options: dict[str, Any] | None = None) -> Iterator[subprocess.Popen]:
    """Another process whose Checkpointer has saved to ``root`` and so holds its writer lease,
    until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, root, json.dumps(options or {})],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0


def gc_in_process(*argv: str) -> int:
    args = build_parser().parse_args(["gc", *argv])
    return int(args.run(args) or 0)


def test_gc_yes_is_refused_while_another_job_holds_the_root(ckpt: Path) -> None:
    """Before: gc --yes deleted (and with --keep-last uncommitted) under a running job."""
    leftover = ckpt / step_dir(150) / "crashed.safetensors"  # an older crash's files: gc's to take
    leftover.parent.mkdir()
    leftover.write_bytes(b"x" * 100)
    manifests = sorted(ckpt.glob(f"*/{MANIFEST}"))
    with holding_job(str(ckpt)) as job:
        for extra in ([], ["--keep-last", "1"]):
            out = run_cli("gc", ckpt, "--yes", *extra)
            assert out.returncode == 1, out.stderr
            assert out.stderr.startswith("fmstore: error: nothing deleted: ")
            assert f"pid {job.pid}," in out.stderr and "Traceback" not in out.stderr
            with pytest.raises(WriterConflictError, match=rf"nothing deleted: .*pid {job.pid}\b"):
                gc_in_process(str(ckpt), "--yes", *extra)
        assert leftover.exists() and sorted(ckpt.glob(f"*/{MANIFEST}")) == manifests + [
            ckpt / step_dir(300) / MANIFEST
        ]
        dry = ok("gc", ckpt, "--json")  # the dry run claims nothing: it runs beside the job
        assert dry["dry_run"] and [d["step"] for d in dry["dirs"]] == [150]
    body = ok("gc", ckpt, "--yes", "--keep-last", "1", "--json")  # the job is gone: collected
    assert body["uncommitted"] == [100, 200] and not leftover.exists()
    assert [s["step"] for s in ok("ls", ckpt, "--json")["snapshots"]] == [300]


def test_gc_yes_is_refused_beside_a_checkpointer_of_its_own_process(ckpt: Path) -> None:
    """POSIX record locks are per process: the lease module's own table tells a Checkpointer of
    this process holding the root (a notebook running ``fmstore.cli.main``) from none."""
    ck = Checkpointer(ckpt)
    try:
        ck.save(300, {"model": {"w": torch.ones(8)}}).wait()
        with pytest.raises(WriterConflictError, match="another Checkpointer of this process"):
            gc_in_process(str(ckpt), "--yes", "--keep-last", "1")
        assert main(["gc", str(ckpt), "--yes", "--keep-last", "1"]) == 1
        assert [s["step"] for s in ok("ls", ckpt, "--json")["snapshots"]] == [100, 200, 300]
    finally:
        ck.close()
    assert gc_in_process(str(ckpt), "--yes", "--keep-last", "1") == 0
    assert ck.steps() == [300]


@pytest.mark.s3
def test_s3_gc_yes_is_refused_while_another_job_holds_the_root(s3: Any, tmp_path: Path) -> None:
    url = s3.url(f"cli-gc-{os.getpid()}-{tmp_path.name}")
    make_root(url, s3.storage_options)
    fs = s3.filesystem()
    leftover = f"{url.split('://', 1)[1]}/{step_dir(150)}/crashed.safetensors"
    fs.pipe(leftover, b"x" * 100)
    # A short lease ttl: the job renews every ttl / 4, and gc tells a live holder by its renewal.
    with holding_job(url, {"storage_options": s3.storage_options, "lease_ttl": 2.0}) as job:
        out = run_cli("gc", url, "--yes", "--keep-last", "1", env=s3.env)
        assert out.returncode == 1, out.stderr
        assert "nothing deleted: " in out.stderr and f"pid {job.pid}," in out.stderr
        assert fs.exists(leftover)
        assert [s["step"] for s in ok("ls", url, "--json", env=s3.env)["snapshots"]] == [100, 200, 300]
    body = ok("gc", url, "--yes", "--keep-last", "1", "--json", env=s3.env)
    assert body["uncommitted"] == [100, 200]
    fs.invalidate_cache()
    assert not fs.exists(leftover)
    assert [s["step"] for s in ok("ls", url, "--json", env=s3.env)["snapshots"]] == [300]
