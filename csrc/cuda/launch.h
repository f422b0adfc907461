// The torch-free boundary between the CUDA kernels (*.cu) and their PyTorch glue
// (ops_cuda.cpp). Only plain pointers, sizes and enums cross it, so the .cu files compile
// with nvcc alone (CI compile-checks them for sm_80/sm_90 on a machine without a GPU).
// Every launcher returns nullptr on success or a static error string.
#pragma once

#include <cstdint>

namespace fasttrain::cuda {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Elements one thread block handles; tensors are cut into chunks of this size.
constexpr int64_t kChunkSize = 65536;

struct GradTensor {
  void* data;
  int64_t numel;
};

enum class NormKind : int32_t { kTwo = 0, kInf = 1, kP = 2 };

// Number of per-block partials launch_grad_norm_partials writes for these tensors.
int64_t grad_norm_num_partials(const GradTensor* tensors, int n);

const char* launch_grad_norm_partials(const GradTensor* tensors, int n, DType dtype,
                                      NormKind kind, float p, float* partials, void* stream);

// out[0] = the norm from partials[0:n_partials] (one block, fixed order: deterministic).
const char* launch_grad_norm_finish(const float* partials, int64_t n_partials, NormKind kind,
                                    float p, float* out, void* stream);

// The same finish, also writing the clip divisor and the non-finite flag (fasttrain::grad_norm_clip).
const char* launch_grad_norm_clip_finish(const float* partials, int64_t n_partials, NormKind kind,
                                         float p, float max_norm, float* norm, float* divisor,
                                         float* found_inf, void* stream);

}  // namespace fasttrain::cuda
