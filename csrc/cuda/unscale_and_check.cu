// fasttrain::unscale_and_check_ on CUDA: grads *= inv_scale in place, *found_inf = 1 when any
// element was inf/NaN (never cleared), many tensors per launch. Reads and writes each element
// once (8 bytes fp32, 4 bytes bf16/fp16): memory bound. No host sync: inv_scale and found_inf
// stay on the device, the contract of torch._amp_foreach_non_finite_check_and_unscale_.
#include "cuda/multi_tensor_apply.cuh"

namespace fasttrain::cuda {
namespace {

using GradMeta = TensorListMeta<1>;

__global__ void __launch_bounds__(kThreads)
    unscale_kernel(GradMeta meta, DType dtype, const float* inv_scale, float* found_inf) {
  const BlockChunk<1> chunk(meta);
  void* const data = meta.addresses[0][chunk.tensor];
  const float inv = *inv_scale;
  bool non_finite = false;
  for (int64_t i = chunk.begin + threadIdx.x * kIlp; i < chunk.end;
       i += static_cast<int64_t>(blockDim.x) * kIlp) {
    float x[kIlp];
    load_ilp(data, dtype, i, chunk.end, x);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      non_finite |= !isfinite(x[k]);
      x[k] *= inv;
    }
    store_ilp(data, dtype, i, chunk.end, x);
  }
  // Every writer stores the same value, so the race is benign; one store per warp at most.
  if (__any_sync(0xffffffffu, non_finite) && (threadIdx.x % 32) == 0) *found_inf = 1.0f;
}

}  // namespace

const char* launch_unscale_and_check(const GradTensor* tensors, int n, DType dtype,
                                     const float* inv_scale, float* found_inf, void* stream) {
  auto numel = [&](int t) { return tensors[t].numel; };
  auto addresses_of = [&](int t, GradMeta& meta, int slot) { meta.addresses[0][slot] = tensors[t].data; };
  auto launch = [&](const GradMeta& meta, int blocks) {
    unscale_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(meta, dtype, inv_scale,
                                                                               found_inf);
    return launch_error("fasttrain: unscale_and_check kernel launch failed");
  };
  return multi_tensor_apply<1>(n, numel, addresses_of, launch);
}

}  // namespace fasttrain::cuda
