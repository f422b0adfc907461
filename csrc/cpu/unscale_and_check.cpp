// fasttrain::unscale_and_check_ on CPU: grads *= inv_scale in place and found_inf = 1.0 when
// any element was inf/NaN before scaling (never cleared), the contract of
// torch._amp_foreach_non_finite_check_and_unscale_. One read and one write per element
// (8 bytes fp32, 4 bytes bf16/fp16): memory bound, one parallel pass over all tensors.
#include "checks.h"
#include "cpu/cpu_utils.h"

#include <torch/library.h>

#include <atomic>
#include <cfloat>
#include <cmath>

namespace fasttrain::cpu {
namespace {

// Scales x[0:n] in place; returns true if any element was non-finite.
bool unscale_block(float* x, int64_t n, float inv_scale) {
  int non_finite = 0;
#pragma omp simd reduction(| : non_finite)
  for (int64_t i = 0; i < n; ++i) {
    non_finite |= !(std::fabs(x[i]) <= FLT_MAX);  // false for inf and NaN
    x[i] *= inv_scale;
  }
  return non_finite != 0;
}

void unscale_and_check_cpu(at::TensorList grads, const at::Tensor& inv_scale,
                           const at::Tensor& found_inf) {
  constexpr const char* op = kUnscaleOp;
  check_unscale_args(grads, inv_scale, found_inf);
  TORCH_CHECK(found_inf.is_cpu() && inv_scale.is_cpu(), op,
              ": inv_scale and found_inf must be CPU tensors for the CPU kernel");
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].is_cpu(), op, ": grads[", i, "] must be a CPU tensor");
  }
  const float inv = inv_scale.item<float>();
  std::atomic<bool> any_non_finite{false};
  for_each_chunk(make_chunks(grads), [&](const Chunk& c) {
    alignas(64) float buffer[kBlock];
    const at::Tensor& g = grads[c.tensor];
    bool seen = false;
    for (int64_t off = c.begin; off < c.end; off += kBlock) {
      const int64_t n = std::min(kBlock, c.end - off);
      const FloatBlock block(g.data_ptr(), g.scalar_type(), off, n, buffer);
      seen |= unscale_block(block.data(), n, inv);
      block.commit();
    }
    if (seen) any_non_finite.store(true, std::memory_order_relaxed);
  });
  if (any_non_finite.load()) found_inf.fill_(1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) { m.impl("unscale_and_check_", &unscale_and_check_cpu); }

}  // namespace fasttrain::cpu
