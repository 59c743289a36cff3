"""The GPU codec chain's blob format (``FMH1``) and its CPU reference: byte planes, then per
chunk either a canonical Huffman code or the raw bytes.

zstd, the CPU chain's entropy stage, cannot be reproduced byte for byte on a GPU, so the GPU
chain has its own format, designed for thousands of threads: every chunk carries its own
length-limited Huffman table and is cut into sub-blocks of 1024 symbols whose bit lengths are
stored, so each GPU thread encodes or decodes one sub-block on its own.  This module writes
and reads exactly the bytes of ``kernels/huffman.cu`` (``tests/test_kernels.py`` compares
them on a CUDA machine) and is what decodes an ``FMH1`` blob where no GPU is present.

A tensor's bytes are cut into segments (:func:`segments`: 256 KiB, doubling up to 16 MiB),
each its own blob, so the GPU copies one to host memory while it encodes the next.  The
stream is ``b"FMHS" | u32 segments | u64 blob length per segment | the blobs``.

Blob layout, little-endian::

    header (32 B):  b"FMH1" | u32 version=1 | u64 nbytes | u32 width | u32 nchunks
                    | u32 flags (0) | u32 chunk symbols (CHUNK)
    chunk table:    per chunk, u64 payload offset | u32 stored bytes | u32 mode (0 raw, 1 huff)
                    | u64 check of the chunk's symbols
    payloads:       in chunk order, each a multiple of 4 bytes, 4-aligned

A blob with any flag set does not decode (a :class:`CodecError`): bit 0 marked an XOR delta
against an earlier snapshot, which earlier versions could write and this one neither writes nor
reads.

Chunks are plane-major: chunk ``c`` is plane ``c // per_plane``, symbols
``[(c % per_plane) * CHUNK, ...)`` of that plane.  A raw payload is the chunk's bytes, zero
padded to 4.  A huff payload is the 256 code lengths as nibbles (128 B; symbol ``2k`` in the
low nibble), the bit length of each sub-block (u16, zero padded to 4 bytes), then the bit
stream, LSB first, zero padded to whole u32 words.  Huff is chosen only when it saves at
least 2% over raw, from the exact sizes.  Codes are canonical (ordered by length, then
symbol) and at most ``MAX_LEN`` bits; the lengths come from a two-queue Huffman construction
over the symbols sorted by (count, symbol); while the longest code has ``MAX_LEN + k`` bits,
the counts become ``c >> k | 1`` and the construction is redone; a chunk holding every byte value,
none more than twice as common as another, is raw without a code being built.  Every step is integer and
deterministic, so both implementations give the same bytes.

A chunk's check is the wrapping sum over its symbols, read as little-endian u32 words ``w_j``
(zero padded), of ``splitmix64(w_j | j << 32)``: order-free, so GPU blocks add their parts
in any order, and a decode that does not reproduce it names the damaged chunk.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent.futures import Executor
from types import ModuleType

import numpy as np
import torch

from .chain import CodecError

STREAM_MAGIC = b"FMHS"
MAGIC = b"FMH1"
#: A tensor is cut into segments, each its own FMH1 blob: the GPU copies one segment to host
#: memory while it encodes the next.  Small first, so the copy engine starts early.
FIRST_SEGMENT = 256 << 10
MAX_SEGMENT = 16 << 20
#: Element widths the chain takes (every segment boundary is a multiple of each).
WIDTHS = (1, 2, 4, 8, 16)
VERSION = 1
HEADER = 32
ENTRY = 24
#: Symbols (bytes of one plane) per chunk: each chunk has its own code table.
CHUNK = 1 << 17
#: Symbols per sub-block: the unit one GPU thread encodes or decodes.
SUB = 1024
#: Longest code: the decode table has 2**MAX_LEN entries (8 KiB in shared memory).
MAX_LEN = 12
RAW, HUFF = 0, 1


def _align4(n: int) -> int:
    return (n + 3) & ~3


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length (bits) per byte value from its count; 0 for absent values."""
    w = [int(c) for c in counts]
    lens = np.zeros(256, dtype=np.uint8)
    while True:
        syms = sorted((s for s in range(256) if w[s]), key=lambda s: (w[s], s))
        n = len(syms)
        if n == 0:
            return lens
        if n == 1:
            lens[syms[0]] = 1
            return lens
        if n == 256 and w[syms[-1]] <= w[syms[0]] + w[syms[1]]:
            # Every leaf pairs before any inner node: a balanced tree, all codes 8 bits (what
            # the construction below gives, found without it: the mantissa planes' case).
            lens[:] = 8
            return lens
        weight = [w[s] for s in syms] + [0] * (n - 1)
        parent = [0] * (2 * n - 1)
        leaf, inner, nxt = 0, n, n
        for _ in range(n - 1):
            picked = []
            for _ in range(2):
                # A leaf wins ties with an inner node: the rule both implementations follow.
                if leaf < n and (inner >= nxt or weight[leaf] <= weight[inner]):
                    picked.append(leaf)
                    leaf += 1
                else:
                    picked.append(inner)
                    inner += 1
            weight[nxt] = weight[picked[0]] + weight[picked[1]]
            parent[picked[0]] = parent[picked[1]] = nxt
            nxt += 1
        depth = [0] * (2 * n - 1)
        for node in range(2 * n - 3, -1, -1):  # parents come after their children
            depth[node] = depth[parent[node]] + 1
        deepest = max(depth[:n])
        if deepest <= MAX_LEN:
            for i, s in enumerate(syms):
                lens[s] = depth[i]
            return lens
        # Flatten the counts by as many bits as the code is too deep, and build again.
        shift = deepest - MAX_LEN
        w = [(x >> shift) | 1 if x else 0 for x in w]


