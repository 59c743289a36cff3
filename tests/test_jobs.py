"""fmstore.BackgroundJobs: errors raised exactly once, threads stopped and started again."""

from __future__ import annotations

import threading

import pytest

from fmstore import BackgroundJobs, exiting


def _threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def _fail(message: str) -> None:
    raise ValueError(message)


def test_an_error_is_raised_once_to_its_waiter_or_else_to_the_next_caller() -> None:
    jobs = BackgroundJobs("test jobs", thread_name="fmstore-test-once")
    try:
        waited = jobs.submit(_fail, "waited")
        with pytest.raises(ValueError, match="waited"):
            waited.result()
        jobs.submit(_fail, "unseen")
        assert jobs.wait()
        assert [str(e) for e in jobs.pop_errors()] == ["unseen"]  # not "waited": its waiter had it
        assert jobs.pop_errors() == []
    finally:
        jobs.close()


def test_stop_leaves_no_thread_and_the_next_job_starts_one_again() -> None:
    prefix = "fmstore-test-stop"
    jobs = BackgroundJobs("test jobs", thread_name=prefix)
    try:
        gate = threading.Event()
        done: list[int] = []
        jobs.submit(lambda: (gate.wait(5), done.append(1)))
        jobs.submit(_fail, "kept")
        assert _threads(prefix)
        gate.set()
        jobs.stop()  # waits for both
        assert done == [1] and not jobs.running() and not _threads(prefix)
        assert [str(e) for e in jobs.pop_errors()] == ["kept"]  # an unseen error survives stop()
        assert jobs.submit(lambda: 7).result() == 7  # not closed: a thread again
        assert jobs._exit_pending() is None
        jobs.stop()
        assert not _threads(prefix)
    finally:
        jobs.close()
    with pytest.raises(RuntimeError, match="closed"):
        jobs.submit(lambda: None)


def test_exit_drain_finishes_jobs_and_close_unregisters() -> None:
    jobs = BackgroundJobs("test jobs", thread_name="fmstore-test-exit")
    gate = threading.Event()
    done: list[int] = []
    jobs.submit(lambda: (gate.wait(5), done.append(1)))
    assert jobs in exiting._live and jobs._exit_pending() == "1 test jobs"
    gate.set()
    assert jobs._exit_wait(None) and done == [1]
    jobs.close()
    assert jobs not in exiting._live
