"""Child process for the checkpoint crash test: save step after step until SIGKILLed.

State at step s: ``w`` (1M float32, all equal to s), ``frozen`` (never changes: referenced
by incremental snapshots), ``nested`` values; ``keep_last=3`` so retention and GC run too.
A third argument, JSON, gives further Checkpointer arguments (``storage_options``, ...).
"""

from __future__ import annotations

import json
import sys

import torch

from fmstore import Checkpointer


def state_at(step: int) -> dict:
    return {
        "w": torch.full((1 << 20,), float(step)),
        "frozen": torch.arange(1 << 18, dtype=torch.int32),
        "nested": {"step": step, "hist": [step, (step, "x")]},
    }


def main() -> None:
    root, start = sys.argv[1], int(sys.argv[2])
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}  # e.g. storage_options, lease_ttl
    ck = Checkpointer(root, keep_last=3, **options)
    step = start
    while True:
        ck.save(step, state_at(step))
        print(f"saved {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
