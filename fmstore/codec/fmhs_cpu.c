/* fmstore.codec._fmhs: the compiled CPU decoder of FMH1 blobs (the FMHS chain's segments; the
 * layout is in huffman.py's docstring).  It gives the same bytes, and for damaged input the
 * same error (kind, chunk, sub-block), as the numpy decoder in huffman.py, which stays the
 * reference and the fallback where this extension was not built; tests compare the two.
 *
 * Built by setuptools at install (setup.py: ext_modules), a plain CPython extension.  One call,
 * decode_rows(blob, out, r0, r1), decodes row blocks r0..r1-1 of a blob: row block r is rows
 * [r * CHUNK, (r + 1) * CHUNK) of the blob's elements, i.e. chunk r of every plane.  All of
 * it happens here with the GIL released: each chunk's checks of structure, its code table,
 * the Huffman sub-blocks (several decoded at once, interleaved, so their dependency chains
 * overlap), the chunk check, and the interleave of the byte planes back into elements, in
 * pieces small enough to stay in L1/L2.  Callers run disjoint row ranges on threads.
 *
 * Errors are returned, not raised: (code, chunk, detail), the least of all the errors met in
 * the rows by (phase, chunk, detail), where phase 1 is a chunk's structure, 2 a damaged
 * sub-block and 3 a check mismatch: the order in which the reference meets them, so taking
 * the least over the calls of a blob gives the reference's error. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define FMHS_SSE2 1
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "the FMH1 reader assumes a little-endian host (the numpy reference decodes elsewhere)"
#endif

#define ABI 1 /* native.py refuses a module built from another version of this file */
#define HEADER 32
#define ENTRY 24
#define CHUNK (1 << 17)
#define SUB 1024
#define NSUB_MAX (CHUNK / SUB)
#define MAX_LEN 12
#define TSIZE (1 << MAX_LEN)
#define TMASK (TSIZE - 1)
#define PIECE (8 * SUB) /* rows decoded, checked and interleaved at a time */
/* Decode-table entries, for a 12-bit window of the stream: the bits the window's codes take
 * (bits 0-3, so that a shift by the entry itself, whose count the CPU takes mod 64, consumes
 * them), INVALID (bit 4, in `one` only), how many symbols (bits 6-7), the symbols (bits 8-31,
 * first in the lowest byte).  `one` holds single codes, `three` as many whole codes as the
 * window holds, up to three.  Where no code starts: symbol 0 of length 0, as the reference
 * reads it, counted as none (so a stream stuck there never ends; `one` flags it too). */
#define INVALID (1u << 4)
#define E_BITS(e) ((e) & 15)
#define E_COUNT(e) (((e) >> 6) & 3)
#define E_SYMS(e) ((e) >> 8)
#define NS 4 /* sub-blocks decoded at once by the fast loop (3: measured slower) */

#ifdef FMHS_PROFILE /* -DFMHS_PROFILE: the stages as functions of their own, for perf */
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE
#endif

enum { RAW = 0, HUFF = 1 };
/* Error codes, as huffman.py words them. */
enum {
  E_OUTSIDE = 1,
  E_RAW_SIZE = 2,
  E_TABLE = 3,
  E_SIZES = 4,
  E_SUB = 5,
  E_MODE = 6,
  E_CHECK = 7,
  E_HEADER = 8,
};

typedef struct {
  int phase, code;
  int64_t chunk, detail;
} err_t;

/* Keep the least error by (phase, chunk, detail); phase 0 (a bad header) before all. */
static void note(err_t *e, int phase, int code, int64_t chunk, int64_t detail) {
  int less = phase < e->phase ||
             (phase == e->phase && (chunk < e->chunk || (chunk == e->chunk && detail < e->detail)));
  if (!e->code || less) {
    e->phase = phase;
    e->code = code;
    e->chunk = chunk;
    e->detail = detail;
  }
}

