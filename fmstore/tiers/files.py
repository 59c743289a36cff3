"""Crash-safe local file I/O, moved to :mod:`fmstore.storage.files`; these names stay
importable from here for code that used them."""

from __future__ import annotations

from ..storage.files import (
    chunks,
    pid_alive,
    read_ranges_into,
    tmp_name,
    tmp_owner_pid,
    write_atomic,
    write_atomic_with,
)

__all__ = [
    "chunks",
    "pid_alive",
    "read_ranges_into",
    "tmp_name",
    "tmp_owner_pid",
    "write_atomic",
    "write_atomic_with",
]
