// CPU (OpenMP via at::parallel_for) kernels for the fused per-sample PGD step.
// Arithmetic in float32, one rounding to the storage type, the same operation order as
// aaa_fast/ops/reference.py so linf results match plain PyTorch bit for bit (the build uses
// -ffp-contract=off: no a*b+c contraction that the reference does not do).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../pgd_step.h"

namespace aaa_fast {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define AAA_FAST_X86_MULTIVERSION 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#include "pgd_step_cpu_kernels.h"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "pgd_step_cpu_kernels.h"
}
#pragma GCC pop_options
#endif
namespace baseline {
#include "pgd_step_cpu_kernels.h"
}

namespace {

enum class Isa { Baseline, Avx2, Avx512 };

bool cpu_has(Isa isa) {
#ifdef AAA_FAST_X86_MULTIVERSION
  __builtin_cpu_init();
  if (isa == Isa::Avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == Isa::Avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == Isa::Baseline;
}

// The widest instruction set this CPU has; $AAA_FAST_CPU_ISA (baseline|avx2|avx512) forces
// one, so tests can check every variant against the reference.
Isa best_isa() {
  static const Isa isa = [] {
    const char* forced = std::getenv("AAA_FAST_CPU_ISA");
    if (forced != nullptr && *forced != '\0') {
      const std::string name(forced);
      const Isa want = name == "avx512" ? Isa::Avx512 : name == "avx2" ? Isa::Avx2 : Isa::Baseline;
      TORCH_CHECK_VALUE(name == "avx512" || name == "avx2" || name == "baseline",
                        "AAA_FAST_CPU_ISA must be baseline, avx2 or avx512, got '", name, "'");
      TORCH_CHECK_VALUE(cpu_has(want), "AAA_FAST_CPU_ISA=", name, " but this CPU lacks it");
      return want;
    }
    return cpu_has(Isa::Avx512) ? Isa::Avx512 : cpu_has(Isa::Avx2) ? Isa::Avx2 : Isa::Baseline;
  }();
  return isa;
}

template <typename T, typename G>
void run_best(bool l2, T* xa, const T* xn, const G* g, const float* dir, const float* e,
              const float* a, int64_t N, int64_t S, float lo, float hi) {
  switch (best_isa()) {
#ifdef AAA_FAST_X86_MULTIVERSION
    case Isa::Avx512: return avx512::run_pgd_step(l2, xa, xn, g, dir, e, a, N, S, lo, hi);
    case Isa::Avx2: return avx2::run_pgd_step(l2, xa, xn, g, dir, e, a, N, S, lo, hi);
#endif
    default: return baseline::run_pgd_step(l2, xa, xn, g, dir, e, a, N, S, lo, hi);
  }
}

void pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                  const at::Tensor& direction, const at::Tensor& eps, const at::Tensor& alpha,
                  c10::string_view norm_name, double lo, double hi) {
  const StepGeometry geometry = prepare_pgd_step(x_adv, x_nat, grad, direction, eps, alpha, norm_name);
  const bool l2 = geometry.l2;
  const int64_t N = geometry.n, S = geometry.s;
  if (N * S == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cpu", [&] {
    using T = scalar_t;
    T* xa = x_adv.data_ptr<T>();
    const T* xn = x_nat.data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pgd_step_cpu_grad", [&] {
      run_best(l2, xa, xn, grad.data_ptr<scalar_t>(), direction.data_ptr<float>(),
               eps.data_ptr<float>(), alpha.data_ptr<float>(), N, S, static_cast<float>(lo),
               static_cast<float>(hi));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aaa_fast, CPU, m) { m.impl("pgd_step_", &pgd_step_cpu); }

}  // namespace aaa_fast