static inline uint64_t rd64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v; /* little-endian hosts: the format's byte order */
}
static inline uint32_t rd32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
static inline uint16_t rd16(const uint8_t *p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}
static int64_t align4(int64_t n) { return (n + 3) & ~(int64_t)3; }

/* ------------------------------------------------------------------------ the chunk check */

static inline uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* The check's terms of `n` symbols whose first one is symbol 4 * j of the chunk, zero padded
 * to whole words (only a chunk's last piece has a partial word). */
static uint64_t check_plain(const uint8_t *s, int64_t n, uint64_t j) {
  uint64_t sum0 = 0, sum1 = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8, j += 2) {
    uint64_t w = rd64(s + i);
    sum0 += mix((w & 0xFFFFFFFFull) | (j << 32));
    sum1 += mix((w >> 32) | ((j + 1) << 32));
  }
  for (; i < n; i += 4, ++j) {
    uint8_t pad[4] = {0, 0, 0, 0};
    memcpy(pad, s + i, n - i < 4 ? (size_t)(n - i) : 4);
    sum0 += mix((uint64_t)rd32(pad) | (j << 32));
  }
  return sum0 + sum1;
}

typedef uint64_t (*check_fn)(const uint8_t *, int64_t, uint64_t);
static check_fn check_part = check_plain; /* set at import */

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FMHS_AVX2 1
/* 64-bit lanes times a constant (lo, hi: its 32-bit halves): AVX2 has only 32x32->64. */
__attribute__((target("avx2"))) static inline __m256i mul64(__m256i a, __m256i lo, __m256i hi) {
  __m256i cross =
      _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), lo), _mm256_mul_epu32(a, hi));
  return _mm256_add_epi64(_mm256_mul_epu32(a, lo), _mm256_slli_epi64(cross, 32));
}
__attribute__((target("avx2"))) static inline __m256i mix4(__m256i z, __m256i c, __m256i l1, __m256i h1,
                                                          __m256i l2, __m256i h2) {
  z = _mm256_add_epi64(z, c);
  z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), l1, h1);
  z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), l2, h2);
  return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}
/* check_plain, four words a vector, two vectors at a time, and four more words on the scalar
 * multiplier beside them (a third more throughput than the vectors alone). */
__attribute__((target("avx2"))) static uint64_t check_avx2(const uint8_t *s, int64_t n, uint64_t j) {
  const __m256i c = _mm256_set1_epi64x((long long)0x9E3779B97F4A7C15ull);
  const __m256i l1 = _mm256_set1_epi64x(0xBF58476D1CE4E5B9ull & 0xFFFFFFFF);
  const __m256i h1 = _mm256_set1_epi64x(0xBF58476D1CE4E5B9ull >> 32);
  const __m256i l2 = _mm256_set1_epi64x(0x94D049BB133111EBull & 0xFFFFFFFF);
  const __m256i h2 = _mm256_set1_epi64x(0x94D049BB133111EBull >> 32);
  const __m256i step = _mm256_set1_epi64x(12ll << 32);
  __m256i ja = _mm256_set_epi64x((long long)(j + 3) << 32, (long long)(j + 2) << 32,
                                 (long long)(j + 1) << 32, (long long)j << 32);
  __m256i jb = _mm256_add_epi64(ja, _mm256_set1_epi64x(4ll << 32));
  __m256i sa = _mm256_setzero_si256(), sb = _mm256_setzero_si256();
  uint64_t s0 = 0, s1 = 0;
  int64_t i = 0;
  for (; i + 48 <= n; i += 48, j += 12) {
    __m256i wa = _mm256_cvtepu32_epi64(_mm_loadu_si128((const __m128i *)(s + i)));
    __m256i wb = _mm256_cvtepu32_epi64(_mm_loadu_si128((const __m128i *)(s + i + 16)));
    uint64_t x = rd64(s + i + 32), y = rd64(s + i + 40);
    s0 += mix((x & 0xFFFFFFFFull) | ((j + 8) << 32)) + mix((y & 0xFFFFFFFFull) | ((j + 10) << 32));
    s1 += mix((x >> 32) | ((j + 9) << 32)) + mix((y >> 32) | ((j + 11) << 32));
    sa = _mm256_add_epi64(sa, mix4(_mm256_or_si256(wa, ja), c, l1, h1, l2, h2));
    sb = _mm256_add_epi64(sb, mix4(_mm256_or_si256(wb, jb), c, l1, h1, l2, h2));
    ja = _mm256_add_epi64(ja, step);
    jb = _mm256_add_epi64(jb, step);
  }
  uint64_t lanes[4];
  _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(sa, sb));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + s0 + s1 + check_plain(s + i, n - i, j);
}
#endif

