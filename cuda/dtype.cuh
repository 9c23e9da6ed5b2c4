// Device-side element types shared by the kernels: kvcache's DType mapped to CUDA's types, float32
// loads and round-to-nearest-even stores, and one dispatch helper that turns a runtime DType into
// a compile-time element type (throwing, with the dtype's name, for one it cannot serve).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kvcache/error.hpp"
#include "kvcache/tensor.hpp"

namespace kvcache::cuda::detail {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

/// Calls f(T{}) with T = float, __half or __nv_bfloat16 for a float DType; any other dtype is a
/// kvcache::Error naming `where`.
template <class F>
decltype(auto) dispatch_float(DType dtype, const char* where, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    default:
      KVCACHE_FAIL(where, ": expected a float32, float16 or bfloat16 tensor, got ",
                   dtype_name(dtype));
  }
}

/// The CUDA stream the backend issues work on (kvcache::cuda::current_stream()).
cudaStream_t stream();

/// Blocks of `threads` threads covering `n` items, capped for grid-stride loops.
inline unsigned grid_for(std::int64_t n, int threads, std::int64_t cap = 65535) {
  std::int64_t blocks = (n + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

}  // namespace kvcache::cuda::detail
