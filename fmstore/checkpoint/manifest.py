"""The snapshot manifest: the one JSON document that makes a snapshot exist.

Layout under a checkpoint root::

    step-0000000100/shard-r00000.safetensors   shard files (valid safetensors)
    step-0000000100/manifest.json              written last, by the coordinator

The manifest records, for every tensor, its global shape and dtype and each saved shard's
slice (offsets/lengths), the file holding its bytes (possibly in an earlier snapshot, for
data that did not change), the byte range in that file, the codec chain and a checksum of
the original bytes; plus the JSON tree of the whole state.  Paths are relative to the root
and checked on load: a manifest cannot point outside the checkpoint.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..codec import registry
from ..codec.registry import CodecConfigError
from ..errors import CorruptBlobError, FmstoreError

FORMAT = "fmstore.snapshot"
#: Checksum chunk: a partial read (resharding) verifies just the chunks it touches.
CHUNK_SIZE = 16 << 20
#: 2: codecs as {"name", "configuration"} entries (1: chains of strings, still read).
VERSION = 2
READS = (1, 2)
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{10})$")
_FILE = re.compile(r"^step-(\d{10})/[A-Za-z0-9._-]+\.safetensors$")


class ManifestError(FmstoreError):
    """A manifest that is malformed, of an unknown version, or names a file it may not."""


def step_dir(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**10:
        raise FmstoreError(f"step must be an int in [0, 1e10), got {step!r}")
    return f"step-{step:010d}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


@dataclass
class Shard:
    """One saved piece of a tensor and where its bytes are."""

    offsets: list[int]  # where the piece starts in the global tensor, per dimension
    lengths: list[int]  # its extent per dimension
    file: str  # relative to the checkpoint root: "step-XXXXXXXXXX/<name>.safetensors"
    begin: int  # byte range in the file
    end: int
    checksum: str  # "xxh3_128:<hex>" over the chunk digests: equal iff every chunk is
    codec: list[dict[str, Any]] = field(default_factory=list)  # [] raw, else [{"name", "configuration"}]
    chunk_size: int = 0  # the original bytes are checked in chunks of this many bytes...
    chunks: list[str] = field(default_factory=list)  # ...each with its xxh3_128 hex digest


@dataclass
class TensorEntry:
    dtype: str
    shape: list[int]
    shards: list[Shard]


@dataclass
class Manifest:
    step: int
    world_size: int
    tensors: dict[str, TensorEntry]
    tree: dict[str, Any]
    files: dict[str, int]  # files this snapshot wrote -> size in bytes
    created: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> Manifest:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: manifest is not JSON ({e})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ManifestError(f"{where}: not an fmstore snapshot manifest")
        version = body.get("version")
        if version not in READS:
            raise ManifestError(
                f"{where}: manifest version {version!r}; this fmstore reads versions {list(READS)}"
            )
        try:
            tensors = {
                name: TensorEntry(
                    e["dtype"], list(e["shape"]), [_shard(s, version, where) for s in e["shards"]]
                )
                for name, e in body["tensors"].items()
            }
            m = cls(
                step=int(body["step"]),
                world_size=int(body["world_size"]),
                tensors=tensors,
                tree=body["tree"],
                files={str(k): int(v) for k, v in body["files"].items()},
                created=float(body.get("created", 0.0)),
                meta=dict(body.get("meta", {})),
            )
        except CodecConfigError as e:
            raise ManifestError(str(e)) from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        """Every file a shard names is a shard file of this or an earlier snapshot of the root."""
        for name, entry in self.tensors.items():
            for s in entry.shards:
                m = _FILE.match(s.file) if isinstance(s.file, str) else None
                if m is None or int(m.group(1)) > self.step:
                    raise ManifestError(
                        f"{where}: tensor {name!r} names file {s.file!r}, which is not a shard file "
                        "of this snapshot or an earlier one under the same root"
                    )
                if not (0 <= s.begin <= s.end):
                    raise ManifestError(f"{where}: tensor {name!r} has a bad byte range {s.begin}..{s.end}")
                if len(s.offsets) != len(entry.shape) or len(s.lengths) != len(entry.shape):
                    raise ManifestError(f"{where}: tensor {name!r}: shard rank does not match shape")
                if any(o < 0 or n < 0 or o + n > g for o, n, g in zip(s.offsets, s.lengths, entry.shape)):
                    raise ManifestError(f"{where}: tensor {name!r}: a shard lies outside shape {entry.shape}")
                if len(s.codec) > 1:
                    raise ManifestError(f"{where}: tensor {name!r}: a pipeline of {len(s.codec)} codecs")
                if s.codec:
                    try:
                        codec = registry.get(s.codec[0], f"{where}: tensor {name!r}")
                        codec.check(dtype_itemsize(entry.dtype), f"{where}: tensor {name!r}")
                    except CodecConfigError as e:
                        raise ManifestError(str(e)) from None

    def referenced_files(self) -> set[str]:
        return {s.file for e in self.tensors.values() for s in e.shards}


def _shard(body: dict[str, Any], version: int, where: str) -> Shard:
    shard = Shard(**body)
    if version == 1:  # chains of strings: ["planes4", "zstd"] and the like
        shard.codec = registry.from_legacy(list(shard.codec), where)
    return shard


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a manifest dtype name (``float32``)."""
    from ..blob import dtype_from_name

    try:
        return dtype_from_name(dtype).itemsize
    except CorruptBlobError:
        raise ManifestError(f"unknown dtype {dtype!r}") from None
