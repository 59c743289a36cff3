"""How many S3 requests a save and a load make, by operation, and whether they scale with the ranks
or with the tensors (issue 30, point 4); then what that means at 1,024 and 8,192 ranks against
S3's documented per-prefix request rates.

Requests are counted in the client: handlers on the botocore event system
(``before-parameter-build.s3``, once per API call, with its Key; ``before-send.s3``, once per
HTTP attempt, so retries show) of the s3fs client the checkpointer's storage uses.  fmstore is
not changed: the file system is opened first with the same options (fsspec caches instances, so
the Checkpointer gets this one, checked by identity) and hooked before the Checkpointer exists,
so its construction is counted too.

With ``--attribute`` each request is also charged to the fmstore line that called the storage
(storage calls are then serialized by a lock so the delta of the counter around one call is
that call's requests): slower, but it says where requests come from.

Runs a SeaweedFS (``weed mini``) on 127.0.0.1 itself.  Usage::

    python bench/s3_requests.py [--attribute] [--save-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: the repository's fmstore, not an installed one
    sys.path.insert(0, REPO)

from fmstore import Checkpointer  # noqa: E402
from fmstore.storage import S3Storage  # noqa: E402

#: Operations S3 bills (and rate-limits) in the PUT class and in the GET class.  LIST is billed
#: as PUT-class on AWS but the per-prefix rate documents only PUT/COPY/POST/DELETE and GET/HEAD;
#: it is shown on its own.
PUT_OPS = {
    "PutObject",
    "UploadPart",
    "CreateMultipartUpload",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "CopyObject",
    "UploadPartCopy",
    "DeleteObject",
    "DeleteObjects",
}
GET_OPS = {"GetObject", "HeadObject", "HeadBucket"}
LIST_OPS = {"ListObjectsV2", "ListObjects", "ListMultipartUploads", "ListParts"}
#: AWS: "at least 3,500 PUT/COPY/POST/DELETE or 5,500 GET/HEAD requests per second per
#: partitioned Amazon S3 prefix".
PUT_LIMIT, GET_LIMIT = 3500, 5500


def classes(ops: Counter[str]) -> dict[str, int]:
    """PUT-class, GET-class and LIST counts of per-operation counts."""
    return {
        "PUT": sum(n for op, n in ops.items() if op in PUT_OPS),
        "GET": sum(n for op, n in ops.items() if op in GET_OPS),
        "LIST": sum(n for op, n in ops.items() if op in LIST_OPS),
    }


# ----------------------------------------------------------------- counting in the client


#: Key groups: how a key can spread over S3's partitions.
KEY_GROUPS = (
    ("shard", re.compile(r"/step-\d+/[0-9a-f]{8}-(shard|kept)-r\d{5}\.safetensors$")),  # hash-led names
    ("report", re.compile(r"/step-\d+/rank-\d{5}\.json$")),  # step-N/rank-NNNNN.json
    ("commit", re.compile(r"/step-\d+/(manifest|aborted)\.json/?$")),  # two keys a step
)


def key_group(key: str) -> str:
    """``shard``, ``report``, ``commit`` (manifest.json / aborted.json of a step) or ``root``
    (the lease, the root's listing, the bucket)."""
    for name, pattern in KEY_GROUPS:
        if pattern.search("/" + key):
            return name
    return "root"


class RequestCounter:
    """Counts the S3 API calls (by operation, and by key group and whether a poll made them)
    and the HTTP attempts of one s3fs file system's client."""

    def __init__(self, fs: Any) -> None:
        fs.connect()  # s3fs creates its aiobotocore client on connect: that client is hooked
        self.events = fs.s3.meta.events
        self.ops: Counter[str] = Counter()
        self.groups: Counter[tuple[str, str, bool]] = Counter()  # (group, op, by a poll) -> calls
        self.attempts = 0
        #: set by Attribution (storage calls serialized) while a poll's storage call runs
        self.polling = False
        self._lock = threading.Lock()
        self._id = f"fmstore-bench-{id(self)}"
        # before-parameter-build: once per API call, with the call's own parameters (Key, Prefix)
        self.events.register("before-parameter-build.s3", self._call, unique_id=self._id + "-call")
        self.events.register("before-send.s3", self._send, unique_id=self._id + "-send")

    def _call(self, params: Any = None, model: Any = None, **_: Any) -> None:
        key = str(params.get("Key") or params.get("Prefix") or "") if isinstance(params, dict) else ""
        with self._lock:
            self.ops[model.name] += 1
            self.groups[(key_group(key), model.name, self.polling)] += 1

    def _send(self, **_: Any) -> None:
        with self._lock:
            self.attempts += 1

    def take(self) -> tuple[Counter[str], Counter[tuple[str, str, bool]], int]:
        """The calls (by operation; by group) and attempts counted since the last take."""
        with self._lock:
            out = self.ops, self.groups, self.attempts
            self.ops, self.groups, self.attempts = Counter(), Counter(), 0
        return out

    def close(self) -> None:
        self.events.unregister("before-parameter-build.s3", self._call, unique_id=self._id + "-call")
        self.events.unregister("before-send.s3", self._send, unique_id=self._id + "-send")


def open_hooked(url: str, options: dict[str, Any]) -> tuple[Any, RequestCounter]:
    """The (cached) s3fs file system a Checkpointer on ``url`` will use, hooked."""
    fs, _ = S3Storage.open_fs(url, options)
    return fs, RequestCounter(fs)


STORAGE_METHODS = (
    "write", "write_streamed", "read_bytes", "read_ranges", "read_with", "size", "exists", "list_dir",
    "scan", "delete", "delete_dir", "put_if", "read_tagged", "delete_if",
)  # fmt: skip


class Attribution:
    """Charges each request to the storage method and the fmstore line (outside fmstore/storage)
    that made it.  Storage calls of this process are serialized by one lock while it is on, so
    the counter's delta around a call is that call's requests."""

    def __init__(self, counter: RequestCounter) -> None:
        self.counter = counter
        self.sites: Counter[tuple[str, str, str]] = Counter()  # (method, site, op) -> requests
        self._lock = threading.RLock()
        self._depth = threading.local()

    def wrap(self, storage: Any) -> None:
        for name in STORAGE_METHODS:
            if hasattr(storage, name):
                setattr(storage, name, self._wrapped(name, getattr(storage, name)))

    def _wrapped(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            site = _caller()
            with self._lock:
                depth = getattr(self._depth, "n", 0)
                self._depth.n = depth + 1
                before = Counter(self.counter.ops) if depth == 0 else None
                if depth == 0:
                    self.counter.polling = is_poll(site)
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._depth.n = depth
                    if depth == 0:
                        self.counter.polling = False
                    if before is not None:
                        for op, n in (self.counter.ops - before).items():
                            self.sites[(name, site, op)] += n

        return call

    def take(self) -> Counter[tuple[str, str, str]]:
        with self._lock:
            out, self.sites = self.sites, Counter()
        return out


def _caller() -> str:
    """``file:line`` of the innermost frame in fmstore but not in fmstore/storage."""
    f = sys._getframe(2)
    while f is not None:
        path = f.f_code.co_filename
        if "/fmstore/" in path and "/fmstore/storage/" not in path:
            return f"{path.split('/fmstore/', 1)[1]}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "?"


# ----------------------------------------------------------------- one run (one process = one rank)

SHAPE = (8, 16)  # each tensor's global shape: small, 8 rows so 8 ranks each hold one


def make_state(n: int, rank: int, world: int, bump: int = 0) -> dict[str, Any]:
    """``n`` tensors, this rank holding a dim-0 slice of each (a DTensor when ``world`` > 1);
    ``bump`` changes the first tenth of them (the incremental save's changed tensors)."""
    rows = SHAPE[0] // world
    changed = max(1, n // 10) if bump else 0
    out: dict[str, Any] = {}
    for i in range(n):
        base = torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE)
        g = base + i + (bump if i < changed else 0)
        local = g[rank * rows : (rank + 1) * rows].clone()
        if world > 1:
            from torch.distributed.tensor import DTensor, Shard, init_device_mesh

            mesh = init_device_mesh("cpu", (world,))
            out[f"t{i:05d}"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        else:
            out[f"t{i:05d}"] = local
    return {"model": out}


def run_rank(
    rank: int, world: int, url: str, options: dict[str, Any], n: int, attribute: bool
) -> dict[str, Any]:
    """Open, save step 1, save step 2 (incremental), close; open again, load the latest, close.
    Returns this rank's requests per phase (and, with ``attribute``, per fmstore line)."""
    import torch.distributed as dist

    fs, counter = open_hooked(url, options)
    attr = Attribution(counter) if attribute else None
    phases: dict[str, dict[str, int]] = {}
    sites: dict[str, list[tuple[str, str, str, int]]] = {}

    groups: dict[str, list[tuple[str, str, bool, int]]] = {}
    attempts: dict[str, int] = {}

    def take(phase: str) -> None:
        ops, grouped, tries = counter.take()
        phases[phase], attempts[phase] = dict(ops), tries
        groups[phase] = [(*k, v) for k, v in grouped.items()]
        if attr is not None:
            sites[phase] = [(*k, v) for k, v in sorted(attr.take().items(), key=lambda kv: -kv[1])]

    def barrier() -> None:
        if world > 1:
            dist.barrier()  # phases line up across ranks: no rank's request lands in another's phase

    ck = Checkpointer(url, storage_options=options)
    assert ck.storage.fs is fs, "the Checkpointer opened another file system: its requests are not counted"
    if attr is not None:
        attr.wrap(ck.storage)
    take("open")
    ck.save(1, make_state(n, rank, world)).wait()
    take("save")
    barrier()
    counter.take()
    ck.save(2, make_state(n, rank, world, bump=1)).wait()
    take("save2")
    barrier()
    counter.take()
    ck.close()
    take("close")
    barrier()
    counter.take()
    ck = Checkpointer(url, storage_options=options)
    if attr is not None:
        attr.wrap(ck.storage)
    take("open2")
    target = make_state(n, rank, world, bump=0)
    for t in target["model"].values():
        (t.to_local() if world > 1 else t).zero_()
    ck.load(target)
    take("load")
    want = make_state(n, rank, world, bump=1)["model"]
    for k, v in target["model"].items():  # the load really read step 2
        got, exp = (v.to_local(), want[k].to_local()) if world > 1 else (v, want[k])
        assert torch.equal(got, exp), k
    ck.close()
    take("close2")
    counter.close()
    return {"phases": phases, "sites": sites, "groups": groups, "attempts": attempts}


def _worker(rank: int, world: int, port: int, url: str, options: dict[str, Any], n: int, attribute: bool,
            out_dir: str) -> None:  # fmt: skip
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got = run_rank(rank, world, url, options, n, attribute)
        with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
            json.dump(got, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's teardown at exit aborts now and then (tests/conftest.py quick_exit)


def run_ranks(world: int, url: str, options: dict[str, Any], n: int, attribute: bool) -> list[dict[str, Any]]:
    """Each rank's :func:`run_rank` result, ``world`` real processes over gloo."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, port, url, options, n, attribute, out_dir), nprocs=world, join=True)
        out = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank-{r}.json")) as f:
                out.append(json.load(f))
    return out


# ----------------------------------------------------------------- the report

#: The storage calls of the ranks that wait for the coordinator's commit (fmstore/checkpoint/
#: level.py ``_wait_for_commit``: ``committed`` polls the manifest, ``_abort_of`` the abort):
#: their number grows with the time the ranks wait, not with the work.  (The coordinator's own
#: wait, ``collect_reports``' ``all_in``, is one process asking one request at a time: counted
#: with the rest.)
POLL_SITES = ("checkpoint/level.py", ("committed", "_abort_of"))


def is_poll(site: str) -> bool:
    return site.startswith(POLL_SITES[0]) and site.rsplit(" ", 1)[-1] in POLL_SITES[1]


PHASES = ("open", "save", "save2", "close", "open2", "load", "close2")


def total(results: list[dict[str, Any]], phase: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for r in results:
        out.update(r["phases"][phase])
    return out


def fmt_ops(ops: Counter[str]) -> str:
    return " ".join(f"{op}={n}" for op, n in sorted(ops.items())) or "-"


def key_layout(fs: Any, url: str) -> dict[str, Any]:
    """The keys of step 1 under ``url``: shard files' leading hash characters, and the rest."""
    root = url.split("://", 1)[1].rstrip("/")
    keys = sorted(p[len(root) + 1 :] for p in fs.find(root))
    step1 = [k for k in keys if k.startswith("step-0000000001/")]
    shards = [k.split("/", 1)[1] for k in step1 if re.search(r"-(shard|kept)-r\d{5}\.safetensors$", k)]
    others = [k for k in step1 if k.split("/", 1)[1] not in shards]
    return {
        "keys": keys,
        "shards": shards,
        "others": others,
        "first_hex": sorted({s[0] for s in shards}),
        "first2_hex": sorted({s[:2] for s in shards}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attribute", action="store_true", help="charge requests to fmstore lines")
    ap.add_argument("--save-seconds", type=float, default=10.0, help="save duration for the rate model")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="S3 round trip for the serial-read floor")
    ap.add_argument("--tensors", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4, 8])
    args = ap.parse_args()

    from fmstore.testing import start_seaweedfs

    with tempfile.TemporaryDirectory() as data, start_seaweedfs(data, bucket="reqs") as server:
        options = server.storage_options()
        print(f"SeaweedFS {server.endpoint}; counting: botocore before-parameter-build.s3 (calls) and")
        print("before-send.s3 (HTTP attempts) on the Checkpointer's own s3fs client")
        print(f"tensor shape {SHAPE} float32; save2 changes a tenth of the tensors (incremental)\n")
        rows: list[tuple[str, int, int, list[dict[str, Any]]]] = []
        layouts: dict[int, dict[str, Any]] = {}
        for n in args.tensors:
            url = f"s3://reqs/t{n}-{time.time_ns()}"
            got = run_rank(0, 1, url, options, n, args.attribute)
            rows.append((f"1 rank, {n} tensors (in-process)", 1, n, [got]))
        for w in args.ranks:
            url = f"s3://reqs/r{w}-{time.time_ns()}"
            res = run_ranks(w, url, options, 100, args.attribute)
            rows.append((f"{w} rank(s), 100 tensors (gloo)", w, 100, res))
            layouts[w] = key_layout(server.filesystem(), url)
        report(rows, layouts, args.save_seconds, args.attribute, args.rtt_ms)


def report(rows: list[tuple[str, int, int, list[dict[str, Any]]]], layouts: dict[int, dict[str, Any]],
           seconds: float, attribute: bool, rtt_ms: float) -> None:  # fmt: skip
    print("Requests per phase, all ranks together (PUT-class / GET-class / LIST; then by operation)")
    for label, _w, _n, res in rows:
        print(f"\n== {label}")
        for phase in PHASES:
            ops = total(res, phase)
            c = classes(ops)
            tries = sum(r["attempts"][phase] for r in res)  # more than the calls: retries
            print(
                f"  {phase:6s} PUT={c['PUT']:4d} GET={c['GET']:4d} LIST={c['LIST']:4d} (HTTP {tries:4d})  "
                + fmt_ops(ops)
            )
        if len(res) > 1:
            for phase in ("save", "save2", "load"):
                per = [classes(Counter(r["phases"][phase])) for r in res]
                each = "  ".join(f"r{i}:{p['PUT']}/{p['GET']}/{p['LIST']}" for i, p in enumerate(per))
                print(f"  {phase:6s} per rank (PUT/GET/LIST): {each}")

    # Slopes: per tensor (1 rank, the tensor series) and per rank (the rank series).
    t_rows = [(n, res) for label, w, n, res in rows if "in-process" in label]
    r_rows = [(w, res) for label, w, n, res in rows if "gloo" in label]
    print("\nSlopes (least squares; requests per extra tensor / per extra rank)")
    for phase in ("save", "save2", "load"):
        for cls in ("PUT", "GET", "LIST"):
            if len(t_rows) > 1:
                xs = [n for n, _ in t_rows]
                ys = [classes(total(res, phase))[cls] for _, res in t_rows]
                a, b = fit(xs, ys)
                print(f"  {phase:6s} {cls:4s} per tensor: {b:8.4f}  (at 1 rank: {ys})")
            if len(r_rows) > 1:
                xs = [w for w, _ in r_rows]
                ys = [classes(total(res, phase))[cls] for _, res in r_rows]
                a, b = fit(xs, ys)
                print(f"  {phase:6s} {cls:4s} per rank:   {b:8.2f}  intercept {a:7.2f}  (ranks {xs}: {ys})")

    if attribute:
        print("\nWhere requests come from (largest run of each series; method, fmstore caller, op: requests)")
        picks = [r for r in rows if "in-process" in r[0]][-1:] + [r for r in rows if "gloo" in r[0]][-1:]
        for label, _w, _n, res in picks:
            for phase in ("save", "save2", "load"):
                agg: Counter[tuple[str, str, str]] = Counter()
                for r in res:
                    for m, site, op, v in r["sites"].get(phase, []):
                        agg[(m, site, op)] += v
                print(f"  {label} / {phase}:")
                for (m, site, op), v in agg.most_common(12):
                    print(f"    {v:6d}  {op:24s} {m:12s} {site}")

    if attribute:
        print("\nPolling (the other ranks' wait for the commit, level.py committed/_abort_of): requests")
        print("that grow with the time ranks wait, not with the work")
        for label, w, _n, res in rows:
            if w < 2:
                continue
            for phase in ("save", "save2"):
                poll = Counter[str]()
                for r in res:
                    for _m, site, op, v in r["sites"].get(phase, []):
                        if is_poll(site):
                            poll[op] += v
                all_ = sum(total(res, phase).values())
                print(
                    f"  {label} / {phase}: polling {sum(poll.values())} of {all_} requests: {fmt_ops(poll)}"
                )

    print("\nKey layout of step 1 (from the bucket listing)")
    for w, lay in layouts.items():
        print(
            f"  {w} rank(s): shard files {len(lay['shards'])}, distinct first hex chars after step-N/: "
            f"{len(lay['first_hex'])} {lay['first_hex']}; other keys in step-N/: "
            f"{[k.split('/', 1)[1] for k in lay['others']]}"
        )
    print("  all keys of the largest run:", ", ".join(layouts[max(layouts)]["keys"]) if layouts else "-")

    if attribute and any("gloo" in r[0] for r in rows):
        extrapolate(rows, seconds, rtt_ms)
    else:
        print("\n(the extrapolation needs --attribute: it leaves polls out of the per-rank fits)")


def fit(xs: list[int], ys: list[int]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through (xs, ys)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def polls_in(seconds: float, ranks: int = 1) -> float:
    """Poll rounds a rank waiting ``seconds`` makes: fmstore/checkpoint/level.py ``_poll`` sleeps
    ``max(10 ms, ranks / POLL_RATE / 8)``, then 1.5 times longer each round, at most ``max(0.5,
    ranks / POLL_RATE)`` s on an
    object store (each sleep jittered to 75-100 %: its mean, 87.5 %, here; request time not
    counted)."""
    from fmstore.checkpoint import POLL_RATE

    longest, delay = max(0.5, ranks / POLL_RATE), max(0.01, ranks / POLL_RATE / 8)
    n, t = 0, 0.0
    while t < seconds:
        n, t, delay = n + 1, t + 0.875 * delay, min(delay * 1.5, longest)
    return n


Rows = list[tuple[str, int, int, list[dict[str, Any]]]]  # (label, ranks, tensors, each rank's result)


def group_fits(rows: Rows, phase: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(group, class) -> (intercept, slope per rank) of the non-poll requests of the multi-rank runs."""
    # Several ranks only: one rank alone writes no reports and waits for nobody.
    runs = [(w, res) for label, w, _n, res in rows if "gloo" in label and w > 1]
    per: dict[tuple[str, str], list[int]] = {}
    for i, (_w, res) in enumerate(runs):
        for r in res:
            for group, op, poll, v in r["groups"][phase]:
                if poll:
                    continue
                cls = "PUT" if op in PUT_OPS else "GET" if op in GET_OPS else "LIST"
                per.setdefault((group, cls), [0] * len(runs))[i] += v
    xs = [w for w, _ in runs]
    return {k: fit(xs, ys) for k, ys in per.items()}


def poll_round(rows: Rows, phase: str) -> Counter[tuple[str, str]]:
    """(group, class) -> requests of one poll round of one waiting rank: the rounds of the largest
    gloo run's non-coordinators, averaged (manifest.json HEAD, then aborted.json, each missing:
    s3fs follows a 404 HEAD with a LIST, to tell a directory)."""
    w, res = max(((w, res) for label, w, _n, res in rows if "gloo" in label and w > 1), default=(0, []))
    got: Counter[tuple[str, str]] = Counter()
    rounds = 0
    for r in res[1:]:
        heads = 0
        for group, op, poll, v in r["groups"][phase]:
            if poll and group == "commit":
                cls = "PUT" if op in PUT_OPS else "GET" if op in GET_OPS else "LIST"
                got[(group, cls)] += v
                if op == "HeadObject":
                    heads += v
        rounds += heads // 2 if heads else 0  # two keys a round
    return Counter({k: round(v / rounds, 2) for k, v in got.items()}) if rounds else got


def extrapolate(rows: Rows, seconds: float, rtt_ms: float) -> None:
    """Requests per second per prefix (partition) at 1,024 and 8,192 ranks, by key group."""
    print(
        f"\nExtrapolation: a save (or load) of R ranks taking T = {seconds:g} s; AWS per-prefix rates "
        f"{PUT_LIMIT} PUT-class/s, {GET_LIMIT} GET-class/s (LIST shown, GET-class assumed for its rate)"
    )
    print("  Key groups: shard = step-N/<8 hex blake2b(writer:rank)>-shard-rNNNNN.safetensors (level.py")
    print("  shard_file), report = step-N/rank-NNNNN.json, commit = step-N/manifest.json and")
    print("  aborted.json (two keys), root = the lease and the root's listing.  A key is served by one")
    print("  partition, so a group of k keys spreads over at most k; S3 splits a busy key range over time,")
    print("  and each save's step-N/ is a new range.")
    print(
        "  Non-poll requests: least-squares per rank over the 2-8 rank runs; polls: the code's schedule "
        f"({polls_in(seconds)} rounds in {seconds:g} s a waiting rank, fewer where ranks / level.POLL_RATE > 0.5 s) x the "
        "measured requests of a round."
    )
    for phase, what in (("save", "first save"), ("save2", "incremental save"), ("load", "load")):
        fits = group_fits(rows, phase)
        rnd = poll_round(rows, phase) if phase != "load" else Counter()
        for ranks in (1024, 8192):
            print(f"\n  {ranks} ranks, {what}:")
            floor = 0.0
            for group in ("shard", "report", "commit", "root"):
                n = {c: max(0.0, a + b * ranks) for (g, c), (a, b) in fits.items() if g == group}
                polled = {
                    c: v * (ranks - 1) * polls_in(seconds, ranks) for (g, c), v in rnd.items() if g == group
                }
                put = n.get("PUT", 0.0) + polled.get("PUT", 0.0)
                get = sum(n.get(c, 0.0) + polled.get(c, 0.0) for c in ("GET", "LIST"))
                if put + get == 0:
                    continue
                keys = {"shard": ranks, "report": ranks, "commit": 2, "root": 2}[group]
                one = max(put / PUT_LIMIT, get / GET_LIMIT)  # seconds on one partition
                need = max(1, -(-one // seconds))  # partitions to finish within T
                ok = need <= keys
                floor = max(floor, one / min(keys, 256))
                polls = f" (polls {sum(polled.values()):,.0f})" if polled else ""
                print(
                    f"    {group:7s} {put:10,.0f} PUT-class {get:10,.0f} GET+LIST{polls}: one partition "
                    f"{put / seconds:8,.0f} PUT/s {get / seconds:9,.0f} GET/s -> "
                    f"needs {need:4.0f} partition(s) "
                    f"for T, {'possible' if ok else 'IMPOSSIBLE'} ({keys} keys); "
                    f"floor {one / min(keys, 256):7.2f} s at <=256 partitions"
                )
            print(f"    floor of the {what} (busiest group, keys over <= 256 partitions): {floor:.2f} s")
            if phase != "load":
                # The coordinator reads the reports one after another: exists (HEAD), then the
                # read (HEAD + GET): a latency floor no partitioning removes.
                from fmstore.checkpoint import REPORT_READERS

                serial = 3 * ranks * rtt_ms / 1000
                print(
                    f"    the coordinator's report reads: {3 * ranks:,} round trips, {serial:.0f} s at {rtt_ms:g} ms "
                    f"each one after the other, {serial / REPORT_READERS:.1f} s on its {REPORT_READERS} threads "
                    "(level.py collect_reports)"
                )


if __name__ == "__main__":
    main()
