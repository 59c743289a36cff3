"""fmstore as users install it: a wheel built from this tree, installed without ``-e`` into a new
virtual environment, used from a directory outside the tree.

Every other test imports the editable install (or the checkout on ``PYTHONPATH``), which maps the
source tree and so can hide a package the wheel leaves out (``fmstore.storage`` once was).

What the new environment shares with the test environment: its dependencies (torch from the
same local wheel, numpy, s3fs, lightning, transformers...), reached through a ``.pth`` path
entry rather than installed again (a second torch install costs ~45 s on the 2-core CI
machine).  A path entry does not run the test environment's own ``.pth`` files, so its editable
fmstore stays invisible; the test asserts that ``fmstore`` comes from the wheel, and ``pip
check`` that the wheel's declared requirements are met.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.s3]

#: Run in the new environment, from outside the tree.  argv: local root, S3 URL or "".
USE = textwrap.dedent(
    """
    import importlib, json, os, pkgutil, sys
    import fmstore
    venv = sys.argv[3]
    assert os.path.realpath(fmstore.__file__).startswith(os.path.realpath(venv)), fmstore.__file__
    modules = []
    for m in pkgutil.walk_packages(fmstore.__path__, "fmstore."):
        if m.name.startswith("fmstore.integrations.") or m.name.endswith(".__main__"):
            continue
        importlib.import_module(m.name)
        modules.append(m.name)
    import torch
    from fmstore import Checkpointer
    from fmstore.codec import kernels
    assert os.path.isfile(kernels.SOURCES["huffman"]), kernels.SOURCES
    state = {"w": torch.arange(12.0).reshape(3, 4), "step": 7}
    for root, opts in ((sys.argv[1], None), (sys.argv[2], json.loads(os.environ.get("S3_OPTS", "null")))):
        if not root:
            continue
        with Checkpointer(root, storage_options=opts) as ck:
            ck.save(7, state).wait()
            back = ck.load()
        assert torch.equal(back["w"], state["w"]) and back["step"] == 7, back
    print(json.dumps({"modules": modules}))
    """
)

#: Imports each integration; with ``hide``, its trainer library is made unimportable first.
INTEGRATIONS = {"lightning": "lightning", "hf": "transformers", "dcp": None, "loop": None}


def _tree_copy(dest: Path) -> None:
    """The files git would commit (tracked, or untracked and not ignored): no build/, no .so,
    no egg-info left by an editable install to leak into the wheel."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The new environment with the wheel installed; returns its directory."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files the wheel is built from")
    work = tmp_path_factory.mktemp("wheel")
    src, dist, venv = work / "src", work / "dist", work / "venv"
    _tree_copy(src)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("fmstore-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    Path(purelib.strip(), "_shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    check = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "check"], capture_output=True, text=True
    )
    # pip check also judges the test environment's packages; only lines about fmstore matter.
    assert not [ln for ln in check.stdout.splitlines() if ln.lower().startswith("fmstore")], check.stdout
    return venv


def test_wheel_saves_loads_and_lists(installed: Path, tmp_path: Path, s3) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    python = installed / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["S3_OPTS"] = json.dumps(s3.storage_options)
    root = str(outside / "ckpt")
    proc = _run(
        [str(python), "-c", USE, root, s3.url(f"wheel-{os.getpid()}"), str(installed)], cwd=outside, env=env
    )
    modules = json.loads(proc.stdout.strip().splitlines()[-1])["modules"]
    for expected in ("fmstore.storage", "fmstore.checkpoint", "fmstore.cli", "fmstore.codec.kernels"):
        assert expected in modules
    fmstore_cmd = str(installed / "bin" / "fmstore")
    assert "usage" in _run([fmstore_cmd, "--help"], cwd=outside, env=env).stdout.lower()
    listing = _run([fmstore_cmd, "ls", root], cwd=outside, env=env).stdout
    assert "7" in listing


@pytest.mark.parametrize("name", sorted(INTEGRATIONS))
def test_wheel_integrations_import_and_name_their_extra(installed: Path, tmp_path: Path, name: str) -> None:
    python = str(installed / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    module = f"fmstore.integrations.{name}"
    _run([python, "-c", f"import {module}"], cwd=tmp_path, env=env)
    library = INTEGRATIONS[name]
    if library is None:
        return
    # The library made unimportable, as where the extra was not installed.
    hide = f"import sys; sys.modules[{library!r}] = None; import {module}"
    proc = subprocess.run([python, "-c", hide], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ModuleNotFoundError" in proc.stderr
    assert f'pip install "fmstore[{name}]"' in proc.stderr, proc.stderr


def test_repository_root_does_not_shadow_pypi_kernels() -> None:
    """The source tree holds no importable top-level ``kernels``: run from the repository root
    (the first entry of ``sys.path``), ``import kernels`` finds PyPI's package if installed."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print((s and s.origin) or '')"
    origin = _run([sys.executable, "-c", probe], cwd=REPO).stdout.strip()
    if origin:
        assert not Path(origin).resolve().is_relative_to(REPO / "kernels"), origin
    else:  # not installed here: the checkout must not provide one either
        assert origin == ""
