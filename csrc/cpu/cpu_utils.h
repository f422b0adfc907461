// Helpers for the CPU multi-tensor kernels: a flat list of (tensor, range) chunks so one
// parallel region covers every tensor of a call, and fp32 <-> bf16/fp16 block conversion so
// the math is written once, in fp32, and vectorised by the compiler (`#pragma omp simd`).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fasttrain::cpu {

// Elements per unit of parallel work: large enough that scheduling costs nothing,
// small enough that 124M parameters give every thread hundreds of chunks.
constexpr int64_t kChunk = 32768;
// Elements converted to fp32 at a time: a few 2 KiB buffers stay in L1.
constexpr int64_t kBlock = 512;

struct Chunk {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      chunks.push_back({static_cast<int32_t>(t), begin, std::min(n, begin + kChunk)});
    }
  }
  return chunks;
}

// Chunks per thread of the pool: all of them (run inline, no parallel region) while the
// tensors hold fewer than two full chunks of elements. A parallel region costs a wake-up of
// every pool thread; on a loaded machine a descheduled thread held a tiny model's step for
// tens of milliseconds per op (ATen's own kernels run inline below their grain size too).
inline int64_t chunk_grain(const std::vector<Chunk>& chunks) {
  int64_t elements = 0;
  for (const Chunk& c : chunks) elements += c.end - c.begin;
  return elements < 2 * kChunk ? std::max<int64_t>(1, static_cast<int64_t>(chunks.size())) : 1;
}

// Runs fn(chunk) for every chunk, spread over the ATen (OpenMP) thread pool when big enough.
template <typename Fn>
inline void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks),
                   [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) fn(chunks[c]);
  });
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// Round to nearest even, NaN kept quiet: the same result as c10::BFloat16(float).
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return value != value ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
}

// dst[0:n] = float(src[0:n]) for a float32/bfloat16/float16 source.
inline void load_float(const void* src, at::ScalarType dtype, int64_t n, float* dst) {
  if (dtype == at::kFloat) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dtype == at::kBFloat16) {
    const auto* in = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(in[i]);
  } else {
    const auto* in = static_cast<const uint16_t*>(src);
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
      const __m128i half8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(half8));
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<float>(c10::Half(in[i], c10::Half::from_bits()));
  }
}

// dst[0:n] = src[0:n] rounded to nearest in dst's dtype (float32/bfloat16/float16).
inline void store_float(const float* src, int64_t n, void* dst, at::ScalarType dtype) {
  if (dtype == at::kFloat) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dtype == at::kBFloat16) {
    auto* out = static_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(src[i]);
  } else {
    auto* out = static_cast<uint16_t*>(dst);
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
      const __m128i half8 = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), half8);
    }
#endif
    for (; i < n; ++i) out[i] = c10::Half(src[i]).x;
  }
}

// A view of one operand of a block: fp32 storage is used in place, other dtypes go through
// a local fp32 buffer that `commit` writes back (rounded) after the math.
class FloatBlock {
 public:
  FloatBlock(void* base, at::ScalarType dtype, int64_t offset, int64_t n, float* buffer)
      : dtype_(dtype), n_(n) {
    const size_t item = dtype == at::kFloat ? 4 : 2;
    storage_ = static_cast<char*>(base) + offset * static_cast<int64_t>(item);
    data_ = dtype == at::kFloat ? static_cast<float*>(storage_) : buffer;
    if (dtype != at::kFloat) load_float(storage_, dtype, n, data_);
  }
  float* data() const { return data_; }
  void commit() const {
    if (dtype_ != at::kFloat) store_float(data_, n_, storage_, dtype_);
  }

 private:
  at::ScalarType dtype_;
  int64_t n_;
  void* storage_;
  float* data_;
};

}  // namespace fasttrain::cpu
