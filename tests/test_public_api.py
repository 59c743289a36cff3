"""The integrations use fmstore's public API only (issue 28).

``trainer_integration/`` (installed as ``fmstore.integrations``) may import from the public
packages below, and only the names they export (``__all__``, which lists their lazily loaded
names too), never a name that starts with ``_``; plus ``fmstore.exiting`` and the integrations
themselves.  A change inside ``fmstore/checkpoint`` then cannot break them silently: what they
need is exported, with a docstring saying what it is for.  Read with ``ast``, so the
integrations' optional extras (Lightning, transformers) need not be installed.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INTEGRATIONS = REPO / "trainer_integration"

#: The packages whose exported names are fmstore's public API.
PUBLIC_PACKAGES = (
    "fmstore",
    "fmstore.checkpoint",
    "fmstore.errors",
    "fmstore.storage",
    "fmstore.codec",
    "fmstore.offload",
    "fmstore.serving",
)
#: Modules public as a whole (any name not starting with ``_``).
PUBLIC_MODULES = ("fmstore.exiting", "fmstore.integrations")

#: Private imports still allowed, (module, name), in dcp.py only.  Empty: the DCP writer
#: writes through the save pipeline (``fmstore.checkpoint.SnapshotWriter``, issue 28).  An
#: entry added here needs a reason; an entry no longer imported fails too.
DCP_WRITER_PRIVATE: set[tuple[str, str]] = set()
ALLOWED_PRIVATE = {"dcp.py": DCP_WRITER_PRIVATE}


def public_names(package: str) -> set[str]:
    """What ``package`` exports: its ``__all__``, or (a module without one, as
    ``fmstore.errors``) the names it defines that do not start with ``_``."""
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    if names is not None:
        return set(names)
    return {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == package
    }


def _module_ok(module: str, packages: tuple[str, ...], modules: tuple[str, ...]) -> bool:
    """Whether importing ``module`` as a whole is allowed: a public package, or a public module
    or one under it (``fmstore.integrations.loop``)."""
    return module in packages or module in modules or any(module.startswith(f"{m}.") for m in modules)


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of each import of an fmstore module in ``path`` (name None for
    ``import module``), wherever it is (functions, ``TYPE_CHECKING`` blocks, ``try``)."""
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "fmstore"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the integrations package
                base = "fmstore.integrations".rsplit(".", node.level - 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.split(".")[0] == "fmstore":
                out += [(node.lineno, module, a.name) for a in node.names]
    return out


def private_imports(
    path: Path, packages: tuple[str, ...] = PUBLIC_PACKAGES, modules: tuple[str, ...] = PUBLIC_MODULES
) -> list[tuple[int, str, str | None]]:
    """The imports of ``path`` that reach past fmstore's public API: ``packages``' exported
    names and ``modules`` (and those under them) as a whole."""
    bad = []
    for line, module, name in imports(path):
        if name is None:
            ok = _module_ok(module, packages, modules)
        elif name == "*" or name.startswith("_"):
            ok = False
        elif _module_ok(f"{module}.{name}", packages, modules):  # a public module itself (from fmstore import exiting)
            ok = True
        elif module in packages:
            ok = name in public_names(module)
        else:
            ok = _module_ok(module, packages, modules)
        if not ok:
            bad.append((line, module, name))
    return bad


MODULES = sorted(INTEGRATIONS.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_integration_imports_only_public_names(path: Path) -> None:
    allowed = ALLOWED_PRIVATE.get(path.name, set())
    wrong = [
        f"{path.name}:{line}: from {module} import {name}" if name else f"{path.name}:{line}: import {module}"
        for line, module, name in private_imports(path)
        if (module, name) not in allowed
    ]
    assert not wrong, (
        "trainer_integration/ must use fmstore's public API (issue 28): export what it needs from "
        f"{', '.join(PUBLIC_PACKAGES)}, with a docstring; private imports found:\n" + "\n".join(wrong)
    )


@pytest.mark.parametrize("file", sorted(ALLOWED_PRIVATE))
def test_private_allowlist_has_no_stale_entries(file: str) -> None:
    """An entry of the allowlist the module no longer imports goes from the list."""
    used = {(module, name) for _, module, name in private_imports(INTEGRATIONS / file)}
    stale = sorted(ALLOWED_PRIVATE[file] - used, key=str)
    assert not stale, f"{file} no longer imports these: remove them from the allowlist: {stale}"


def test_the_check_catches_private_imports(tmp_path: Path) -> None:
    src = tmp_path / "probe.py"
    src.write_text(
        "from fmstore.checkpoint.tree import unflatten\n"  # a private module
        "from fmstore.checkpoint import overlap\n"  # a private submodule, through a public package
        "from fmstore.checkpoint import _LAZY\n"  # a private name
        "from fmstore.storage import files\n"  # not exported
        "import fmstore.blob\n"
        "def f():\n    from fmstore.tiers.host import BufferPool\n"  # inside a function too
        "from fmstore.checkpoint import Checkpointer, Manifest\n"  # public: fine
        "from fmstore import exiting, Policy\n"
        "from fmstore.errors import ConfigError\n"
        "from fmstore.integrations.loop import LoopCheckpointer\n"
        "from .loop import LoopCheckpointer\n"
    )
    assert [line for line, _, _ in private_imports(src)] == [1, 2, 3, 4, 5, 7]


@pytest.mark.parametrize("package", PUBLIC_PACKAGES)
def test_every_exported_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    missing = [n for n in sorted(public_names(package)) if not hasattr(module, n)]
    assert not missing, f"{package} exports names it cannot give: {missing}"


# ---------------------------------------------------------------------- bench/

BENCH = REPO / "bench"
#: What bench/ may import besides the integrations' public API: the ``fmstore`` command run
#: in-process (``fmstore.cli.main``, its ``__all__``) and the testing helpers, a public package
#: as a whole (a local S3 server; the synthetic many-rank job of ``fmstore.testing.metadata``).
BENCH_PUBLIC_PACKAGES = (*PUBLIC_PACKAGES, "fmstore.cli")
BENCH_PUBLIC_MODULES = (*PUBLIC_MODULES, "fmstore.testing")


def bench_private_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """The imports of fmstore in bench script ``path`` that reach past the public API (the same
    rule as for trainer_integration/, plus ``fmstore.cli.main`` and ``fmstore.testing``)."""
    return private_imports(path, BENCH_PUBLIC_PACKAGES, BENCH_PUBLIC_MODULES)


BENCHES = sorted(BENCH.glob("*.py"))


@pytest.mark.parametrize("path", BENCHES, ids=[p.name for p in BENCHES])
def test_bench_imports_only_public_names(path: Path) -> None:
    """bench/ measures fmstore through its public API (issue 28): a bench needing something
    private gets a public function or export, and calls the library instead of re-creating it."""
    wrong = [
        f"{path.name}:{line}: from {module} import {name}" if name else f"{path.name}:{line}: import {module}"
        for line, module, name in bench_private_imports(path)
    ]
    assert not wrong, (
        "bench/ must use fmstore's public API (issue 28): export what it needs from "
        f"{', '.join(BENCH_PUBLIC_PACKAGES)} or {', '.join(BENCH_PUBLIC_MODULES)}; private imports found:\n"
        + "\n".join(wrong)
    )


def test_the_bench_check_catches_private_imports(tmp_path: Path) -> None:
    src = tmp_path / "probe.py"
    src.write_text(
        "from fmstore.checkpoint.level import SnapshotLevel\n"  # a private module
        "from fmstore.units import format_size\n"  # exported by fmstore, not public itself
        "from fmstore.cli._export_io import fsync_path\n"  # a private module of a public package
        "from fmstore.cli import build_parser\n"  # not in fmstore.cli's __all__
        "from fmstore.testing import _lazy\n"  # a private name
        "import fmstore.gcpause\n"
        "from fmstore import format_size, Checkpointer\n"  # public: fine
        "from fmstore.cli import main\n"
        "from fmstore.testing import start_seaweedfs\n"
        "from fmstore.testing.metadata import Job\n"
        "from fmstore.codec import huffman, as_bytes_tensor\n"
        "import fmstore.testing.metadata\n"
    )
    assert [line for line, _, _ in bench_private_imports(src)] == [1, 2, 3, 4, 5, 6]


def _puts_bench_on_sys_path(tree: ast.AST) -> bool:
    """Whether a module calls ``sys.path.insert``/``append`` with an argument naming ``bench``."""
    for node in ast.walk(tree):
        f = getattr(node, "func", None)
        if (
            isinstance(node, ast.Call)
            and isinstance(f, ast.Attribute)
            and f.attr in ("insert", "append")
            and ast.unparse(f.value) == "sys.path"
            and any(isinstance(c, ast.Constant) and "bench" in str(c.value) for c in ast.walk(node))
        ):
            return True
    return False


def test_no_test_imports_a_bench_script() -> None:
    """The tests exercise the library (``fmstore.testing.metadata`` for the metadata bench's
    job), never a bench script put on ``sys.path``."""
    tests = sorted((REPO / "tests").glob("*.py"))
    found = [p.name for p in tests if _puts_bench_on_sys_path(ast.parse(p.read_text()))]
    assert not found, f"tests put bench/ on sys.path: {found}"
    assert _puts_bench_on_sys_path(ast.parse('sys.path.insert(0, os.path.join(ROOT, "bench"))'))
