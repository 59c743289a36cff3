// Blockwise int8 quantization (absmax per block of 256 float32 values) and its inverse:
// the GPU path of fmstore/codec/quant.py, which computes the same IEEE expressions
// (scale = absmax / 127, code = rint(x / scale), x' = code * scale) and so the same bytes.
// Plain C ABI, called through ctypes (see kernels/__init__.py).

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int BLOCK = 256;  // values per scale = threads per CUDA block

__global__ void quantize_k(const float* __restrict__ x, int8_t* __restrict__ codes, float* __restrict__ scales,
                           int64_t n) {
  __shared__ float warp_max[BLOCK / 32];
  int64_t i = (int64_t)blockIdx.x * BLOCK + threadIdx.x;
  float v = i < n ? x[i] : 0.0f;
  float m = fabsf(v);
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < BLOCK / 32 ? warp_max[threadIdx.x] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (threadIdx.x == 0) warp_max[0] = m;
  }
  __syncthreads();
  float scale = __fdiv_rn(warp_max[0], 127.0f);
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
  if (i < n) {
    float q = scale > 0.0f ? rintf(__fdiv_rn(v, scale)) : 0.0f;
    q = fminf(fmaxf(q, -127.0f), 127.0f);
    codes[i] = (int8_t)q;
  }
}

__global__ void dequantize_k(const int8_t* __restrict__ codes, const float* __restrict__ scales,
                             float* __restrict__ out, int64_t n) {
  int64_t i = (int64_t)blockIdx.x * BLOCK + threadIdx.x;
  if (i < n) out[i] = __fmul_rn((float)codes[i], scales[blockIdx.x]);
}

}  // namespace

extern "C" {

int fmstore_quantize(const float* x, int8_t* codes, float* scales, int64_t n, cudaStream_t stream) {
  int64_t blocks = (n + BLOCK - 1) / BLOCK;
  if (blocks) quantize_k<<<(unsigned)blocks, BLOCK, 0, stream>>>(x, codes, scales, n);
  return (int)cudaGetLastError();
}

int fmstore_dequantize(const int8_t* codes, const float* scales, float* out, int64_t n, cudaStream_t stream) {
  int64_t blocks = (n + BLOCK - 1) / BLOCK;
  if (blocks) dequantize_k<<<(unsigned)blocks, BLOCK, 0, stream>>>(codes, scales, out, n);
  return (int)cudaGetLastError();
}

}  // extern "C"