def canonical_codes(lens: np.ndarray) -> np.ndarray:
    """Each value's code, bit-reversed for an LSB-first stream (uint64; 0 where absent)."""
    codes = np.zeros(256, dtype=np.uint64)
    code = 0
    for length in range(1, MAX_LEN + 1):
        for s in np.flatnonzero(lens == length):
            codes[s] = int(f"{code:0{length}b}"[::-1], 2)
            code += 1
        code <<= 1
    return codes


def _pack_lengths(lens: np.ndarray) -> bytes:
    return (lens[0::2] | (lens[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_lengths(raw: np.ndarray) -> np.ndarray:
    out = np.empty(256, dtype=np.uint8)
    out[0::2] = raw & 15
    out[1::2] = raw >> 4
    return out


def chunk_check(sym: np.ndarray) -> int:
    """The check of one chunk's symbols (see the module docstring)."""
    pad = np.zeros(_align4(sym.size), dtype=np.uint8)
    pad[: sym.size] = sym
    z = pad.view("<u4").astype(np.uint64) | (np.arange(pad.size // 4, dtype=np.uint64) << np.uint64(32))
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return int(z.sum(dtype=np.uint64))


def _huff_payload(sym: np.ndarray, counts: np.ndarray) -> tuple[int, bytes | None]:
    """(stored size, payload or None when raw is chosen) of one chunk."""
    m = sym.size
    lo, hi = int(counts.min()), int(counts.max())
    if lo > 0 and hi <= 2 * lo:
        # Every value present, none more than twice as common as another: the entropy is at
        # least 7.918 bits, so no code saves 2%.  Raw, without building one (the GPU's rule).
        return _align4(m), None
    lens = code_lengths(counts)
    bits = int((counts.astype(np.int64) * lens).sum())
    nsub = -(-m // SUB)
    stored = 128 + _align4(2 * nsub) + 4 * (-(-bits // 32))
    if stored * 50 >= m * 49:  # saves under 2%: raw
        return _align4(m), None
    ln = lens[sym].astype(np.int64)
    sub_bits = np.add.reduceat(ln, np.arange(0, m, SUB)).astype(np.uint16)
    pos = np.cumsum(ln) - ln
    cd = canonical_codes(lens)[sym]
    word = pos >> 6
    sh = (pos & 63).astype(np.uint64)
    lo = cd << sh
    hi = (cd >> (np.uint64(63) - sh)) >> np.uint64(1)  # the part past the word (0 if none)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(word)) + 1))
    out = np.zeros(int(word[-1]) + 2, dtype=np.uint64)
    first = word[starts]
    # Codes in one word have disjoint bits, so a sum is their OR.
    out[first] += np.add.reduceat(lo, starts)
    out[first + 1] += np.add.reduceat(hi, starts)
    stream = out.view(np.uint8)[: 4 * (-(-bits // 32))]
    sub = sub_bits.tobytes()
    payload = _pack_lengths(lens) + sub + b"\0" * (_align4(len(sub)) - len(sub)) + stream.tobytes()
    assert len(payload) == stored
    return stored, payload


def _chunks(n: int, width: int) -> Iterator[tuple[int, int, int]]:
    """(plane, first symbol, symbols) of each chunk, in blob order."""
    for p in range(width):
        for a in range(0, n, CHUNK):
            yield p, a, min(CHUNK, n - a)


def segments(nbytes: int) -> list[tuple[int, int]]:
    """(begin, end) byte ranges of a tensor's segments: 256 KiB, then doubling to 16 MiB."""
    out, a, size = [], 0, FIRST_SEGMENT
    while a < nbytes:
        out.append((a, min(nbytes, a + size)))
        a, size = out[-1][1], min(2 * size, MAX_SEGMENT)
    return out


def encode(data: torch.Tensor, width: int, *, pool: Executor | None = None) -> bytes:
    """The ``FMHS`` stream of flat uint8 CPU ``data`` of ``width``-byte elements: exactly the
    bytes the GPU encoder writes."""
    if width not in WIDTHS or data.numel() % width:
        raise ValueError(f"{data.numel()} bytes are not a whole number of {width}-byte elements")
    blobs = [_encode_blob(data[a:b], width, pool) for a, b in segments(data.numel())]
    head = STREAM_MAGIC + struct.pack("<I", len(blobs)) + b"".join(struct.pack("<Q", len(b)) for b in blobs)
    return head + b"".join(blobs)


def _encode_blob(data: torch.Tensor, width: int, pool: Executor | None) -> bytes:
    rows = data.numpy().reshape(-1, width)
    n = rows.shape[0]
    jobs = list(_chunks(n, width))

    def one(job: tuple[int, int, int]) -> tuple[int, bytes | None, np.ndarray, int]:
        p, a, m = job
        sym = np.ascontiguousarray(rows[a : a + m, p])
        stored, payload = _huff_payload(sym, np.bincount(sym, minlength=256))
        return stored, payload, sym, chunk_check(sym)

    results = list(pool.map(one, jobs)) if pool else [one(j) for j in jobs]
    table = bytearray()
    parts: list[bytes] = []
    offset = 0
    for stored, payload, sym, check in results:
        table += struct.pack("<QIIQ", offset, stored, RAW if payload is None else HUFF, check)
        if payload is None:
            payload = sym.tobytes() + b"\0" * (stored - sym.size)
        parts.append(payload)
        offset += stored
    head = struct.pack("<4sIQIIII", MAGIC, VERSION, data.numel(), width, len(jobs), 0, CHUNK)
    return head + bytes(table) + b"".join(parts)


def parse_header(raw: np.ndarray, name: str = "") -> tuple[int, int, int, int]:
    """(nbytes, width, nchunks, flags) from a blob's first ``HEADER`` bytes."""
    where = f"tensor {name!r}: " if name else ""
    if raw.size < HEADER or raw[:4].tobytes() != MAGIC:
        raise CodecError(f"{where}not an fmstore FMH1 blob (bad magic)")
    _, version, nbytes, width, nchunks, flags, chunk = struct.unpack("<4sIQIIII", raw[:HEADER].tobytes())
    if version != VERSION or chunk != CHUNK or width < 1 or nbytes % width:
        raise CodecError(f"{where}FMH1 version {version} / chunk {chunk} / width {width} is not supported")
    if nchunks != width * -(-(nbytes // width) // CHUNK):
        raise CodecError(f"{where}FMH1 header lists {nchunks} chunks for {nbytes} bytes (damaged)")
    if flags:
        raise CodecError(
            f"{where}FMH1 flags {flags:#x} are not supported (bit 0 marks an XOR delta against an "
            "earlier snapshot, which this fmstore no longer writes or reads)"
        )
    return int(nbytes), int(width), int(nchunks), int(flags)


def read_header(
    blob: memoryview | bytes | np.ndarray, name: str = ""
) -> tuple[int, int, int, int, np.ndarray]:
    """(nbytes, width, flags, payload start, chunk table: (n, 4) int64 of offset, stored,
    mode, check with its bits as a signed value)."""
    raw = np.frombuffer(blob, dtype=np.uint8) if not isinstance(blob, np.ndarray) else blob
    nbytes, width, nchunks, flags = parse_header(raw, name)
    start = HEADER + ENTRY * nchunks
    if raw.size < start:
        where = f"tensor {name!r}: " if name else ""
        raise CodecError(f"{where}FMH1 blob is truncated inside its chunk table")
    t = raw[HEADER:start].view(np.uint32).reshape(nchunks, 6).astype(np.int64)
    table = np.stack([t[:, 0] | (t[:, 1] << 32), t[:, 2], t[:, 3], t[:, 4] | (t[:, 5] << 32)], axis=1)
    return nbytes, width, flags, start, table


def read_directory(
    stream: np.ndarray, nbytes: int, name: str = "", *, total: int | None = None
) -> list[tuple[int, int, int, int]]:
    """(begin, end, blob offset, blob length) of each segment of an ``FMHS`` stream that
    holds ``nbytes`` bytes (``stream`` may be just its directory when ``total``, the
    stream's length, is given)."""
    where = f"tensor {name!r}: " if name else ""
    segs = segments(nbytes)
    head = 8 + 8 * len(segs)
    if stream.size < head or stream[:4].tobytes() != STREAM_MAGIC:
        raise CodecError(f"{where}not an fmstore FMHS stream (bad magic or truncated)")
    (count,) = struct.unpack("<I", stream[4:8].tobytes())
    if count != len(segs):
        raise CodecError(f"{where}FMHS stream has {count} segments, {len(segs)} expected for {nbytes} bytes")
    sizes = [int(v) for v in stream[8:head].view("<u8")]
    out, at = [], head
    for (a, b), size in zip(segs, sizes):
        out.append((a, b, at, size))
        at += size
    length = stream.size if total is None else total
    if at != length:
        raise CodecError(f"{where}FMHS stream is {length} bytes, its directory describes {at} (truncated?)")
    return out


def stream_digest(stream: np.ndarray | bytes | memoryview, nbytes: int, name: str = "") -> str:
    """The checksum a manifest records for an FMHS-coded tensor: xxh3-128 over every chunk's
    check (a function of the original bytes alone), in order.  A decode proves each chunk
    against its check; this ties the checks to the manifest."""
    import xxhash

    raw = stream if isinstance(stream, np.ndarray) else np.frombuffer(stream, dtype=np.uint8)
    h = xxhash.xxh3_128()
    h.update(struct.pack("<Q", nbytes))
    for _, _, at, size in read_directory(raw, nbytes, name):
        _, _, _, _, table = read_header(raw[at : at + size], name)
        h.update(table[:, 3].astype("<i8").tobytes())
    return "fmh1:" + h.hexdigest()


def decode(
    blob: memoryview | bytes | np.ndarray,
    out: torch.Tensor,
    *,
    name: str = "",
    pool: Executor | None = None,
) -> torch.Tensor:
    """Decode an ``FMHS`` stream into flat uint8 CPU ``out``; a damaged chunk is named.
    Where the compiled decoder is built (``native.py``), every segment decodes there, its
    row blocks spread over ``pool`` (on the calling thread without one); otherwise the numpy
    decoder, the reference, does it."""
    from . import native

    stream = blob if isinstance(blob, np.ndarray) else np.frombuffer(blob, dtype=np.uint8)
    directory = read_directory(stream, out.numel(), name)
    lib = native.load()  # the compiled decoder; None: the numpy one
    if lib is not None:
        _decode_native(lib, stream, directory, out, name, pool)
    else:
        for i, (a, b, at, size) in enumerate(directory):
            _decode_blob(stream[at : at + size], out[a:b], name, i, pool)
    return out


def _blob_header(
    raw: np.ndarray, out: torch.Tensor, name: str, seg: int
) -> tuple[int, int, int, int, np.ndarray]:
    """read_header's answer for segment ``seg``'s blob, checked against its target."""
    nbytes, width, flags, start, table = read_header(raw, name)
    where = (f"tensor {name!r}: " if name else "") + f"segment {seg}, "
    if nbytes != out.numel():
        raise CodecError(f"{where}encoded {nbytes} bytes, the target holds {out.numel()}")
    return nbytes, width, flags, start, table


#: Output bytes per call of the compiled decoder, about: large enough that the call's cost
#: (~10 us) is small, small enough that two threads share a tensor of a few MB evenly.
NATIVE_JOB_BYTES = 1 << 20


def _decode_native(
    lib: ModuleType,
    stream: np.ndarray,
    directory: list[tuple[int, int, int, int]],
    out: torch.Tensor,
    name: str,
    pool: Executor | None,
) -> None:
    """Every segment through the compiled decoder (``fmhs_cpu.c``: structure checks, tables,
    sub-blocks, chunk checks and the plane interleave, without the GIL), in calls of a few
    row blocks each, on ``pool``.  The error raised is the one the reference raises: the
    first segment's that fails, and within it the least by the reference's order."""
    flat = out.numpy()
    jobs: list[tuple[int, np.ndarray, np.ndarray, int, int]] = []
    late: CodecError | None = None  # a segment's bad header: raised if none before it fails
    for i, (a, b, at, size) in enumerate(directory):
        raw = stream[at : at + size]
        try:
            nbytes, width, _, _, _ = _blob_header(raw, out[a:b], name, i)
        except CodecError as e:
            late = e
            break
        per_plane = -(-(nbytes // width) // CHUNK)
        step = max(1, NATIVE_JOB_BYTES // (CHUNK * width))
        for r in range(0, per_plane, step):
            jobs.append((i, raw, flat[a:b], r, min(per_plane, r + step)))

    def run(job: tuple[int, np.ndarray, np.ndarray, int, int]):
        return lib.decode_rows(job[1], job[2], job[3], job[4])

    if pool is not None and len(jobs) > 1:
        results = list(pool.map(run, jobs))
    else:
        results = [run(j) for j in jobs]
    failed = [(jobs[k][0], r) for k, r in enumerate(results) if r is not None]
    if failed:
        seg = min(s for s, _ in failed)
        phase = {1: 1, 2: 1, 3: 1, 4: 1, 6: 1, 5: 2, 7: 3}
        code, c, detail = min(
            (r for s, r in failed if s == seg), key=lambda r: (phase.get(r[0], 0), r[1], r[2])
        )
        a, b, at, _ = directory[seg]
        raise _native_error(code, c, detail, stream[at:], b - a, name, seg)
    if late is not None:
        raise late


def _native_error(
    code: int, c: int, detail: int, raw: np.ndarray, nbytes: int, name: str, seg: int
) -> CodecError:
    """The reference's words for the compiled decoder's error ``code`` in chunk ``c``."""
    where = (f"tensor {name!r}: " if name else "") + f"segment {seg}, "
    width = int(struct.unpack("<I", raw[16:20].tobytes())[0])
    per_plane = max(1, -(-(nbytes // width) // CHUNK))
    at = f"{where}chunk {c} (plane {c // per_plane})"
    if code == 1:
        return CodecError(f"{at} lies outside the blob (truncated?)")
    if code == 6:
        return CodecError(f"{at} has unknown mode {detail}")
    why = {
        2: f"raw size {detail}",
        3: "bad code table",
        4: "sizes disagree",
        5: f"sub-block at symbol {detail} is damaged",
        7: "check mismatch (damaged)",
    }.get(code)
    if why is None:
        return CodecError(f"{where}FMH1 blob is not decodable (compiled decoder error {code})")
    return CodecError(f"{at} does not decode: {why}")


def _decode_blob(raw: np.ndarray, out: torch.Tensor, name: str, seg: int, pool: Executor | None) -> None:
    """The reference decoder of one segment's blob (numpy)."""
    nbytes, width, flags, start, table = _blob_header(raw, out, name, seg)
    where = (f"tensor {name!r}: " if name else "") + f"segment {seg}, "
    n = nbytes // width
    jobs = list(_chunks(n, width))
    rows = out.numpy().reshape(-1, width)
    payload = raw[start:]
    # (table, first bit, symbols, first symbol plane-major, chunk, bit after the last)
    subs: list[tuple[int, int, int, int, int, int]] = []
    tables: list[np.ndarray] = []
    for c, ((p, a, m), (off, stored, mode, _)) in enumerate(zip(jobs, table)):
        if off + stored > payload.size or stored % 4:
            raise CodecError(f"{where}chunk {c} (plane {p}) lies outside the blob (truncated?)")
        body = payload[off : off + stored]
        if mode == RAW:
            if stored != _align4(m):
                raise CodecError(f"{where}chunk {c} (plane {p}) does not decode: raw size {stored}")
            rows[a : a + m, p] = body[:m]
            continue
        if mode != HUFF:
            raise CodecError(f"{where}chunk {c} (plane {p}) has unknown mode {mode}")
        nsub = -(-m // SUB)
        lens = _unpack_lengths(body[:128])
        if lens.max() > MAX_LEN or (2.0 ** -lens[lens > 0].astype(np.float64)).sum() > 1:
            raise CodecError(f"{where}chunk {c} (plane {p}) does not decode: bad code table")
        sub_bits = body[128 : 128 + 2 * nsub].view(np.uint16).astype(np.int64)
        stream_at = off + 128 + _align4(2 * nsub)
        if stored != 128 + _align4(2 * nsub) + 4 * (-(-int(sub_bits.sum()) // 32)):
            raise CodecError(f"{where}chunk {c} (plane {p}) does not decode: sizes disagree")
        bit0 = 8 * stream_at + np.concatenate(([0], np.cumsum(sub_bits)[:-1]))
        tables.append(_decode_table(lens))
        for k in range(nsub):
            first = p * n + a + k * SUB
            subs.append(
                (len(tables) - 1, int(bit0[k]), min(SUB, m - k * SUB), first, c, int(bit0[k] + sub_bits[k]))
            )
    if subs:
        _decode_subs(payload, subs, np.concatenate(tables), rows, n, where)
    for c, ((p, a, m), entry) in enumerate(zip(jobs, table)):
        if chunk_check(np.ascontiguousarray(rows[a : a + m, p])) != int(entry[3]) & ((1 << 64) - 1):
            raise CodecError(f"{where}chunk {c} (plane {p}) does not decode: check mismatch (damaged)")


def _decode_table(lens: np.ndarray) -> np.ndarray:
    """2**MAX_LEN entries of (symbol | length << 8), 0 where no code starts."""
    table = np.zeros(1 << MAX_LEN, dtype=np.int64)
    codes = canonical_codes(lens)
    for s in np.flatnonzero(lens):
        length = int(lens[s])
        table[int(codes[s]) + (np.arange(1 << (MAX_LEN - length), dtype=np.int64) << length)] = s | (
            length << 8
        )
    return table


def _decode_subs(
    payload: np.ndarray, subs: list, tables: np.ndarray, rows: np.ndarray, n: int, where: str
) -> None:
    """Decode every sub-block at once, one symbol of each per step (numpy across sub-blocks),
    checking that each one ends exactly where its stored bit length says."""
    padded = np.concatenate((payload, np.zeros(8, dtype=np.uint8))).astype(np.int64)
    info = np.array(subs, dtype=np.int64)
    tab, pos, count = info[:, 0] << MAX_LEN, info[:, 1].copy(), info[:, 2]
    out = np.zeros((len(subs), SUB), dtype=np.uint8)
    bad = np.zeros(len(subs), dtype=bool)
    mask = (1 << MAX_LEN) - 1
    limit = 8 * payload.size
    for i in range(SUB):
        live = count > i
        b = np.minimum(pos >> 3, payload.size)
        window = padded[b] | (padded[b + 1] << 8) | (padded[b + 2] << 16)
        entry = tables[tab + ((window >> (pos & 7)) & mask)]
        length = entry >> 8
        bad |= live & (length == 0)
        out[:, i] = entry & 255
        pos += np.where(live, length, 0)
    bad |= (pos != info[:, 5]) | (pos > limit)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise CodecError(
            f"{where}chunk {subs[k][4]} (plane {subs[k][3] // n}) does not decode: "
            f"sub-block at symbol {subs[k][3] % n} is damaged"
        )
    for k, (_, _, m, f, _, _) in enumerate(subs):
        p, a = divmod(f, n)
        rows[a : a + m, p] = out[k, :m]
