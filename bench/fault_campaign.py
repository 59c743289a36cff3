"""The SIGKILL campaign of docs/RELIABILITY.md: checkpoint writers killed at random moments of
their save loop, on a local root and on S3 (a SeaweedFS started here), raw and compressed, and
after every kill a fresh reader that loads each committed step and compares it with what was
saved.  tests/test_faults.py runs the same loop with a few kills per configuration; this runs
hundreds.

Each kill lands 0-3 ms after the writer announces a phase (staging, a shard write, the
manifest commit, retention), the phases taken in turn.  It prints, per configuration, the kills,
how many hit a save in flight, the snapshots checked, and the three failures it looks for:
a step the writer reported committed that is gone (``lost``), a step that loads other values
(``wrong``), a committed step that fails to load (``errors``).  Exit status 1 if any is non-zero.

    PYTHONPATH=. .venv/bin/python bench/fault_campaign.py              # 60 kills x 4 configurations
    PYTHONPATH=. .venv/bin/python bench/fault_campaign.py --kills 10 --only local-raw
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fault_kit import PHASES, Tally, Zygote, kill_series  # noqa: E402

from fmstore.testing import start_seaweedfs  # noqa: E402

CONFIGS = ("local-raw", "local-lossless", "s3-raw", "s3-lossless")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=60, help="SIGKILLs per configuration (default 60)")
    ap.add_argument("--only", choices=CONFIGS, action="append", help="run just these configurations")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    configs = args.only or list(CONFIGS)
    failed = False
    with tempfile.TemporaryDirectory(prefix="fmstore-faults-") as tmp, contextlib.ExitStack() as stack:
        server = None
        if any(c.startswith("s3") for c in configs):
            server = stack.enter_context(start_seaweedfs(f"{tmp}/weed", bucket="campaign"))
        zygote = Zygote()
        stack.callback(zygote.close)
        print(f"{'configuration':16} {'kills':>5} {'mid-save':>8} {'checked':>7} {'lost':>4} {'wrong':>5} "
              f"{'errors':>6} {'s/kill':>6}  kills per phase")
        total = Tally()
        for i, config in enumerate(configs):
            backend, compression = config.split("-")
            options: dict[str, Any] = {"keep_last": 2, "compression": None if compression == "raw" else compression}
            if backend == "s3":
                assert server is not None
                root = f"s3://campaign/{config}"
                options["storage_options"] = server.storage_options()
            else:
                root = f"{tmp}/{config}"
            t0 = time.perf_counter()
            tally = kill_series(zygote, root, options, args.kills, seed=args.seed + i)
            per_kill = (time.perf_counter() - t0) / max(1, tally.kills)
            phases = " ".join(f"{p}={tally.phases[p]}" for p in PHASES)
            print(f"{config:16} {tally.kills:5d} {tally.mid_save:8d} {tally.checked:7d} {len(tally.lost):4d} "
                  f"{len(tally.wrong):5d} {len(tally.errors):6d} {per_kill:6.2f}  {phases}", flush=True)
            for e in tally.errors[:5]:
                print(f"    error: {e}")
            if tally.lost or tally.wrong:
                print(f"    lost steps {tally.lost}, wrong steps {tally.wrong}")
            failed |= bool(tally.lost or tally.wrong or tally.errors)
            total.kills += tally.kills
            total.mid_save += tally.mid_save
            total.checked += tally.checked
            total.lost += tally.lost
            total.wrong += tally.wrong
            total.errors += tally.errors
        print(f"{'all':16} {total.kills:5d} {total.mid_save:8d} {total.checked:7d} {len(total.lost):4d} "
              f"{len(total.wrong):5d} {len(total.errors):6d}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
