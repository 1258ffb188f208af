// CPU (OpenMP via at::parallel_for) kernels for the fused per-sample PGD step.
// Arithmetic in float32, one rounding to the storage type, the same operation order as
// aaa_fast/ops/reference.py so linf results match plain PyTorch bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../pgd_step.h"

namespace aaa_fast {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task: big enough to amortise a thread wake-up

// clamp written so a NaN input stays NaN, like torch.clamp
inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
// torch.sign semantics: sign(NaN) = 0
inline float signf(float g) { return static_cast<float>((g > 0.f) - (g < 0.f)); }

template <typename T, typename G>
void linf_range(T* x_adv, const T* x_nat, const G* grad, const float* dir, const float* eps,
                const float* alpha, int64_t S, float lo, float hi, int64_t begin, int64_t end) {
  while (begin < end) {
    const int64_t n = begin / S;
    const int64_t stop = std::min(end, (n + 1) * S);
    const float step = dir[n] * alpha[n];
    const float e = eps[n];
    for (int64_t j = begin; j < stop; ++j) {
      const float xn = static_cast<float>(x_nat[j]);
      const float v = static_cast<float>(x_adv[j]) + step * signf(static_cast<float>(grad[j]));
      x_adv[j] = static_cast<T>(clampf(xn + clampf(v - xn, -e, e), lo, hi));
    }
    begin = stop;
  }
}

template <typename T, typename G>
void l2_sample(T* x_adv, const T* x_nat, const G* grad, float dir, float eps, float alpha,
               int64_t S, float lo, float hi) {
  double g_sq = 0.0;
  for (int64_t j = 0; j < S; ++j) {
    const float g = static_cast<float>(grad[j]);
    g_sq += static_cast<double>(g) * g;
  }
  const float g_norm = static_cast<float>(std::sqrt(g_sq));
  // a zero gradient gives no move (and no 0/0)
  const float step = g_norm > 0.f ? dir * alpha : 0.f;
  const float g_div = g_norm > 0.f ? g_norm : 1.f;
  double d_sq = 0.0;
  for (int64_t j = 0; j < S; ++j) {
    const float delta = static_cast<float>(x_adv[j]) +
                        step * (static_cast<float>(grad[j]) / g_div) -
                        static_cast<float>(x_nat[j]);
    d_sq += static_cast<double>(delta) * delta;
  }
  const float d_norm = static_cast<float>(std::sqrt(d_sq));
  const float scale = d_norm > eps ? eps / d_norm : 1.f;
  for (int64_t j = 0; j < S; ++j) {
    const float xn = static_cast<float>(x_nat[j]);
    const float delta = static_cast<float>(x_adv[j]) +
                        step * (static_cast<float>(grad[j]) / g_div) - xn;
    x_adv[j] = static_cast<T>(clampf(xn + delta * scale, lo, hi));
  }
}

void pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                  const at::Tensor& direction, const at::Tensor& eps, const at::Tensor& alpha,
                  c10::string_view norm_name, double lo_d, double hi_d) {
  check_pgd_step_args(x_adv, x_nat, grad, direction, eps, alpha);
  const Norm norm = parse_norm(std::string(norm_name));
  const int64_t N = x_adv.size(0);
  if (x_adv.numel() == 0) return;
  const int64_t S = x_adv.numel() / N;
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d);
  const float* dir = direction.data_ptr<float>();
  const float* e = eps.data_ptr<float>();
  const float* a = alpha.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cpu", [&] {
    using T = scalar_t;
    T* xa = x_adv.data_ptr<T>();
    const T* xn = x_nat.data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pgd_step_cpu_grad", [&] {
      const scalar_t* g = grad.data_ptr<scalar_t>();
      if (norm == Norm::Linf) {
        at::parallel_for(0, N * S, kGrain, [&](int64_t begin, int64_t end) {
          linf_range(xa, xn, g, dir, e, a, S, lo, hi, begin, end);
        });
      } else {
        at::parallel_for(0, N, std::max<int64_t>(1, kGrain / S), [&](int64_t begin, int64_t end) {
          for (int64_t n = begin; n < end; ++n) {
            l2_sample(xa + n * S, xn + n * S, g + n * S, dir[n], e[n], a[n], S, lo, hi);
          }
        });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aaa_fast, CPU, m) { m.impl("pgd_step_", &pgd_step_cpu); }

}  // namespace aaa_fast