/* --------------------------------------------------------------------------- a plane's chunk */

typedef struct {
  int mode, failed;
  int64_t chunk, nsub;
  const uint8_t *body;      /* the chunk's payload */
  uint64_t want, got;       /* the stored check, and the decoded symbols' */
  int64_t bit[NSUB_MAX + 1]; /* each sub-block's first bit in the payload, then the end */
  uint32_t *one, *three;    /* decode tables (see INVALID) */
} plane_t;

/* Structure checks of chunk c (the reference's first phase) and, for a Huffman chunk, its
 * tables and sub-block offsets.  Returns 0 or an error code. */
NOINLINE static int setup(plane_t *pl, const uint8_t *payload, int64_t psize, const uint8_t *entry, int64_t m,
                          int64_t *detail) {
  uint64_t off = rd64(entry);
  int64_t stored = rd32(entry + 8);
  uint32_t mode = rd32(entry + 12);
  pl->want = rd64(entry + 16);
  pl->got = 0;
  pl->mode = (int)mode;
  if (off > (uint64_t)psize || stored > psize - (int64_t)off || stored % 4) return E_OUTSIDE;
  pl->body = payload + off;
  if (mode == RAW) {
    *detail = stored;
    return stored != align4(m) ? E_RAW_SIZE : 0;
  }
  if (mode != HUFF) {
    *detail = mode;
    return E_MODE;
  }
  const uint8_t *body = pl->body;
  int64_t nsub = (m + SUB - 1) / SUB, stream_at = 128 + align4(2 * nsub);
  if (stored < 128) return E_SIZES;
  uint8_t lens[256];
  uint32_t count[16] = {0}, kraft = 0;
  for (int s = 0; s < 256; ++s) {
    lens[s] = (s & 1) ? body[s >> 1] >> 4 : body[s >> 1] & 15;
    count[lens[s]]++;
  }
  for (int l = MAX_LEN + 1; l < 16; ++l)
    if (count[l]) return E_TABLE;
  for (int l = 1; l <= MAX_LEN; ++l) kraft += count[l] << (MAX_LEN - l);
  if (kraft > TSIZE) return E_TABLE;
  if (stored < stream_at) return E_SIZES;
  int64_t total = 0, bit = 8 * ((int64_t)off + stream_at);
  for (int64_t k = 0; k < nsub; ++k) {
    pl->bit[k] = bit + total;
    total += rd16(body + 128 + 2 * k);
  }
  pl->bit[nsub] = bit + total;
  if (stream_at + 4 * ((total + 31) / 32) != stored) return E_SIZES;
  pl->nsub = nsub;
  /* Canonical codes, ordered by length then symbol, bit-reversed for the LSB-first stream. */
  uint32_t next[MAX_LEN + 2], code = 0;
  for (int l = 1; l <= MAX_LEN; ++l) {
    next[l] = code;
    code = (code + count[l]) << 1;
  }
  uint32_t *one = pl->one, *three = pl->three;
  uint16_t csym[256], crev[256];
  uint8_t clen[256];
  int ncodes = 0;
  for (int l = 1; l <= MAX_LEN; ++l) /* codes by length: the loops below stop at the first too long */
    for (int s = 0; s < 256; ++s) {
      if (lens[s] != l) continue;
      uint32_t c = next[l]++, rev = 0;
      for (int i = 0; i < l; ++i) rev |= ((c >> i) & 1u) << (l - 1 - i);
      csym[ncodes] = (uint16_t)s;
      crev[ncodes] = (uint16_t)rev;
      clen[ncodes++] = (uint8_t)l;
    }
  for (int i = 0; i < TSIZE; ++i) one[i] = INVALID;
  for (int i = 0; i < ncodes; ++i)
    for (uint32_t q = crev[i]; q < TSIZE; q += 1u << clen[i])
      one[q] = (uint32_t)csym[i] << 8 | 1u << 6 | clen[i];
  /* `three`: every window whose first code is c1, and whose next bits start a code c2 that
   * ends inside it (its remaining bits decide which, whatever follows), and so on: each such
   * prefix fills the windows that begin with it, longer prefixes after shorter ones. */
  for (int i = 0; i < TSIZE; ++i) three[i] = one[i] & ~INVALID;
  for (int i = 0; i < ncodes; ++i) {
    uint32_t l1 = clen[i];
    for (int j = 0; j < ncodes && l1 + clen[j] <= MAX_LEN; ++j) {
      uint32_t l2 = l1 + clen[j], p2 = crev[i] | (uint32_t)crev[j] << l1;
      uint32_t e2 = (uint32_t)csym[i] << 8 | (uint32_t)csym[j] << 16 | 2u << 6 | l2;
      for (uint32_t q = p2; q < TSIZE; q += 1u << l2) three[q] = e2;
      for (int k = 0; k < ncodes && l2 + clen[k] <= MAX_LEN; ++k) {
        uint32_t l3 = l2 + clen[k], p3 = p2 | (uint32_t)crev[k] << l2;
        uint32_t e3 = (e2 & ~(uint32_t)0xCF) | (uint32_t)csym[k] << 24 | 3u << 6 | l3;
        for (uint32_t q = p3; q < TSIZE; q += 1u << l3) three[q] = e3;
      }
    }
  }
  return 0;
}

