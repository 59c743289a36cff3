"""Names of a package loaded on first use: one ``__getattr__``/``__dir__`` pair for the packages
whose import must stay cheap and torch-free (``fmstore``, ``fmstore.checkpoint``,
``fmstore.codec``), so that ``fmstore --help``, ``fmstore ls`` and catching fmstore's errors
import no torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(
    package: str, namespace: dict[str, Any], table: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name of ``table`` (name -> submodule)
    is imported from its submodule when first asked for, then kept in ``namespace``."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
