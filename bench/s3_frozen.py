"""How long fmstore's calls take to fail against an S3 server that accepts connections and
never answers: a local SeaweedFS (``weed mini``, started here) SIGSTOPped after one save.

For each call (``steps()``, ``load()``, constructing a Checkpointer on the root) it prints the
seconds until the error and the error; after SIGCONT it checks the snapshot still loads.  The
bound comes from ``fmstore.storage.s3.S3_CONFIG`` / ``S3_ATTEMPTS`` unless ``--read-timeout``
overrides botocore's read timeout through ``storage_options``.

    PYTHONPATH=. .venv/bin/python bench/s3_frozen.py
    PYTHONPATH=. .venv/bin/python bench/s3_frozen.py --read-timeout 2
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from typing import Any

import torch

from fmstore import Checkpointer
from fmstore.storage import S3_ATTEMPTS, S3_CONFIG
from fmstore.testing import start_seaweedfs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--read-timeout", type=float, default=None, help="botocore read_timeout, s")
    args = ap.parse_args()
    read_timeout = args.read_timeout or S3_CONFIG["read_timeout"]
    print(f"S3_CONFIG {S3_CONFIG}, S3_ATTEMPTS {S3_ATTEMPTS}, read_timeout used {read_timeout} s")
    with start_seaweedfs(tempfile.mkdtemp(prefix="s3-frozen-"), bucket="fmstore-frozen") as server:
        url = "s3://fmstore-frozen/run"
        opts: dict[str, Any] = server.storage_options()
        if args.read_timeout:
            opts["config_kwargs"] = {"read_timeout": args.read_timeout}
        ck = Checkpointer(url, storage_options=opts)
        ck.save(1, {"w": torch.arange(1000.0)}).wait()
        calls = {
            "steps()": ck.steps,
            "load()": ck.load,
            "Checkpointer(url)": lambda: Checkpointer(url, storage_options=opts),
        }
        os.killpg(server.process.pid, signal.SIGSTOP)
        try:
            for name, call in calls.items():
                t0 = time.monotonic()
                try:
                    call()
                    outcome = "returned (no error)"
                except Exception as e:  # noqa: BLE001 - printed: which error a user sees
                    outcome = f"{type(e).__name__}: {str(e)[:110]}"
                print(f"{name:<18} {time.monotonic() - t0:6.1f} s  {outcome}", flush=True)
        finally:
            os.killpg(server.process.pid, signal.SIGCONT)
        assert torch.equal(ck.load()["w"], torch.arange(1000.0))
        print("after SIGCONT: step 1 loads, equal")
        ck.close()


if __name__ == "__main__":
    main()
