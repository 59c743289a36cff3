"""The pieces of a streaming load: which byte ranges of which shard files land where."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

from ..checkpoint import Manifest, Shard
from ..errors import FmstoreError
from .ring import MAX_SLOT, slot_size


@dataclass
class Job:
    name: str
    shard: Shard | None  # None: a coded tensor, read whole through the checkpoint reader
    view: torch.Tensor  # the shard's region of the destination (the whole destination when coded)
    start: int = 0  # byte range in the shard
    nbytes: int = 0
    direct: bool = False  # read straight into ``view`` (a new CPU tensor), no ring slot


def plan_jobs(
    manifest: Manifest,
    ring_bytes: int,
    threads: int,
    names: dict[str, str],
    dests: dict[str, torch.Tensor],
    fresh: bool,
) -> list[Job]:
    """The pieces to read: for raw shards, runs of whole checksum chunks that fit a slot (or
    one chunk, where a chunk is larger than a slot); a coded tensor is one job.  ``fresh``:
    the destinations are new tensors, so a contiguous CPU region is read straight into
    (a ring would only add a copy there, and a failed load returns nothing to look at)."""
    slot = slot_size(ring_bytes, threads)
    jobs: list[Job] = []
    for key, name in names.items():
        entry = manifest.tensors[name]
        dest = dests[key]
        if any(s.codec for s in entry.shards):
            jobs.append(Job(name, None, dest))
            continue
        itemsize = dest.element_size()
        covered = 0
        for shard in entry.shards:
            n = prod(shard.lengths)
            covered += n
            stored = shard.end - shard.begin
            if stored != n * itemsize:
                raise FmstoreError(
                    f"tensor {name!r}: {stored} bytes recorded in {shard.file!r} for {n} elements"
                )
            if not stored:
                continue
            cs = shard.chunk_size
            if cs <= 0 or cs % itemsize:
                raise FmstoreError(f"tensor {name!r} in {shard.file!r}: checksum chunks of {cs} bytes")
            view = dest[tuple(slice(o, o + k) for o, k in zip(shard.offsets, shard.lengths))]
            direct = fresh and view.device.type == "cpu" and view.is_contiguous()
            # Whole chunks a slot holds (one, if it holds none); straight reads in pieces of
            # the largest slot, for as many reads in flight.
            group = max(1, (MAX_SLOT if direct else slot) // cs) * cs
            jobs.extend(
                Job(name, shard, view, a, min(group, stored - a), direct) for a in range(0, stored, group)
            )
        if covered != dest.numel():
            raise FmstoreError(
                f"snapshot step {manifest.step}: tensor {name!r}: its shards cover {covered} of "
                f"{dest.numel()} elements"
            )
    # The file order: neighbouring pieces are read at about the same time.
    jobs.sort(key=lambda j: (j.shard.file, j.shard.begin + j.start) if j.shard else ("", 0))
    return jobs
