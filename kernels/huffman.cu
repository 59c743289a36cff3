// The GPU codec chain: byte planes, then per chunk a canonical Huffman code or the raw bytes,
// written in the FMH1 layout that fmstore/codec/huffman.py documents and reproduces byte for
// byte on the CPU (tests/test_kernels.py compares the two on a CUDA machine).
//
// Encode, all on the caller's stream, no host round trip:
//   split      planes of the input (planes.cu's kernels)
//   hist       per-chunk byte histograms and chunk checks (order-free sums)
//   build      per chunk: length-limited Huffman lengths, canonical codes, exact sizes, mode
//   layout     per segment: chunk offsets (one block scans them), header and chunk table
//   emit       per chunk, one thread per 1024-symbol sub-block: bit counts, a block scan,
//              then the bits; raw chunks are copied
// Decode: one block per chunk; the payload staged and a 4096-entry table in shared memory,
// one thread per sub-block, each checking it ends where its stored bit length says, then the
// chunk check; then merge.  Errors (damaged or foreign blob) are recorded in a device int pair
// (code, chunk) per segment.  Each kernel is launched once for all segments of a tensor.
//
// Plain C ABI, called through ctypes with raw device pointers.

#include <cuda_runtime.h>
#include <stdint.h>

#include "planes.cu"

