"""Finish, at interpreter exit, what fmstore has promised: saves and write-backs in flight.

A ``save()`` that returned has promised a commit, a TieredStore's write-back a durable copy; a
script that ends without ``close()`` must not lose either.  Python shuts down every
ThreadPoolExecutor at exit before it joins threads, and a background persist that then hands
work to a pool fails, silently.  :func:`register` puts an object on a list drained *before*
that shutdown (threading's exit hooks run newest first, and this one is registered after
``concurrent.futures``'), so the persist finishes.  A SIGTERM with no handler of the program's
own is caught the same way: what is in flight is finished, then the process dies of SIGTERM as
it would have (a framework that installs its handler later, and calls ours from it, keeps its
own way of stopping).  What cannot be finished is said on stderr.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import weakref
from typing import Protocol

#: Seconds an exit waits quietly before saying what it waits for.
NOTICE_S = 2.0


class Drainable(Protocol):
    def _exit_pending(self) -> str | None:
        """What is still in flight (for messages), or None."""

    def _exit_wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` s; True once done.  Raises what failed."""


_live: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()
_hooked = False
_draining = False


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) has none of its parent's threads: what the parent
    has in flight is not the child's to finish, and waiting for it at the child's exit would
    stall until the parent kills the worker (5 s at each epoch end of a loader with workers)."""
    global _live, _lock, _draining
    _live = weakref.WeakSet()
    _lock = threading.Lock()  # the parent may have held it at the fork
    _draining = False


os.register_at_fork(after_in_child=_forget_in_child)


def register(obj: Drainable) -> None:
    """Drain ``obj`` at interpreter exit and on an unhandled SIGTERM."""
    global _hooked
    with _lock:
        _live.add(obj)
        if _hooked:
            return
        _hooked = True
    import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours

    register_hook = getattr(threading, "_register_atexit", None)
    if register_hook is not None:
        register_hook(drain)
    else:  # pragma: no cover - CPython has had it since 3.9
        atexit.register(drain)
    _hook_sigterm()


def unregister(obj: Drainable) -> None:
    with _lock:
        _live.discard(obj)


def drain(why: str = "exit") -> None:
    """Wait for everything registered that is still in flight; report failures on stderr."""
    global _draining
    _draining = True
    try:
        for obj in list(_live):
            what = obj._exit_pending()
            if what is None:
                continue
            try:
                if not obj._exit_wait(NOTICE_S):
                    print(f"fmstore: finishing {what} before {why} ...", file=sys.stderr, flush=True)
                    obj._exit_wait(None)
            except KeyboardInterrupt:
                print(f"fmstore: interrupted at {why}: {what} was NOT finished", file=sys.stderr, flush=True)
                return
            except BaseException as e:  # noqa: BLE001 - said on stderr: there is no caller left
                print(
                    f"fmstore: {what} failed at {why}: {type(e).__name__}: {e}", file=sys.stderr, flush=True
                )
    finally:
        _draining = False


def _hook_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the program (or its framework) handles SIGTERM itself
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - not the main interpreter
        pass


def _on_sigterm(signum: int, frame: object) -> None:
    if not _draining:  # a second SIGTERM while draining ends the process at once
        drain("SIGTERM")
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return  # a framework installed later calls us from its own handler: it decides what follows
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # die of SIGTERM, as without fmstore
