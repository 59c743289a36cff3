"""Source-checkout imports: ``fmstore.integrations`` from the repository's ``trainer_integration/``.

An installed fmstore (a wheel, or ``pip install -e .``) places ``trainer_integration/`` under the
fmstore namespace, as ``setup.py`` maps it.  A checkout run without installing (``PYTHONPATH=.
python ...``, the GPU machine's ``setup.py build_ext --inplace``) has no such mapping; this
finder gives it the same name, and only when the folder sits beside this package.  (The CUDA
sources need no finder: ``fmstore.codec.kernels`` looks for them in ``kernels/`` itself.)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

#: Subpackage name -> the repository folder that holds it.
MAPPED = {"fmstore.integrations": "trainer_integration"}


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
    # First: the integrations must come from the checkout this fmstore comes from, also where
    # an editable install of another checkout maps the name (a wheel's fmstore is no checkout).
    sys.meta_path.insert(0, _SourceTreeFinder(repo))
