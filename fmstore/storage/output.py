"""Atomic local output outside any root: a file or a directory written under a hidden temporary
name and renamed into place (what ``fmstore export`` writes), and removal of local scratch paths.

Part of the storage layer: with :mod:`fmstore.checkpoint.snapshots` the only code that deletes.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, FmstoreError
from .files import fsync_path, pid_alive


def remove_local(path: str | os.PathLike[str]) -> None:
    """Remove a local file or directory tree if it exists (a scratch folder, a temporary)."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:  # gone already, or not ours to remove
            pass


def temp_name(final: str) -> str:
    parent, base = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{base}.fmstore-tmp-{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale(final: str) -> None:
    """Remove the temporaries that killed exports to ``final`` left (their process is gone)."""
    parent, base = os.path.split(final)
    prefix = f".{base}.fmstore-tmp-"
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or pid_alive(int(pid_text)):
            continue
        remove_local(os.path.join(parent, name))


class AtomicOutput:
    """Write ``final`` (a file, or a directory with ``is_dir``) under a temporary name in the
    same directory and rename it into place on :meth:`commit`: a killed export leaves at most a
    hidden ``.NAME.fmstore-tmp-PID-*`` behind, never a partial file under the final name (the
    next export to the same name removes it once that process is gone).

    An existing ``final`` is refused unless ``force``; even then only one of the same kind
    (a file or a directory, and ``looks_like(path)``) is replaced, so a typo cannot wipe a
    random file or folder.
    """

    def __init__(
        self, final: str, *, is_dir: bool, force: bool, looks_like: Callable[[str], bool] | None = None
    ) -> None:
        self.check(final, is_dir=is_dir, force=force, looks_like=looks_like)
        self.final = os.path.abspath(final)
        self.is_dir = is_dir
        os.makedirs(os.path.dirname(self.final), exist_ok=True)
        remove_stale(self.final)
        self.tmp = temp_name(self.final)
        if is_dir:
            os.mkdir(self.tmp)
        self.done = False

    @staticmethod
    def check(
        final: str, *, is_dir: bool, force: bool, looks_like: Callable[[str], bool] | None = None
    ) -> None:
        """Raise unless ``final`` may be written (see the class docstring)."""
        if "://" in final:
            raise ConfigError(f"the output must be a local path, got {final!r}")
        path = os.path.abspath(final)
        if os.path.lexists(path):
            if not force:
                raise FmstoreError(f"{final!r} exists; pass --force to replace it")
            kind_ok = os.path.isdir(path) if is_dir else os.path.isfile(path)
            if not kind_ok or (looks_like is not None and not looks_like(path)):
                raise FmstoreError(
                    f"{final!r} exists and does not look like an earlier export of this format; "
                    "not replacing it even with --force"
                )

    def commit(self) -> None:
        parent = os.path.dirname(self.final)
        if self.is_dir:
            for dirpath, _, files in os.walk(self.tmp):
                for f in files:
                    fsync_path(os.path.join(dirpath, f))
                fsync_path(dirpath)
            old = None
            if os.path.lexists(self.final):
                old = temp_name(self.final) + "-old"
                os.rename(self.final, old)
            os.rename(self.tmp, self.final)
            if old is not None:
                remove_local(old)
        else:
            fsync_path(self.tmp)
            os.replace(self.tmp, self.final)
        fsync_path(parent)
        self.done = True

    def abort(self) -> None:
        if self.done:
            return
        remove_local(self.tmp)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
