"""Bad input gets a clear error naming what was wrong; stored blobs are valid safetensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fmstore import (
    BlobNotFoundError,
    CapacityError,
    ConfigError,
    CorruptBlobError,
    HostTier,
    InvalidKeyError,
    LocalTier,
    ObjectTier,
    TieredStore,
    format_size,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("4GiB", 4 << 30),
        ("64MiB", 64 << 20),
        ("512", 512),
        ("1.5KiB", 1536),
        ("2GB", 2 * 10**9),
        (" 8 kib ", 8192),
        (123, 123),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["4 gigs", "GiB", "-1", "1e3MB", "", "4GiBs", -5, True, 1.5])
def test_capacity_string_that_does_not_parse(bad, tmp_path):
    with pytest.raises(ConfigError) as err:
        HostTier(bad)
    assert "capacity" in str(err.value)
    with pytest.raises(ConfigError):
        LocalTier(tmp_path, capacity=bad)


def test_format_size():
    assert format_size(1536) == "1.5 KiB" and format_size(None) == "unlimited" and format_size(7) == "7 B"


def test_unknown_url_scheme():
    with pytest.raises(ConfigError) as err:
        ObjectTier("nosuchproto://bucket/x")
    assert "nosuchproto" in str(err.value)
    with pytest.raises(ConfigError):
        ObjectTier("")


def test_tensor_larger_than_capacity_names_key_and_tier(tmp_path):
    tier = LocalTier(tmp_path, "1MiB", name="nvme")
    with pytest.raises(CapacityError) as err:
        tier.put("model/huge", torch.zeros(1 << 20, dtype=torch.float32))
    msg = str(err.value)
    assert "model/huge" in msg and "nvme" in msg and "4.0 MiB" in msg and "1.0 MiB" in msg


@pytest.mark.parametrize("bad", ["../escape", "a/../../etc/passwd", "/etc/passwd", "C:/x"])
def test_key_escaping_the_root_is_refused(bad, tmp_path):
    tier = LocalTier(tmp_path / "root")
    with pytest.raises(InvalidKeyError) as err:
        tier.put(bad, torch.ones(1))
    assert bad in str(err.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    with TieredStore([tier]) as store:
        with pytest.raises(InvalidKeyError):
            store.put(bad, torch.ones(1))


def test_values_that_cannot_be_stored(tmp_path):
    tier = LocalTier(tmp_path)
    with pytest.raises(Exception, match="tensors or bytes"):
        tier.put("k", [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(Exception, match="meta tensor"):
        tier.put("k", torch.empty(3, device="meta"))


def test_blob_files_are_valid_safetensors(tmp_path):
    tier = LocalTier(tmp_path)
    w = torch.randn(4, 8).to(torch.bfloat16)
    tier.put("layer/w", w)
    path = tier.path_of("layer/w")
    assert torch.equal(load_file(path)["data"], w)
    with safe_open(path, "pt") as f:
        assert f.metadata()["dtype"] == "bfloat16"
    # A dtype safetensors has no code for is stored as U8 and still opens.
    c = torch.randn(3, dtype=torch.complex64)
    tier.put("c", c)
    assert load_file(tier.path_of("c"))["data"].dtype == torch.uint8
    assert torch.equal(tier.get("c"), c)


def test_truncated_blob_is_an_error_naming_it(tmp_path):
    tier = LocalTier(tmp_path)
    tier.put("w", torch.randn(1000))
    path = tier.path_of("w")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CorruptBlobError) as err:
        tier.get("w")
    assert "'w'" in str(err.value) and "truncated" in str(err.value)
    with open(path, "wb") as f:
        f.write(b"\x05")  # not even a header
    with pytest.raises(CorruptBlobError, match="truncated"):
        tier.get("w")
    with open(path, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CorruptBlobError, match="malformed"):
        tier.get("w")


@pytest.mark.s3
def test_truncated_object_on_s3_is_an_error(s3):
    tier = ObjectTier(s3.url("corrupt"), s3.storage_options)
    tier.put("w", torch.randn(1000))
    fs = s3.filesystem()
    path = tier.path_of("w")
    fs.pipe(path, fs.cat(path)[:-100])
    with pytest.raises(CorruptBlobError, match="truncated"):
        tier.get("w")
    tier.delete("w")
    with pytest.raises(BlobNotFoundError, match="'w'"):
        tier.get("w")


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    tier = LocalTier(tmp_path)
    tier.put("a", torch.ones(3))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".a.safetensors.fmstore-tmp-{dead.stdout.strip()}-deadbeef"
    stale.write_bytes(b"partial")
    live = tmp_path / f".b.safetensors.fmstore-tmp-{os.getpid()}-cafecafe"
    live.write_bytes(b"in progress")
    again = LocalTier(tmp_path)
    assert again.list() == ["a"]
    assert not stale.exists() and live.exists()  # a live writer's file is left alone


def test_cli_blobs_lists_a_tier(tmp_path):
    from fmstore import ObjectTier

    tier = ObjectTier("file://" + str(tmp_path / "object"))
    tier.put("model/w", torch.ones(4))
    tier.put("meta/config.json", b"{}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "fmstore.cli", "blobs", str(tmp_path / "object")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0 and "2 blob(s)" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "fmstore.cli", "blobs", "bogus://x"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2 and "unknown URL scheme 'bogus'" in out.stderr


def test_docker_compose_file_is_well_formed():
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    minio = spec["services"]["minio"]
    assert minio["image"].startswith("quay.io/minio/minio:RELEASE.")  # pinned, not :latest
    assert any("9000" in str(p) for p in minio["ports"]) and any("9001" in str(p) for p in minio["ports"])
    assert "healthcheck" in minio
    assert spec["services"]["createbucket"]["depends_on"]["minio"]["condition"] == "service_healthy"


#: Modules not to import: ``python -m fmstore.cli`` runs the command line when imported.
_NOT_IMPORTED = {"fmstore.cli.__main__"}
#: The trainers' libraries, optional: an integration needing a missing one is skipped.
_OPTIONAL = {"lightning", "transformers"}


def _fmstore_modules() -> list[str]:
    """The names of every module of ``fmstore`` and ``fmstore.integrations``, subpackages' too."""
    import pkgutil

    import fmstore
    import fmstore.integrations

    names = set()
    for package in (fmstore, fmstore.integrations):
        names.add(package.__name__)
        # a subpackage that fails to import is left out here and imported (failing) by the test
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".", onerror=names.add):
            names.add(info.name)
    return sorted(names - _NOT_IMPORTED)


def test_every_exception_is_defined_in_errors():
    """Every public exception class of fmstore (and its integrations) lives in the torch-free
    ``fmstore.errors``: one place to read them, and ``fmstore`` commands map them to exit codes
    by ``isinstance`` without importing the modules that raise them."""
    import importlib

    elsewhere, skipped = [], []
    for name in _fmstore_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in _OPTIONAL:
                skipped.append(name)
                continue
            raise
        for attr, value in vars(module).items():
            if (
                not attr.startswith("_")
                and isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.split(".")[0] in ("fmstore", "trainer_integration")
                and value.__module__ != "fmstore.errors"
            ):
                elsewhere.append(f"{name}.{attr} (defined in {value.__module__})")
    assert not elsewhere, "exceptions defined outside fmstore.errors: " + ", ".join(sorted(set(elsewhere)))
