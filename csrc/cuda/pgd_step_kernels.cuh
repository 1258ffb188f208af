// CUDA kernels for the fused per-sample PGD step. Torch-free on purpose: this header is
// included by the torch binding (pgd_step_cuda.cu, built only with CUDA torch) and by
// compile_check.cu, which CI compiles with plain nvcc so these sources cannot rot.
// Storage type T: float, double, __half or __nv_bfloat16; gradient type G likewise.
// Arithmetic in float32 with the operation order of aaa_fast/ops/reference.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace aaa_fast {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_float<double>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// clamp that keeps NaN (like torch.clamp); sign with sign(NaN) = 0 (like torch.sign)
__device__ __forceinline__ float clampf(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}
__device__ __forceinline__ float signf(float g) { return static_cast<float>((g > 0.f) - (g < 0.f)); }

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 4;
constexpr int kElemsPerBlock = kThreads * kItemsPerThread;
constexpr unsigned kMaxGridY = 65535;

// grid: x = sample, y = chunk of kElemsPerBlock elements of that sample (strided by gridDim.y)
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
pgd_linf_kernel(T* __restrict__ x_adv, const T* __restrict__ x_nat, const G* __restrict__ grad,
                const float* __restrict__ dir, const float* __restrict__ eps,
                const float* __restrict__ alpha, int64_t S, float lo, float hi) {
  const int64_t n = blockIdx.x;
  const float step = dir[n] * alpha[n];
  const float e = eps[n];
  const int64_t base = n * S;
  for (int64_t chunk = blockIdx.y; chunk * kElemsPerBlock < S; chunk += gridDim.y) {
#pragma unroll
    for (int k = 0; k < kItemsPerThread; ++k) {
      const int64_t j = chunk * kElemsPerBlock + k * kThreads + threadIdx.x;
      if (j < S) {
        const float xn = to_float(x_nat[base + j]);
        const float v = to_float(x_adv[base + j]) + step * signf(to_float(grad[base + j]));
        x_adv[base + j] = from_float<T>(clampf(xn + clampf(v - xn, -e, e), lo, hi));
      }
    }
  }
}

// Sum over the block; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

// grid: x = sample; one block walks its sample three times (|g|, |delta|, write).
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
pgd_l2_kernel(T* __restrict__ x_adv, const T* __restrict__ x_nat, const G* __restrict__ grad,
              const float* __restrict__ dir, const float* __restrict__ eps,
              const float* __restrict__ alpha, int64_t S, float lo, float hi) {
  __shared__ float shared[kThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * S;
  const T* xa = x_adv + base;
  const T* xn = x_nat + base;
  const G* g = grad + base;

  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < S; j += kThreads) {
    const float gj = to_float(g[j]);
    acc += gj * gj;
  }
  const float g_norm = sqrtf(block_sum(acc, shared));
  const float step = g_norm > 0.f ? dir[blockIdx.x] * alpha[blockIdx.x] : 0.f;
  const float g_div = g_norm > 0.f ? g_norm : 1.f;

  acc = 0.f;
  for (int64_t j = threadIdx.x; j < S; j += kThreads) {
    const float delta = to_float(xa[j]) + step * (to_float(g[j]) / g_div) - to_float(xn[j]);
    acc += delta * delta;
  }
  const float d_norm = sqrtf(block_sum(acc, shared));
  const float e = eps[blockIdx.x];
  const float scale = d_norm > e ? e / d_norm : 1.f;

  T* out = x_adv + base;
  for (int64_t j = threadIdx.x; j < S; j += kThreads) {
    const float xnj = to_float(xn[j]);
    const float delta = to_float(xa[j]) + step * (to_float(g[j]) / g_div) - xnj;
    out[j] = from_float<T>(clampf(xnj + delta * scale, lo, hi));
  }
}

// Host launchers; N must fit in gridDim.x (< 2^31).
template <typename T, typename G>
cudaError_t launch_pgd_step(bool l2, T* x_adv, const T* x_nat, const G* grad, const float* dir,
                            const float* eps, const float* alpha, int64_t N, int64_t S, float lo,
                            float hi, cudaStream_t stream) {
  if (N == 0 || S == 0) return cudaSuccess;
  if (l2) {
    pgd_l2_kernel<T, G><<<dim3(static_cast<unsigned>(N)), kThreads, 0, stream>>>(
        x_adv, x_nat, grad, dir, eps, alpha, S, lo, hi);
  } else {
    const int64_t chunks = (S + kElemsPerBlock - 1) / kElemsPerBlock;
    const unsigned grid_y = static_cast<unsigned>(chunks < kMaxGridY ? chunks : kMaxGridY);
    pgd_linf_kernel<T, G><<<dim3(static_cast<unsigned>(N), grid_y), kThreads, 0, stream>>>(
        x_adv, x_nat, grad, dir, eps, alpha, S, lo, hi);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace aaa_fast
