// Multi-tensor apply: many tensors per kernel launch, each cut into kChunkSize chunks, one
// thread block per chunk. The tensor addresses and a block -> (tensor, chunk) map travel in
// the kernel's parameter buffer (4 KB on every arch), so a launch needs no device memory and
// no copy: apex's multi_tensor_apply design, rewritten without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"

namespace fasttrain::cuda {

constexpr int kThreads = 512;
constexpr int kIlp = 4;  // elements per thread per iteration: one 16-byte fp32 access
constexpr int kMaxBlocks = 320;

// Tensors per launch for DEPTH pointers per tensor, keeping the struct under ~3.9 KB.
template <int DEPTH>
constexpr int max_tensors() {
  return (3900 - kMaxBlocks * 5) / (8 * DEPTH + 8) > 110 ? 110
                                                          : (3900 - kMaxBlocks * 5) / (8 * DEPTH + 8);
}

template <int DEPTH>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors<DEPTH>();
  void* addresses[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta<6>) <= 3900, "kernel parameter buffer is 4 KB");
static_assert(sizeof(TensorListMeta<1>) <= 3900, "kernel parameter buffer is 4 KB");

// Calls launch(meta, n_blocks) once per full parameter buffer; launch returns nullptr or an
// error, which stops the walk. numel(t) is tensor t's size; addresses_of(t, meta, slot)
// writes its DEPTH pointers into meta.addresses[*][slot]. Host-only logic: a test runs it
// with a recording `launch` on a machine without a GPU.
template <int DEPTH, typename Numel, typename AddressesOf, typename Launch>
const char* multi_tensor_apply(int n, const Numel& numel, const AddressesOf& addresses_of,
                               const Launch& launch) {
  using Meta = TensorListMeta<DEPTH>;
  int last = -1;
  for (int t = 0; t < n; ++t) last = numel(t) > 0 ? t : last;
  Meta meta;
  int n_tensors = 0, n_blocks = 0;
  for (int t = 0; t <= last; ++t) {
    if (numel(t) == 0) continue;
    addresses_of(t, meta, n_tensors);
    meta.numel[n_tensors++] = numel(t);
    const int64_t chunks = (numel(t) + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<unsigned char>(n_tensors - 1);
      meta.block_to_chunk[n_blocks++] = static_cast<int32_t>(c);
      const bool tensor_done = c == chunks - 1;
      if (n_blocks == kMaxBlocks || (tensor_done && n_tensors == Meta::kMaxTensors) ||
          (tensor_done && t == last)) {
        if (const char* error = launch(meta, n_blocks)) return error;
        n_blocks = 0;
        if (tensor_done) {
          n_tensors = 0;
        } else {  // the tensor continues in the next launch, in slot 0
          for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][n_tensors - 1];
          meta.numel[0] = meta.numel[n_tensors - 1];
          n_tensors = 1;
        }
      }
    }
  }
  return nullptr;
}

inline const char* launch_error(const char* what) {
  return cudaGetLastError() == cudaSuccess ? nullptr : what;
}

// ---- element access in fp32 whatever the storage dtype (dtype uniform per launch)
__device__ __forceinline__ float to_float(const void* base, DType t, int64_t i) {
  if (t == DType::kFloat32) return static_cast<const float*>(base)[i];
  if (t == DType::kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  return __half2float(static_cast<const __half*>(base)[i]);
}

__device__ __forceinline__ float bits_to_float(uint16_t bits, DType t) {
  return t == DType::kBFloat16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16)
                               : __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ bool aligned_for_ilp(const void* base, DType t, int64_t i) {
  const int64_t item = t == DType::kFloat32 ? 4 : 2;
  return reinterpret_cast<uintptr_t>(static_cast<const char*>(base) + i * item) % (kIlp * item) == 0;
}

// out[0:kIlp] = elements i..i+kIlp-1 (as fp32); lanes past `end` read as 0.
__device__ __forceinline__ void load_ilp(const void* base, DType t, int64_t i, int64_t end,
                                         float* out) {
  if (i + kIlp <= end && aligned_for_ilp(base, t, i)) {
    if (t == DType::kFloat32) {
      const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
      out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
      return;
    }
    const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(base) + i);
    out[0] = bits_to_float(static_cast<uint16_t>(raw.x), t);
    out[1] = bits_to_float(static_cast<uint16_t>(raw.x >> 16), t);
    out[2] = bits_to_float(static_cast<uint16_t>(raw.y), t);
    out[3] = bits_to_float(static_cast<uint16_t>(raw.y >> 16), t);
    return;
  }
#pragma unroll
  for (int k = 0; k < kIlp; ++k) out[k] = i + k < end ? to_float(base, t, i + k) : 0.0f;
}

// This block's chunk of its tensor: [begin, end).
template <int DEPTH>
struct BlockChunk {
  int tensor;
  int64_t begin, end;
  __device__ explicit BlockChunk(const TensorListMeta<DEPTH>& meta) {
    tensor = meta.block_to_tensor[blockIdx.x];
    begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t n = meta.numel[tensor];
    end = begin + kChunkSize < n ? begin + kChunkSize : n;
  }
};

}  // namespace fasttrain::cuda
