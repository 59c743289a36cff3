"""Child process for the crash-safety tests: overwrite one key forever, announcing each write.

Run as ``python crash_writer.py '<json spec>'``; the parent SIGKILLs it mid-write.
Blob ``i`` is ``numel`` int32 values all equal to ``i``, so a torn blob is easy to spot.
"""

from __future__ import annotations

import json
import sys

import torch

from fmstore import LocalTier, ObjectTier


def open_tier(spec: dict) -> LocalTier | ObjectTier:
    if spec["kind"] == "local":
        return LocalTier(spec["path"])
    return ObjectTier(spec["url"], spec.get("storage_options"), part_size=spec.get("part_size", "8MiB"))


def main() -> None:
    spec = json.loads(sys.argv[1])
    tier = open_tier(spec)
    numel = spec["numel"]
    i = 0
    while True:
        i += 1
        value = torch.full((numel,), i, dtype=torch.int32)
        print(f"writing {i}", flush=True)
        tier.put(spec["key"], value)
        print(f"wrote {i}", flush=True)


if __name__ == "__main__":
    main()
