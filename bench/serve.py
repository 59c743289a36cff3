"""Serving side by side (issue 29, point 4): time to the device of a committed snapshot, commit to
serving, and requests during a weight swap; same files, same run, against the raw limits.

Part 1 (``--part load``): a state shaped like a transformer's layers (per layer q/k/v/o
``h x h``, gate/up ``f x h``, down ``h x f``, two norms; ``--hidden``/``--ffn``, as many layers
as make ``--size``), bf16 on CUDA, fp32 on a CPU, random normal * 0.02.  Saved once with
``Checkpointer(root).save(1, {"model": sd})`` raw, once with ``compression="lossless"``, once as
one ``.safetensors`` file and (SeaweedFS ``weed mini`` on loopback, where ``weed`` is installed)
raw and lossless to S3.  Time to the device (synchronized) of:

- ``fmstore``: ``fmstore.serving.load_state_dict(root, prefix="model", device=...)`` cold from
  local disk, warm from the page cache, from S3; raw and lossless;
- ``host``: ``Checkpointer(..., policy=Policy(host_memory=1)).load(device=..., level="host")``,
  the copy a save keeps in host memory (the checkpointer's load, not the streaming loader:
  ``load_state_dict`` takes a root or URL and has no host-memory level);
- ``Checkpointer.load``: the old path, ``load(device=..., level="local")``, raw and lossless;
- ``safetensors``: ``safetensors.torch.load_file(path, device=...)``;
- peers, where importable: ``fastsafetensors`` (``fastsafe_open(..., nogds=True)``),
  ``runai-model-streamer`` (``SafetensorsStreamer``; its tensors arrive on the host, then
  ``.to(device)``), ``instanttensor`` (``safe_open(..., device=...)``; CUDA only).

Cold: every file of the source is fsync'd and dropped from the page cache with
``posix_fadvise(DONTNEED)`` before each timed load (``--drop-caches`` also writes 3 to
``/proc/sys/vm/drop_caches``, root only, the whole machine's cache: off by default on a shared
machine); ``fincore`` shows what is left resident.  Raw limits in the same run: a parallel read
(``--threads`` threads, 16 MiB reads, O_DIRECT where the file system takes it, else buffered and
cold) of the same files; pinned H2D bandwidth on CUDA, a memcpy on a CPU; a parallel ranged GET
(botocore, the client under s3fs, which fmstore's S3 storage uses) of the same S3 objects.  Each
method's GB/s is the state's bytes over its time; its limit's GB/s is the state's bytes over the
limit's time for the same source (a coded root's files are smaller), and the ratio is the
method's over its limit's.  Peak host memory of each fmstore load: the process's RSS, sampled
every 2 ms, over what it was before, and ``LoadStats.peak_ring_bytes`` against ``--ring``.

Part 2 (``--part swap``, first half): a tiny ``fmstore.integrations.train`` run (steps 2 and 4),
``fmstore serve ROOT --poll 0.2`` started as its own process (the CLI) on a free loopback port;
a new step (step 4's model perturbed, ``{"model": ...}``) is committed, and the time from the
commit returning (``save`` + ``wait``) to ``/v1/models`` naming the step is compared with
``load_state_dict`` of that snapshot alone (to the CPU, where the server loads).

Part 2 (second half): ``--clients`` threads send ``/v1/completions`` (a short prompt,
max_tokens 8, one keep-alive connection each) for ``--swap-seconds``, with a new step committed
in the middle: requests/s, p50/p99 latency before the commit, during it (until the first answer
from the new step) and after, failed requests (must be 0), the steps that answered.

Methods run ``--repeats`` rounds in an order rotated each round; medians over rounds.  A method
that raises prints its error and the run goes on.

    PYTHONPATH=. .venv/bin/python bench/serve.py --part all          # CPU, ~200 MB, < 3 min
    PYTHONPATH=. .venv/bin/python bench/serve.py --part load --peer-path /tmp/peers   # peers from
        # pip install --target /tmp/peers fastsafetensors runai-model-streamer instanttensor (+ typer humanize)
    pip install --no-index --find-links .whl fastsafetensors runai-model-streamer instanttensor  # GPU machine
    PYTHONPATH=. python3 bench/serve.py --part load --dir /tmp      # CUDA: 8 GB bf16
    PYTHONPATH=. python3 bench/serve.py --part swap
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import http.client
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from common import copy_rate, evict, free_port, machine_info, sh  # bench/common.py

from fmstore import Checkpointer, Policy, format_size, parse_size
from fmstore.serving import LoadStats, load_state_dict

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
GB = 1e9
BLOCK = 16 << 20


class Skip(Exception):
    """A method that cannot run here: printed with its reason, not a failure."""


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def free_device() -> None:
    """Free what the last method loaded, and give glibc's free heap back to the system, so the
    next load's RSS growth is its own (freed tensors under glibc's mmap threshold stay mapped)."""
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# =============================================================================== the state


def make_state(nbytes: int, h: int, f: int) -> dict[str, torch.Tensor]:
    """Transformer-shaped layers (q/k/v/o h x h, gate/up f x h, down h x f, 2 norms) to ~nbytes."""
    item = torch.finfo(DTYPE).bits // 8
    per_layer = (4 * h * h + 3 * f * h + 2 * h) * item
    layers = max(1, round(nbytes / per_layer))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"layers.{i}."
        for name, shape in [
            ("attn.q.weight", (h, h)), ("attn.k.weight", (h, h)), ("attn.v.weight", (h, h)),
            ("attn.o.weight", (h, h)), ("mlp.gate.weight", (f, h)), ("mlp.up.weight", (f, h)),
            ("mlp.down.weight", (h, f)), ("norm1.weight", (h,)), ("norm2.weight", (h,)),
        ]:  # fmt: skip
            t = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).mul_(0.02)
            sd[p + name] = t.to(DTYPE)
    sync()
    return sd


def nbytes_of(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def files_under(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.join(d, n) for n in names if not n.endswith(".lease")]
    return sorted(out)


def evict_all(paths: list[str], drop_caches: bool) -> None:
    for p in paths:
        evict(p)
    if drop_caches:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def warm_all(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(BLOCK):
                pass


def resident(paths: list[str]) -> int | None:
    """Bytes of ``paths`` in the page cache (util-linux ``fincore``), None where it is missing."""
    if not shutil.which("fincore"):
        return None
    out = sh(["fincore", "--bytes", "--noheadings", "--output", "RES", *paths])
    try:
        return sum(int(x) for x in out.split())
    except ValueError:
        return None


# =============================================================================== raw limits


def direct_ok(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 1 << 20)
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def parallel_read(paths: list[str], threads: int, direct: bool) -> tuple[int, float, str]:
    """Read ``paths`` whole, ``threads`` 16 MiB preads at once into page-aligned buffers:
    (bytes, seconds, mode); O_DIRECT if asked and every file takes it, else buffered."""
    direct = direct and all(direct_ok(p) for p in paths)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {p: os.open(p, flags) for p in paths}
    jobs = [(p, off) for p in paths for off in range(0, os.path.getsize(p), BLOCK)]
    local = threading.local()

    def read(job: tuple[str, int]) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, BLOCK)
        return os.preadv(fds[job[0]], [buf], job[1])

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, jobs))
        return total, time.perf_counter() - t0, "O_DIRECT" if direct else "buffered"
    finally:
        for fd in fds.values():
            os.close(fd)


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Pinned host -> device bytes/s (CUDA), or a memcpy's (CPU); best of ``repeats``."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=CUDA)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    rate = copy_rate(dst, src, repeats)
    del src, dst
    free_device()
    return rate


def s3_client(opts: dict[str, Any], threads: int) -> Any:
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=opts["endpoint_url"],
        aws_access_key_id=opts["key"],
        aws_secret_access_key=opts["secret"],
        region_name=opts["client_kwargs"]["region_name"],
        config=Config(max_pool_connections=threads, s3={"addressing_style": "path"}),
    )


def s3_objects(opts: dict[str, Any], url: str) -> list[tuple[str, str, int]]:
    """(bucket, key, size) of every object under an s3:// URL."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    out = []
    for path, info in sorted(fs.find(url[len("s3://") :], detail=True).items()):
        bucket, key = path.split("/", 1)
        if not key.endswith(".lease"):
            out.append((bucket, key, int(info["size"])))
    return out


