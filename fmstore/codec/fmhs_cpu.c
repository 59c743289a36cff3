/* A compiled CPU decoder for one Huffman chunk of an FMH1 blob (see huffman.py for the
 * layout).  It gives the same bytes as the numpy decoder in huffman.py, which stays the
 * reference and the fallback where no C compiler is found; tests compare the two.
 * Built with the system's cc on first use (fmstore/codec/native.py) and called through ctypes,
 * which releases the GIL, so chunks decode in parallel on a thread pool. */
#include <stdint.h>
#include <string.h>

#define SUB 1024
#define MAX_LEN 12

static int64_t align4(int64_t n) { return (n + 3) & ~(int64_t)3; }

static uint64_t peek(const uint8_t *s, int64_t nbytes, int64_t bit) {
  int64_t at = bit >> 3;
  uint64_t v = 0;
  if (at + 8 <= nbytes) {
    memcpy(&v, s + at, 8);
  } else {
    for (int i = 0; i < 8 && at + i < nbytes; ++i) v |= (uint64_t)s[at + i] << (8 * i);
  }
  return v >> (bit & 7);
}

/* Decode the huff payload `body` (`stored` bytes) of a chunk of `m` symbols into `out`.
 * Returns 0, or 3 (bad code table), 4 (sizes disagree), 5 (a damaged sub-block). */
int fmhs_decode_huff(const uint8_t *body, int64_t stored, int64_t m, uint8_t *out) {
  int64_t nsub = (m + SUB - 1) / SUB;
  int64_t stream_at = 128 + align4(2 * nsub);
  if (stored < stream_at) return 4;
  uint8_t lens[256];
  uint32_t count[16] = {0};
  for (int s = 0; s < 256; ++s) {
    lens[s] = (s & 1) ? body[s >> 1] >> 4 : body[s >> 1] & 15;
    count[lens[s]]++;
  }
  uint32_t first[MAX_LEN + 1], code = 0, kraft = 0;
  for (int l = 1; l <= MAX_LEN; ++l) {
    first[l] = code;
    code = (code + count[l]) << 1;
    kraft += count[l] << (MAX_LEN - l);
  }
  for (int l = MAX_LEN + 1; l < 16; ++l)
    if (count[l]) return 3;
  if (kraft > (1u << MAX_LEN)) return 3;
  uint16_t table[1 << MAX_LEN];
  memset(table, 0, sizeof table);
  uint32_t next[MAX_LEN + 1];
  memcpy(next, first, sizeof next);
  for (int s = 0; s < 256; ++s) {
    int l = lens[s];
    if (!l) continue;
    uint32_t c = next[l]++, rev = 0;
    for (int i = 0; i < l; ++i) rev |= ((c >> i) & 1u) << (l - 1 - i);
    for (uint32_t q = 0; q < (1u << (MAX_LEN - l)); ++q) table[rev | (q << l)] = (uint16_t)(s | (l << 8));
  }
  int64_t total = 0;
  uint16_t sub[128];
  if (nsub > 128) return 4;
  memcpy(sub, body + 128, 2 * nsub);
  for (int64_t k = 0; k < nsub; ++k) total += sub[k];
  if (stream_at + 4 * ((total + 31) / 32) != stored) return 4;
  const uint8_t *stream = body + stream_at;
  int64_t nbytes = stored - stream_at, bit = 0;
  for (int64_t k = 0; k < nsub; ++k) {
    int64_t n = m - k * SUB < SUB ? m - k * SUB : SUB, end = bit + sub[k];
    uint8_t *o = out + k * SUB;
    for (int64_t i = 0; i < n; ++i) {
      uint32_t e = table[peek(stream, nbytes, bit) & ((1u << MAX_LEN) - 1)];
      if (!(e >> 8)) return 5;
      o[i] = (uint8_t)e;
      bit += e >> 8;
    }
    if (bit != end) return 5;
  }
  return 0;
}
