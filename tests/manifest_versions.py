"""Manifest bodies between versions 2 and 3, as plain JSON (tests edit a manifest as version 2's
object per shard, hostile values included, then write it back in either version)."""

from __future__ import annotations

from typing import Any

from fmstore.checkpoint.shardtable import HEX, ShardTable, decode_ints, encode_ints

_INT_FIELDS = ("begin", "chunk_size")


def v3_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    """A (well-formed) version-3 body as version 2."""
    if body.get("version") != 3:
        return body
    t, sh = body["tensors"], body["shards"]
    n, dims = sh["rows"], sh["dims"]
    table = ShardTable.from_body(sh)  # (the checksums and digests in either of their forms)
    col = {k: decode_ints(sh[k], n, k).tolist() for k in ("tensor", "file", "begin", "size", "chunk_size", "nchunks", "codec")}
    off = decode_ints(sh["offsets"], n * dims, "offsets").reshape(n, dims).tolist()
    ln = decode_ints(sh["lengths"], n * dims, "lengths").reshape(n, dims).tolist()
    tensors = {name: {"dtype": d, "shape": s, "shards": []} for name, d, s in zip(t["names"], t["dtypes"], t["shapes"])}
    names = t["names"]
    at = 0
    for i in range(n):
        name = names[col["tensor"][i]]
        nd = len(tensors[name]["shape"])
        k = col["nchunks"][i]
        tensors[name]["shards"].append(
            {
                "offsets": off[i][:nd],
                "lengths": ln[i][:nd],
                "file": sh["files"][col["file"][i]],
                "begin": col["begin"][i],
                "end": col["begin"][i] + col["size"][i],
                "checksum": table.checksums[i],
                "codec": sh["codecs"][col["codec"][i]],
                "chunk_size": col["chunk_size"][i],
                "chunks": [table.chunks[j : j + HEX] for j in range(at * HEX, (at + k) * HEX, HEX)],
            }
        )
        at += k
    out = {k: v for k, v in body.items() if k != "shards"}
    out.update(version=2, tensors=tensors)
    return out


def v2_to_v3(body: dict[str, Any]) -> dict[str, Any] | None:
    """A version-2 body as version 3, hostile values kept where an integer column can hold
    them; None where one cannot (a float, a string where an int belongs)."""
    tensors = body["tensors"]
    try:
        names = list(tensors)
        dims = max((len(e["shape"]) for e in tensors.values() if isinstance(e["shape"], list)), default=0)
        files: dict[str, int] = {}
        codecs: list[Any] = [[]]
        cols: dict[str, list[Any]] = {k: [] for k in ("tensor", "file", "begin", "size", "chunk_size", "nchunks", "codec", "offsets", "lengths")}
        checksums, chunks = [], []
        for i, name in enumerate(names):
            for s in tensors[name]["shards"]:
                if s["codec"] not in codecs:
                    codecs.append(s["codec"])
                for v in (s["begin"], s["end"], s["chunk_size"], *s["offsets"], *s["lengths"]):
                    if type(v) is not int:
                        return None
                if len(s["offsets"]) > dims or len(s["lengths"]) > dims:
                    return None
                cols["tensor"].append(i)
                cols["file"].append(files.setdefault(s["file"], len(files)))
                cols["begin"].append(s["begin"])
                cols["size"].append(s["end"] - s["begin"])
                cols["chunk_size"].append(s["chunk_size"])
                cols["nchunks"].append(len(s["chunks"]))
                cols["codec"].append(codecs.index(s["codec"]))
                cols["offsets"] += s["offsets"] + [0] * (dims - len(s["offsets"]))
                cols["lengths"] += s["lengths"] + [0] * (dims - len(s["lengths"]))
                checksums.append(s["checksum"])
                chunks += s["chunks"]
        shards = {"rows": len(cols["tensor"]), "dims": dims, **{k: encode_ints(v) for k, v in cols.items()}}
        shards.update(files=list(files), codecs=codecs, checksums=checksums, chunks="".join(chunks))
    except (OverflowError, TypeError, KeyError):
        return None
    out = {k: v for k, v in body.items()}
    out.update(
        version=3,
        tensors={
            "names": names,
            "dtypes": [tensors[n]["dtype"] for n in names],
            "shapes": [tensors[n]["shape"] for n in names],
        },
        shards=shards,
    )
    return out
