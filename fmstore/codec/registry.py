"""Codecs by name: what a manifest records of how a shard's bytes are coded, and how to undo it.

A manifest stores a shard's codec as ``{"name": ..., "configuration": {...}}`` (zarr v3's
convention); :func:`get` turns that into a :class:`Codec` object, and an unknown name or a bad
configuration is a manifest error.  Each codec declares:

- ``checksum``: what the manifest's checksum of a shard coded with it covers.  ``"chunks"``:
  the decoded bytes, in ``chunk_size`` chunks (the reader hashes them after decoding);
  ``"stream"``: the codec's stream carries its own per-chunk checks, and the manifest holds a
  digest of those (the decoder verifies as it goes, the reader compares the digest first).
- ``devices``: where it decodes (``"cpu"``, ``"cuda"``).
- ``lossy``: whether a load gives back other values than were saved.

One name per format:

=============== ===================================================== ===========
name            format                                                configuration
=============== ===================================================== ===========
``planes-zstd`` FMC1: byte planes, each 1 MiB chunk zstd or raw        ``width``
``fmhs``        FMHS: byte planes, per-chunk canonical Huffman or raw  ``width``
``int8-absmax`` int8 codes then float32 scales, one per block          ``block``
=============== ===================================================== ===========

A writer's ``codec=`` option (``Checkpointer``, the Lightning and DCP integrations) is read
here too: :func:`choose` resolves it (``"auto"``, a lossless codec's name above, or an alias of
one, :data:`ALIASES`), :func:`lossless` gives the codec a CPU encode then uses, and
:func:`gpu_codec` the one a GPU encode while staging writes.

Manifests of version 1 recorded chains as lists of strings (``["planes4", "zstd"]``,
``["planes2", "huff"]``, ``["int8-absmax256"]``); :func:`from_legacy` reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CodecConfigError, ConfigError, CorruptBlobError

if TYPE_CHECKING:  # torch is imported where a codec runs: reading a manifest (fmstore ls) needs none
    import torch


class Codec:
    """A registered codec, configured.  Subclasses set the class attributes and implement
    :meth:`decode` (and :meth:`encode` where fmstore writes the format on the CPU)."""

    name: ClassVar[str]
    checksum: ClassVar[str] = "chunks"
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    lossy: ClassVar[bool] = False

    def configuration(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "configuration": self.configuration()}

    def check(self, itemsize: int, where: str) -> None:
        """That this configuration fits a tensor of ``itemsize``-byte elements."""

    #: The most decoded bytes one coded byte of this format can give: a manifest claiming more
    #: is refused before a load allocates the decoded size.
    max_ratio: ClassVar[int] = 1

    def check_sizes(self, coded: int, decoded: int, itemsize: int, where: str) -> None:
        """That ``coded`` stored bytes can decode to ``decoded`` bytes of ``itemsize``-byte
        elements in this format (a bound, or the exact size where the format fixes it)."""
        if coded <= 0 or decoded > coded * self.max_ratio:
            raise CodecConfigError(
                f"{where}: {coded} bytes coded with {self!r} cannot decode to {decoded} bytes "
                f"(at most {self.max_ratio} per coded byte)"
            )

    def encode(
        self, data: torch.Tensor, *, dtype: torch.dtype, pool: Executor | None = None
    ) -> list[bytes | memoryview]:
        """The coded form of flat uint8 CPU ``data`` (a tensor of ``dtype``), as segments."""
        raise NotImplementedError

    def decode(
        self, blob: torch.Tensor, out: torch.Tensor, *, dtype: torch.dtype, name: str, pool: Executor | None
    ) -> None:
        """Decode uint8 CPU ``blob`` into flat uint8 ``out`` (CPU, or CUDA where the codec
        decodes there); damage raises :class:`~fmstore.errors.CorruptBlobError` naming it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.configuration().items())
        return f"{self.name}({cfg})"

    @property
    def label(self) -> str:
        """A short name for listings: ``fmhs/2``, ``planes-zstd/4``, ``int8-absmax/256``."""
        values = "/".join(str(v) for v in self.configuration().values())
        return f"{self.name}/{values}" if values else self.name


