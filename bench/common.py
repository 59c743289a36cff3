"""What the benchmark scripts share: page-cache eviction and the machine header they print."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import torch

from fmstore import format_size


def evict(path: str, drop: bool = True) -> None:
    """fsync ``path`` and (``drop``) evict it from the page cache: the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def sh(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() if shutil.which(cmd[0]) else "?"


def machine_info(root: str, device: str = "cpu") -> None:
    """Print date, host, disk (with file system), versions and load: the header of a result."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"date:    {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"host:    nproc={os.cpu_count()} arch={platform.machine()} ram={format_size(mem)} {platform.platform()}"
    )
    fs = sh(["findmnt", "-no", "FSTYPE", "-T", root])
    print(f"disk:    {sh(['df', '-h', root]).splitlines()[-1]}  ({fs})")
    gpu = f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""
    print(f"python:  {sys.version.split()[0]}  torch {torch.__version__}  device {device}{gpu}")
    print(f"load:    {loadavg()} (1/5/15 min; other work skews results)", flush=True)


def copy_rate(dst: Any, src: Any, repeats: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` (tensors of one size; pinned host <-> CUDA copies
    synchronized), best of ``repeats`` after one warm-up copy."""
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    dst.copy_(src, non_blocking=True)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        times.append(time.perf_counter() - t0)
    return src.nbytes / min(times)


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a server or a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