def s3_parallel_get(client: Any, objects: list[tuple[str, str, int]], threads: int) -> tuple[int, float]:
    """Ranged GETs of 16 MiB, ``threads`` at once, of every object: (bytes, seconds)."""
    jobs = [(b, k, a, min(a + BLOCK, n) - 1) for b, k, n in objects for a in range(0, n, BLOCK)]

    def get(job: tuple[str, str, int, int]) -> int:
        b, k, a, z = job
        return len(client.get_object(Bucket=b, Key=k, Range=f"bytes={a}-{z}")["Body"].read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(get, jobs))
    return total, time.perf_counter() - t0


# =============================================================================== part 1: load


class RssPeak:
    """The process's peak resident set over its value at start, sampled every 2 ms."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.now()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def delta(self) -> int:
        return self.peak - self.base


@dataclass
class Method:
    name: str
    limit: str  # which raw limit its ratio is against
    load: Callable[[], Any]  # returns what holds the loaded tensors
    files: list[str] = field(default_factory=list)  # evicted before each run (cold)
    warm: list[str] = field(default_factory=list)  # read once before each run (warm)
    fmstore: bool = False  # RSS and ring figures
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    ring: list[int] = field(default_factory=list)
    staging: list[int] = field(default_factory=list)
    skipped: str = ""


def flatten(out: Any) -> dict[str, torch.Tensor]:
    """The loaded tensors of any method's result, keyed by state-dict name."""
    if isinstance(out, dict) and set(out) == {"model"}:
        out = out["model"]
    return out


