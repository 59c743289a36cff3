// The GPU codec chain: byte planes, then per chunk a canonical Huffman code or the raw bytes,
// written in the FMH1 layout that fmstore/codec/huffman.py documents and reproduces byte for
// byte on the CPU (tests/test_kernels.py compares the two on a CUDA machine).
//
// Encode, all on the caller's stream, no host round trip:
//   prep       zero the accumulators and split the input into planes (planes.cu's code), in one
//              launch for all segments
//   hist       per-chunk byte histograms and chunk checks (order-free sums)
//   build      per chunk: length-limited Huffman lengths, canonical codes, exact sizes, mode
//   layout     per segment: chunk offsets (one block scans them), header and chunk table
//   emit       per chunk, four threads per 1024-symbol sub-block (256 symbols each): each
//              counts its bits, a block scan gives its offset, then it writes them; raw chunks
//              are copied
// Decode: one block per chunk; the payload staged and a 4096-entry table in shared memory,
// one thread per sub-block, each checking it ends where its stored bit length says, then the
// chunk check; then merge.  Errors (damaged or foreign blob) are recorded in a device int pair
// (code, chunk) per segment.  Each kernel is launched once for all segments of a tensor.
//
// Plain C ABI, called through ctypes with raw device pointers.

#include <cuda_runtime.h>

#include <algorithm>
#include <stdint.h>

#include "planes.cu"