/* ------------------------------------------------------------------------ Huffman sub-blocks */

/* 8 bytes of the payload at byte `at`, zeros past its end (the reference's padding). */
static inline uint64_t peek(const uint8_t *s, int64_t nbytes, int64_t at) {
  if (at + 8 <= nbytes) return rd64(s + at);
  uint64_t v = 0;
  for (int i = 0; i < 8 && at + i < nbytes; ++i) v |= (uint64_t)s[at + i] << (8 * i);
  return v;
}

/* One sub-block, bounds-checked.  Returns 1 where it is damaged (a window where no code
 * starts, or it does not end where its stored bit length says). */
NOINLINE static int sub_safe(const plane_t *pl, const uint8_t *payload, int64_t psize, int64_t k, int64_t n,
                             uint8_t *o) {
  int64_t bit = pl->bit[k];
  uint32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w = (uint32_t)(peek(payload, psize, bit >> 3) >> (bit & 7)) & TMASK;
    uint32_t e = pl->one[w];
    acc |= e;
    o[i] = (uint8_t)E_SYMS(e);
    bit += E_BITS(e);
  }
  return (acc & INVALID) || bit != pl->bit[k + 1];
}

static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* NS (4) whole sub-blocks k..k+3 into o (SUB symbols each), a window of each in turn: four
 * independent dependency chains, in registers, each window giving up to three symbols (a
 * 4-byte store; the byte past them is overwritten by the next).  The caller checked that
 * every read stays inside the payload: a symbol moves at most MAX_LEN bits, whatever the
 * data (where no code starts, none).  While every stream has 16 symbols' room left the four
 * go together, then each finishes alone; a stream stuck where no code starts makes no
 * progress, and rounds are counted (each moves every live stream 4 symbols on).  Returns 0,
 * or 1 where one of them may be damaged (the caller finds which with sub_safe). */