def check(out: Any, ref: dict[str, torch.Tensor]) -> None:
    got = flatten(out)
    if set(got) != set(ref):
        raise AssertionError(f"keys differ: {sorted(set(got) ^ set(ref))[:4]}")
    for k, t in ref.items():
        g = got[k]
        if g.device.type != torch.device(DEVICE).type or not torch.equal(g, t):
            raise AssertionError(f"{k}: not equal to the saved tensor on {DEVICE} (got {g.device})")


def touch(out: Any) -> None:
    """On a CPU, read one element of every 4 KiB page of each loaded tensor: a loader that maps
    the file (safetensors on a CPU) has read nothing until the tensors are used.  Inside the
    timing, for every method alike; a no-op on CUDA (device tensors are in memory)."""
    if CUDA:
        return
    for t in flatten(out).values():
        flat = t.reshape(-1)
        flat[:: max(1, 4096 // t.element_size())].sum()


def peers(st_path: str) -> list[tuple[str, Callable[[], Any]]]:
    """(name, load) of each peer loader; a peer that cannot be imported raises Skip when run."""

    def fastsafetensors() -> Any:
        try:
            from fastsafetensors import fastsafe_open
        except ImportError as e:
            raise Skip(f"not importable: {e}") from None
        dev = "cuda:0" if CUDA else "cpu"
        with fastsafe_open(filenames=[st_path], nogds=True, device=dev) as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def runai() -> Any:
        try:
            from runai_model_streamer import SafetensorsStreamer
        except ImportError as e:
            raise Skip(f"not importable: {e}") from None
        out = {}
        with SafetensorsStreamer() as s:
            s.stream_file(st_path, device="cpu")
            for k, t in s.get_tensors():
                out[k] = t.to(DEVICE) if CUDA else t
        return out

    def instanttensor() -> Any:
        try:
            from instanttensor import safe_open
        except ImportError as e:
            raise Skip(f"not importable: {e}") from None
        if not CUDA:
            raise Skip("CUDA devices only (its own check: 'InstantTensor only supports CUDA devices for now')")
        with safe_open(st_path, framework="pt", device=torch.cuda.current_device()) as f:
            return dict(f.tensors())

    return [("fastsafetensors", fastsafetensors), ("runai-model-streamer", runai), ("instanttensor", instanttensor)]


@contextlib.contextmanager
def s3_server(workdir: str) -> Iterator[Any]:
    """A SeaweedFS ``weed mini`` on loopback (fmstore.testing), or None with the reason printed."""
    from fmstore.testing.seaweedfs import find_weed, start_seaweedfs

    try:
        find_weed()
    except FileNotFoundError as e:
        print(f"S3: skipped ({e})", flush=True)
        yield None
        return
    with start_seaweedfs(os.path.join(workdir, "seaweedfs"), bucket="bench") as server:
        yield server


def part_load(a: argparse.Namespace, workdir: str) -> None:
    size = parse_size(a.size, what="--size")
    sd = make_state(size, a.hidden, a.ffn)
    state_bytes = nbytes_of(sd)
    shapes = Counter(tuple(t.shape) for t in sd.values())
    print(
        f"\n== part load: {len(sd)} tensors, {format_size(state_bytes)} {str(DTYPE).replace('torch.', '')} on "
        f"{DEVICE} (shapes {', '.join(f'{n}x{list(s)}' for s, n in shapes.most_common())}); ring {a.ring}, "
        f"{a.threads} threads",
        flush=True,
    )
    raw_root, ll_root = os.path.join(workdir, "raw"), os.path.join(workdir, "lossless")
    st_path = os.path.join(workdir, "model.safetensors")
    t0 = time.perf_counter()
    ck_raw = Checkpointer(raw_root, policy=Policy(host_memory=1))  # kept open: its host copy
    ck_raw.save(1, {"model": sd})
    ck_raw.wait()
    with Checkpointer(ll_root, compression="lossless") as ck:
        ck.save(1, {"model": sd})
        ck.wait()
    ck_ll = Checkpointer(ll_root)
    import safetensors.torch

    safetensors.torch.save_file({k: t.cpu() for k, t in sd.items()}, st_path)
    raw_files, ll_files = files_under(raw_root), files_under(ll_root)
    fsize = lambda ps: sum(os.path.getsize(p) for p in ps)  # noqa: E731
    print(
        f"saved in {time.perf_counter() - t0:.1f} s: raw root {format_size(fsize(raw_files))} "
        f"({len(raw_files)} files), lossless root {format_size(fsize(ll_files))} "
        f"({state_bytes / fsize(ll_files):.2f}x smaller), safetensors {format_size(os.path.getsize(st_path))}",
        flush=True,
    )

    # ------------------------------------------------------------------ raw limits
    limits: dict[str, tuple[float, str]] = {}  # name -> (seconds for the state, note)
    drop = a.drop_caches
    if drop and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("--drop-caches: /proc/sys/vm/drop_caches is not writable; posix_fadvise only")
        drop = False
    evict_all(raw_files + ll_files + [st_path], drop)
    left = resident(raw_files + ll_files + [st_path])
    print(
        "cold = fsync + posix_fadvise(POSIX_FADV_DONTNEED) on every file of the source before each load"
        + (" + drop_caches=3" if drop else "")
        + (f"; resident after eviction: {format_size(left)} (fincore)" if left is not None else ""),
        flush=True,
    )
    for name, paths in [("read raw", raw_files), ("read lossless", ll_files), ("read safetensors", [st_path])]:
        # O_DIRECT and buffered (cold), each a median over rounds; the faster is the limit.
        modes: dict[str, tuple[float, int]] = {}
        for direct in (True, False):
            times = []
            for _ in range(a.repeats):
                evict_all(paths, drop)
                n, s, mode = parallel_read(paths, a.threads, direct)
                times.append(s)
            modes.setdefault(mode, (statistics.median(times), n))
        mode = min(modes, key=lambda m: modes[m][0])
        s, n = modes[mode]
        limits[name] = (s, f"{format_size(n)} cold: " + ", ".join(
            f"{m} {modes[m][0] * 1e3:.0f} ms = {modes[m][1] / modes[m][0] / GB:.2f} GB/s" for m in modes
        ) + f"; limit: {mode}")  # fmt: skip
    bw = copy_bandwidth(min(state_bytes, 1 << 30))
    limits["H2D" if CUDA else "memcpy"] = (
        state_bytes / bw,
        f"{'pinned H2D' if CUDA else 'memcpy'} {bw / GB:.2f} GB/s (best of 5, {format_size(min(state_bytes, 1 << 30))})",
    )
    copy_limit = "H2D" if CUDA else "memcpy"

    # ------------------------------------------------------------------ methods
    def fm(root: str, opts: dict[str, Any] | None = None) -> Callable[[], Any]:
        def go() -> Any:
            stats = LoadStats()
            out = load_state_dict(root, prefix="model", device=DEVICE, ring_bytes=a.ring, threads=a.threads,
                                  storage_options=opts, stats=stats)  # fmt: skip
            sync()
            go.stats = stats  # type: ignore[attr-defined]
            return out

        return go

    methods = [
        Method("fmstore raw cold", "read raw", fm(raw_root), files=raw_files, fmstore=True),
        Method("fmstore raw warm", copy_limit, fm(raw_root), warm=raw_files, fmstore=True),
        Method("fmstore lossless cold", "read lossless", fm(ll_root), files=ll_files, fmstore=True),
        Method("fmstore lossless warm", copy_limit, fm(ll_root), warm=ll_files, fmstore=True),
        Method("host level (Checkpointer)", copy_limit, lambda: ck_raw.load(device=DEVICE, level="host")),
        Method("Checkpointer.load raw cold", "read raw", lambda: ck_raw.load(device=DEVICE, level="local"),
               files=raw_files),  # fmt: skip
        Method("Checkpointer.load raw warm", copy_limit, lambda: ck_raw.load(device=DEVICE, level="local"),
               warm=raw_files),  # fmt: skip
        Method("Checkpointer.load lossless cold", "read lossless", lambda: ck_ll.load(device=DEVICE),
               files=ll_files),  # fmt: skip
        Method("Checkpointer.load lossless warm", copy_limit, lambda: ck_ll.load(device=DEVICE), warm=ll_files),
        Method("safetensors.load_file cold", "read safetensors",
               lambda: safetensors.torch.load_file(st_path, device=DEVICE), files=[st_path]),  # fmt: skip
        Method("safetensors.load_file warm", copy_limit,
               lambda: safetensors.torch.load_file(st_path, device=DEVICE), warm=[st_path]),  # fmt: skip
    ]
    for name, fn in peers(st_path):
        methods.append(Method(f"{name} cold", "read safetensors", fn, files=[st_path]))
        methods.append(Method(f"{name} warm", copy_limit, fn, warm=[st_path]))

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(s3_server(workdir)) if not a.no_s3 else None
        if a.no_s3:
            print("S3: skipped (--no-s3)")
        if server is not None:
            opts = server.storage_options()
            t0 = time.perf_counter()
            for kind, comp in [("raw", None), ("lossless", "lossless")]:
                with Checkpointer(f"s3://bench/{kind}", storage_options=opts, compression=comp) as ck:
                    ck.save(1, {"model": sd})
                    ck.wait()
            client = s3_client(opts, a.threads)
            objs = {k: s3_objects(opts, f"s3://bench/{k}") for k in ("raw", "lossless")}
            print(f"S3: weed mini at {server.endpoint}, uploaded in {time.perf_counter() - t0:.1f} s", flush=True)
            for kind in ("raw", "lossless"):
                runs = [s3_parallel_get(client, objs[kind], a.threads) for _ in range(a.repeats)]
                s = statistics.median(r[1] for r in runs)
                n = runs[0][0]
                limits[f"GET {kind}"] = (s, f"{format_size(n)} in {s * 1e3:.0f} ms = {n / s / GB:.2f} GB/s, "
                                            f"{len(objs[kind])} objects, 16 MiB ranges, {a.threads} threads")  # fmt: skip
                methods.append(Method(f"fmstore {kind} S3", f"GET {kind}", fm(f"s3://bench/{kind}", opts), fmstore=True))

        print("\nraw limits (same run, medians):")
        for name, (_, note) in limits.items():
            print(f"  {name:<18} {note}")
        print(flush=True)

        ref = sd
        for warmup in (fm(raw_root), lambda: ck_raw.load(device=DEVICE, level="local")):  # discarded
            check(warmup(), ref)
            free_device()
        for rnd in range(a.repeats):
            order = methods[rnd % len(methods) :] + methods[: rnd % len(methods)]
            for m in order:
                if m.skipped:
                    continue
                if m.files:
                    evict_all(m.files, drop)
                if m.warm:
                    warm_all(m.warm)
                free_device()
                out = None
                try:
                    with RssPeak() as rss:
                        t0 = time.perf_counter()
                        out = m.load()
                        touch(out)
                        sync()
                        s = time.perf_counter() - t0
                    if rnd == 0:
                        check(out, ref)
                except Skip as e:
                    m.skipped = str(e)
                    print(f"  {m.name:<34} skipped: {e}", flush=True)
                    continue
                except Exception as e:  # noqa: BLE001  a method's failure is a result, not the end
                    m.skipped = f"failed: {type(e).__name__}: {e}"
                    print(f"  {m.name:<34} FAILED: {type(e).__name__}: {e}", flush=True)
                    traceback.print_exc(limit=3)
                    continue
                finally:
                    del out
                m.times.append(s)
                extra = ""
                if m.fmstore:
                    st = m.load.stats  # type: ignore[attr-defined]
                    m.rss.append(rss.delta)
                    m.ring.append(st.peak_ring_bytes)
                    m.staging.append(st.peak_staging_bytes)
                    extra = f"  peak RSS +{format_size(rss.delta)}, ring peak {format_size(st.peak_ring_bytes)}"
                print(f"  round {rnd + 1}: {m.name:<34} {s * 1e3:8.1f} ms  {state_bytes / s / GB:6.2f} GB/s{extra}",
                      flush=True)  # fmt: skip
    ck_raw.close()
    ck_ll.close()

    print(f"\n{format_size(state_bytes)} to {DEVICE}, medians over {a.repeats} rounds:")
    print(f"{'method':<34} {'time':>9} {'GB/s':>7}  {'limit':<17} {'limit GB/s':>10} {'ratio':>6}  host memory")
    for m in methods:
        if m.skipped or not m.times:
            print(f"{m.name:<34} {'-':>9} {'-':>7}  skipped: {m.skipped}")
            continue
        s = statistics.median(m.times)
        ls = limits[m.limit][0]
        mem = ""
        if m.fmstore:
            mem = (
                f"peak RSS +{format_size(statistics.median(m.rss))}"
                + (" (incl. the loaded tensors)" if not CUDA else "")
                + f"; ring peak {format_size(max(m.ring))} of {a.ring}"
                + (f"; coded staging peak {format_size(max(m.staging))}" if max(m.staging) else "")
            )
        print(
            f"{m.name:<34} {s * 1e3:7.1f}ms {state_bytes / s / GB:7.2f}  {m.limit:<17} "
            f"{state_bytes / ls / GB:10.2f} {ls / s:6.2f}  {mem}"
        )
    print(
        "GB/s: the state's bytes over the time; limit GB/s: the state's bytes over the raw limit's time "
        "for the same source (a coded root reads fewer bytes); ratio = method / limit."
        + ("" if CUDA else "  On a CPU each time includes reading one element per 4 KiB page of the result "
           "(a mapped file, safetensors' on a CPU, is read only then)."),
        flush=True,
    )


# =============================================================================== part 2: serving


def call(port: int, method: str, path: str, body: Any = None, conn: Any = None) -> tuple[int, Any]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers={"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        text = resp.read()
        return resp.status, json.loads(text) if text else None
    finally:
        if own:
            conn.close()


class Committer:
    """Commits new steps to a train.py root: the base step's model perturbed, as ``{"model": ...}``."""

    def __init__(self, root: str, base: int) -> None:
        self.root = root
        self.sd = load_state_dict(root, base, prefix="model", device="cpu")
        self.ck = Checkpointer(root)
        self.g = torch.Generator().manual_seed(0)

    def commit(self, step: int) -> float:
        """Commit ``step``; the perf_counter time when the commit returned (durable)."""
        with torch.no_grad():
            for t in self.sd.values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=self.g, dtype=t.dtype) * 0.01)
        self.ck.save(step, {"model": self.sd})
        self.ck.wait()
        return time.perf_counter()

    def close(self) -> None:
        self.ck.close()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def part_swap(a: argparse.Namespace, workdir: str) -> int:
    root = os.path.join(workdir, "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    print(f"\n== part swap: a train.py run (--size {a.serve_size}, steps 2 and 4) served by `fmstore serve --poll 0.2`",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fmstore.integrations.train", "--root", root, "--size", a.serve_size,
         "--steps", "4", "--every", "2", "--corpus-bytes", "65536", "--log-every", "100"],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    print(f"trained in {time.perf_counter() - t0:.1f} s", flush=True)
    port = free_port()
    log_path = os.path.join(workdir, "serve.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fmstore.cli", "serve", root, "--port", str(port), "--poll", "0.2",
             "--size", a.serve_size, "--log-level", "warning", "--max-batch", str(a.clients)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    committer = None
    failed_total = 0
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                with open(log_path, errors="replace") as f:
                    raise RuntimeError(f"fmstore serve exited with {proc.returncode}: {f.read()[-2000:]}")
            try:
                if call(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("fmstore serve did not answer /health in 120 s")
            time.sleep(0.05)
        print(f"fmstore serve (pid {proc.pid}) on 127.0.0.1:{port}, up {time.perf_counter() - t0:.1f} s after start",
              flush=True)  # fmt: skip
        committer = Committer(root, 4)
        step = 4

        # ------------------------------------------------------------ commit to serving
        seen, alone = [], []
        for rnd in range(a.repeats):
            step += 1
            done = committer.commit(step)
            while True:
                status, body = call(port, "GET", "/v1/models")
                if status == 200 and body["fmstore_step"] == step:
                    break
                if time.perf_counter() - done > 60:
                    raise TimeoutError(f"/v1/models did not name step {step} within 60 s")
                time.sleep(0.002)
            seen.append(time.perf_counter() - done)
            t1 = time.perf_counter()
            load_state_dict(root, step, prefix="model", device="cpu")
            alone.append(time.perf_counter() - t1)
            print(f"  round {rnd + 1}: step {step}: commit -> /v1/models {seen[-1] * 1e3:7.1f} ms; "
                  f"load_state_dict alone {alone[-1] * 1e3:6.1f} ms", flush=True)  # fmt: skip
        s, l_ = statistics.median(seen), statistics.median(alone)
        print(
            f"\ncommit to serving (median of {a.repeats}): {s * 1e3:.1f} ms from the commit returning to /v1/models "
            f"naming the step; the snapshot's load_state_dict alone (cpu, warm) {l_ * 1e3:.1f} ms; ratio {s / l_:.1f}x "
            f"(the watcher polls every 0.2 s: ~100 ms of it is the poll on average)",
            flush=True,
        )

        # ------------------------------------------------------------ requests during a swap
        status, body = call(port, "GET", "/v1/models")
        old = body["fmstore_step"]
        new = step + 1
        stop = threading.Event()
        results: list[tuple[float, float, bool, int, str]] = []  # start, end, ok, step, error
        lock = threading.Lock()

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            prompt = f"def f{i}("
            while not stop.is_set():
                t_a = time.perf_counter()
                try:
                    st, out = call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 8}, conn)
                    ok, stp, err = st == 200, (out or {}).get("fmstore_step", -1), "" if st == 200 else f"{st} {out}"
                except Exception as e:  # noqa: BLE001
                    ok, stp, err = False, -1, f"{type(e).__name__}: {e}"
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    results.append((t_a, time.perf_counter(), ok, stp, err))
            conn.close()

        ready = threading.Barrier(a.clients + 1)

        def warm_client(i: int) -> None:  # one untimed request each first (the server's first batches)
            try:
                call(port, "POST", "/v1/completions", {"prompt": f"def f{i}(", "max_tokens": 8})
            finally:
                ready.wait()
            client(i)

        threads = [threading.Thread(target=warm_client, args=(i,), daemon=True) for i in range(a.clients)]
        for t in threads:
            t.start()
        ready.wait()
        t_start = time.perf_counter()
        time.sleep(a.swap_seconds / 2)
        t_c0 = time.perf_counter()
        t_c1 = committer.commit(new)
        time.sleep(max(0.0, t_start + a.swap_seconds - time.perf_counter()))
        stop.set()
        for t in threads:
            t.join()
        t_end = time.perf_counter()
        first_new = min((r[1] for r in results if r[2] and r[3] == new), default=None)
        t_swap = first_new if first_new is not None else t_end
        phases = [("before", t_start, t_c0), ("during", t_c0, t_swap), ("after", t_swap, t_end)]
        print(
            f"\nrequests during a swap: {a.clients} clients, /v1/completions max_tokens 8, {a.swap_seconds:.0f} s; "
            f"step {new} committed at {t_c0 - t_start:.2f} s (commit took {(t_c1 - t_c0) * 1e3:.0f} ms), "
            + (f"first answered by step {new} at {t_swap - t_start:.2f} s" if first_new else f"step {new} NEVER answered")
        )
        print(f"{'phase':<7} {'secs':>6} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}  steps")
        for name, lo, hi in phases:
            rs = [r for r in results if lo <= r[1] < hi or (name == "after" and r[1] == hi)]
            lat = [(r[1] - r[0]) * 1e3 for r in rs if r[2]]
            fail = sum(1 for r in rs if not r[2])
            steps = dict(sorted(Counter(r[3] for r in rs if r[2]).items()))
            dur = max(hi - lo, 1e-9)
            print(f"{name:<7} {dur:6.2f} {len(rs):8d} {len(lat) / dur:7.1f} {pct(lat, 0.5):8.1f} {pct(lat, 0.99):8.1f} "
                  f"{fail:6d}  {steps}")  # fmt: skip
        failed_total = sum(1 for r in results if not r[2])
        lat = [(r[1] - r[0]) * 1e3 for r in results if r[2]]
        print(
            f"{'all':<7} {t_end - t_start:6.2f} {len(results):8d} {len(lat) / (t_end - t_start):7.1f} "
            f"{pct(lat, 0.5):8.1f} {pct(lat, 0.99):8.1f} {failed_total:6d}  "
            f"{dict(sorted(Counter(r[3] for r in results if r[2]).items()))}"
        )
        stale = sum(1 for r in results if r[2] and r[0] > t_swap and r[3] != new)
        print(f"failed requests: {failed_total} (must be 0); steps seen {old} -> {new}; "
              f"requests started after the first new answer yet answered by the old step: {stale}", flush=True)  # fmt: skip
        for r in [r for r in results if not r[2]][:5]:
            print(f"  failure: {r[4][:300]}")
    finally:
        if committer is not None:
            committer.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return 1 if failed_total else 0


# =============================================================================== main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["load", "swap", "all"], default="all")
    p.add_argument("--size", default="8GB" if CUDA else "200MB", help="the state's bytes (default 8GB CUDA, 200MB CPU)")
    p.add_argument("--hidden", type=int, default=4096 if CUDA else 1024, help="h (default 4096 CUDA, 1024 CPU)")
    p.add_argument("--ffn", type=int, help="f (default 11008 * hidden / 4096)")
    p.add_argument("--ring", default="512MiB" if CUDA else "64MiB", help="load_state_dict's ring_bytes")
    p.add_argument("--threads", type=int, default=8, help="loader, parallel-read and GET threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the files go (default: a temporary folder under ./fmstore-data)")
    p.add_argument("--drop-caches", action="store_true", help="also write 3 to /proc/sys/vm/drop_caches (root)")
    p.add_argument("--no-s3", action="store_true", help="skip S3 (weed mini)")
    p.add_argument("--peer-path", help="a folder prepended to sys.path for the peers (pip install --target)")
    p.add_argument("--serve-size", default="tiny", choices=["tiny", "small", "base", "1b"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--swap-seconds", type=float, default=6.0)
    a = p.parse_args()
    a.ffn = a.ffn or round(11008 * a.hidden / 4096 / 64) * 64
    if a.peer_path:
        sys.path.insert(0, a.peer_path)
    base = a.dir or os.path.join(os.getcwd(), "fmstore-data")
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="bench-serve-", dir=base)
    machine_info(workdir, DEVICE)
    print(f"args:    {' '.join(sys.argv[1:]) or '(defaults)'}", flush=True)
    rc = 0
    try:
        if a.part in ("load", "all"):
            part_load(a, workdir)
            free_device()
        if a.part in ("swap", "all"):
            rc = part_swap(a, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
