// Loop bodies of the CPU kernels. Included several times by pgd_step_cpu.cpp, each time
// inside a namespace compiled for one instruction set (AVX-512, AVX2, baseline), so the
// compiler vectorises the same source for each; the best one is chosen at run time.
// No #include here on purpose: it is pasted inside a namespace.

// clamp written so a NaN input stays NaN, like torch.clamp
inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
// torch.sign semantics: sign(NaN) = 0
inline float signf(float g) { return static_cast<float>((g > 0.f) - (g < 0.f)); }

// Converts the three streams of one sample segment to float32 in blocks, so the arithmetic
// loop is a plain float loop the compiler vectorises whatever the storage types are.
constexpr int64_t kBlock = 512;

template <typename T>
inline void load_block(const T* __restrict__ src, float* __restrict__ dst, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
inline void store_block(const float* __restrict__ src, T* __restrict__ dst, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<T>(src[j]);
}

inline void linf_block(float* __restrict__ xa, const float* __restrict__ xn,
                       const float* __restrict__ g, float step, float e, float lo, float hi,
                       int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const float v = xa[j] + step * signf(g[j]);
    xa[j] = clampf(xn[j] + clampf(v - xn[j], -e, e), lo, hi);
  }
}

// Elements [begin, end) of the flattened batch; a range may span several samples.
template <typename T, typename G>
void linf_range(T* __restrict__ x_adv, const T* __restrict__ x_nat, const G* __restrict__ grad,
                const float* dir, const float* eps, const float* alpha, int64_t S, float lo,
                float hi, int64_t begin, int64_t end) {
  constexpr bool all_float = std::is_same<T, float>::value && std::is_same<G, float>::value;
  alignas(64) float xa[all_float ? 1 : kBlock], xn[all_float ? 1 : kBlock], g[all_float ? 1 : kBlock];
  while (begin < end) {
    const int64_t n = begin / S;
    const int64_t stop = std::min(end, (n + 1) * S);
    const float step = dir[n] * alpha[n];
    const float e = eps[n];
    if constexpr (all_float) {
      linf_block(reinterpret_cast<float*>(x_adv) + begin, reinterpret_cast<const float*>(x_nat) + begin,
                 reinterpret_cast<const float*>(grad) + begin, step, e, lo, hi, stop - begin);
    } else {
      for (int64_t b = begin; b < stop; b += kBlock) {
        const int64_t len = std::min(kBlock, stop - b);
        load_block(x_adv + b, xa, len);
        load_block(x_nat + b, xn, len);
        load_block(grad + b, g, len);
        linf_block(xa, xn, g, step, e, lo, hi, len);
        store_block(xa, x_adv + b, len);
      }
    }
    begin = stop;
  }
}

// One whole sample: |g|, then |delta|, then the write.
template <typename T, typename G>
void l2_sample(T* __restrict__ x_adv, const T* __restrict__ x_nat, const G* __restrict__ grad,
               float dir, float eps, float alpha, int64_t S, float lo, float hi) {
  double g_sq = 0.0;
  for (int64_t j = 0; j < S; ++j) {
    const float gj = static_cast<float>(grad[j]);
    g_sq += static_cast<double>(gj) * gj;
  }
  const float g_norm = static_cast<float>(std::sqrt(g_sq));
  // a zero gradient gives no move (and no 0/0)
  const float step = g_norm > 0.f ? dir * alpha : 0.f;
  const float g_div = g_norm > 0.f ? g_norm : 1.f;
  double d_sq = 0.0;
  for (int64_t j = 0; j < S; ++j) {
    const float delta = static_cast<float>(x_adv[j]) + step * (static_cast<float>(grad[j]) / g_div) -
                        static_cast<float>(x_nat[j]);
    d_sq += static_cast<double>(delta) * delta;
  }
  const float d_norm = static_cast<float>(std::sqrt(d_sq));
  const float scale = d_norm > eps ? eps / d_norm : 1.f;
  for (int64_t j = 0; j < S; ++j) {
    const float xn = static_cast<float>(x_nat[j]);
    const float delta = static_cast<float>(x_adv[j]) + step * (static_cast<float>(grad[j]) / g_div) - xn;
    x_adv[j] = static_cast<T>(clampf(xn + delta * scale, lo, hi));
  }
}

template <typename T, typename G>
void run_pgd_step(bool l2, T* x_adv, const T* x_nat, const G* grad, const float* dir,
                  const float* eps, const float* alpha, int64_t N, int64_t S, float lo, float hi) {
  constexpr int64_t kGrain = 1 << 15;  // elements per task: enough to amortise a thread wake-up
  if (!l2) {
    at::parallel_for(0, N * S, kGrain, [&](int64_t begin, int64_t end) {
      linf_range(x_adv, x_nat, grad, dir, eps, alpha, S, lo, hi, begin, end);
    });
  } else {
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / S), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        l2_sample(x_adv + n * S, x_nat + n * S, grad + n * S, dir[n], eps[n], alpha[n], S, lo, hi);
      }
    });
  }
}
