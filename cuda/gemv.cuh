// Private to the CUDA backend: the few-row product out = x · Wᵀ + beta · out that decode runs
// (1 to 8 rows of x against a whole weight matrix), as a plain view of pointers, strides and sizes
// that gemm.cu fills from its checked tensors, and the launcher of the kernel in gemv.cu. The
// kernel streams W once at memory bandwidth; cuBLAS stays the path for everything it does not
// serve (more rows, unaligned rows, sizes past its limits).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kvcache/tensor.hpp"

namespace kvcache::cuda::detail {

/// Most rows of x the GEMV kernel serves.
inline constexpr int kGemvMaxRows = 8;

/// One few-row product, strides in elements:
///   out[r, o] = Σ_i x[r, i] · weight[o, i] + beta · out[r, o]     r < rows, o < out_features
/// with float32 accumulation and one rounding to out_dtype. beta = 0 never reads out.
/// In silu_mul mode x is made on the fly, x[r, i] = silu(gate[r, i]) · up[r, i] rounded to the
/// weight's dtype exactly as cuda::silu_mul rounds it, and `x` is unused.
/// In rms_norm mode x is made on the fly as cuda::rms_norm(hidden, norm_weight, eps, W's dtype)
/// makes it, bit for bit: x[r, i] = norm_weight[i] · (hidden[r, i] · inv_rms[r]) rounded to the
/// weight's dtype, inv_rms[r] = 1 / sqrt(mean_i hidden[r, i]² + eps) with norms.cu's reduction
/// order (every block recomputes it; hidden is a few KiB, L2-resident); `x` is unused.
struct GemvArgs {
  const void* weight = nullptr;       // [out_features, in] contiguous, weight_dtype
  const void* x = nullptr;            // [rows, in] row stride ldx, weight_dtype (plain mode)
  const void* gate = nullptr;         // [rows, in] row stride ldg, weight_dtype (silu_mul mode)
  const void* up = nullptr;           // [rows, in] row stride ldu, weight_dtype (silu_mul mode)
  const void* hidden = nullptr;       // [rows, in] row stride ldh, float32 (rms_norm mode)
  const void* norm_weight = nullptr;  // [in] float32 (rms_norm mode)
  void* out = nullptr;                // [rows, out_features] row stride ldo, out_dtype
  std::int64_t ldx = 0, ldg = 0, ldu = 0, ldh = 0, ldo = 0;
  int rows = 0, in = 0, out_features = 0;
  DType weight_dtype = DType::kBFloat16;  // float32, bfloat16 or float16
  DType out_dtype = DType::kFloat32;      // weight_dtype or float32
  float beta = 0.0f;
  float eps = 0.0f;  // rms_norm mode
  bool silu_mul = false;
  bool rms_norm = false;  // at most one of silu_mul and rms_norm
};

/// True when launch_gemv serves `a`: 1 <= rows <= kGemvMaxRows; a float weight dtype and out in
/// it or float32; `in` a multiple of 16 bytes' worth of elements; weight and the x (or gate and
/// up) rows 16-byte aligned; the staged x small enough for the current device's shared memory
/// (and, for silu_mul, few enough elements that computing them in every block stays cheaper than
/// a separate silu_mul). rms_norm mode also wants a 16-bit weight (float32 products stay on
/// cuBLAS, as in linear), 16-byte aligned hidden rows and norm_weight (norms.cu's 4-wide loads,
/// whose reduction order it reproduces) and few enough elements. Otherwise the caller takes its
/// fallback (cuBLAS, or silu_mul / rms_norm then linear).
bool gemv_serves(const GemvArgs& a);

/// Launches the GEMV kernel on `stream` (no allocation, no synchronisation) and returns the
/// launch's status; cudaErrorNotSupported where gemv_serves(a) is false.
cudaError_t launch_gemv(const GemvArgs& a, cudaStream_t stream);

}  // namespace kvcache::cuda::detail