namespace fmh {

constexpr int CHUNK = 1 << 17;
constexpr int SUB = 1024;
constexpr int NSUB = CHUNK / SUB;  // threads of a decode block
// The encoder splits each sub-block in four: more threads to hide each one's serial bit
// packing, which bounds emit on tensors too small to fill the GPU.  Same stream format.
constexpr int QSUB = SUB / 4;
constexpr int NQ = CHUNK / QSUB;  // threads of an emit block
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

// ---------------------------------------------------------------- prep

// Split (SPLIT) or merge one segment of n_elems W-byte elements, 16-byte aligned, as thread
// i0 of `step`: a split 16 elements at a time where the planes start 16-aligned (n_elems % 16
// == 0, every segment but maybe a tensor's last), else 4 (n_elems % 4 == 0: merges always,
// see planes_launch), else byte by byte.
template <int W, bool SPLIT>
__device__ inline void planes_segment(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t n_elems,
                                      int64_t i0, int64_t step) {
  int64_t done = 0;
  if (SPLIT && n_elems % 16 == 0) {
    for (int64_t g = i0; g < n_elems / 16; g += step) split16<W>(in, out, n_elems, g);
    done = n_elems;
  } else if (n_elems % 4 == 0) {
    for (int64_t q = i0; q < n_elems / 4; q += step) {
      if (SPLIT) split_quad<W>(in, out, n_elems, q);
      else merge_quad<W>(in, out, n_elems, q);
    }
    done = n_elems;
  }
  for (int64_t i = done * W + i0; i < n_elems * W; i += step) {
    int64_t plane_at = (i % W) * n_elems + i / W;
    if (SPLIT) out[plane_at] = in[i];
    else out[i] = in[plane_at];
  }
}

// Before hist, one launch: blocks of row 0 zero two accumulator arrays (z0, z1); for W 2
// and 4, row y splits segment s0 + y into its planes (a launch per segment plus three memsets
// cost more than the work on small tensors).  W 1: zeroing only.
template <int W>
__global__ void prep(const uint8_t* __restrict__ data, uint8_t* __restrict__ planes, const int64_t* segs, int64_t s0,
                     uint32_t* z0, int64_t n0, uint32_t* z1, int64_t n1) {
  int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, step = (int64_t)gridDim.x * blockDim.x;
  if (blockIdx.y == 0) {
    for (int64_t i = i0; i < n0; i += step) z0[i] = 0;
    for (int64_t i = i0; i < n1; i += step) z1[i] = 0;
  }
  if constexpr (W > 1) {
    const int64_t* sg = segs + (s0 + blockIdx.y) * SEG_COLS;
    int64_t n_elems = sg[1] / W;
    const uint8_t* in = data + sg[0];
    uint8_t* out = planes + sg[0];
    planes_segment<W, true>(in, out, n_elems, i0, step);
  }
}

// Merge segments [s0, s0 + gridDim.y) of `planes` into `out` (row y: one segment), W 2 or 4,
// `out` 16-byte aligned: one launch for all of a tensor's segments.
template <int W>
__global__ void merge_segs(const uint8_t* __restrict__ planes, uint8_t* __restrict__ out, const int64_t* segs) {
  const int64_t* sg = segs + blockIdx.y * SEG_COLS;
  int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, step = (int64_t)gridDim.x * blockDim.x;
  planes_segment<W, false>(planes + sg[0], out + sg[0], sg[1] / W, i0, step);
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

// floor(65536 * log2(1 + f / 256)), f = 0..256: integer bounds of log2 for the entropy test
// in build (exact decimal arithmetic wrote this table).
__constant__ uint32_t LOG2_FRAC[257] = {
    0, 368, 735, 1101, 1465, 1828, 2190, 2550, 2909, 3266, 3622, 3977,
    4331, 4683, 5034, 5383, 5731, 6078, 6424, 6769, 7112, 7454, 7794, 8134,
    8472, 8809, 9145, 9480, 9813, 10146, 10477, 10807, 11136, 11463, 11790, 12115,
    12440, 12763, 13085, 13406, 13726, 14045, 14363, 14680, 14995, 15310, 15624, 15936,
    16248, 16558, 16868, 17176, 17484, 17790, 18096, 18400, 18704, 19006, 19308, 19608,
    19908, 20207, 20505, 20801, 21097, 21392, 21686, 21980, 22272, 22563, 22854, 23143,
    23432, 23720, 24007, 24293, 24578, 24862, 25146, 25429, 25710, 25991, 26272, 26551,
    26829, 27107, 27384, 27660, 27935, 28210, 28483, 28756, 29028, 29300, 29570, 29840,
    30109, 30377, 30644, 30911, 31177, 31442, 31707, 31971, 32234, 32496, 32757, 33018,
    33278, 33538, 33796, 34054, 34312, 34568, 34824, 35079, 35334, 35588, 35841, 36093,
    36345, 36596, 36847, 37096, 37346, 37594, 37842, 38089, 38336, 38582, 38827, 39071,
    39315, 39559, 39801, 40044, 40285, 40526, 40766, 41006, 41245, 41483, 41721, 41959,
    42195, 42431, 42667, 42902, 43136, 43370, 43603, 43836, 44068, 44299, 44530, 44760,
    44990, 45219, 45448, 45676, 45904, 46131, 46357, 46583, 46808, 47033, 47257, 47481,
    47704, 47927, 48149, 48371, 48592, 48813, 49033, 49253, 49472, 49690, 49909, 50126,
    50343, 50560, 50776, 50992, 51207, 51421, 51635, 51849, 52062, 52275, 52487, 52699,
    52910, 53121, 53331, 53541, 53751, 53960, 54168, 54376, 54584, 54791, 54998, 55204,
    55410, 55615, 55820, 56024, 56228, 56432, 56635, 56837, 57040, 57242, 57443, 57644,
    57844, 58044, 58244, 58443, 58642, 58841, 59039, 59236, 59433, 59630, 59827, 60023,
    60218, 60413, 60608, 60802, 60996, 61190, 61383, 61576, 61768, 61960, 62152, 62343,
    62534, 62724, 62914, 63104, 63293, 63482, 63671, 63859, 64047, 64234, 64421, 64608,
    64794, 64980, 65165, 65351, 65536,
};

// log2(x) * 65536 rounded down (LO) or up (!LO), from x's top 9 significant bits, x >= 1.
template <bool LO>
__device__ inline int64_t log2_bound(uint64_t x) {
  int e = 63 - __clzll((long long)x);
  uint32_t f = e >= 8 ? (uint32_t)(x >> (e - 8)) & 255u : (uint32_t)(x << (8 - e)) & 255u;
  // x lies in [2^e (1 + f/256), 2^e (1 + (f+1)/256)); exact when e <= 8.
  return (int64_t)e * 65536 + (LO ? LOG2_FRAC[f] : LOG2_FRAC[f + 1] + 1);
}

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
  __shared__ uint32_t count_sh[MAX_LEN + 1];
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
  // Warp reductions first: 256 atomics on one shared word would run one after another.
  uint32_t wlo = __reduce_min_sync(0xffffffffu, w[s]), whi = __reduce_max_sync(0xffffffffu, w[s]);
  if ((s & 31) == 0) {
    atomicMin(&lo_sh, wlo);
    atomicMax(&hi_sh, whi);
  }
  __syncthreads();
  if (lo_sh > 0 && hi_sh <= 2 * lo_sh) {
    codes[c * 256 + s] = 0;
    if (s == 0) {
      stored[c] = (uint32_t)align4(m);
      mode[c] = RAW;
    }
    return;
  }
  // Any prefix code costs at least the entropy, m log2 m - sum c log2 c bits: where a lower
  // bound of it (integer, in 2^-16 bits) already leaves no 2% to save, the chunk is raw without
  // building a code.  The build would decide raw too, so the CPU reference needs no such rule.
  // Saves the 255-step build on near-uniform planes (a bf16's low byte, entropy ~7.96 bits).
  int64_t ent = 0;
  if (w[s]) ent = max((int64_t)0, (int64_t)w[s] * (log2_bound<true>((uint64_t)m) - log2_bound<false>(w[s])));
  for (int o = 16; o; o >>= 1) ent += __shfl_down_sync(0xffffffffu, ent, o);
  if ((s & 31) == 0) part_sh[s >> 5] = (unsigned long long)ent;
  __syncthreads();
  ent = 0;
  for (int q = 0; q < 8; ++q) ent += (int64_t)part_sh[q];
  if (50 * ent >= 392 * m * 65536) {  // bits >= 0.98 * 8m, so stored * 50 >= m * 49
    codes[c * 256 + s] = 0;
    if (s == 0) {
      stored[c] = (uint32_t)align4(m);
      mode[c] = RAW;
    }
    return;
  }
  __syncthreads();  // part_sh is used again below
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
  if (s <= MAX_LEN) count_sh[s] = 0;
  __syncthreads();
  if (lens[s]) atomicAdd(&count_sh[lens[s]], 1u);
  __syncthreads();
  if (s == 0) {
    uint32_t code = 0;
    for (int l = 1; l <= MAX_LEN; ++l) {
      first[l] = code;
      code = (code + count_sh[l]) << 1;
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
  if (threadIdx.x == 0) {
    *total = carry;
    // `total` may be pinned host memory that the host polls while the chain still runs (it
    // learns the size to copy before emit ends): make the write visible to the system now.
    __threadfence_system();
  }
}

// Per segment: its FMH1 header and chunk table, at its place in the stream.
__global__ void tables(const int64_t* segs, int64_t s_base, int width, const uint32_t* stored,
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
    h[6] = 0;  // flags: none (bit 0 marked an XOR delta, no longer written or read)
    h[7] = CHUNK;
  }
}

// ---------------------------------------------------------------- emit

__device__ inline uint4 ld16(const uint4* p) { return __ldg(p); }

__global__ void __launch_bounds__(NQ) emit(const uint8_t* planes, const int64_t* segs, const int64_t* chunks,
                                             int64_t c_base, const uint32_t* codes, const uint8_t* nibbles,
                                             const uint32_t* mode, const uint64_t* offsets,
                                             const int64_t* seg_at, uint8_t* out) {
  __shared__ uint32_t tab[256];
  __shared__ uint32_t scan[NQ];
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
  __syncthreads();
  int64_t s0 = (int64_t)t * QSUB;
  int count = (int)max((int64_t)0, min((int64_t)QSUB, m - s0));
  const uint8_t* mine = src + s0;
  bool vec = (((uintptr_t)mine) & 15) == 0;
  // Pass 1, this thread's bits (its symbols' code lengths): the stream offsets need every
  // thread's count before any writes.  Pass 2 below reads the same bytes again, from cache.
  uint32_t nbits = 0;
  int counted = 0;
  auto lens16 = [&](uint4 x) {
    uint32_t ws[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int u = 0; u < 16; ++u) nbits += tab[(ws[u >> 2] >> (8 * (u & 3))) & 255] >> 16;
  };
  if (vec) {
    const uint4* v = reinterpret_cast<const uint4*>(mine);
    for (; counted + 64 <= count; counted += 64) {  // four loads in flight
      uint4 x0 = ld16(v + counted / 16), x1 = ld16(v + counted / 16 + 1), x2 = ld16(v + counted / 16 + 2),
            x3 = ld16(v + counted / 16 + 3);
      lens16(x0);
      lens16(x1);
      lens16(x2);
      lens16(x3);
    }
    for (; counted + 16 <= count; counted += 16) lens16(ld16(v + counted / 16));
  }
  for (; counted < count; ++counted) nbits += tab[mine[counted]] >> 16;
  int64_t nsub = (m + SUB - 1) / SUB;
  uint64_t start = block_scan(scan, nbits) - nbits;
  uint16_t* sub_bits = reinterpret_cast<uint16_t*>(dst + 128);
  if ((t & 3) == 3 && (t >> 2) < nsub) sub_bits[t >> 2] = (uint16_t)(scan[t] - (t >= 4 ? scan[t - 4] : 0));
  if (t == 0 && (nsub & 1)) sub_bits[nsub] = 0;  // zero pad to 4 bytes
  uint32_t* stream = reinterpret_cast<uint32_t*>(dst + 128 + align4(2 * nsub));
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
  bool first = true;
  // Words go out four at a time as one 16-byte store where the stream is 16-byte aligned:
  // each thread writes its own run, so narrow stores would scatter across the warp.  Only
  // the first word and the last partial one can be shared with a neighbour (OR-ed in); a
  // complete last word ends where the next thread's run starts, so it is this thread's own.
  uint32_t q0 = 0, q1 = 0, q2 = 0, q3 = 0;
  int nq = 0;
  int64_t qstart = 0;
  auto put = [&](uint32_t word) {
    if (first) {
      atomicOr(stream + wi, word);
      first = false;
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
  // Two symbols per step: their codes joined (at most 24 bits) and one check for a full word;
  // fewer than 32 bits are pending before a step, so at most 55 after it.  Each step's branch
  // diverges across the warp, so halving the steps halves the time spent in it.
  auto two = [&](uint32_t a, uint32_t b) {
    uint32_t ea = tab[a], eb = tab[b];
    uint32_t la = ea >> 16;
    acc |= (uint64_t)((ea & 0xffffu) | ((eb & 0xffffu) << la)) << nb;
    nb += (int)(la + (eb >> 16));
    if (nb >= 32) {
      put((uint32_t)acc);
      acc >>= 32;
      nb -= 32;
    }
  };
  auto sixteen = [&](uint4 v) {
    uint32_t ws[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int u = 0; u < 16; u += 2) two((ws[u >> 2] >> (8 * (u & 3))) & 255, (ws[u >> 2] >> (8 * (u & 3) + 8)) & 255);
  };
  int done = 0;
#ifdef FMH_ABLATE_EMIT_NOLOOP
  count = 0;
#endif
  if (vec) {
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
  for (int i = done; i < count; i += 2) {
    uint32_t a = mine[i];
    if (i + 1 < count) {
      two(a, mine[i + 1]);
    } else {  // an odd count's last symbol, alone
      uint32_t e = tab[a];
      acc |= (uint64_t)(e & 0xffffu) << nb;
      nb += (int)(e >> 16);
      if (nb >= 32) {
        put((uint32_t)acc);
        acc >>= 32;
        nb -= 32;
      }
    }
  }
  // The last, partial word: maybe shared with the next thread's first.
  if (nb > 0) atomicOr(stream + wi, (uint32_t)acc);
  // Words still pending (fewer than four; never shared) go out one by one.
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
        h[5] != (uint32_t)nchunks || h[6] != 0 || h[7] != CHUNK)
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
  int64_t per_chunk = 256 * 4 + 8 + 256 * 4 + 8 + 4 + 4 + 128;
  return ((fmh::align4(nbytes) + 15) & ~int64_t(15)) + nchunks * per_chunk + nseg * 24 + 64;
}

// Encode segments [s0, s1) of flat `data` (segment and chunk rows built by
// fmstore/codec/gpu.py, on the device; `segs_host` their host copy) into `out`, laid out as the
// whole FMHS stream; the end of segment s1 - 1 in it goes to `total` (device memory, or pinned
// host memory, where it lands before tables and emit run).  Launches for
// consecutive ranges on one stream build one stream (the caller copies each range out as it
// lands); the directory is complete after the last.  `scratch` is shared by the ranges.
int fmstore_huff_encode(const uint8_t* data, int width, const int64_t* segs, const int64_t* segs_host,
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
  const uint8_t* planes = width > 1 ? planes_buf : data;
  // Widths 2 and 4 (aligned): zeroing and the split in one launch; else zeroing, then a split
  // per segment.
  bool batched = (width == 2 || width == 4) && (((uintptr_t)data) & 15) == 0;
  int64_t biggest = 0;
  for (int64_t s = s0; s < s1; ++s) biggest = std::max(biggest, segs_host[s * SEG_COLS + 1]);
  int64_t zero_work = std::max(nc * 256, batched ? biggest / (16 * width) : 0);
  dim3 grid((unsigned)std::min<int64_t>(512, std::max<int64_t>(1, (zero_work + 255) / 256)),
            batched ? (unsigned)(s1 - s0) : 1u);
  auto* z0 = counts + c0 * 256;
  auto* z1 = reinterpret_cast<uint32_t*>(checks + c0);
  if (batched && width == 2) prep<2><<<grid, 256, 0, stream>>>(data, planes_buf, segs, s0, z0, nc * 256, z1, 2 * nc);
  else if (batched) prep<4><<<grid, 256, 0, stream>>>(data, planes_buf, segs, s0, z0, nc * 256, z1, 2 * nc);
  else prep<1><<<grid, 256, 0, stream>>>(data, planes_buf, segs, s0, z0, nc * 256, z1, 2 * nc);
  if (!batched && width > 1) {
    for (int64_t s = s0; s < s1; ++s) {
      int64_t begin = segs_host[s * SEG_COLS], len = segs_host[s * SEG_COLS + 1];
      int rc = fmstore_split(data + begin, planes_buf + begin, len / width, width, stream);
      if (rc) return rc;
    }
  }
  dim3 sliced((unsigned)nc, CHUNK / HIST_SLICE);
  hist<<<sliced, 256, 0, stream>>>(planes, chunks, c0, counts, checks);
  build<<<(unsigned)nc, 256, 0, stream>>>(chunks, c0, counts, codes, nibbles, stored, mode);
  seg_layout<<<(unsigned)(s1 - s0), 1024, 0, stream>>>(segs, s0, stored, offsets, seg_len);
  stream_layout<<<1, 1024, 0, stream>>>(nseg, s0, s1, seg_len, seg_at, out, total);
  tables<<<(unsigned)(s1 - s0), 256, 0, stream>>>(segs, s0, width, stored, mode, checks, offsets, seg_at, out);
  emit<<<(unsigned)nc, NQ, 0, stream>>>(planes, segs, chunks, c0, codes, nibbles, mode, offsets, seg_at,
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
  if ((width == 2 || width == 4) && (((uintptr_t)out) & 15) == 0) {
    int64_t biggest = 0;
    for (int64_t s = 0; s < nseg; ++s) biggest = std::max(biggest, segs_host[s * SEG_COLS + 1]);
    dim3 grid((unsigned)std::min<int64_t>(512, std::max<int64_t>(1, biggest / 16 / 256)), (unsigned)nseg);
    if (width == 2) merge_segs<2><<<grid, 256, 0, stream_>>>(planes, out, segs);
    else merge_segs<4><<<grid, 256, 0, stream_>>>(planes, out, segs);
    return (int)cudaGetLastError();
  }
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
