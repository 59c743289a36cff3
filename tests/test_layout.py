"""Where the code that deletes lives (issue 28): one owner of a root's snapshots."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DELETION = re.compile(r"shutil\.rmtree|os\.unlink|\.rm\(|\.delete\(")

#: The storage layer and the snapshot owner: the only code that deletes under a root.
OWNERS = ("fmstore/storage/", "fmstore/checkpoint/snapshots.py")

#: Lines that match but delete nothing under a checkpoint root themselves; each is (file, how many
#: lines there match).  Any other hit, one more here, or one fewer (a stale entry) fails.  Local
#: temporaries outside a root (an export's, the HF resume folder, the demo's scratch) go through
#: the storage layer's ``remove_local`` / ``AtomicOutput``.
NOT_UNDER_A_ROOT = {
    # The blob tiers are the TieredStore's storage layer (named blobs, no snapshots): a tier's
    # own delete, and the store evicting a blob from a tier through that public method.
    "fmstore/store.py": 4,
    "fmstore/tiers/base.py": 1,
    "fmstore/tiers/blobfiles.py": 1,
    # Blobs these modules put in a TieredStore themselves, removed through the store's public
    # delete (and, for another process's cache file, the tier's).
    "fmstore/offload/parameters.py": 2,
    "fmstore/serving/cache.py": 3,
    # ck.delete(step): a call of the public Checkpointer.delete, which is Snapshots.drop.
    "trainer_integration/lightning.py": 2,
}


def test_only_the_storage_layer_and_the_snapshot_owner_delete():
    hits: dict[str, list[str]] = {}
    for top in ("fmstore", "trainer_integration"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith(OWNERS):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if DELETION.search(line):
                    hits.setdefault(rel, []).append(f"{rel}:{n}: {line.strip()}")
    wrong = [
        line
        for rel, lines in hits.items()
        if len(lines) != NOT_UNDER_A_ROOT.get(rel, 0)
        for line in lines
    ]
    wrong += [f"{rel}: listed with {n} but has {len(hits.get(rel, []))}" for rel, n in NOT_UNDER_A_ROOT.items()
              if len(hits.get(rel, [])) != n]  # fmt: skip
    assert not wrong, "deletions outside fmstore/storage/ and fmstore/checkpoint/snapshots.py:\n" + "\n".join(wrong)
    assert (REPO / OWNERS[1]).exists()
