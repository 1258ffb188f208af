// Torch binding of the CUDA kernels (built only where torch has CUDA).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include "../pgd_step.h"
#include "pgd_step_kernels.cuh"

namespace aaa_fast {
namespace {

// at::Half / at::BFloat16 share the bit layout of CUDA's __half / __nv_bfloat16.
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                   const at::Tensor& direction, const at::Tensor& eps, const at::Tensor& alpha,
                   c10::string_view norm_name, double lo, double hi) {
  const StepGeometry geometry = prepare_pgd_step(x_adv, x_nat, grad, direction, eps, alpha, norm_name);
  const bool l2 = geometry.l2;
  const int64_t N = geometry.n, S = geometry.s;
  if (N * S == 0) return;
  TORCH_CHECK(N < (int64_t(1) << 31), "pgd_step_: batch too large for one CUDA grid");
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    T* xa = reinterpret_cast<T*>(x_adv.data_ptr<scalar_t>());
    const T* xn = reinterpret_cast<const T*>(x_nat.data_ptr<scalar_t>());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pgd_step_cuda_grad", [&] {
      using G = typename CudaType<scalar_t>::type;
      const G* g = reinterpret_cast<const G*>(grad.data_ptr<scalar_t>());
      const cudaError_t err = cuda::launch_pgd_step<T, G>(
          l2, xa, xn, g, direction.data_ptr<float>(), eps.data_ptr<float>(),
          alpha.data_ptr<float>(), N, S, static_cast<float>(lo), static_cast<float>(hi), stream);
      TORCH_CHECK(err == cudaSuccess, "pgd_step_ CUDA launch failed: ", cudaGetErrorString(err));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aaa_fast, CUDA, m) { m.impl("pgd_step_", &pgd_step_cuda); }

}  // namespace aaa_fast