#define FMHS_REFILL(s) b##s = rd64(payload + (pos##s >> 3)) >> (pos##s & 7); /* >= 57 bits */
#define FMHS_WIN(s)                  \
  e = three[(uint32_t)b##s & TMASK]; \
  st32(d##s, E_SYMS(e));             \
  d##s += E_COUNT(e);                \
  b##s >>= e & 63; /* = E_BITS(e): bits 4-5 of a `three` entry are 0; one shift, no mask */ \
  pos##s += E_BITS(e);
#define FMHS_START(s)                                 \
  uint64_t pos##s = (uint64_t)pl->bit[k + (s)], b##s; \
  uint8_t *d##s = o + (s) * SUB;
#define FMHS_ROOM(s) &&(o + (s) * SUB + SUB - d##s >= 16)
#define FMHS_TAIL(s)                                                                 \
  if (tail(pl, payload, pos##s, d##s, o + (s) * SUB + SUB) != (uint64_t)pl->bit[k + (s) + 1]) \
    bad = 1;
#define FMHS_EACH(X) X(0) X(1) X(2) X(3)
#define FMHS_FAST_BODY                                                                  \
  const uint32_t *three = pl->three;                                                    \
  uint32_t e;                                                                           \
  int bad = 0;                                                                          \
  FMHS_EACH(FMHS_START)                                                                 \
  for (int round = 0; round < SUB / 4 FMHS_EACH(FMHS_ROOM); ++round) {                  \
    FMHS_EACH(FMHS_REFILL)                                                              \
    FMHS_EACH(FMHS_WIN) FMHS_EACH(FMHS_WIN) FMHS_EACH(FMHS_WIN) FMHS_EACH(FMHS_WIN)     \
  }                                                                                     \
  FMHS_EACH(FMHS_TAIL)                                                                  \
  return bad;

/* The rest of one sub-block, from bit pos, into [d, end): three-symbol windows while four
 * bytes' room is left, then single symbols.  Returns the bit after the last symbol, or
 * UINT64_MAX where it got stuck (a window with no code). */
static uint64_t tail(const plane_t *pl, const uint8_t *payload, uint64_t pos, uint8_t *d, uint8_t *end) {
  uint32_t e;
  for (int i = 0; i < SUB && end - d >= 4; ++i) {
    e = pl->three[(uint32_t)(rd64(payload + (pos >> 3)) >> (pos & 7)) & TMASK];
    st32(d, E_SYMS(e));
    d += E_COUNT(e);
    pos += E_BITS(e);
  }
  for (int i = 0; i < 4 && d < end; ++i) {
    e = pl->one[(uint32_t)(rd64(payload + (pos >> 3)) >> (pos & 7)) & TMASK];
    *d = (uint8_t)E_SYMS(e);
    d += E_COUNT(e);
    pos += E_BITS(e);
  }
  return d == end ? pos : UINT64_MAX;
}

typedef int (*fast_fn)(const plane_t *, const uint8_t *, int64_t, uint8_t *);

static int subs_fast_plain(const plane_t *pl, const uint8_t *payload, int64_t k, uint8_t *o) {
  FMHS_FAST_BODY
}
#if defined(__GNUC__) && defined(__x86_64__)
/* The same, with BMI2's shifts by any register (shrx): no shuffling through %cl. */
__attribute__((target("bmi2"))) static int subs_fast_bmi2(const plane_t *pl, const uint8_t *payload, int64_t k,
                                                          uint8_t *o) {
  FMHS_FAST_BODY
}
#define FMHS_BMI2 1
#endif
static fast_fn subs_fast = subs_fast_plain; /* set at import */

/* Sub-blocks [k0, k1) of a chunk of m symbols into o (symbol k0 * SUB at o[0]).  Returns -1,
 * or the first damaged sub-block. */
NOINLINE static int64_t subs(const plane_t *pl, const uint8_t *payload, int64_t psize, int64_t m, int64_t k0,
                             int64_t k1, uint8_t *o) {
  int64_t k = k0;
  /* The fast loop reads 8 bytes at a sub-block's bit position, which moves at most MAX_LEN
   * bits a symbol whatever the data: safe while the farthest stays inside the payload. */
  int64_t safe_bits = 8 * (psize - 16) - (int64_t)MAX_LEN * SUB;
  for (; k + NS <= k1 && (k + NS) * SUB <= m && pl->bit[k + NS - 1] <= safe_bits; k += NS)
    if (subs_fast(pl, payload, k, o + (k - k0) * SUB)) break; /* sub_safe says which */
  for (; k < k1; ++k) { /* the rest one at a time: fast where safe, else (or where damaged) checked */
    int64_t n = m - k * SUB < SUB ? m - k * SUB : SUB;
    uint8_t *d = o + (k - k0) * SUB;
    if (pl->bit[k] <= safe_bits && tail(pl, payload, (uint64_t)pl->bit[k], d, d + n) == (uint64_t)pl->bit[k + 1])
      continue;
    if (sub_safe(pl, payload, psize, k, n, d)) return k;
  }
  return -1;
}

/* ------------------------------------------------------------------------------- interleave */

/* Rows [0, n) of `w` planes into elements at out. */
NOINLINE static void interleave(uint8_t *out, const uint8_t *const *src, int64_t w, int64_t n) {
  int64_t i = 0;
  if (w == 1) {
    if (src[0] != out) memcpy(out, src[0], (size_t)n);
    return;
  }
  if (w == 2) {
    const uint8_t *a = src[0], *b = src[1];
#ifdef FMHS_SSE2
    for (; i + 16 <= n; i += 16) {
      __m128i x = _mm_loadu_si128((const __m128i *)(a + i));
      __m128i y = _mm_loadu_si128((const __m128i *)(b + i));
      _mm_storeu_si128((__m128i *)(out + 2 * i), _mm_unpacklo_epi8(x, y));
      _mm_storeu_si128((__m128i *)(out + 2 * i + 16), _mm_unpackhi_epi8(x, y));
    }
#endif
    for (; i < n; ++i) {
      out[2 * i] = a[i];
      out[2 * i + 1] = b[i];
    }
    return;
  }
  if (w == 4) {
    const uint8_t *a = src[0], *b = src[1], *c = src[2], *d = src[3];
#ifdef FMHS_SSE2
    for (; i + 16 <= n; i += 16) {
      __m128i x = _mm_loadu_si128((const __m128i *)(a + i)), y = _mm_loadu_si128((const __m128i *)(b + i));
      __m128i z = _mm_loadu_si128((const __m128i *)(c + i)), t = _mm_loadu_si128((const __m128i *)(d + i));
      __m128i xy0 = _mm_unpacklo_epi8(x, y), xy1 = _mm_unpackhi_epi8(x, y);
      __m128i zt0 = _mm_unpacklo_epi8(z, t), zt1 = _mm_unpackhi_epi8(z, t);
      uint8_t *o = out + 4 * i;
      _mm_storeu_si128((__m128i *)o, _mm_unpacklo_epi16(xy0, zt0));
      _mm_storeu_si128((__m128i *)(o + 16), _mm_unpackhi_epi16(xy0, zt0));
      _mm_storeu_si128((__m128i *)(o + 32), _mm_unpacklo_epi16(xy1, zt1));
      _mm_storeu_si128((__m128i *)(o + 48), _mm_unpackhi_epi16(xy1, zt1));
    }
#endif
    for (; i < n; ++i) {
      out[4 * i] = a[i];
      out[4 * i + 1] = b[i];
      out[4 * i + 2] = c[i];
      out[4 * i + 3] = d[i];
    }
    return;
  }
  for (int64_t p = 0; p < w; ++p) {
    const uint8_t *s = src[p];
    uint8_t *o = out + p;
    for (i = 0; i < n; ++i) o[i * w] = s[i];
  }
}

/* ------------------------------------------------------------------------------ row blocks */

typedef struct {
  const uint8_t *raw;
  int64_t rawlen, nbytes, width, nchunks, n, per_plane;
} blob_t;

static int parse(blob_t *b, const uint8_t *raw, int64_t rawlen, int64_t outlen) {
  if (rawlen < HEADER || memcmp(raw, "FMH1", 4) || rd32(raw + 4) != 1 || rd32(raw + 28) != CHUNK)
    return E_HEADER;
  b->raw = raw;
  b->rawlen = rawlen;
  b->nbytes = (int64_t)rd64(raw + 8);
  b->width = rd32(raw + 16);
  b->nchunks = rd32(raw + 20);
  if (b->nbytes < 0 || b->width < 1 || b->nbytes % b->width || b->nbytes != outlen) return E_HEADER;
  b->n = b->nbytes / b->width;
  b->per_plane = (b->n + CHUNK - 1) / CHUNK;
  if (b->nchunks != b->width * b->per_plane || rawlen < HEADER + ENTRY * b->nchunks) return E_HEADER;
  return 0;
}

/* Row blocks [r0, r1) of blob b into out (the blob's whole output).  Without the GIL. */
static int rows(const blob_t *b, uint8_t *out, int64_t r0, int64_t r1, err_t *err) {
  int64_t w = b->width, start = HEADER + ENTRY * b->nchunks;
  const uint8_t *payload = b->raw + start;
  int64_t psize = b->rawlen - start;
  /* Scratch: a piece of each plane, then each plane's tables. */
  size_t piece = w == 1 ? 0 : (size_t)PIECE;
  uint8_t *mem = malloc((size_t)w * (piece + sizeof(plane_t) + TSIZE * 8) + 64);
  const uint8_t **src = malloc((size_t)w * sizeof *src);
  if (!mem || !src) {
    free(mem);
    free(src);
    return -1;
  }
  plane_t *pl = (plane_t *)mem;
  uint8_t *tables = mem + (size_t)w * sizeof(plane_t);
  uint8_t *scratch = tables + (size_t)w * TSIZE * 8;
  for (int64_t p = 0; p < w; ++p) {
    pl[p].one = (uint32_t *)(tables + (size_t)p * TSIZE * 8);
    pl[p].three = pl[p].one + TSIZE;
  }
  for (int64_t r = r0; r < r1; ++r) {
    int64_t a = r * CHUNK, m = b->n - a < CHUNK ? b->n - a : CHUNK;
    for (int64_t p = 0; p < w; ++p) {
      int64_t c = p * b->per_plane + r, detail = 0;
      pl[p].chunk = c;
      int code = setup(&pl[p], payload, psize, b->raw + HEADER + ENTRY * c, m, &detail);
      pl[p].failed = code != 0;
      if (code) note(err, 1, code, c, code == E_RAW_SIZE || code == E_MODE ? detail : 0);
    }
    for (int64_t q = 0; q < m; q += PIECE) {
      int64_t pm = m - q < PIECE ? m - q : PIECE;
      uint8_t *dst = out + (a + q) * w;
      for (int64_t p = 0; p < w; ++p) {
        plane_t *x = &pl[p];
        uint8_t *mine = w == 1 ? dst : scratch + p * piece;
        src[p] = mine;
        if (x->failed) continue; /* its bytes are left as they are: the call fails */
        if (x->mode == RAW) {
          src[p] = x->body + q;
        } else {
          int64_t bad = subs(x, payload, psize, m, q / SUB, (q + pm + SUB - 1) / SUB, mine);
          if (bad >= 0) {
            x->failed = 1;
            note(err, 2, E_SUB, x->chunk, a + bad * SUB);
            continue;
          }
        }
        x->got += check_part(src[p], pm, (uint64_t)q / 4);
      }
      interleave(dst, src, w, pm);
    }
    for (int64_t p = 0; p < w; ++p)
      if (!pl[p].failed && pl[p].got != pl[p].want) note(err, 3, E_CHECK, pl[p].chunk, 0);
  }
  free(mem);
  free(src);
  return 0;
}

/* ------------------------------------------------------------------------------- Python API */

PyDoc_STRVAR(decode_rows_doc,
             "decode_rows(blob, out, r0, r1) -> None | (code, chunk, detail)\n\n"
             "Decode row blocks r0..r1-1 (CHUNK elements each) of the FMH1 blob `blob` into `out`,\n"
             "a writable buffer of the blob's nbytes, with the GIL released.  None, or the first\n"
             "error in the reference's order: code 1 chunk outside the blob, 2 raw size (detail:\n"
             "stored), 3 bad code table, 4 sizes disagree, 5 damaged sub-block (detail: its first\n"
             "symbol), 6 unknown mode (detail: mode), 7 check mismatch, 8 bad header.");

static PyObject *decode_rows(PyObject *self, PyObject *args) {
  Py_buffer in, out;
  long long r0, r1;
  (void)self;
  if (!PyArg_ParseTuple(args, "y*w*LL", &in, &out, &r0, &r1)) return NULL;
  blob_t b;
  err_t err = {0, 0, 0, 0}; /* code 0: none */
  int rc = parse(&b, in.buf, in.len, out.len);
  if (rc == 0 && (r0 < 0 || r1 > b.per_plane || r0 > r1)) {
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return PyErr_Format(PyExc_ValueError, "row blocks %lld..%lld of %lld", r0, r1,
                        (long long)b.per_plane);
  }
  if (rc == 0) {
    Py_BEGIN_ALLOW_THREADS rc = rows(&b, out.buf, r0, r1, &err);
    Py_END_ALLOW_THREADS
  } else {
    note(&err, 0, rc, 0, 0);
    rc = 0;
  }
  PyBuffer_Release(&in);
  PyBuffer_Release(&out);
  if (rc < 0) return PyErr_NoMemory();
  if (!err.code) Py_RETURN_NONE;
  return Py_BuildValue("(iLL)", err.code, (long long)err.chunk, (long long)err.detail);
}

static PyMethodDef methods[] = {
    {"decode_rows", decode_rows, METH_VARARGS, decode_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fmhs",
    .m_doc = "The compiled CPU decoder of fmstore's FMH1 blobs (fmhs_cpu.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fmhs(void) {
#if defined(FMHS_BMI2) || defined(FMHS_AVX2)
  __builtin_cpu_init();
#endif
#ifdef FMHS_BMI2
  if (__builtin_cpu_supports("bmi2")) subs_fast = subs_fast_bmi2;
#endif
#ifdef FMHS_AVX2
  if (__builtin_cpu_supports("avx2")) check_part = check_avx2;
#endif
  PyObject *m = PyModule_Create(&module);
  if (!m) return NULL;
  int bmi2 = subs_fast != subs_fast_plain, avx2 = check_part != check_plain;
  const char *features = bmi2 ? (avx2 ? "bmi2 avx2" : "bmi2") : (avx2 ? "avx2" : "");
  if (PyModule_AddStringConstant(m, "features", features) || PyModule_AddIntConstant(m, "ABI", ABI) ||
      PyModule_AddIntConstant(m, "CHUNK", CHUNK) || PyModule_AddIntConstant(m, "SUB", SUB) ||
      PyModule_AddIntConstant(m, "MAX_LEN", MAX_LEN)) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
