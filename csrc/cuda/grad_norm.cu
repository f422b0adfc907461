// fasttrain::grad_norm on CUDA: the global p-norm of many tensors in two launches.
//   1. multi-tensor: one fp32 partial per chunk (sum x^2, max |x|, or sum |x|^p)
//   2. one block combines the partials in a fixed order (fp64), so the result is
//      deterministic run to run, and applies sqrt / ^(1/p).
// Reads each element once: memory bound. The result stays on the device (no host sync).
#include "cuda/multi_tensor_apply.cuh"

namespace fasttrain::cuda {
namespace {

using GradMeta = TensorListMeta<1>;

__device__ __forceinline__ float combine(float acc, float x, NormKind kind) {
  // max that keeps NaN (fmaxf drops it): the inf-norm of a NaN gradient must be NaN
  if (kind == NormKind::kInf) return (acc != acc || x != x) ? acc + x : fmaxf(acc, x);
  return acc + x;
}

__device__ __forceinline__ float term(float x, NormKind kind, float p) {
  if (kind == NormKind::kTwo) return x * x;
  if (kind == NormKind::kInf) return fabsf(x);
  return p == 1.0f ? fabsf(x) : powf(fabsf(x), p);
}

// Sum (or NaN-propagating max for the inf-norm) across a warp; valid in lane 0.
template <typename T>
__device__ T warp_reduce(T value, NormKind kind) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other = __shfl_down_sync(0xffffffffu, value, offset);
    value = kind == NormKind::kInf ? ((value != value || other != other) ? value + other
                                                                          : (value > other ? value : other))
                                   : value + other;
  }
  return value;
}

// Block-wide reduction; the result is valid in thread 0.
template <typename T>
__device__ T block_reduce(T value, NormKind kind) {
  __shared__ T warp_results[kThreads / 32];
  value = warp_reduce(value, kind);
  if (threadIdx.x % 32 == 0) warp_results[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x < 32) {
    value = threadIdx.x < blockDim.x / 32 ? warp_results[threadIdx.x] : T(0);
    value = warp_reduce(value, kind);
  }
  return value;
}

__global__ void __launch_bounds__(kThreads)
    norm_partials_kernel(GradMeta meta, DType dtype, NormKind kind, float p, float* partials) {
  const BlockChunk<1> chunk(meta);
  const void* const data = meta.addresses[0][chunk.tensor];
  float acc = 0.0f;
  for (int64_t i = chunk.begin + threadIdx.x * kIlp; i < chunk.end;
       i += static_cast<int64_t>(blockDim.x) * kIlp) {
    float x[kIlp];
    load_ilp(data, dtype, i, chunk.end, x);  // lanes past the end read 0: neutral for all norms
#pragma unroll
    for (int k = 0; k < kIlp; ++k) acc = combine(acc, term(x[k], kind, p), kind);
  }
  acc = block_reduce(acc, kind);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// clip: when `divisor` is set, also writes max((norm + 1e-6) / max_norm, 1) there (NaN/inf
// pass through) and 1.0/0.0 to `found_inf` for a non-finite/finite norm.
__global__ void __launch_bounds__(kThreads)
    norm_finish_kernel(const float* partials, int64_t n, NormKind kind, float p, float* out,
                       float max_norm, float* divisor, float* found_inf) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double x = partials[i];
    acc = kind == NormKind::kInf ? ((acc != acc || x != x) ? acc + x : fmax(acc, x)) : acc + x;
  }
  acc = block_reduce(acc, kind);
  if (threadIdx.x == 0) {
    const double norm = kind == NormKind::kInf ? acc : kind == NormKind::kTwo ? sqrt(acc) : pow(acc, 1.0 / p);
    const float value = static_cast<float>(norm);
    *out = value;
    if (divisor != nullptr) {
      const bool finite = isfinite(value);
      *divisor = finite ? fmaxf((value + 1e-6f) / max_norm, 1.0f) : value;
      *found_inf = finite ? 0.0f : 1.0f;
    }
  }
}

}  // namespace

int64_t grad_norm_num_partials(const GradTensor* tensors, int n) {
  int64_t blocks = 0;
  for (int t = 0; t < n; ++t) blocks += (tensors[t].numel + kChunkSize - 1) / kChunkSize;
  return blocks;
}

const char* launch_grad_norm_partials(const GradTensor* tensors, int n, DType dtype,
                                      NormKind kind, float p, float* partials, void* stream) {
  auto numel = [&](int t) { return tensors[t].numel; };
  auto addresses_of = [&](int t, GradMeta& meta, int slot) { meta.addresses[0][slot] = tensors[t].data; };
  int64_t written = 0;
  auto launch = [&](const GradMeta& meta, int blocks) {
    norm_partials_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        meta, dtype, kind, p, partials + written);
    written += blocks;
    return launch_error("fasttrain: grad_norm kernel launch failed");
  };
  return multi_tensor_apply<1>(n, numel, addresses_of, launch);
}

const char* launch_grad_norm_finish(const float* partials, int64_t n_partials, NormKind kind,
                                    float p, float* out, void* stream) {
  norm_finish_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      partials, n_partials, kind, p, out, 0.0f, nullptr, nullptr);
  return launch_error("fasttrain: grad_norm finish launch failed");
}

const char* launch_grad_norm_clip_finish(const float* partials, int64_t n_partials, NormKind kind,
                                         float p, float max_norm, float* norm, float* divisor,
                                         float* found_inf, void* stream) {
  norm_finish_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      partials, n_partials, kind, p, norm, max_norm, divisor, found_inf);
  return launch_error("fasttrain: grad_norm_clip finish launch failed");
}

}  // namespace fasttrain::cuda
