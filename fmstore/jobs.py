"""Background work whose errors reach a caller exactly once, finished at interpreter exit.

One piece for what the TieredStore (write-back, demotions), the Checkpointer (durable
persists) and the Lightning plugin (pointer commits, removals) each run in the background:
submit a job, bound how many run (the caller waits on :meth:`BackgroundJobs.running`), wait
for them all, and raise what failed once: to whoever waits on that job's :class:`Job`, or else
to the next caller that asks (:meth:`BackgroundJobs.pop_errors`), never twice and never lost.
Registered with :mod:`fmstore.exiting`, so what is in flight at exit is finished first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Generic, TypeVar

from . import exiting

T = TypeVar("T")

__all__ = ["BackgroundJobs", "Job"]


class Job(Generic[T]):
    """One background job: its future, and whether a caller has seen its error yet."""

    def __init__(self, future: Future[T], *, label: str = "", record: bool = True) -> None:
        self.future = future
        self.label = label  # what it does, for exit messages
        self._seen = not record  # an unrecorded job's error is only its waiter's

    def done(self) -> bool:
        return self.future.done()

    def error(self, timeout: float | None = None) -> BaseException | None:
        """Wait (``concurrent.futures.TimeoutError`` after ``timeout`` s) and give the job's
        error, which from then on counts as seen (no other caller is given it)."""
        error = self.future.exception(timeout)
        if error is not None:
            self._seen = True
        return error

    def result(self, timeout: float | None = None) -> T:
        error = self.error(timeout)
        if error is not None:
            raise error
        return self.future.result()

    def _unseen_error(self) -> BaseException | None:
        """The error of a finished job nobody has seen (then it counts as seen)."""
        if not self.future.done() or self._seen:
            return None
        error = self.future.exception()
        if error is not None:
            self._seen = True
        return error


class BackgroundJobs:
    """Jobs run on ``workers`` threads (started on first use), oldest first.

    ``what`` names them in exit messages ("the commit of step 3 to 's3://b/run'" when jobs
    carry labels: ``what.format(labels)``).  :meth:`close` waits for the jobs and stops the
    threads; a closed instance refuses new jobs."""

    def __init__(self, what: str, *, workers: int = 1, thread_name: str = "fmstore-jobs") -> None:
        self.what = what
        self.workers = workers
        self.thread_name = thread_name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: list[Job[Any]] = []
        self._errors: list[BaseException] = []  # of finished jobs, not yet raised to anyone
        self._closed = False
        exiting.register(self)

    def submit(self, fn: Callable[..., T], *args: Any, label: str = "", record: bool = True) -> Job[T]:
        """Run ``fn(*args)`` in the background.  Its error goes to the returned job's waiter,
        or, if nobody waited for it, to the next :meth:`pop_errors` (``record=False``: only to
        the waiter, e.g. a prefetch whose failure costs nothing)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.what.format('')} is closed".strip())
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self.thread_name)
            job: Job[T] = Job(self._executor.submit(fn, *args), label=label, record=record)
            self._jobs.append(job)
        return job

    def collect(self) -> None:
        """Keep the errors of finished jobs nobody has seen; forget finished jobs."""
        with self._lock:
            # One look at each job: one that finishes meanwhile stays for the next call
            # (asking done() twice could drop it unreported).
            done = [j for j in self._jobs if j.done()]
            if not done:
                return
            self._jobs = [j for j in self._jobs if j not in done]
            self._errors += [e for e in (j._unseen_error() for j in done) if e is not None]

    def running(self) -> list[Job[Any]]:
        """The jobs still running or queued, oldest first (after collecting finished ones)."""
        self.collect()
        with self._lock:
            return list(self._jobs)

    def failed(self) -> bool:
        """Whether a finished job's error waits to be raised."""
        self.collect()
        with self._lock:
            return bool(self._errors)

    def pop_errors(self, limit: int | None = None) -> list[BaseException]:
        """The errors (oldest first, at most ``limit``) of finished jobs nobody has seen; each
        is given out once."""
        self.collect()
        with self._lock:
            n = len(self._errors) if limit is None else limit
            out, self._errors = self._errors[:n], self._errors[n:]
        return out

    def wait(self, timeout: float | None = None, *, raise_error: bool = False) -> bool:
        """Wait (up to ``timeout`` s) for every job, also those submitted meanwhile; whether
        none is left.  ``raise_error``: then raise the oldest error nobody has seen."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = [j.future for j in self._jobs if not j.done()]
            if not pending:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            wait_futures(pending, timeout=left)
        if raise_error:
            errors = self.pop_errors(1)
            if errors:
                raise errors[0]
        return True

    def stop(self) -> None:
        """Wait for every job and stop the threads, without closing: the next :meth:`submit`
        starts them again (an owner that is torn down and used again, as a Lightning plugin
        between two fits, leaves no thread behind meanwhile).  Errors nobody has seen stay for
        the next :meth:`pop_errors`."""
        self.wait()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def close(self, *, wait: bool = True) -> None:
        """Refuse new jobs, wait for those in flight (unless ``wait=False``), stop the threads."""
        with self._lock:
            self._closed = True
            executor = self._executor
        exiting.unregister(self)
        if executor is not None:
            executor.shutdown(wait=wait)

    # fmstore.exiting's protocol: what is in flight at exit is finished first.
    def _exit_pending(self) -> str | None:
        with self._lock:
            running = [j for j in self._jobs if not j.done()]
        if not running:
            return None
        labels = ", ".join(j.label for j in running if j.label)
        return self.what.format(labels) if "{}" in self.what else f"{len(running)} {self.what}"

    def _exit_wait(self, timeout: float | None) -> bool:
        return self.wait(timeout, raise_error=True)
