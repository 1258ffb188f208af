// Compiled by CI with plain nvcc (no torch headers, which need a CUDA build of torch):
// instantiates every kernel the torch binding can launch, so the sources cannot rot.
#include "pgd_step_kernels.cuh"

#define AAA_FAST_INSTANTIATE(T, G)                                                       \
  template cudaError_t aaa_fast::cuda::launch_pgd_step<T, G>(                            \
      bool, T*, const T*, const G*, const float*, const float*, const float*, int64_t,   \
      int64_t, float, float, cudaStream_t);

#define AAA_FAST_INSTANTIATE_GRADS(T) \
  AAA_FAST_INSTANTIATE(T, float)      \
  AAA_FAST_INSTANTIATE(T, double)     \
  AAA_FAST_INSTANTIATE(T, __half)     \
  AAA_FAST_INSTANTIATE(T, __nv_bfloat16)

AAA_FAST_INSTANTIATE_GRADS(float)
AAA_FAST_INSTANTIATE_GRADS(double)
AAA_FAST_INSTANTIATE_GRADS(__half)
AAA_FAST_INSTANTIATE_GRADS(__nv_bfloat16)
