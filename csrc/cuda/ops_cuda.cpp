// Thin PyTorch glue for the CUDA kernels: validates, groups tensors by dtype, passes raw
// pointers across the torch-free boundary in launch.h, registers the CUDA kernels.
// No host sync anywhere: lr, steps, grad_scale and found_inf may all live on the device.
#include "checks.h"
#include "cuda/launch.h"

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <map>
#include <vector>

namespace fasttrain::cuda {
namespace {

DType to_dtype(at::ScalarType t) {
  return t == at::kFloat ? DType::kFloat32 : t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
}

void check_on(const char* op, const at::Tensor& t, const char* name, size_t i, at::Device device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", expected ",
              device, " like the other tensors of the call");
}

void check_launch(const char* error) { TORCH_CHECK(error == nullptr, error); }

void* current_stream(at::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList master_params,
                at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
                double weight_decay, double eps, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fasttrain::adamw_";
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr, beta1,
                   beta2, eps, grad_scale, found_inf);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) check_on(op, state_steps[i], "state_steps", i, device);
  if (grad_scale) check_on(op, *grad_scale, "grad_scale", 0, device);
  if (found_inf) check_on(op, *found_inf, "found_inf", 0, device);
  TORCH_CHECK(lr.is_cpu() || lr.device() == device, op, ": lr must be on the CPU or on ", device);
  const c10::cuda::CUDAGuard guard(device);
  // steps += 1, or += (found_inf == 0): the kernels then read the incremented step.
  if (found_inf) {
    at::_foreach_add_(state_steps, found_inf->eq(0).to(at::kFloat).reshape({}));
  } else {
    at::_foreach_add_(state_steps, 1);
  }
  AdamwArgs args{};
  args.lr_ptr = lr.is_cpu() ? nullptr : lr.data_ptr<float>();
  args.lr_value = lr.is_cpu() ? lr.item<float>() : 0.0f;  // a CPU tensor: no device sync
  args.beta1 = static_cast<float>(beta1);
  args.beta2 = static_cast<float>(beta2);
  args.weight_decay = static_cast<float>(weight_decay);
  args.eps = static_cast<float>(eps);
  args.grad_scale = grad_scale ? grad_scale->data_ptr<float>() : nullptr;
  args.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  std::map<std::array<at::ScalarType, 4>, std::vector<AdamwTensor>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const std::array<at::ScalarType, 4> key{params[i].scalar_type(), grads[i].scalar_type(),
                                            exp_avgs[i].scalar_type(), exp_avg_sqs[i].scalar_type()};
    groups[key].push_back(AdamwTensor{
        params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
        master_params.empty() ? nullptr : master_params[i].data_ptr<float>(),
        state_steps[i].data_ptr<float>(), params[i].numel()});
  }
  for (const auto& [key, tensors] : groups) {
    args.param_t = to_dtype(key[0]);
    args.grad_t = to_dtype(key[1]);
    args.exp_avg_t = to_dtype(key[2]);
    args.exp_avg_sq_t = to_dtype(key[3]);
    check_launch(launch_adamw(tensors.data(), static_cast<int>(tensors.size()), args,
                              current_stream(device)));
  }
}

std::map<at::ScalarType, std::vector<GradTensor>> group_by_dtype(at::TensorList tensors) {
  std::map<at::ScalarType, std::vector<GradTensor>> groups;
  for (const at::Tensor& t : tensors) groups[t.scalar_type()].push_back({t.data_ptr(), t.numel()});
  return groups;
}

void unscale_and_check_cuda(at::TensorList grads, const at::Tensor& inv_scale,
                            const at::Tensor& found_inf) {
  constexpr const char* op = kUnscaleOp;
  check_unscale_args(grads, inv_scale, found_inf);
  if (grads.empty()) return;
  const at::Device device = grads[0].device();
  check_on(op, inv_scale, "inv_scale", 0, device);
  check_on(op, found_inf, "found_inf", 0, device);
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& [dtype, tensors] : group_by_dtype(grads)) {
    check_launch(launch_unscale_and_check(tensors.data(), static_cast<int>(tensors.size()),
                                          to_dtype(dtype), inv_scale.data_ptr<float>(),
                                          found_inf.data_ptr<float>(), current_stream(device)));
  }
}

at::Tensor grad_norm_cuda(at::TensorList tensors, double norm_type) {
  constexpr const char* op = "fasttrain::grad_norm";
  check_norm_type(op, norm_type);
  check_tensor_list(op, tensors, "tensors");
  TORCH_CHECK(!tensors.empty(), op, ": got no tensors; the norm of nothing is 0");
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const NormKind kind = std::isinf(norm_type) ? NormKind::kInf
                        : norm_type == 2.0    ? NormKind::kTwo
                                              : NormKind::kP;
  const auto groups = group_by_dtype(tensors);
  int64_t total = 0;
  for (const auto& [dtype, group] : groups) total += grad_norm_num_partials(group.data(), group.size());
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor partials = at::empty({std::max<int64_t>(total, 1)}, options);
  partials.zero_();
  int64_t offset = 0;
  for (const auto& [dtype, group] : groups) {
    check_launch(launch_grad_norm_partials(group.data(), static_cast<int>(group.size()),
                                           to_dtype(dtype), kind, static_cast<float>(norm_type),
                                           partials.data_ptr<float>() + offset, current_stream(device)));
    offset += grad_norm_num_partials(group.data(), group.size());
  }
  at::Tensor out = at::empty({}, options);
  check_launch(launch_grad_norm_finish(partials.data_ptr<float>(), std::max<int64_t>(total, 1), kind,
                                       static_cast<float>(norm_type), out.data_ptr<float>(),
                                       current_stream(device)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("adamw_", &adamw_cuda);
  m.impl("unscale_and_check_", &unscale_and_check_cuda);
  m.impl("grad_norm", &grad_norm_cuda);
}

}  // namespace fasttrain::cuda
