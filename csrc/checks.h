// Argument validation shared by the CPU, CUDA and Meta kernels of the fasttrain ops.
// Every check reads only metadata (sizes, dtypes, devices, strides), so it also runs on
// fake/meta tensors while torch.compile traces. Messages name the op, the argument, the
// index in the list, and what to do instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fasttrain {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_list_length(const char* op, at::TensorList list, const char* name,
                              size_t expected, const char* expected_name) {
  TORCH_CHECK(list.size() == expected, op, ": ", name, " has ", list.size(),
              " tensors but ", expected_name, " has ", expected,
              "; pass one entry per parameter, in the same order");
}

inline void check_contiguous(const char* op, const at::Tensor& t, const char* name, size_t i) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] is not contiguous",
              " (strides ", t.strides(), "); the fused kernels walk flat memory, so",
              " allocate it contiguously (e.g. torch.zeros_like(p, memory_format=",
              "torch.contiguous_format))");
}

inline void check_like(const char* op, const at::Tensor& t, const char* name, size_t i,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(),
              " but ", ref_name, "[", i, "] has shape ", ref.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, "[", i, "] is on ", t.device(),
              " but ", ref_name, "[", i, "] is on ", ref.device(),
              "; keep all tensors of one call on one device");
  check_contiguous(op, t, name, i);
}

inline void check_float_dtype(const char* op, const at::Tensor& t, const char* name, size_t i) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, "[", i, "] has dtype ",
              t.scalar_type(), "; supported: float32, bfloat16, float16");
}

inline void check_scalar_tensor(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a one-element float32 tensor, got dtype ", t.scalar_type(),
              " with ", t.numel(), " elements");
}

// All checks of fasttrain::adamw_ (see csrc/ops.cpp for the schema).
inline void check_adamw_args(at::TensorList params, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList master_params, at::TensorList state_steps,
                             const at::Tensor& lr, double beta1, double beta2, double eps,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fasttrain::adamw_";
  const size_t n = params.size();
  check_list_length(op, grads, "grads", n, "params");
  check_list_length(op, exp_avgs, "exp_avgs", n, "params");
  check_list_length(op, exp_avg_sqs, "exp_avg_sqs", n, "params");
  check_list_length(op, state_steps, "state_steps", n, "params");
  TORCH_CHECK(master_params.empty() || master_params.size() == n, op, ": master_params has ",
              master_params.size(), " tensors; pass [] or one fp32 copy per parameter (", n,
              ")");
  TORCH_CHECK(0.0 <= beta1 && beta1 < 1.0 && 0.0 <= beta2 && beta2 < 1.0, op,
              ": betas must lie in [0, 1), got (", beta1, ", ", beta2, ")");
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  check_scalar_tensor(op, lr, "lr");
  if (grad_scale) check_scalar_tensor(op, *grad_scale, "grad_scale");
  if (found_inf) check_scalar_tensor(op, *found_inf, "found_inf");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    check_contiguous(op, p, "params", i);
    check_float_dtype(op, p, "params", i);
    check_like(op, grads[i], "grads", i, p, "params");
    check_float_dtype(op, grads[i], "grads", i);
    check_like(op, exp_avgs[i], "exp_avgs", i, p, "params");
    check_float_dtype(op, exp_avgs[i], "exp_avgs", i);
    check_like(op, exp_avg_sqs[i], "exp_avg_sqs", i, p, "params");
    check_float_dtype(op, exp_avg_sqs[i], "exp_avg_sqs", i);
    TORCH_CHECK(p.device() == params[0].device(), op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", params[0].device(),
                "; call the op once per device");
    if (!master_params.empty()) {
      check_like(op, master_params[i], "master_params", i, p, "params");
      TORCH_CHECK(master_params[i].scalar_type() == at::kFloat, op, ": master_params[", i,
                  "] has dtype ", master_params[i].scalar_type(), "; master weights are fp32");
    }
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.defined() && step.numel() == 1 && step.scalar_type() == at::kFloat, op,
                ": state_steps[", i, "] must be a one-element float32 tensor (like torch.optim",
                " keeps), got dtype ", step.scalar_type(), " with ", step.numel(), " elements");
  }
}

inline void check_norm_type(const char* op, double norm_type) {
  TORCH_CHECK(norm_type > 0.0, op, ": norm_type must be a positive number or inf (2.0 for ",
              "clipping), got ", norm_type);
}

inline void check_max_norm(const char* op, double max_norm) {
  TORCH_CHECK(max_norm > 0.0, op, ": max_norm must be > 0 (clip to this total norm), got ", max_norm);
}

inline void check_tensor_list(const char* op, at::TensorList grads, const char* name) {
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), op, ": ", name, "[", i, "] is undefined");
    check_float_dtype(op, g, name, i);
    check_contiguous(op, g, name, i);
    TORCH_CHECK(g.device() == grads[0].device(), op, ": ", name, "[", i, "] is on ", g.device(),
                " but ", name, "[0] is on ", grads[0].device(), "; call the op once per device");
  }
}

// All checks of fasttrain::unscale_and_check_ shared by its CPU, CUDA and Meta kernels.
inline constexpr const char* kUnscaleOp = "fasttrain::unscale_and_check_";

inline void check_unscale_args(at::TensorList grads, const at::Tensor& inv_scale,
                               const at::Tensor& found_inf) {
  check_tensor_list(kUnscaleOp, grads, "grads");
  check_scalar_tensor(kUnscaleOp, inv_scale, "inv_scale");
  check_scalar_tensor(kUnscaleOp, found_inf, "found_inf");
}

// All checks of fasttrain::ce_rows_ (see csrc/ops.cpp for the schema).
inline void check_ce_rows_args(const at::Tensor& logits, const at::Tensor& target,
                        const std::optional<at::Tensor>& grad, const at::Tensor& loss,
                        const at::Tensor& scale) {
  constexpr const char* op = "fasttrain::ce_rows_";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (rows, classes), got shape ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (strides ", logits.strides(), ")");
  check_float_dtype(op, logits, "logits", 0);
  const int64_t N = logits.size(0);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape (", N,
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must be int64 or int32 class indices, got ", target.scalar_type());
  TORCH_CHECK(target.is_contiguous(), op, ": target must be contiguous");
  TORCH_CHECK(loss.dim() == 1 && loss.size(0) == N && loss.scalar_type() == at::kFloat && loss.is_contiguous(),
              op, ": loss must be a contiguous float32 tensor of shape (", N, ",), got ", loss.scalar_type(),
              " ", loss.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && (scale.dim() == 0 || (scale.dim() == 1 && scale.size(0) == N)),
              op, ": scale must be a float32 tensor of shape () or (", N, ",), got ", scale.scalar_type(), " ",
              scale.sizes());
  if (grad.has_value() && grad->defined()) {
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->is_contiguous(), op,
                ": grad must be contiguous with the logits' shape ", logits.sizes(), ", got ", grad->sizes());
    check_float_dtype(op, *grad, "grad", 0);
  }
}

}  // namespace fasttrain
