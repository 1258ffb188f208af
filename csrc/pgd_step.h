// Shared argument checks for the native pgd_step_ kernels (CPU and CUDA bindings).
// The Python layer validates user input with friendlier errors; these checks keep a
// direct torch.ops call from reading out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <string>

namespace aaa_fast {

enum class Norm { Linf, L2 };

inline Norm parse_norm(const std::string& norm) {
  if (norm == "linf") return Norm::Linf;
  if (norm == "l2") return Norm::L2;
  TORCH_CHECK_VALUE(false, "pgd_step_: norm must be 'linf' or 'l2', got '", norm, "'");
}

// Every sample must occupy one dense block of numel/N elements, batch outermost
// (true for contiguous and channels_last tensors), with identical strides everywhere.
inline void check_pgd_step_args(const at::Tensor& x_adv, const at::Tensor& x_nat,
                                const at::Tensor& grad, const at::Tensor& direction,
                                const at::Tensor& eps, const at::Tensor& alpha) {
  TORCH_CHECK_VALUE(x_adv.dim() >= 1, "pgd_step_: x_adv must have a batch dimension");
  const int64_t n = x_adv.size(0);
  TORCH_CHECK_VALUE(x_nat.sizes() == x_adv.sizes(), "pgd_step_: x_nat shape ", x_nat.sizes(),
                    " != x_adv shape ", x_adv.sizes());
  TORCH_CHECK_VALUE(grad.sizes() == x_adv.sizes(), "pgd_step_: grad shape ", grad.sizes(),
                    " != x_adv shape ", x_adv.sizes());
  TORCH_CHECK_TYPE(x_nat.scalar_type() == x_adv.scalar_type(),
                   "pgd_step_: x_nat dtype must equal x_adv dtype");
  TORCH_CHECK(x_nat.strides() == x_adv.strides() && grad.strides() == x_adv.strides(),
              "pgd_step_: x_adv, x_nat and grad must share strides");
  TORCH_CHECK(x_adv.is_non_overlapping_and_dense(), "pgd_step_: x_adv must be dense");
  TORCH_CHECK(n <= 1 || x_adv.stride(0) * n == x_adv.numel(),
              "pgd_step_: the batch dimension must be outermost in memory");
  for (const at::Tensor* t : {&direction, &eps, &alpha}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n,
                      "pgd_step_: direction, eps and alpha must have shape (N,)");
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat,
                     "pgd_step_: direction, eps and alpha must be float32");
    TORCH_CHECK(t->is_contiguous(), "pgd_step_: direction, eps and alpha must be contiguous");
  }
  for (const at::Tensor* t : {&x_nat, &grad, &direction, &eps, &alpha}) {
    TORCH_CHECK(t->device() == x_adv.device(), "pgd_step_: all tensors must be on ",
                x_adv.device());
  }
}

// What both device bindings need after the checks: the norm and the (N samples, S elements
// per sample) geometry of the flattened batch. An empty batch has N * S == 0.
struct StepGeometry {
  bool l2;
  int64_t n;
  int64_t s;
};

inline StepGeometry prepare_pgd_step(const at::Tensor& x_adv, const at::Tensor& x_nat,
                                     const at::Tensor& grad, const at::Tensor& direction,
                                     const at::Tensor& eps, const at::Tensor& alpha,
                                     c10::string_view norm) {
  check_pgd_step_args(x_adv, x_nat, grad, direction, eps, alpha);
  const bool l2 = parse_norm(std::string(norm)) == Norm::L2;
  const int64_t n = x_adv.size(0);
  return {l2, n, x_adv.numel() == 0 ? 0 : x_adv.numel() / n};
}

}  // namespace aaa_fast
