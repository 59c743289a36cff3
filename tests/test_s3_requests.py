"""How many S3 requests a save and a load make (issue 30, point 4): a save's PUT-class requests
grow with the ranks, not with the tensors; a load's requests grow with the tensors by at most one
ranged GET each.

Requests are counted in the client, by operation, through a handler on the botocore event
system (``before-call.s3``) of the s3fs client the Checkpointer's storage uses; fmstore is not
changed.  bench/s3_requests.py measures the same over more sizes and extrapolates to 1,024 and
8,192 ranks.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import S3Info, free_port, quick_exit

from fmstore import Checkpointer
from fmstore.storage import S3Storage

pytestmark = pytest.mark.s3

#: S3's PUT class (its per-prefix limit is 3,500/s: "PUT/COPY/POST/DELETE") as fmstore uses it.
PUT_CLASS = {"PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload", "CopyObject",
             "DeleteObject", "DeleteObjects", "AbortMultipartUpload"}  # fmt: skip


class Requests:
    """The S3 API calls, by operation, of the s3fs client a Checkpointer on ``url`` will use."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        # The cached instance every Storage with these options gets (fmstore's S3 config is
        # copied for each open: botocore rewriting its retries no longer changes the cache key).
        self.fs = S3Storage.open_fs(url, options)[0]
        self.fs.connect()  # makes the aiobotocore client that is hooked
        self.ops: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._id = f"fmstore-test-requests-{id(self)}"
        self.fs.s3.meta.events.register("before-call.s3", self._count, unique_id=self._id)

    def _count(self, model: Any = None, **_: Any) -> None:
        with self._lock:  # (handlers run on fsspec's event-loop thread; the lock keeps take() whole)
            self.ops[model.name] += 1

    def take(self) -> Counter[str]:
        """The calls counted since the last take."""
        with self._lock:
            out, self.ops = self.ops, Counter()
        return out

    def close(self) -> None:
        self.fs.s3.meta.events.unregister("before-call.s3", self._count, unique_id=self._id)


def put_class(ops: Counter[str]) -> int:
    return sum(n for op, n in ops.items() if op in PUT_CLASS)


def state(n: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """``n`` small tensors (8 x 4 float32), this rank holding rows ``rank``/``world`` of each."""
    rows = 8 // world
    out: dict[str, Any] = {}
    for i in range(n):
        local = (torch.arange(32, dtype=torch.float32).reshape(8, 4) + i)[rank * rows : (rank + 1) * rows]
        if world > 1:
            from torch.distributed.tensor import DTensor, Shard, init_device_mesh

            mesh = init_device_mesh("cpu", (world,))
            local = DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False)
        out[f"t{i:04d}"] = local
    return {"model": out}


def save_and_load(s3: S3Info, n: int) -> tuple[Counter[str], Counter[str]]:
    """One process alone: the requests of a first save of ``n`` tensors to a fresh root, and of
    loading it back with a new Checkpointer (a restart)."""
    url = s3.url(f"requests-{n}-{time.time_ns()}")
    req = Requests(url, s3.storage_options)
    try:
        with Checkpointer(url, storage_options=s3.storage_options) as ck:
            assert ck.storage.fs is req.fs  # else its requests would go uncounted
            req.take()  # (construction: the bucket check)
            ck.save(1, state(n)).wait()
            saved = req.take()
        with Checkpointer(url, storage_options=s3.storage_options) as ck:
            target = state(n)
            for t in target["model"].values():
                t.zero_()
            req.take()
            ck.load(target)
            loaded = req.take()
        assert all(torch.equal(target["model"][k], v) for k, v in state(n)["model"].items())
    finally:
        req.close()
    return saved, loaded


def test_save_requests_do_not_grow_with_tensors(s3: S3Info) -> None:
    few, _ = save_and_load(s3, 10)
    many, _ = save_and_load(s3, 100)
    # One rank, first save to a fresh root: the lease claim, one shard file, the manifest; each a
    # single PUT at these sizes (parts are 32 MiB), whatever the number of tensors in the file.
    assert put_class(few) == put_class(many) == 3, (few, many)
    assert few["PutObject"] == many["PutObject"] == 3, (few, many)
    # Nor do the save's reads and listings (the commit's checks) depend on the tensors.
    assert few == many, (few, many)


def test_load_requests_do_not_grow_with_tensors(s3: S3Info) -> None:
    _, few = save_and_load(s3, 10)
    _, many = save_and_load(s3, 100)
    # Per snapshot and per shard file the load makes a fixed number of requests (listing, the
    # manifest, each file's size and header); the tensors' bytes are ranged GETs that
    # Storage.read_ranges coalesces (ranges of one file at most COALESCE_GAP apart, up to a part
    # size, go as one GET): 100 small tensors of one file are as many GETs as 10.  (Before
    # coalescing it was one GET per tensor: 1,005 for 1,000 tensors.)
    assert few == many, (few, many)
    assert put_class(few) == 0, few  # a load writes nothing


# ----------------------------------------------------------------- two ranks


@quick_exit  # gloo teardown at exit aborts now and then, after the body passed (conftest)
def _save_worker(
    rank: int, world: int, port: int, urls: dict[str, str], options: dict[str, Any], out: str
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got: dict[str, dict[str, int]] = {}
        for n, url in urls.items():
            req = Requests(url, options)
            with Checkpointer(url, storage_options=options) as ck:
                assert ck.storage.fs is req.fs
                req.take()
                ck.save(1, state(int(n), rank, world)).wait()
                got[n] = dict(req.take())
            req.close()
            dist.barrier()  # the next root's requests start once every rank is done with this one
        Path(out, f"rank-{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def test_two_rank_save_puts_grow_with_ranks_not_tensors(s3: S3Info, tmp_path: Path) -> None:
    stamp = time.time_ns()
    urls = {str(n): s3.url(f"requests-2r-{n}-{stamp}") for n in (10, 100)}
    args = (2, free_port(), urls, s3.storage_options, str(tmp_path))
    mp.spawn(_save_worker, args=args, nprocs=2, join=True)
    ranks = [json.loads(Path(tmp_path, f"rank-{r}.json").read_text()) for r in range(2)]
    one_rank, _ = save_and_load(s3, 10)
    coordinator_only = 2  # the lease claim and the manifest: rank 0 alone writes them
    for n in ("10", "100"):
        per_rank = [Counter(r[n]) for r in ranks]
        both = per_rank[0] + per_rank[1]
        # Every rank: its shard file, plus (with several ranks) its report rank-NNNNN.json, which
        # the coordinator deletes once the manifest is written: 3 PUT-class requests a rank.
        assert both["PutObject"] == 2 * one_rank["PutObject"] - coordinator_only + 2, (n, per_rank)
        assert both["DeleteObject"] == 2, (n, per_rank)
        assert put_class(both) == 2 * put_class(one_rank) - coordinator_only + 2 * 2, (n, per_rank)
        assert put_class(per_rank[1]) == 1 + 1, (n, per_rank)  # a non-coordinator: shard + report
    assert [put_class(Counter(r["10"])) for r in ranks] == [put_class(Counter(r["100"])) for r in ranks]
