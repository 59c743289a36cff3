"""Byte sizes: parse ``"4GiB"``-style strings and format byte counts for people."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str | None, *, what: str = "size") -> int | None:
    """Return ``value`` as a byte count; ``None`` stays ``None`` (no limit).

    Accepts non-negative ints and strings such as ``"512"``, ``"64MiB"``, ``"4GiB"``, ``"1.5GB"``
    (decimal units are powers of 1000, ``*iB`` units powers of 1024).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a byte count or a string like '4GiB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} must not be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"cannot parse {what} {value!r}: expected a number with an optional unit "
                f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '4GiB'"
            )
        return int(float(m.group(1)) * _UNITS[unit])
    raise ConfigError(f"{what} must be an int or a string like '4GiB', not {type(value).__name__}")


def format_size(n: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'``; ``None`` -> ``'unlimited'``."""
    if n is None:
        return "unlimited"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
