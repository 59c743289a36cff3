// Byte-plane split/merge on the GPU: the reversible transforms of fmstore's
// codec chain.  Each must produce exactly the bytes of its CPU reference in
// fmstore/codec/planes.py (tests/test_kernels.py compares them on a CUDA machine).
//
// Plain C ABI (no torch headers): the library is built with nvcc alone and called through
// ctypes with raw device pointers and the caller's stream.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

// split, width 2 or 4: quad q is elements 4q..4q+3 (one 8- or 16-byte load), written as one
// 32-bit word (4 bytes) to each plane, so loads and stores are both vectorized and coalesced.
template <int W>
__device__ inline void split_quad(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t n_elems,
                                  int64_t quad) {
  uint8_t b[4 * W];
  if (W == 2) {
    *reinterpret_cast<uint2*>(b) = reinterpret_cast<const uint2*>(in)[quad];
  } else {
    *reinterpret_cast<uint4*>(b) = reinterpret_cast<const uint4*>(in)[quad];
  }
#pragma unroll
  for (int p = 0; p < W; ++p) {
    uint32_t word = (uint32_t)b[p] | ((uint32_t)b[W + p] << 8) | ((uint32_t)b[2 * W + p] << 16) |
                    ((uint32_t)b[3 * W + p] << 24);
    reinterpret_cast<uint32_t*>(out + (int64_t)p * n_elems)[quad] = word;
  }
}

template <int W>
__device__ inline void merge_quad(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t n_elems,
                                  int64_t quad) {
  uint8_t b[4 * W];
#pragma unroll
  for (int p = 0; p < W; ++p) {
    uint32_t word = reinterpret_cast<const uint32_t*>(in + (int64_t)p * n_elems)[quad];
#pragma unroll
    for (int k = 0; k < 4; ++k) b[k * W + p] = (uint8_t)(word >> (8 * k));
  }
  if (W == 2) {
    reinterpret_cast<uint2*>(out)[quad] = *reinterpret_cast<uint2*>(b);
  } else {
    reinterpret_cast<uint4*>(out)[quad] = *reinterpret_cast<uint4*>(b);
  }
}

// Split (SPLIT) or merge, grid-stride over quads.
template <int W, bool SPLIT>
__global__ void planes_vec(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t n_elems) {
  int64_t n_quads = n_elems / 4;
  for (int64_t quad = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; quad < n_quads;
       quad += (int64_t)gridDim.x * blockDim.x) {
    if (SPLIT) split_quad<W>(in, out, n_elems, quad);
    else merge_quad<W>(in, out, n_elems, quad);
  }
}

// 4x4 byte transpose of four words: byte k of word j <-> byte j of word k.
__device__ inline void transpose4(uint32_t& a, uint32_t& b, uint32_t& c, uint32_t& d) {
  uint32_t t0 = __byte_perm(a, b, 0x5140), t1 = __byte_perm(c, d, 0x5140);
  uint32_t t2 = __byte_perm(a, b, 0x7362), t3 = __byte_perm(c, d, 0x7362);
  a = __byte_perm(t0, t1, 0x5410);
  b = __byte_perm(t0, t1, 0x7632);
  c = __byte_perm(t2, t3, 0x5410);
  d = __byte_perm(t2, t3, 0x7632);
}

// Split elements 16g..16g+15, width 2 or 4: W 16-byte loads, one 16-byte store per plane
// (coalesced across the warp).  Needs n_elems % 16 == 0 and 16-byte aligned pointers.
template <int W>
__device__ inline void split16(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t n_elems,
                               int64_t g) {
  uint32_t x[4 * W];
#pragma unroll
  for (int k = 0; k < W; ++k) {
    uint4 v = reinterpret_cast<const uint4*>(in)[g * W + k];
    x[4 * k] = v.x, x[4 * k + 1] = v.y, x[4 * k + 2] = v.z, x[4 * k + 3] = v.w;
  }
  // After this, word j of plane p is x[W * j + p].
  if (W == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) transpose4(x[4 * j], x[4 * j + 1], x[4 * j + 2], x[4 * j + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // words 2j, 2j+1 (elements 4j..4j+3) -> plane words j
      uint32_t a = x[2 * j], b = x[2 * j + 1];
      x[2 * j] = __byte_perm(a, b, 0x6420);
      x[2 * j + 1] = __byte_perm(a, b, 0x7531);
    }
  }
#pragma unroll
  for (int p = 0; p < W; ++p)
    reinterpret_cast<uint4*>(out + (int64_t)p * n_elems)[g] = make_uint4(x[p], x[W + p], x[2 * W + p], x[3 * W + p]);
}

