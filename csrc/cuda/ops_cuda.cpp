// Thin PyTorch glue for the CUDA kernel: validates, groups tensors by dtype, passes raw
// pointers across the torch-free boundary in launch.h, registers the CUDA kernel of
// fasttrain::grad_norm (AdamW and unscale run as Triton kernels on CUDA: docs/csrc.md).
// No host sync: the norm is written to a device tensor.
#include "checks.h"
#include "cuda/launch.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <map>
#include <tuple>
#include <vector>

namespace fasttrain::cuda {
namespace {

DType to_dtype(at::ScalarType t) {
  return t == at::kFloat ? DType::kFloat32 : t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
}

void check_launch(const char* error) { TORCH_CHECK(error == nullptr, error); }

void* current_stream(at::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

std::map<at::ScalarType, std::vector<GradTensor>> group_by_dtype(at::TensorList tensors) {
  std::map<at::ScalarType, std::vector<GradTensor>> groups;
  for (const at::Tensor& t : tensors) groups[t.scalar_type()].push_back({t.data_ptr(), t.numel()});
  return groups;
}

// The first launch(es) of both norm ops: one fp32 partial per chunk, on the tensors' device.
struct Partials {
  at::Tensor values;
  int64_t count;
  NormKind kind;
  at::Device device;
};

Partials norm_partials(const char* op, at::TensorList tensors, double norm_type) {
  check_norm_type(op, norm_type);
  check_tensor_list(op, tensors, "tensors");
  TORCH_CHECK(!tensors.empty(), op, ": got no tensors; the norm of nothing is 0");
  const at::Device device = tensors[0].device();
  const NormKind kind = std::isinf(norm_type) ? NormKind::kInf
                        : norm_type == 2.0    ? NormKind::kTwo
                                              : NormKind::kP;
  const auto groups = group_by_dtype(tensors);
  int64_t total = 0;
  for (const auto& [dtype, group] : groups) total += grad_norm_num_partials(group.data(), group.size());
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor partials = at::empty({std::max<int64_t>(total, 1)}, options);
  // every chunk's block writes its own slot (tests/test_ops_cuda_compile.py's launcher check:
  // each chunk once), so only a list of empty tensors needs the zero: no memset launch a step
  if (total == 0) partials.zero_();
  int64_t offset = 0;
  for (const auto& [dtype, group] : groups) {
    check_launch(launch_grad_norm_partials(group.data(), static_cast<int>(group.size()),
                                           to_dtype(dtype), kind, static_cast<float>(norm_type),
                                           partials.data_ptr<float>() + offset, current_stream(device)));
    offset += grad_norm_num_partials(group.data(), group.size());
  }
  return {partials, std::max<int64_t>(total, 1), kind, device};
}

at::Tensor grad_norm_cuda(at::TensorList tensors, double norm_type) {
  const c10::cuda::CUDAGuard guard(tensors.empty() ? at::Device(at::kCUDA) : tensors[0].device());
  const Partials parts = norm_partials("fasttrain::grad_norm", tensors, norm_type);
  at::Tensor out = at::empty({}, parts.values.options());
  check_launch(launch_grad_norm_finish(parts.values.data_ptr<float>(), parts.count, parts.kind,
                                       static_cast<float>(norm_type), out.data_ptr<float>(),
                                       current_stream(parts.device)));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_norm_clip_cuda(at::TensorList tensors, double norm_type,
                                                                   double max_norm) {
  constexpr const char* op = "fasttrain::grad_norm_clip";
  check_max_norm(op, max_norm);
  const c10::cuda::CUDAGuard guard(tensors.empty() ? at::Device(at::kCUDA) : tensors[0].device());
  const Partials parts = norm_partials(op, tensors, norm_type);
  at::Tensor norm = at::empty({}, parts.values.options());
  at::Tensor divisor = at::empty({}, parts.values.options());
  at::Tensor found_inf = at::empty({}, parts.values.options());
  check_launch(launch_grad_norm_clip_finish(parts.values.data_ptr<float>(), parts.count, parts.kind,
                                            static_cast<float>(norm_type), static_cast<float>(max_norm),
                                            norm.data_ptr<float>(), divisor.data_ptr<float>(),
                                            found_inf.data_ptr<float>(), current_stream(parts.device)));
  return {norm, divisor, found_inf};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("grad_norm", &grad_norm_cuda);
  m.impl("grad_norm_clip", &grad_norm_clip_cuda);
}

}  // namespace fasttrain::cuda
