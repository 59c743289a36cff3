"""Where the code that deletes lives (issue 28): one owner of a root's snapshots."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DELETION = re.compile(r"shutil\.rmtree|os\.unlink|\.rm\(|\.delete\(")

#: The storage layer and the snapshot owner: the only code that deletes under a root.
OWNERS = ("fmstore/storage/", "fmstore/checkpoint/snapshots.py")

#: Deletions of things that are no checkpoint root's, left where they are for now; each is
#: (file, how many lines there match).  Any other hit, or one more here, fails.
NOT_UNDER_A_ROOT = {
    "fmstore/store.py": 4,  # TieredStore evicting blobs from its tiers (no snapshots)
    "fmstore/tiers/base.py": 1,  # a blob tier's own delete
    "fmstore/tiers/blobfiles.py": 1,  # a blob tier's own delete
    "fmstore/cli/_export_io.py": 5,  # an export's temporaries at its destination
    "trainer_integration/hf.py": 1,  # the folder of files handed to HF's Trainer to resume from
    "trainer_integration/demo.py": 1,  # the demo's scratch directory
    "trainer_integration/lightning.py": 2,  # ck.delete(step): the public Checkpointer.delete (-> Snapshots.drop)
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
    assert not wrong, "deletions outside fmstore/storage/ and fmstore/checkpoint/snapshots.py:\n" + "\n".join(wrong)
    assert (REPO / OWNERS[1]).exists()
