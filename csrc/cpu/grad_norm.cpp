// fasttrain::grad_norm on CPU: the global p-norm of many tensors, as a 0-d fp32 tensor.
//   p = 2: sqrt(sum x^2)   p = inf: max |x| (NaN if any NaN)   other p > 0: (sum |x|^p)^(1/p)
// Each chunk accumulates in fp32 (vector lanes); the per-chunk partials are combined in
// chunk order, so the result does not depend on the thread count. Reads each element once.
#include "checks.h"
#include "cpu/cpu_utils.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace fasttrain::cpu {
namespace {

float partial_sum_sq(const float* x, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
  return acc;
}

float partial_max_abs(const float* x, int64_t n) {
  float acc = 0.0f;
  int nan_seen = 0;
#pragma omp simd reduction(max : acc) reduction(| : nan_seen)
  for (int64_t i = 0; i < n; ++i) {
    acc = std::max(acc, std::fabs(x[i]));
    nan_seen |= x[i] != x[i];
  }
  return nan_seen ? std::numeric_limits<float>::quiet_NaN() : acc;
}

float partial_sum_pow(const float* x, int64_t n, float p) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += p == 1.0f ? std::fabs(x[i]) : std::pow(std::fabs(x[i]), p);
  return acc;
}

float chunk_partial(const at::Tensor& t, const Chunk& c, float p) {
  alignas(64) float buffer[kBlock];
  const bool is_inf = std::isinf(p);
  float acc = 0.0f;
  for (int64_t off = c.begin; off < c.end; off += kBlock) {
    const int64_t n = std::min(kBlock, c.end - off);
    const FloatBlock block(t.data_ptr(), t.scalar_type(), off, n, buffer);
    if (is_inf) {
      const float m = partial_max_abs(block.data(), n);
      acc = std::isnan(m) || std::isnan(acc) ? m + acc : std::max(acc, m);
    } else {
      acc += p == 2.0f ? partial_sum_sq(block.data(), n) : partial_sum_pow(block.data(), n, p);
    }
  }
  return acc;
}

float norm_of(const char* op, at::TensorList tensors, double norm_type) {
  check_norm_type(op, norm_type);
  check_tensor_list(op, tensors, "tensors");
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].is_cpu(), op, ": tensors[", i, "] must be a CPU tensor");
  }
  const float p = static_cast<float>(norm_type);
  const std::vector<Chunk> chunks = make_chunks(tensors);
  std::vector<float> partials(chunks.size());
  for_each_chunk(chunks, [&](const Chunk& c) {
    partials[&c - chunks.data()] = chunk_partial(tensors[c.tensor], c, p);
  });
  double total = 0.0;
  for (float part : partials) {
    total = std::isinf(p) ? (std::isnan(part) ? part : std::max<double>(total, part)) : total + part;
    if (std::isnan(total)) break;
  }
  const double norm = std::isinf(p) ? total : (p == 2.0f ? std::sqrt(total) : std::pow(total, 1.0 / p));
  return static_cast<float>(norm);
}

at::Tensor scalar(float value) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *out.data_ptr<float>() = value;
  return out;
}

at::Tensor grad_norm_cpu(at::TensorList tensors, double norm_type) {
  return scalar(norm_of("fasttrain::grad_norm", tensors, norm_type));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_norm_clip_cpu(at::TensorList tensors, double norm_type,
                                                                  double max_norm) {
  constexpr const char* op = "fasttrain::grad_norm_clip";
  check_max_norm(op, max_norm);
  const float norm = norm_of(op, tensors, norm_type);
  // the divisor in fp32 as torch computes (norm + 1e-6) / max_norm; NaN/inf pass through
  const float divisor = std::fmax((norm + 1e-6f) / static_cast<float>(max_norm), 1.0f);
  const bool finite = std::isfinite(norm);
  return {scalar(norm), scalar(finite ? divisor : norm), scalar(finite ? 0.0f : 1.0f)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("grad_norm", &grad_norm_cpu);
  m.impl("grad_norm_clip", &grad_norm_clip_cpu);
}

}  // namespace fasttrain::cpu
