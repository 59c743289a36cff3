"""Manifest versions 1 and 2: reading them, and writing them (a snapshot of an older fmstore,
for the tests that check every version loads the same values, and for ``bench/metadata_scale.py``).

Version 2 stores every shard as one JSON object (the fields of :class:`~.manifest.Shard`)
in a list under its tensor; version 1 is version 2 with each codec a chain of strings
(``["planes4", "zstd"]``).  Both are read into tensor entries holding :class:`Shard` lists,
then validated like version 3 (their shards made into a :class:`~.shardtable.ShardTable`).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from ..errors import ManifestError
from .manifest import FORMAT, Manifest, Shard, TensorEntry, _registry

_FIELDS = [f.name for f in fields(Shard)]
_NFIELDS = len(_FIELDS)
#: Version-1 chains of the codec entries :func:`fmstore.codec.registry.from_legacy` reads.
_LEGACY = {
    "planes-zstd": lambda c: [f"planes{c['width']}", "zstd"],
    "fmhs": lambda c: [f"planes{c['width']}", "huff"],
    "int8-absmax": lambda c: ["int8-absmax256"] if c.get("block") == 256 else None,
}


def shard_of_body(body: Any) -> Shard:
    """The shard of a version-2 JSON object.  One with exactly the fields, in order (as
    version 2 wrote them), becomes the shard's attributes as it is (the constructor's keyword
    matching is most of the cost of reading one); any other object goes through the
    constructor, which refuses unknown names and fills defaults."""
    if type(body) is dict and len(body) == _NFIELDS and list(body) == _FIELDS:
        shard = object.__new__(Shard)
        shard.__dict__ = body
        return shard
    return Shard(**body)


def _legacy_shard(body: dict[str, Any], where: str) -> Shard:
    """A shard of a version-1 manifest: its codec a chain of strings (["planes4", "zstd"])."""
    shard = Shard(**body)
    registry = _registry()
    try:
        shard.codec = registry.from_legacy(list(shard.codec), where)
    except registry.CodecConfigError as e:
        raise ManifestError(str(e)) from None
    return shard


def tensors_of_v2(tensors: Any, version: int, where: str) -> dict[str, TensorEntry]:
    """The tensor entries of a version-1 or -2 manifest's ``tensors`` object."""
    from_body = (lambda s: _legacy_shard(s, where)) if version == 1 else shard_of_body
    return {
        name: TensorEntry(e["dtype"], list(e["shape"]), [from_body(s) for s in e["shards"]])
        for name, e in tensors.items()
    }


def _shard_body(s: Shard, version: int) -> dict[str, Any]:
    d = {f: getattr(s, f) for f in _FIELDS}
    if version == 1 and d["codec"]:
        (c,) = d["codec"]
        chain = _LEGACY.get(c["name"], lambda _: None)(c.get("configuration", {}))
        if chain is None:
            raise ValueError(f"codec {c!r} has no version-1 form")
        d["codec"] = chain
    return d


def to_json_v2(m: Manifest, version: int = 2) -> bytes:
    """``m``'s JSON in manifest version ``version`` (1 or 2), as an older fmstore wrote it."""
    if version not in (1, 2):
        raise ValueError(f"version {version!r} is not 1 or 2")
    body = {
        "format": FORMAT,
        "version": version,
        "step": m.step,
        "world_size": m.world_size,
        "tensors": {
            name: {"dtype": e.dtype, "shape": e.shape, "shards": [_shard_body(s, version) for s in e.shards]}
            for name, e in m.tensors.items()
        },
        "tree": m.tree,
        "files": m.files,
        "created": m.created,
        "meta": m.meta,
    }
    return json.dumps(body, separators=(",", ":")).encode()
