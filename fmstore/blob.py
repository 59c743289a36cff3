"""What a stored blob is: a tensor or bytes, and its on-disk form, a one-entry safetensors file.

Every tier stores the same two kinds of value.  Memory tiers keep them as tensors; file and
object tiers keep them as a safetensors file holding one entry named ``data``, so any
safetensors tool can open a stored blob.  The ``__metadata__`` records the exact torch dtype
and shape (safetensors has no code for some torch dtypes, e.g. complex or float8 *fnuz*; those
are stored as ``U8`` bytes and rebuilt from the metadata).  No pickle anywhere.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass

import torch

from .errors import CorruptBlobError, FmstoreError
from .storage.files import byte_view  # torch-free, for the storage layer; re-exported here

#: What a tier stores and gives back.
Value = torch.Tensor | bytes

FORMAT_VERSION = "1"
ENTRY = "data"
#: A header longer than this is refused rather than parsed (safetensors uses the same cap).
MAX_HEADER = 100 * 1024 * 1024

# safetensors dtype codes for the torch dtypes it knows.
SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
}
_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES_BY_NAME[name]
    except KeyError:
        raise CorruptBlobError(f"unknown dtype {name!r} in blob header") from None


@dataclass(frozen=True)
class BlobInfo:
    """What a blob is without its bytes: kind, dtype, shape and size of the data."""

    kind: str  # "tensor" or "bytes"
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @property
    def is_bytes(self) -> bool:
        return self.kind == "bytes"


def describe(value: object, *, key: str = "?") -> BlobInfo:
    """The :class:`BlobInfo` of a value a caller wants to store; refuses what cannot be stored."""
    if isinstance(value, torch.Tensor):
        if value.is_quantized or value.is_sparse or value.layout != torch.strided:
            raise FmstoreError(
                f"cannot store {key!r}: only dense strided tensors are supported "
                f"(got layout={value.layout}, quantized={value.is_quantized})"
            )
        if value.device.type == "meta":
            raise FmstoreError(f"cannot store {key!r}: it is a meta tensor with no data")
        return BlobInfo("tensor", value.dtype, tuple(value.shape), value.numel() * value.element_size())
    if isinstance(value, (bytes, bytearray, memoryview)):
        n = memoryview(value).nbytes
        return BlobInfo("bytes", torch.uint8, (n,), n)
    raise FmstoreError(f"cannot store {key!r}: values are torch tensors or bytes, not {type(value).__name__}")


def as_bytes_tensor(value: Value) -> torch.Tensor:
    """A flat contiguous uint8 view of a value's data (a copy only when it must be made)."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        return t.reshape(-1).view(torch.uint8)
    mv = memoryview(value).cast("B")
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        # frombuffer warns that bytes are read-only; callers only ever read from this view.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv, dtype=torch.uint8)


def as_memoryview(value: Value) -> memoryview:
    """A flat byte view of a value's data in host memory (device tensors are copied to host)."""
    if isinstance(value, torch.Tensor):
        t = as_bytes_tensor(value)
        if t.device.type != "cpu":
            t = t.cpu()
        return memoryview(t.numpy()) if t.numel() else memoryview(b"")
    return byte_view(value)


def from_bytes_tensor(buf: torch.Tensor, info: BlobInfo) -> Value:
    """Rebuild the value from a flat uint8 tensor holding exactly its data."""
    if info.is_bytes:
        return buf.cpu().numpy().tobytes()
    return buf.view(info.dtype).reshape(info.shape)


# ---------------------------------------------------------------- the file form (safetensors)


def encode_header(info: BlobInfo) -> bytes:
    """The safetensors prefix (8-byte length + JSON, space-padded to 8 bytes) for a blob."""
    code = SAFETENSORS_CODES.get(info.dtype) if not info.is_bytes else "U8"
    shape = list(info.shape) if code is not None else [info.nbytes]
    meta = {
        "fmstore": FORMAT_VERSION,
        "kind": info.kind,
        "dtype": dtype_name(info.dtype),
        "shape": json.dumps(list(info.shape)),
    }
    body = {
        "__metadata__": meta,
        ENTRY: {"dtype": code or "U8", "shape": shape, "data_offsets": [0, info.nbytes]},
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def header_length(prefix: bytes, *, name: str) -> int:
    """Total header size (length field + JSON) given at least the first 8 bytes of a blob."""
    if len(prefix) < 8:
        raise CorruptBlobError(f"{name}: truncated blob ({len(prefix)} bytes, no header)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER:
        raise CorruptBlobError(f"{name}: header length {n} is implausible; not an fmstore blob")
    return 8 + n


def decode_header(header: bytes, *, name: str) -> BlobInfo:
    """Parse and validate a blob header (the bytes up to the data); errors name the blob."""
    try:
        body = json.loads(header[8:].decode())
        meta = body["__metadata__"]
        entry = body[ENTRY]
        start, end = entry["data_offsets"]
        kind = meta["kind"]
        dtype = dtype_from_name(meta["dtype"])
        shape = tuple(int(s) for s in json.loads(meta["shape"]))
    except CorruptBlobError as e:
        raise CorruptBlobError(f"{name}: {e}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptBlobError(f"{name}: malformed blob header ({type(e).__name__}: {e})") from None
    if kind not in ("tensor", "bytes") or start != 0 or end < 0:
        raise CorruptBlobError(f"{name}: malformed blob header (kind={kind!r}, offsets={start},{end})")
    numel = 1
    for s in shape:
        numel *= s
    expected = numel * torch.empty(0, dtype=dtype).element_size()
    if expected != end:
        raise CorruptBlobError(
            f"{name}: header says {end} data bytes but dtype {dtype} and shape {list(shape)} need {expected}"
        )
    return BlobInfo(kind, dtype, shape, end)