namespace fmh {

constexpr int CHUNK = 1 << 17;
constexpr int SUB = 1024;
constexpr int NSUB = CHUNK / SUB;  // threads of an emit/decode block
constexpr int MAX_LEN = 12;
constexpr int HEADER = 32;
constexpr int ENTRY = 24;
constexpr int RAW = 0, HUFF = 1;
constexpr int HIST_SLICE = 1 << 15;  // symbols per histogram block

__host__ __device__ inline int64_t align4(int64_t n) { return (n + 3) & ~int64_t(3); }

__device__ inline uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Word j (4 symbols, zero padded past m) of a chunk starting at `src`.
__device__ inline uint32_t load_word(const uint8_t* src, int64_t j, int64_t m, bool aligned) {
  int64_t i = 4 * j;
  if (aligned && i + 4 <= m) return reinterpret_cast<const uint32_t*>(src)[j];
  uint32_t w = 0;
  for (int k = 0; k < 4; ++k)
    if (i + k < m) w |= (uint32_t)src[i + k] << (8 * k);
  return w;
}

// Host-built descriptors (int64 rows), one launch covering every segment of a tensor.
// Segment row: begin byte, bytes, first chunk, chunks, blob offset, blob length, chunks per plane, 0.
// Chunk row:   symbols' offset in the planes buffer, symbols, segment, index in segment, plane, 0.
constexpr int SEG_COLS = 8, CHUNK_COLS = 6;

struct Chunk {
  int64_t src, m, seg, local, plane;
  __device__ explicit Chunk(const int64_t* chunks, int64_t c) {
    const int64_t* r = chunks + c * CHUNK_COLS;
    src = r[0];
    m = r[1];
    seg = r[2];
    local = r[3];
    plane = r[4];
  }
};

// Calls f(j, word j) for words [0, nw) of a chunk whose bytes start at `src` (m bytes, zero
// padded to a word).  Coalesced, with eight loads in flight per thread where `src` is
// word-aligned: a block of few warps otherwise waits out one memory latency per word.
template <typename F>
__device__ inline void for_words(const uint8_t* src, int64_t m, int64_t j0, int64_t j1, F f) {
  int64_t step = blockDim.x, j = j0 + threadIdx.x;
  int64_t full = min(j1, m / 4);  // words wholly inside the chunk
  if ((((uintptr_t)src) & 3) == 0) {
    const uint32_t* w32 = reinterpret_cast<const uint32_t*>(src);
    for (; j + 7 * step < full; j += 8 * step) {
      uint32_t w[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) w[u] = __ldg(w32 + j + u * step);
#pragma unroll
      for (int u = 0; u < 8; ++u) f(j + u * step, w[u]);
    }
  }
  for (; j < j1; j += step) f(j, load_word(src, j, m, (((uintptr_t)src) & 3) == 0));
}

// ---------------------------------------------------------------- hist

__global__ void hist(const uint8_t* planes, const int64_t* chunks, int64_t c_base, uint32_t* counts,
                     unsigned long long* checks) {
  __shared__ uint32_t h[8][256];  // one histogram per warp: fewer collisions on hot bytes
  int64_t c = c_base + blockIdx.x;
  Chunk k(chunks, c);
  int64_t m = k.m;
  for (int i = threadIdx.x; i < 8 * 256; i += blockDim.x) (&h[0][0])[i] = 0;
  __syncthreads();
  const uint8_t* src = planes + k.src;
  int warp = threadIdx.x >> 5;
  int64_t words = (m + 3) / 4;
  int64_t j0 = (int64_t)blockIdx.y * (HIST_SLICE / 4);
  int64_t j1 = min(words, j0 + HIST_SLICE / 4);
  uint64_t sum = 0;
  for_words(src, m, j0, j1, [&](int64_t j, uint32_t w) {
    sum += mix((uint64_t)w | ((uint64_t)j << 32));
    int valid = (int)min((int64_t)4, m - 4 * j);
    for (int q = 0; q < valid; ++q) atomicAdd(&h[warp][(w >> (8 * q)) & 255], 1u);
  });
  for (int off = 16; off; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
  if ((threadIdx.x & 31) == 0 && sum) atomicAdd(checks + c, (unsigned long long)sum);
  __syncthreads();
  for (int s = threadIdx.x; s < 256; s += blockDim.x) {
    uint32_t t = 0;
    for (int q = 0; q < 8; ++q) t += h[q][s];
    if (t) atomicAdd(counts + c * 256 + s, t);
  }
}

// ---------------------------------------------------------------- build

// Per chunk (one block of 256 threads, thread = byte value): the same construction as
// code_lengths()/canonical_codes() in huffman.py, then the exact stored sizes.
__global__ void build(const int64_t* chunks, int64_t c_base, const uint32_t* counts, uint32_t* codes,
                      uint8_t* nibbles, uint32_t* stored, uint32_t* mode) {
  __shared__ uint32_t w[256];
  __shared__ uint16_t order[256];
  __shared__ uint32_t weight[511];
  __shared__ uint16_t parent[511];
  __shared__ uint8_t depth[511];
  __shared__ uint8_t lens[256];
  __shared__ int n_sh, deepest_sh;
  __shared__ uint32_t first[MAX_LEN + 2];
  __shared__ unsigned long long part_sh[8];
  __shared__ uint32_t lo_sh, hi_sh;
  int64_t c = c_base + blockIdx.x;
  int s = threadIdx.x;
  int64_t m = Chunk(chunks, c).m;
  w[s] = counts[c * 256 + s];
  lens[s] = 0;
  if (s == 0) {
    lo_sh = 0xffffffffu;
    hi_sh = 0;
  }
  __syncthreads();
  // Every value present and none more than twice as common as another: no code saves 2%
  // (entropy >= 7.918 bits), so raw without building one; huffman.py applies the same rule.
  atomicMin(&lo_sh, w[s]);
  atomicMax(&hi_sh, w[s]);
  __syncthreads();
  if (lo_sh > 0 && hi_sh <= 2 * lo_sh) {
    codes[c * 256 + s] = 0;
    if (s == 0) {
      stored[c] = (uint32_t)align4(m);
      mode[c] = RAW;
    }
    return;
  }
  for (;;) {
    // Rank among present values by (count, value): their sorted order.
    uint32_t ws = w[s];
    int rank = 0, n = 0;
    for (int u = 0; u < 256; ++u) {
      uint32_t wu = w[u];
      n += wu != 0;
      rank += wu != 0 && (wu < ws || (wu == ws && u < s));
    }
    if (ws) order[rank] = (uint16_t)s;
    if (s == 0) n_sh = n;
    __syncthreads();
    n = n_sh;
    if (n <= 1) {
      if (n == 1 && s == order[0]) lens[s] = 1;
      break;
    }
    if (n == 256 && w[order[255]] <= w[order[0]] + w[order[1]]) {
      lens[s] = 8;  // balanced: see code_lengths() in huffman.py
      break;
    }
    if (s == 0) {
      for (int i = 0; i < n; ++i) weight[i] = w[order[i]];
      int leaf = 0, inner = n, nxt = n;
      for (int k = 0; k < n - 1; ++k) {
        int pick[2];
        for (int t = 0; t < 2; ++t) {
          if (leaf < n && (inner >= nxt || weight[leaf] <= weight[inner])) pick[t] = leaf++;
          else pick[t] = inner++;
        }
        weight[nxt] = weight[pick[0]] + weight[pick[1]];
        parent[pick[0]] = parent[pick[1]] = (uint16_t)nxt;
        ++nxt;
      }
      deepest_sh = 0;
    }
    __syncthreads();
    // Each leaf's depth: the steps up to the root (every thread walks its own).
    int d = 0;
    if (ws) {
      for (int node = rank; node != 2 * n - 2; node = parent[node]) ++d;
      atomicMax(&deepest_sh, d);
      depth[rank] = (uint8_t)min(d, 255);
    }
    __syncthreads();
    if (deepest_sh <= MAX_LEN) {
      if (ws) lens[s] = depth[rank];
      break;
    }
    // Too deep by k bits: counts c >> k | 1, and build again (huffman.py does the same).
    if (ws) w[s] = (ws >> (deepest_sh - MAX_LEN)) | 1;
    __syncthreads();
  }
  __syncthreads();
  // Canonical codes: first code of each length, then rank among values of the same length.
  if (s == 0) {
    uint32_t count[MAX_LEN + 1] = {0};
    for (int u = 0; u < 256; ++u) count[lens[u]]++;
    uint32_t code = 0;
    count[0] = 0;
    for (int l = 1; l <= MAX_LEN; ++l) {
      first[l] = code;
      code = (code + count[l]) << 1;
    }
  }
  __syncthreads();
  int l = lens[s];
  uint32_t out = 0;
  unsigned long long mine = 0;
  if (l) {
    uint32_t code = first[l];
    for (int u = 0; u < s; ++u) code += lens[u] == l;
    uint32_t rev = __brev(code) >> (32 - l);
    out = rev | ((uint32_t)l << 16);
    mine = (unsigned long long)counts[c * 256 + s] * l;
  }
  // The chunk's bits: a block reduction (a shared 64-bit atomic would serialize 256 threads).
  for (int o = 16; o; o >>= 1) mine += __shfl_down_sync(0xffffffffu, mine, o);
  if ((s & 31) == 0) part_sh[s >> 5] = mine;
  codes[c * 256 + s] = out;
  if ((s & 1) == 0) nibbles[c * 128 + s / 2] = (uint8_t)(lens[s] | (lens[s + 1] << 4));
  __syncthreads();
  if (s == 0) {
    unsigned long long bits = 0;
    for (int q = 0; q < 8; ++q) bits += part_sh[q];
    int64_t nsub = (m + SUB - 1) / SUB;
    int64_t huff = 128 + align4(2 * nsub) + 4 * (int64_t)((bits + 31) / 32);
    bool use = huff * 50 < m * 49;
    stored[c] = (uint32_t)(use ? huff : align4(m));
    mode[c] = use ? HUFF : RAW;
  }
}

// ---------------------------------------------------------------- bits

// Each huff chunk's sub-block bit lengths, with coalesced reads: a warp's 32 words lie in one
// sub-block, so one atomic per warp.
__global__ void bits(const uint8_t* planes, const int64_t* chunks, int64_t c_base, const uint32_t* codes,
                     const uint32_t* mode, uint32_t* sub_bits) {
  __shared__ uint8_t len[256];
  int64_t c = c_base + blockIdx.x;
  if (mode[c] != HUFF) return;
  Chunk k(chunks, c);
  for (int s = threadIdx.x; s < 256; s += blockDim.x) len[s] = (uint8_t)(codes[c * 256 + s] >> 16);
  __syncthreads();
  int64_t m = k.m, words = (m + 3) / 4;
  int64_t j0 = (int64_t)blockIdx.y * (HIST_SLICE / 4);
  int64_t j1 = min(words, j0 + HIST_SLICE / 4);
  const uint8_t* src = planes + k.src;
  // Whole warps walk whole sub-blocks (256 words): lanes of a warp share j / 256.
  for (int64_t base = j0; base < j1; base += blockDim.x) {
    int64_t j = base + threadIdx.x;
    uint32_t b = 0;
    if (j < j1) {
      uint32_t w = load_word(src, j, m, (((uintptr_t)src) & 3) == 0);
      int valid = (int)min((int64_t)4, m - 4 * j);
      for (int q = 0; q < valid; ++q) b += len[(w >> (8 * q)) & 255];
    }
    for (int o = 16; o; o >>= 1) b += __shfl_down_sync(0xffffffffu, b, o);
    int64_t first = base + (threadIdx.x & ~31);
    if ((threadIdx.x & 31) == 0 && first < j1 && b) atomicAdd(sub_bits + c * NSUB + first / (SUB / 4), b);
  }
}

// ---------------------------------------------------------------- layout

// Inclusive prefix sum of v over the block (Hillis-Steele in `part`, one slot per thread).
template <typename T>
__device__ inline T block_scan(T* part, T v) {
  part[threadIdx.x] = v;
  __syncthreads();
  for (int off = 1; off < (int)blockDim.x; off <<= 1) {
    T t = threadIdx.x >= (unsigned)off ? part[threadIdx.x - off] : 0;
    __syncthreads();
    part[threadIdx.x] += t;
    __syncthreads();
  }
  return part[threadIdx.x];
}

// Per segment (one block): chunk offsets inside its payload, and the blob's length.
__global__ void seg_layout(const int64_t* segs, int64_t s_base, const uint32_t* stored, uint64_t* offsets,
                           int64_t* seg_len) {
  __shared__ uint64_t carry;
  __shared__ uint64_t part[1024];
  int64_t sid = s_base + blockIdx.x;
  const int64_t* sg = segs + sid * SEG_COLS;
  int64_t first = sg[2], nchunks = sg[3];
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < nchunks; base += blockDim.x) {
    int64_t l = base + threadIdx.x;
    uint64_t v = l < nchunks ? stored[first + l] : 0;
    uint64_t incl = block_scan(part, v);
    if (l < nchunks) offsets[first + l] = carry + incl - v;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry += part[threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.x == 0) seg_len[sid] = HEADER + ENTRY * nchunks + (int64_t)carry;
}

// One block, for segments [s0, s1): where each one's blob starts in the stream (after those
// before s0, laid out by an earlier launch), their directory entries, and the end of s1 - 1.
__global__ void stream_layout(int64_t nseg, int64_t s0, int64_t s1, const int64_t* seg_len, int64_t* seg_at,
                              uint8_t* out, int64_t* total) {
  __shared__ int64_t carry;
  __shared__ int64_t part[1024];
  int64_t head = 8 + 8 * nseg;
  if (threadIdx.x == 0) {
    carry = s0 == 0 ? head : seg_at[s0 - 1] + seg_len[s0 - 1];
    if (s0 == 0) {
      reinterpret_cast<uint32_t*>(out)[0] = 0x53484D46u;  // "FMHS"
      reinterpret_cast<uint32_t*>(out)[1] = (uint32_t)nseg;
    }
  }
  __syncthreads();
  for (int64_t base = s0; base < s1; base += blockDim.x) {
    int64_t s = base + threadIdx.x;
    int64_t v = s < s1 ? seg_len[s] : 0;
    int64_t incl = block_scan(part, v);
    if (s < s1) {
      seg_at[s] = carry + incl - v;
      uint32_t* d = reinterpret_cast<uint32_t*>(out + 8 + 8 * s);  // 4-aligned
      d[0] = (uint32_t)v;
      d[1] = (uint32_t)((uint64_t)v >> 32);
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry += part[threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.x == 0) *total = carry;
}

// Per segment: its FMH1 header and chunk table, at its place in the stream.
__global__ void tables(const int64_t* segs, int64_t s_base, int width, int flags, const uint32_t* stored,
                       const uint32_t* mode, const unsigned long long* checks, const uint64_t* offsets,
                       const int64_t* seg_at, uint8_t* out) {
  const int64_t* sg = segs + (s_base + blockIdx.x) * SEG_COLS;
  int64_t nbytes = sg[1], first = sg[2], nchunks = sg[3];
  uint8_t* blob = out + seg_at[s_base + blockIdx.x];
  for (int64_t l = threadIdx.x; l < nchunks; l += blockDim.x) {
    int64_t c = first + l;
    uint32_t* e = reinterpret_cast<uint32_t*>(blob + HEADER + l * ENTRY);
    e[0] = (uint32_t)offsets[c];
    e[1] = (uint32_t)(offsets[c] >> 32);
    e[2] = stored[c];
    e[3] = mode[c];
    e[4] = (uint32_t)checks[c];
    e[5] = (uint32_t)(checks[c] >> 32);
  }
  if (threadIdx.x == 0) {
    uint32_t* h = reinterpret_cast<uint32_t*>(blob);
    h[0] = 0x31484D46u;  // "FMH1"
    h[1] = 1;
    h[2] = (uint32_t)nbytes;
    h[3] = (uint32_t)((uint64_t)nbytes >> 32);
    h[4] = (uint32_t)width;
    h[5] = (uint32_t)nchunks;
    h[6] = (uint32_t)flags;
    h[7] = CHUNK;
  }
}

// ---------------------------------------------------------------- emit

__device__ inline uint4 ld16(const uint4* p) { return __ldg(p); }

__global__ void __launch_bounds__(NSUB) emit(const uint8_t* planes, const int64_t* segs, const int64_t* chunks,
                                             int64_t c_base, const uint32_t* codes, const uint8_t* nibbles,
                                             const uint32_t* mode, const uint64_t* offsets,
                                             const uint32_t* sub_bits_all, const int64_t* seg_at, uint8_t* out) {
  __shared__ uint32_t tab[256];
  __shared__ uint32_t scan[NSUB];
  int64_t c = c_base + blockIdx.x;
  Chunk k(chunks, c);
  int64_t m = k.m;
  const int64_t* sg = segs + k.seg * SEG_COLS;
  const uint8_t* src = planes + k.src;
  uint8_t* dst = out + seg_at[k.seg] + HEADER + ENTRY * sg[3] + offsets[c];
  int t = threadIdx.x;
  if (mode[c] == RAW) {
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for_words(src, m, 0, (m + 3) / 4, [&](int64_t j, uint32_t w) { d[j] = w; });
    return;
  }
  for (int s = t; s < 256; s += blockDim.x) tab[s] = codes[c * 256 + s];
  if (t < 32) reinterpret_cast<uint32_t*>(dst)[t] = reinterpret_cast<const uint32_t*>(nibbles + c * 128)[t];
  int64_t nsub = (m + SUB - 1) / SUB;
  uint32_t nbits = sub_bits_all[c * NSUB + t];
  uint64_t start = block_scan(scan, nbits) - nbits;
  uint16_t* sub_bits = reinterpret_cast<uint16_t*>(dst + 128);
  if (t < nsub) sub_bits[t] = (uint16_t)nbits;
  if (t == nsub && (nsub & 1)) sub_bits[t] = 0;  // zero pad to 4 bytes
  uint32_t* stream = reinterpret_cast<uint32_t*>(dst + 128 + align4(2 * nsub));
  int64_t s0 = (int64_t)t * SUB;
  int count = (int)max((int64_t)0, min((int64_t)SUB, m - s0));
  int64_t first_w = start >> 5, last_w = (start + nbits + 31) / 32 - 1;
  // Boundary words are shared with the neighbours and OR-ed in: zero them first.
  if (count) {
    stream[first_w] = 0;
    stream[last_w] = 0;
  }
  __syncthreads();
  if (!count) return;
  uint64_t acc = 0;
  int nb = (int)(start & 31);
  int64_t wi = first_w;
  // Words go out four at a time as one 16-byte store where the stream is 16-byte aligned:
  // each thread writes its own run, so narrow stores would scatter across the warp.
  uint32_t q0 = 0, q1 = 0, q2 = 0, q3 = 0;
  int nq = 0;
  int64_t qstart = 0;
  auto put = [&](uint32_t word) {
    if (wi == first_w || wi == last_w) {
      atomicOr(stream + wi, word);
    } else if (nq == 0 && (((uintptr_t)(stream + wi)) & 15) != 0) {
#ifndef FMH_ABLATE_EMIT_NOSTORE
      stream[wi] = word;
#endif
    } else {
      if (nq == 0) qstart = wi;
      q0 = nq == 0 ? word : q0;
      q1 = nq == 1 ? word : q1;
      q2 = nq == 2 ? word : q2;
      q3 = nq == 3 ? word : q3;
      if (++nq == 4) {
#ifndef FMH_ABLATE_EMIT_NOSTORE
        *reinterpret_cast<uint4*>(stream + qstart) = make_uint4(q0, q1, q2, q3);
#endif
        nq = 0;
      }
    }
    ++wi;
  };
  auto one = [&](uint32_t sym) {
    uint32_t e = tab[sym];
    acc |= (uint64_t)(e & 0xffffu) << nb;
    nb += e >> 16;
    if (nb >= 32) {
      put((uint32_t)acc);
      acc >>= 32;
      nb -= 32;
    }
  };
  auto sixteen = [&](uint4 v) {
    uint32_t ws[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int u = 0; u < 16; ++u) one((ws[u >> 2] >> (8 * (u & 3))) & 255);
  };
  const uint8_t* mine = src + s0;
  int done = 0;
#ifdef FMH_ABLATE_EMIT_NOLOOP
  count = 0;
#endif
  if ((((uintptr_t)mine) & 15) == 0) {
    // The next 64 symbols load while these 64 are coded: one memory latency per 64 symbols
    // is hidden behind the work instead of paid per word.
    const uint4* v = reinterpret_cast<const uint4*>(mine);
    int n64 = count / 64;
    uint4 c0, c1, c2, c3;
    if (n64) {
      c0 = ld16(v), c1 = ld16(v + 1), c2 = ld16(v + 2), c3 = ld16(v + 3);
    }
    for (int q = 0; q < n64; ++q) {
      uint4 n0 = c0, n1 = c1, n2 = c2, n3 = c3;
      if (q + 1 < n64) {
        n0 = ld16(v + 4 * q + 4), n1 = ld16(v + 4 * q + 5), n2 = ld16(v + 4 * q + 6), n3 = ld16(v + 4 * q + 7);
      }
      sixteen(c0);
      sixteen(c1);
      sixteen(c2);
      sixteen(c3);
      c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    }
    done = n64 * 64;
  }
  for (int i = done; i < count; ++i) one(mine[i]);
  if (nb > 0) put((uint32_t)acc);
  // Words still pending (fewer than four; never a shared boundary word) go out one by one.
  if (nq > 0) stream[qstart] = q0;
  if (nq > 1) stream[qstart + 1] = q1;
  if (nq > 2) stream[qstart + 2] = q2;
}

// ---------------------------------------------------------------- decode

__device__ inline void fail(int* err, int code, int64_t c) {
  if (atomicCAS(err, 0, code) == 0) err[1] = (int)c;
}

// One block: the FMHS directory read back into each segment's blob offset and length, checked
// against the stream's length (error slot: errs[2 * nseg]).
__global__ void directory(const uint8_t* stream, int64_t stream_bytes, int64_t nseg, int64_t* seg_at,
                          int64_t* seg_len, int* errs) {
  if (threadIdx.x != 0) return;
  int64_t head = 8 + 8 * nseg;
  const uint32_t* h = reinterpret_cast<const uint32_t*>(stream);
  if (stream_bytes < head || h[0] != 0x53484D46u || h[1] != (uint32_t)nseg) {
    fail(errs + 2 * nseg, 9, -1);
    for (int64_t s = 0; s < nseg; ++s) seg_at[s] = seg_len[s] = 0;
    return;
  }
  int64_t at = head;
  for (int64_t s = 0; s < nseg; ++s) {
    int64_t len = (int64_t)(h[2 + 2 * s] | ((uint64_t)h[3 + 2 * s] << 32));
    bool ok = len >= 0 && at + len <= stream_bytes;
    seg_at[s] = ok ? at : 0;
    seg_len[s] = ok ? len : 0;
    at += ok ? len : 0;
    if (!ok) fail(errs + 2 * nseg, 9, s);
  }
  if (at != stream_bytes) fail(errs + 2 * nseg, 9, -1);
}

constexpr int TABLE_SIZE = 1 << MAX_LEN;
constexpr int ROUND = 64;                   // symbols each thread decodes between output flushes
constexpr int STAGE_WORDS = ROUND / 4 + 1;  // odd stride: a warp's slots fall in distinct banks

// One block per chunk of every segment; errors go to errs[2 * segment].
__global__ void __launch_bounds__(NSUB) unpack(const uint8_t* stream, const int64_t* segs, const int64_t* chunks,
                                               const int64_t* seg_at, const int64_t* seg_len, int width,
                                               uint8_t* planes, int* errs) {
  __shared__ uint16_t table[TABLE_SIZE];
  __shared__ uint32_t pairs[TABLE_SIZE];  // up to two symbols per lookup (see below)
  __shared__ uint32_t ostage[NSUB * STAGE_WORDS];
  __shared__ uint8_t lens[256];
  __shared__ uint32_t first[MAX_LEN + 2];
  __shared__ uint32_t scan[NSUB];
  __shared__ unsigned long long check_sh;
  __shared__ int bad_sh;
  Chunk k(chunks, blockIdx.x);
  int64_t m = k.m, c = k.local;
  const int64_t* sg = segs + k.seg * SEG_COLS;
  int64_t nchunks = sg[3];
  int* err = errs + 2 * k.seg;
  const uint8_t* blob = stream + seg_at[k.seg];
  int64_t blob_bytes = seg_len[k.seg];
  int t = threadIdx.x;
  int64_t start_payload = HEADER + ENTRY * nchunks;
  if (blob_bytes < start_payload) {
    if (t == 0) fail(err, 8, c);
    return;
  }
  if (c == 0 && t == 0) {
    const uint32_t* h = reinterpret_cast<const uint32_t*>(blob);
    uint64_t nb = h[2] | ((uint64_t)h[3] << 32);
    if (h[0] != 0x31484D46u || h[1] != 1 || nb != (uint64_t)sg[1] || h[4] != (uint32_t)width ||
        h[5] != (uint32_t)nchunks || h[7] != CHUNK)
      fail(err, 8, -1);
  }
  const uint32_t* e = reinterpret_cast<const uint32_t*>(blob + HEADER + c * ENTRY);
  uint64_t off = e[0] | ((uint64_t)e[1] << 32);
  uint32_t stored = e[2], md = e[3];
  uint64_t want = e[4] | ((uint64_t)e[5] << 32);
  if (start_payload + off + stored > (uint64_t)blob_bytes || (stored & 3) || (off & 3)) {
    if (t == 0) fail(err, 1, c);
    return;
  }
  const uint8_t* body = blob + start_payload + off;
  uint8_t* out = planes + k.src;
  bool aligned = (((uintptr_t)out) & 3) == 0;
  if (t == 0) {
    check_sh = 0;
    bad_sh = 0;
  }
  __syncthreads();
  uint64_t sum = 0;
  if (md == RAW) {
    if (stored != align4(m)) {
      if (t == 0) fail(err, 2, c);
      return;
    }
    for_words(body, align4(m), 0, (m + 3) / 4, [&](int64_t j, uint32_t w) {
      sum += mix((uint64_t)w | ((uint64_t)j << 32));
      if (aligned && 4 * j + 4 <= m) reinterpret_cast<uint32_t*>(out)[j] = w;
      else
        for (int q = 0; q < 4 && 4 * j + q < m; ++q) out[4 * j + q] = (uint8_t)(w >> (8 * q));
    });
  } else if (md == HUFF) {
    int64_t nsub = (m + SUB - 1) / SUB;
    if (stored < 128 + align4(2 * nsub)) {
      if (t == 0) fail(err, 4, c);
      return;
    }
    for (int i = t; i < TABLE_SIZE; i += blockDim.x) table[i] = 0;
    for (int s = t; s < 256; s += blockDim.x) {
      uint8_t nib = body[s >> 1];
      lens[s] = (s & 1) ? nib >> 4 : nib & 15;
    }
    __syncthreads();
    if (t == 0) {
      uint32_t count[16] = {0};
      for (int u = 0; u < 256; ++u) count[lens[u]]++;
      uint32_t code = 0, kraft = 0;
      for (int l = 1; l <= MAX_LEN; ++l) {
        first[l] = code;
        code = (code + count[l]) << 1;
        kraft += count[l] << (MAX_LEN - l);
      }
      for (int l = MAX_LEN + 1; l < 16; ++l) kraft += count[l] ? (1u << 30) : 0;
      if (kraft > (1u << MAX_LEN)) bad_sh = 1;
    }
    __syncthreads();
    if (bad_sh) {
      if (t == 0) fail(err, 3, c);
      return;
    }
    for (int s = t; s < 256; s += blockDim.x) {
      int l = lens[s];
      if (!l) continue;
      uint32_t code = first[l];
      for (int u = 0; u < s; ++u) code += lens[u] == l;
      uint32_t rev = __brev(code) >> (32 - l);
      for (uint32_t q = 0; q < (1u << (MAX_LEN - l)); ++q) table[rev | (q << l)] = (uint16_t)(s | (l << 8));
    }
    __syncthreads();
    // Two symbols per lookup where both codes fit the 12-bit window (exponent codes average
    // under 3 bits): entry = s1 | s2 << 8 | bits << 16 | symbols << 24; 0 where no code starts.
    for (int i = t; i < TABLE_SIZE; i += blockDim.x) {
      uint32_t e1 = table[i], l1 = e1 >> 8, e = 0;
      if (l1) {
        uint32_t e2 = table[i >> l1], l2 = e2 >> 8;
        if (l2 && l1 + l2 <= MAX_LEN) e = (e1 & 255u) | ((e2 & 255u) << 8) | ((l1 + l2) << 16) | (2u << 24);
        else e = (e1 & 255u) | (l1 << 16) | (1u << 24);
      }
      pairs[i] = e;
    }
    const uint16_t* sub_bits = reinterpret_cast<const uint16_t*>(body + 128);
    uint32_t nbits = t < nsub ? sub_bits[t] : 0;
    uint64_t pos = block_scan(scan, nbits) - nbits;
    int64_t stream_at = 128 + align4(2 * nsub);
    int64_t total = scan[NSUB - 1];
    if (stream_at + 4 * ((total + 31) / 32) != stored) {
      if (t == 0) fail(err, 4, c);
      return;
    }
    const uint32_t* words = reinterpret_cast<const uint32_t*>(body + stream_at);
    int64_t nwords = (total + 31) / 32;
    int64_t s0 = (int64_t)t * SUB;
    int count = (int)max((int64_t)0, min((int64_t)SUB, m - s0));
    int64_t wi = pos >> 5;
    auto word = [&](int64_t i) -> uint64_t { return i < nwords ? __ldg(words + i) : 0u; };
    uint64_t buf = (word(wi) | (word(wi + 1) << 32)) >> (pos & 31);
    int avail = 64 - (int)(pos & 31);
    // Three words are always in flight ahead of the refills: a global load takes longer than
    // the couple of dozen symbols one word holds.
    uint64_t next0 = word(wi + 2), next1 = word(wi + 3), next2 = word(wi + 4);
    wi += 5;
    uint32_t used = 0;
    bool bad = false;
    uint64_t pk = 0;  // decoded bytes not yet staged, np of them
    int np = 0, done = 0;
    // Output goes through shared memory, ROUND symbols per thread at a time, then out with
    // coalesced stores: each thread storing its own sub-block's words would scatter them.
    uint32_t* mine = ostage + t * STAGE_WORDS;
    for (int r = 0; r < SUB / ROUND; ++r) {
      int limit = min(count, (r + 1) * ROUND);
      int staged_words = 0;
#ifdef FMH_ABLATE_NOLOOP
      done = limit;
#endif
      while (done < limit) {
        if (avail < 32) {
          buf |= next0 << avail;
          avail += 32;
          next0 = next1;
          next1 = next2;
          next2 = word(wi++);
        }
        uint32_t e = pairs[buf & (TABLE_SIZE - 1)];
        uint32_t n = e >> 24;
        if (n == 2 && done + 1 == limit) {  // a round's last symbol: take one only
          uint32_t e1 = table[buf & (TABLE_SIZE - 1)];
          e = (e1 & 255u) | ((e1 >> 8) << 16) | (1u << 24);
          n = 1;
        }
        uint32_t l = (e >> 16) & 255u;
        bad |= n == 0;
        n = n ? n : 1;
        l = l ? l : 1;
        buf >>= l;
        avail -= l;
        used += l;
        pk |= (uint64_t)(e & 0xffffu) << (8 * np);
        np += n;
        done += n;
        if (np >= 4) {
          mine[staged_words++] = (uint32_t)pk;
          pk >>= 32;
          np -= 4;
        }
      }
      if (np && done == count) {  // the sub-block's last, partial word (zero padded)
        mine[staged_words++] = (uint32_t)(pk & 0xffffffffull);
        np = 0;
      }
      __syncthreads();
      // Thread slot q's words of this round go to words q * SUB/4 + r * ROUND/4 + i.
      for (int idx = t; idx < NSUB * (ROUND / 4); idx += blockDim.x) {
        int q = idx / (ROUND / 4), i = idx % (ROUND / 4);
        int64_t j = (int64_t)q * (SUB / 4) + r * (ROUND / 4) + i;
        if (4 * j >= m) continue;
        uint32_t w = ostage[q * STAGE_WORDS + i];
        sum += mix((uint64_t)w | ((uint64_t)j << 32));
        if (aligned && 4 * j + 4 <= m) reinterpret_cast<uint32_t*>(out)[j] = w;
        else
          for (int b = 0; b < 4 && 4 * j + b < m; ++b) out[4 * j + b] = (uint8_t)(w >> (8 * b));
      }
      __syncthreads();
    }
    if (bad || (count && used != nbits)) fail(err, 5, c);
  } else {
    if (t == 0) fail(err, 6, c);
    return;
  }
  for (int o = 16; o; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
  if ((t & 31) == 0) atomicAdd(&check_sh, (unsigned long long)sum);
  __syncthreads();
  if (t == 0 && check_sh != want) fail(err, 7, c);
}

}  // namespace fmh

extern "C" {

// The most bytes one segment's FMH1 blob can take (every chunk raw).
int64_t fmstore_huff_max_bytes(int64_t nbytes, int width) {
  int64_t per_plane = (nbytes / width + fmh::CHUNK - 1) / fmh::CHUNK;
  int64_t nchunks = per_plane * width;
  return fmh::HEADER + fmh::ENTRY * nchunks + nchunks * 4 + nbytes;
}

// Device scratch the encoder (and, for its segment arrays, the decoder) needs.
int64_t fmstore_huff_scratch_bytes(int64_t nbytes, int64_t nchunks, int64_t nseg) {
  int64_t per_chunk = 256 * 4 + 8 + fmh::NSUB * 4 + 256 * 4 + 8 + 4 + 4 + 128;
  return ((fmh::align4(nbytes) + 15) & ~int64_t(15)) + nchunks * per_chunk + nseg * 24 + 64;
}

// Encode segments [s0, s1) of flat `data` (segment and chunk rows built by
// fmstore/codec/gpu.py, on the device; `segs_host` their host copy) into `out`, laid out as the
// whole FMHS stream; the end of segment s1 - 1 in it goes to device `total`.  Launches for
// consecutive ranges on one stream build one stream (the caller copies each range out as it
// lands); the directory is complete after the last.  `scratch` is shared by the ranges.
int fmstore_huff_encode(const uint8_t* data, int width, int flags, const int64_t* segs, const int64_t* segs_host,
                        int64_t nseg, int64_t s0, int64_t s1, const int64_t* chunks, int64_t nchunks, uint8_t* out,
                        int64_t* total, uint8_t* scratch, cudaStream_t stream) {
  using namespace fmh;
  if (nseg == 0) {
    stream_layout<<<1, 32, 0, stream>>>(0, 0, 0, nullptr, nullptr, out, total);
    return (int)cudaGetLastError();
  }
  int64_t nbytes = segs_host[(nseg - 1) * SEG_COLS] + segs_host[(nseg - 1) * SEG_COLS + 1];
  uint8_t* planes_buf = scratch;
  int64_t at = (align4(nbytes) + 15) & ~int64_t(15);
  uint32_t* counts = reinterpret_cast<uint32_t*>(scratch + at);
  at += nchunks * 256 * 4;
  unsigned long long* checks = reinterpret_cast<unsigned long long*>(scratch + at);
  at += nchunks * 8;
  uint32_t* sub_bits = reinterpret_cast<uint32_t*>(scratch + at);
  at += nchunks * NSUB * 4;
  uint32_t* codes = reinterpret_cast<uint32_t*>(scratch + at);
  at += nchunks * 256 * 4;
  uint64_t* offsets = reinterpret_cast<uint64_t*>(scratch + at);
  at += nchunks * 8;
  int64_t* seg_len = reinterpret_cast<int64_t*>(scratch + at);
  at += nseg * 8;
  int64_t* seg_at = reinterpret_cast<int64_t*>(scratch + at);
  at += nseg * 8;
  uint32_t* stored = reinterpret_cast<uint32_t*>(scratch + at);
  at += nchunks * 4;
  uint32_t* mode = reinterpret_cast<uint32_t*>(scratch + at);
  at += nchunks * 4;
  uint8_t* nibbles = scratch + at;
  int64_t c0 = segs_host[s0 * SEG_COLS + 2];
  int64_t c1 = segs_host[(s1 - 1) * SEG_COLS + 2] + segs_host[(s1 - 1) * SEG_COLS + 3];
  int64_t nc = c1 - c0;
  cudaError_t e = cudaMemsetAsync(counts + c0 * 256, 0, nc * 256 * 4, stream);
  if (!e) e = cudaMemsetAsync(checks + c0, 0, nc * 8, stream);
  if (!e) e = cudaMemsetAsync(sub_bits + c0 * NSUB, 0, nc * NSUB * 4, stream);
  if (e) return (int)e;
  const uint8_t* planes = data;
  if (width > 1) {
    for (int64_t s = s0; s < s1; ++s) {
      int64_t begin = segs_host[s * SEG_COLS], len = segs_host[s * SEG_COLS + 1];
      int rc = fmstore_split(data + begin, planes_buf + begin, len / width, width, stream);
      if (rc) return rc;
    }
    planes = planes_buf;
  }
  dim3 sliced((unsigned)nc, CHUNK / HIST_SLICE);
  hist<<<sliced, 256, 0, stream>>>(planes, chunks, c0, counts, checks);
  build<<<(unsigned)nc, 256, 0, stream>>>(chunks, c0, counts, codes, nibbles, stored, mode);
  bits<<<sliced, 256, 0, stream>>>(planes, chunks, c0, codes, mode, sub_bits);
  seg_layout<<<(unsigned)(s1 - s0), 1024, 0, stream>>>(segs, s0, stored, offsets, seg_len);
  stream_layout<<<1, 1024, 0, stream>>>(nseg, s0, s1, seg_len, seg_at, out, total);
  tables<<<(unsigned)(s1 - s0), 256, 0, stream>>>(segs, s0, width, flags, stored, mode, checks, offsets, seg_at, out);
  emit<<<(unsigned)nc, NSUB, 0, stream>>>(planes, segs, chunks, c0, codes, nibbles, mode, offsets, sub_bits, seg_at,
                                        out);
  return (int)cudaGetLastError();
}

// Decode the FMHS `stream` (stream_bytes long) into `out`, through `planes_buf` (the same size)
// when width > 1.  errs (2 device ints per segment, then 2 for the directory; zeroed here)
// get (code, chunk) of the first damage found; the caller reads them after the stream ran.
int fmstore_huff_decode(const uint8_t* stream, int64_t stream_bytes, int width, const int64_t* segs,
                        const int64_t* segs_host, int64_t nseg, const int64_t* chunks, int64_t nchunks, uint8_t* out,
                        uint8_t* planes_buf, int* errs, int64_t* seg_arrays, cudaStream_t stream_) {
  using namespace fmh;
  cudaError_t e = cudaMemsetAsync(errs, 0, (2 * nseg + 2) * sizeof(int), stream_);
  if (e || nseg == 0) return (int)e;
  int64_t* seg_at = seg_arrays;
  int64_t* seg_len = seg_arrays + nseg;
  directory<<<1, 32, 0, stream_>>>(stream, stream_bytes, nseg, seg_at, seg_len, errs);
  uint8_t* planes = width > 1 ? planes_buf : out;
  if (nchunks) unpack<<<(unsigned)nchunks, NSUB, 0, stream_>>>(stream, segs, chunks, seg_at, seg_len, width, planes, errs);
  e = cudaGetLastError();
  if (e) return (int)e;
  if (width > 1) {
    for (int64_t s = 0; s < nseg; ++s) {
      int64_t begin = segs_host[s * SEG_COLS], len = segs_host[s * SEG_COLS + 1];
      int rc = fmstore_merge(planes + begin, out + begin, len / width, width, stream_);
      if (rc) return rc;
    }
  }
  return 0;
}

}  // extern "C"
