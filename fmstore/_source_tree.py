"""Source-checkout imports: ``fmstore.kernels`` and ``fmstore.integrations`` from the repository.

An installed fmstore (a wheel, or ``pip install -e .``) places the repository's ``kernels/`` and
``trainer_integration/`` folders under the fmstore namespace, as ``pyproject.toml`` maps them.
A checkout run without installing (``PYTHONPATH=. python ...``) has no such mapping; this finder
gives it the same two names, and only when the folders sit beside this package.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

#: Subpackage name -> the repository folder that holds it.
MAPPED = {"fmstore.kernels": "kernels", "fmstore.integrations": "trainer_integration"}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, repo: Path) -> None:
        self.repo = repo

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        folder = MAPPED.get(fullname)
        if folder is None:
            return None
        init = self.repo / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


def install() -> None:
    """Add the finder when this package is a checkout's ``fmstore/`` folder (not an installed one)."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "pyproject.toml").is_file() or not (repo / "trainer_integration").is_dir():
        return
    if any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        return
    # Last, so an installed mapping (a wheel's folders, the editable finder) is found first.
    sys.meta_path.append(_SourceTreeFinder(repo))
