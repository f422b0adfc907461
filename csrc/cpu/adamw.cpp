// fasttrain::adamw_ on CPU: one multi-tensor AdamW step, fp32 math for every storage dtype.
//
// Per element (torch.optim.AdamW, decoupled weight decay, eps outside the sqrt):
//   g = grad / grad_scale;  w *= 1 - lr*wd;  m = m + (1-b1)*(g - m);  v = b2*v + (1-b2)*g*g
//   w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
// w is the fp32 master when given (the param then receives w rounded to nearest), else the
// param itself widened to fp32. Bytes per parameter, fp32 without master: read p, g, m, v and
// write p, m, v = 28; memory bound, so the work is one pass over all tensors in a single
// parallel region (chunks of every tensor), the math vectorised by the compiler.
#include "checks.h"
#include "cpu/cpu_utils.h"

#include <torch/library.h>

#include <cmath>

namespace fasttrain::cpu {
namespace {

struct StepConstants {
  float decay;            // 1 - lr*wd
  float step_size;        // lr / (1 - beta1^t)
  float bias_corr2_sqrt;  // sqrt(1 - beta2^t)
};

struct Hyper {
  float one_minus_beta1, beta2, one_minus_beta2, eps, grad_scale;
};

struct Slot {  // one parameter and its state; raw pointers, dtypes checked beforehand
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* master;  // nullptr without master weights
  at::ScalarType param_t, grad_t, exp_avg_t, exp_avg_sq_t;
  StepConstants k;
};

template <bool kScaled>
void adamw_math(float* w, const float* g, float* m, float* v, int64_t n, const StepConstants& k,
                const Hyper& h) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float grad = kScaled ? g[i] / h.grad_scale : g[i];
    const float weight = w[i] * k.decay;
    const float exp_avg = m[i] + h.one_minus_beta1 * (grad - m[i]);
    const float exp_avg_sq = h.beta2 * v[i] + h.one_minus_beta2 * (grad * grad);
    const float denom = std::sqrt(exp_avg_sq) / k.bias_corr2_sqrt + h.eps;
    w[i] = weight - k.step_size * (exp_avg / denom);
    m[i] = exp_avg;
    v[i] = exp_avg_sq;
  }
}

void adamw_chunk(const Slot& s, const Chunk& chunk, const Hyper& h, bool scaled) {
  alignas(64) float buffers[4][kBlock];
  auto* const grad_base = const_cast<void*>(s.grad);  // read only: never committed
  for (int64_t off = chunk.begin; off < chunk.end; off += kBlock) {
    const int64_t n = std::min(kBlock, chunk.end - off);
    const FloatBlock g(grad_base, s.grad_t, off, n, buffers[0]);
    const FloatBlock w(s.master ? s.master : s.param, s.master ? at::kFloat : s.param_t, off, n,
                       buffers[1]);
    const FloatBlock m(s.exp_avg, s.exp_avg_t, off, n, buffers[2]);
    const FloatBlock v(s.exp_avg_sq, s.exp_avg_sq_t, off, n, buffers[3]);
    if (scaled) {
      adamw_math<true>(w.data(), g.data(), m.data(), v.data(), n, s.k, h);
    } else {
      adamw_math<false>(w.data(), g.data(), m.data(), v.data(), n, s.k, h);
    }
    w.commit();
    m.commit();
    v.commit();
    if (s.master) {
      const int64_t item = s.param_t == at::kFloat ? 4 : 2;
      store_float(w.data(), n, static_cast<char*>(s.param) + off * item, s.param_t);
    }
  }
}

void check_on_cpu(at::TensorList params, at::TensorList state_steps, const at::Tensor& lr,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].is_cpu() && state_steps[i].is_cpu(), "fasttrain::adamw_: params[", i,
                "] and state_steps[", i, "] must be CPU tensors for the CPU kernel");
  }
  TORCH_CHECK(lr.is_cpu() && (!grad_scale || grad_scale->is_cpu()) &&
                  (!found_inf || found_inf->is_cpu()),
              "fasttrain::adamw_: lr, grad_scale and found_inf must be CPU tensors for the CPU "
              "kernel");
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList master_params,
               at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
               double weight_decay, double eps, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr, beta1,
                   beta2, eps, grad_scale, found_inf);
  check_on_cpu(params, state_steps, lr, grad_scale, found_inf);
  if (found_inf && found_inf->item<float>() != 0.0f) return;  // skipped step: touch nothing
  const double lr_value = lr.item<float>();
  const Hyper h{static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                grad_scale ? grad_scale->item<float>() : 1.0f};
  std::vector<Slot> slots(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.0f;
    const double t = *step;
    const StepConstants k{static_cast<float>(1.0 - lr_value * weight_decay),
                          static_cast<float>(lr_value / (1.0 - std::pow(beta1, t))),
                          static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)))};
    Slot& slot = slots[i];
    slot.param = params[i].data_ptr();
    slot.grad = grads[i].data_ptr();
    slot.exp_avg = exp_avgs[i].data_ptr();
    slot.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    slot.master = master_params.empty() ? nullptr : master_params[i].data_ptr<float>();
    slot.param_t = params[i].scalar_type();
    slot.grad_t = grads[i].scalar_type();
    slot.exp_avg_t = exp_avgs[i].scalar_type();
    slot.exp_avg_sq_t = exp_avg_sqs[i].scalar_type();
    slot.k = k;
  }
  const bool scaled = grad_scale.has_value();
  for_each_chunk(make_chunks(params),
                 [&](const Chunk& c) { adamw_chunk(slots[c.tensor], c, h, scaled); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) { m.impl("adamw_", &adamw_cpu); }

}  // namespace fasttrain::cpu
