// fasttrain::ce_rows_ on CPU: per-row cross-entropy loss and its scaled gradient, one row
// at a time in fp32 (the row is converted once into a thread-local buffer, which holds x,
// then exp(x - max), then the gradient, and is written back once in the gradient's dtype).
//
//   lse = max + log(sum exp(x - max))
//   loss = -(1 - ls) (x[t] - lse) - ls (mean(x) - lse) + z lse^2        (0 if t == ignore)
//   grad = s (1 + 2 z lse) exp(x - lse) - s ls / V, and grad[t] += s (ls - 1)  (0 if ignored)
//
// with s the row's scale, ls the label smoothing, z the z-loss weight. The same formulas as
// the chunked torch fallback in kernels/cross_entropy.py, in three passes over an L1/L2-
// resident row instead of six over the chunk. A row holding NaN, +inf or only -inf gets a
// NaN loss and gradient (as log_softmax gives); -inf entries alone are masked classes.
#include "checks.h"
#include "cpu/cpu_utils.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace fasttrain::cpu {
namespace {

// exp(d) for d <= 0 (Cephes' expf: ln 2 split in two, a degree-6 polynomial on
// [-ln2/2, ln2/2], 2^n from the exponent bits); below -87 it returns ~1e-38, not 0, which
// no sum of a row (>= 1, the max's own term) can see. Branch-free so the loops vectorise.
[[gnu::always_inline]] inline float exp_nonpositive(float d) {
  d = d < -87.0f ? -87.0f : d;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (d * 1.44269504088896341f + kRound) - kRound;
  float r = std::fma(n, -0.693359375f, d);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

struct RowArgs {
  int64_t V;
  int64_t ignore_index;
  float label_smoothing;
  float z_loss;
};

template <typename T>
constexpr at::ScalarType dtype_of() {
  if constexpr (std::is_same_v<T, float>) {
    return at::kFloat;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return at::kBFloat16;
  } else {
    return at::kHalf;
  }
}

template <typename T>
inline void store_row(const float* src, int64_t n, T* dst) {
  store_float(src, n, dst, dtype_of<T>());
}

// One row: reads `in` (V values), returns the loss, writes the gradient to `grad` (V values,
// may be `in`) unless it is null. `e` is V floats of scratch.
template <typename In, typename Out>
float ce_row(const In* in, float* e, Out* grad, int64_t t, bool valid, float scale, const RowArgs& a) {
  const int64_t V = a.V;
  if (!valid) {
    if (grad != nullptr) std::fill(e, e + V, 0.0f), store_row(e, V, grad);
    return 0.0f;
  }
  float m = -std::numeric_limits<float>::infinity();
  double sum_x = 0.0;  // for label smoothing's mean(x), summed as the exponentials below
  int nan_seen = 0;
  load_float(in, dtype_of<In>(), V, e);  // the row in fp32 (vectorised conversion), cache-resident
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t end = std::min(V, b + kBlock);
    float block = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : block) reduction(| : nan_seen)
    for (int64_t j = b; j < end; ++j) {
      const float x = e[j];
      m = std::max(m, x);
      block += x;
      nan_seen |= x != x;
    }
    sum_x += block;
  }
  if (nan_seen || !std::isfinite(m)) {
    if (grad != nullptr) std::fill(e, e + V, std::numeric_limits<float>::quiet_NaN()), store_row(e, V, grad);
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float x_t = e[t];
  // blocks of kBlock summed in fp32 lanes, the block sums in fp64: the sum's rounding stays
  // at a few ulp for any V (one fp32 running sum per lane drifts by ~sqrt(V / 16) ulp)
  double sum_e_wide = 0.0;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t end = std::min(V, b + kBlock);
    float block = 0.0f;
#pragma omp simd reduction(+ : block)
    for (int64_t j = b; j < end; ++j) {
      const float v = exp_nonpositive(e[j] - m);
      e[j] = v;
      block += v;
    }
    sum_e_wide += block;
  }
  const float sum_e = static_cast<float>(sum_e_wide);
  const float lse = m + std::log(sum_e);
  const float ls = a.label_smoothing;
  float loss = -(1.0f - ls) * (x_t - lse);
  if (ls != 0.0f) loss -= ls * (static_cast<float>(sum_x / static_cast<double>(V)) - lse);
  if (a.z_loss != 0.0f) loss += a.z_loss * lse * lse;
  if (grad != nullptr) {
    const float factor = scale * (a.z_loss != 0.0f ? 1.0f + 2.0f * a.z_loss * lse : 1.0f) / sum_e;
    const float shift = ls * scale / static_cast<float>(V);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) e[j] = e[j] * factor - shift;
    e[t] += (ls - 1.0f) * scale;
    store_row(e, V, grad);
  }
  return loss;
}

int64_t target_at(const at::Tensor& target, int64_t i) {
  return target.scalar_type() == at::kLong ? target.data_ptr<int64_t>()[i]
                                           : static_cast<int64_t>(target.data_ptr<int32_t>()[i]);
}

void ce_rows_cpu(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& grad,
                 const at::Tensor& loss, const at::Tensor& scale, int64_t ignore_index,
                 double label_smoothing, double z_loss) {
  check_ce_rows_args(logits, target, grad, loss, scale);
  TORCH_CHECK(logits.is_cpu() && target.is_cpu() && loss.is_cpu() && scale.is_cpu() &&
                  (!grad.has_value() || !grad->defined() || grad->is_cpu()),
              "fasttrain::ce_rows_: every tensor must be on the CPU");
  const int64_t N = logits.size(0), V = logits.size(1);
  for (int64_t i = 0; i < N; ++i) {  // free on the CPU, and an error is clearer before any work
    const int64_t t = target_at(target, i);
    TORCH_CHECK(t == ignore_index || (t >= 0 && t < V), "fasttrain::ce_rows_: target[", i, "] = ", t,
                " is outside [0, ", V, ") and not ignore_index=", ignore_index);
  }
  const bool want_grad = grad.has_value() && grad->defined();
  const RowArgs args{V, ignore_index, static_cast<float>(label_smoothing), static_cast<float>(z_loss)};
  const float* scales = scale.data_ptr<float>();
  const bool per_row = scale.dim() == 1;
  float* out = loss.data_ptr<float>();
  // rows per task: about 64K elements, so small problems stay on one thread
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));
  auto run = [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    const In* in = static_cast<const In*>(logits.data_ptr());
    Out* g = want_grad ? static_cast<Out*>(grad->data_ptr()) : nullptr;
    at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) {
      std::vector<float> scratch(static_cast<size_t>(V));
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t t = target_at(target, i);
        const bool valid = t != ignore_index;
        out[i] = ce_row(in + i * V, scratch.data(), g == nullptr ? nullptr : g + i * V, valid ? t : 0, valid,
                        scales[per_row ? i : 0], args);
      }
    });
  };
  auto with_out = [&](auto in_tag) {
    switch (want_grad ? grad->scalar_type() : at::kFloat) {
      case at::kBFloat16: return run(in_tag, c10::BFloat16{});
      case at::kHalf: return run(in_tag, c10::Half{});
      default: return run(in_tag, float{});
    }
  };
  switch (logits.scalar_type()) {
    case at::kBFloat16: return with_out(c10::BFloat16{});
    case at::kHalf: return with_out(c10::Half{});
    default: return with_out(float{});
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) { m.impl("ce_rows_", &ce_rows_cpu); }

}  // namespace fasttrain::cpu