template <int W>
__global__ void split16_kernel(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t n_elems) {
  for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < n_elems / 16;
       g += (int64_t)gridDim.x * blockDim.x)
    split16<W>(in, out, n_elems, g);
}

// Any width, one byte per thread: the tail of the vector kernels, and widths 1, 8, 16.
// SPLIT: interleaved -> planes; else planes -> interleaved.
template <bool SPLIT>
__global__ void planes_bytes(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, int64_t n_elems,
                             int width, int64_t first_elem) {
  int64_t total = (n_elems - first_elem) * width;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t e = first_elem + i / width;
    int p = (int)(i % width);
    int64_t plane_at = (int64_t)p * n_elems + e, elem_at = e * width + p;
    out[SPLIT ? plane_at : elem_at] = in[SPLIT ? elem_at : plane_at];
  }
}

int grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = 65535 * 8;  // grid-stride loops cover the rest
  return (int)(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

bool aligned(const void* p, int64_t a) { return ((uintptr_t)p % a) == 0; }

}  // namespace

// Split (merge): the vector kernel for widths 2 and 4 where the strides allow, the byte
// kernel for the rest.  Returns 0 on success, else a cudaError_t value.
template <bool SPLIT>
static int planes_launch(const uint8_t* in, uint8_t* out, int64_t n_elems, int width, cudaStream_t stream) {
  const int T = 256;
  int64_t done = 0;
  // The interleaved side is read (split) or written (merge) 4 elements at a time.
  const uint8_t* wide = SPLIT ? in : out;
  const uint8_t* narrow = SPLIT ? out : in;
  // Split reads each thread's 16 elements whole and stores 16 bytes per plane, coalesced;
  // merge keeps the 4-element kernel, whose 16-byte stores are coalesced across the warp
  // (merge16's four per thread were not: measured 2.3 against 2.7-2.9 TB/s).
  if (SPLIT && (width == 2 || width == 4) && aligned(wide, 16) && aligned(narrow, 16) && n_elems % 16 == 0) {
    int64_t groups = n_elems / 16;
    if (groups) {
      if (width == 2) split16_kernel<2><<<grid_for(groups, T), T, 0, stream>>>(in, out, n_elems);
      else split16_kernel<4><<<grid_for(groups, T), T, 0, stream>>>(in, out, n_elems);
    }
    return (int)cudaGetLastError();
  }
  if ((width == 2 || width == 4) && aligned(wide, 4 * width) && aligned(narrow, 4) && n_elems % 4 == 0) {
    int64_t quads = n_elems / 4;
    if (quads) {
      if (width == 2) planes_vec<2, SPLIT><<<grid_for(quads, T), T, 0, stream>>>(in, out, n_elems);
      else planes_vec<4, SPLIT><<<grid_for(quads, T), T, 0, stream>>>(in, out, n_elems);
    }
    done = quads * 4;
  }
  if (done < n_elems) {
    int64_t blocks = grid_for((n_elems - done) * width, T);
    planes_bytes<SPLIT><<<blocks, T, 0, stream>>>(in, out, n_elems, width, done);
  }
  return (int)cudaGetLastError();
}

extern "C" {

int fmstore_split(const uint8_t* in, uint8_t* out, int64_t n_elems, int width, cudaStream_t stream) {
  return planes_launch<true>(in, out, n_elems, width, stream);
}

int fmstore_merge(const uint8_t* in, uint8_t* out, int64_t n_elems, int width, cudaStream_t stream) {
  return planes_launch<false>(in, out, n_elems, width, stream);
}

}  // extern "C"