_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` known under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise CodecConfigError(f"codec {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(spec: dict[str, Any] | Codec, where: str = "") -> Codec:
    """The codec a manifest entry names (``{"name", "configuration"}``)."""
    if isinstance(spec, Codec):
        return spec
    at = f"{where}: " if where else ""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise CodecConfigError(f"{at}a codec must be {{'name': ..., 'configuration': ...}}, got {spec!r}")
    factory = _REGISTRY.get(spec["name"])
    if factory is None:
        raise CodecConfigError(f"{at}unknown codec {spec['name']!r} (this fmstore knows {names()})")
    cfg = spec.get("configuration", {})
    if not isinstance(cfg, dict):
        raise CodecConfigError(f"{at}codec {spec['name']!r}: configuration must be an object, got {cfg!r}")
    try:
        return factory(**cfg)
    except (TypeError, ValueError) as e:
        raise CodecConfigError(f"{at}codec {spec['name']!r}: bad configuration {cfg!r} ({e})") from None


#: ``codec="auto"``: the writer picks per tensor (FMHS encoded on the GPU for large CUDA tensors
#: where the kernels load, ``planes-zstd`` for the rest).
AUTO = "auto"
#: Earlier names of codecs, accepted wherever a writer's ``codec=`` is.
ALIASES = {"zstd": "planes-zstd", "huffman": "fmhs"}


def choices() -> list[str]:
    """What a writer's ``codec=`` names (aliases aside): ``"auto"`` and each registered
    lossless byte-plane codec."""
    return [AUTO] + [
        n for n, f in _REGISTRY.items() if isinstance(f, type) and issubclass(f, _ByteWidth) and not f.lossy
    ]


def choose(codec: str) -> str:
    """The codec a writer's ``codec=`` value means: ``"auto"`` or a registered codec's name,
    an alias resolved; anything else is a :class:`~fmstore.errors.ConfigError`."""
    name = ALIASES.get(codec, codec) if isinstance(codec, str) else codec
    if name not in choices():
        raise ConfigError(
            f"codec must be one of {choices()} (or an earlier name: {list(ALIASES)}), got {codec!r}"
        )
    return name


def lossless(choice: str, width: int) -> Codec:
    """The codec a writer with ``choice`` (from :func:`choose`) encodes ``width``-byte elements
    with on the CPU (``"auto"``: ``planes-zstd``)."""
    return _REGISTRY[PlanesZstd.name if choice == AUTO else choice](width)


def encodes_on_gpu(choice: str) -> bool:
    """Whether a writer with ``choice`` may encode CUDA tensors on their GPU while staging."""
    return choice in (AUTO, Fmhs.name)


def gpu_codec(width: int) -> Codec:
    """The codec of a tensor encoded on its GPU while staging: FMHS, what the kernels write."""
    return Fmhs(width)


def from_legacy(chain: list[str], where: str = "") -> list[dict[str, Any]]:
    """A version-1 manifest's chain of strings as codec entries."""
    at = f"{where}: " if where else ""
    if not chain:
        return []
    if len(chain) == 2 and chain[0].startswith("planes") and chain[1] in ("zstd", "huff"):
        try:
            width = int(chain[0][len("planes") :])
        except ValueError:
            raise CodecConfigError(f"{at}unknown codec chain {chain}") from None
        return [{"name": "planes-zstd" if chain[1] == "zstd" else "fmhs", "configuration": {"width": width}}]
    if chain == ["int8-absmax256"]:
        return [{"name": "int8-absmax", "configuration": {"block": 256}}]
    raise CodecConfigError(f"{at}unknown codec chain {chain}")


class _ByteWidth(Codec):
    """A codec of byte planes: configured by the element width it splits (1, 2, 4, 8, 16 bytes,
    which must be the tensor's)."""

    def __init__(self, width: int) -> None:
        if not isinstance(width, int) or isinstance(width, bool) or width not in (1, 2, 4, 8, 16):
            raise ValueError("width must be one of [1, 2, 4, 8, 16]")
        self.width = width

    def configuration(self) -> dict[str, Any]:
        return {"width": self.width}

    def check(self, itemsize: int, where: str) -> None:
        if self.width != itemsize:
            raise CodecConfigError(f"{where}: codec {self!r} does not fit {itemsize}-byte elements")


@register
class PlanesZstd(_ByteWidth):
    """The CPU chain (:mod:`fmstore.codec.chain`): byte planes, each chunk zstd or raw."""

    name = "planes-zstd"
    # A zstd block decodes to at most 128 KiB and takes at least 4 bytes (an RLE block).
    max_ratio = 32768

    def encode(
        self, data: torch.Tensor, *, dtype: torch.dtype, pool: Executor | None = None
    ) -> list[bytes | memoryview]:
        from .chain import encode

        return encode(data, self.width, pool=pool).segments

    def decode(
        self, blob: torch.Tensor, out: torch.Tensor, *, dtype: torch.dtype, name: str, pool: Executor | None
    ) -> None:
        from .chain import decode

        decode(memoryview(blob.numpy()), out, pool=pool, name=name)


@register
class Fmhs(_ByteWidth):
    """FMHS (:mod:`fmstore.codec.huffman`): what the GPU encoder writes; decodes on a GPU where
    the kernels load, else on the CPU."""

    name = "fmhs"
    checksum = "stream"
    devices = frozenset({"cpu", "cuda"})
    # A chunk is raw or Huffman-coded with codes of at least one bit: at most 8 symbols a byte.
    max_ratio = 8

    def encode(
        self, data: torch.Tensor, *, dtype: torch.dtype, pool: Executor | None = None
    ) -> list[bytes | memoryview]:
        from .huffman import encode

        return [encode(data, self.width, pool=pool)]

    @staticmethod
    def digest(stream: Any, nbytes: int, name: str) -> str:
        """The manifest checksum of a stream: a digest of its chunk checks."""
        from .huffman import stream_digest

        return stream_digest(stream, nbytes, name)

    def decode(
        self, blob: torch.Tensor, out: torch.Tensor, *, dtype: torch.dtype, name: str, pool: Executor | None
    ) -> None:
        import torch

        from . import gpu, huffman

        if "cuda" in self.devices and gpu.kernels_load():
            dev = (
                out
                if out.device.type == "cuda"
                else torch.empty(out.numel(), dtype=torch.uint8, device="cuda")
            )
            try:
                gpu.huff_decode(blob.to(dev.device), dev, self.width, name=name)
            except torch.cuda.OutOfMemoryError:  # no room for the planes: the CPU decoder below
                pass
            else:
                if dev is not out:
                    out.copy_(dev)
                return
        host = out if out.device.type == "cpu" else torch.empty(out.numel(), dtype=torch.uint8)
        huffman.decode(blob.numpy(), host, name=name, pool=pool)
        if host is not out:
            out.copy_(host)


@register
class Int8Absmax(Codec):
    """Blockwise int8 (lossy): ``n`` int8 codes, then one float32 scale (absmax / 127) per
    ``block`` values.  The manifest's checksums are of the dequantized bytes a load returns."""

    name = "int8-absmax"
    lossy = True

    def __init__(self, block: int) -> None:
        from .quant import BLOCK

        if block != BLOCK:
            raise ValueError(f"block must be {BLOCK}")
        self.block = block

    def configuration(self) -> dict[str, Any]:
        return {"block": self.block}

    def check(self, itemsize: int, where: str) -> None:
        if itemsize not in (2, 4):
            raise CodecConfigError(f"{where}: codec {self!r} stores float tensors only")

    def check_sizes(self, coded: int, decoded: int, itemsize: int, where: str) -> None:
        n = decoded // itemsize  # the format's size is exact: a code per value, a scale per block
        want = n + 4 * -(-n // self.block)
        if coded != want:
            raise CodecConfigError(
                f"{where}: {coded} bytes coded with {self!r}, {want} expected for {n} values"
            )

    def encode(
        self, data: torch.Tensor, *, dtype: torch.dtype, pool: Executor | None = None
    ) -> list[bytes | memoryview]:
        import torch

        from .quant import quantize

        codes, scales = quantize(data.view(dtype).to(torch.float32), self.block)
        return [memoryview(codes.numpy()).cast("B"), memoryview(scales.numpy()).cast("B")]

    def decode(
        self, blob: torch.Tensor, out: torch.Tensor, *, dtype: torch.dtype, name: str, pool: Executor | None
    ) -> None:
        import torch

        from ..blob import as_bytes_tensor
        from .quant import dequantize

        n = out.numel() // torch.empty(0, dtype=dtype).element_size()
        nblocks = -(-n // self.block)
        if blob.numel() != n + 4 * nblocks:
            raise CorruptBlobError(
                f"tensor {name!r}: int8 blob of {blob.numel()} bytes, expected {n + 4 * nblocks}"
            )
        codes = blob[:n].view(torch.int8)
        scales = blob[n:].clone().view(torch.float32)  # at an offset of n bytes: not 4-byte aligned
        out.copy_(as_bytes_tensor(dequantize(codes, scales, self.block).to(dtype)))
