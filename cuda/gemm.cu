// cuda::linear: out = x · weightᵀ + beta · out, float32 accumulation; linear_silu_mul, the
// same product with x = silu(gate) · up made on the fly; and linear_rms_norm, with x =
// rms_norm(hidden, norm_weight, eps) made on the fly.
//
// Which path. Decode's products (1 to 8 rows of x, bfloat16 or float16 weights, 16-byte aligned
// rows) go to our own GEMV kernel (gemv.cu), which streams the weight at memory bandwidth with one
// launch and no per-call host work beyond a few checks; everything else, and all float32 products
// (the exact mode), goes through cublasGemmEx as below. linear_silu_mul runs the GEMV kernel in its
// silu_mul mode where it serves the call (any float dtype) and silu_mul followed by linear
// otherwise; linear_rms_norm runs it in its rms_norm mode where it serves the call (16-bit
// weights: float32 keeps cuBLAS's exact product, as linear does) and rms_norm followed by linear
// otherwise. Both fused modes store the very x bits the two-kernel path would, and run the same
// GEMV plan on them, so they give the same bits as that path.
//
// Layouts. kvcache's matrices are row-major; cuBLAS reads column-major. A row-major [r, c]
// matrix with row stride ld is the column-major [c, r] matrix with leading dimension ld, so
//   out  row-major [rows, out_f], stride ldc  =  C  column-major [out_f, rows], ld ldc
//   x    row-major [rows, in],    stride ldx  =  B  column-major [in, rows],    ld ldx  (op N)
//   W    row-major [out_f, in],   contiguous  =  A  column-major [in, out_f],   ld in   (op T)
// and C = Aᵀ · B + beta · C is one cublasGemmEx with m = out_f, n = rows, k = in.
//
// Precision: compute type CUBLAS_COMPUTE_32F (not _FAST_*), math mode CUBLAS_DEFAULT_MATH, so a
// float32 product is true float32 (no TF32 or BF16x9 emulation, which only the math modes or the
// _FAST / _EMULATED compute types allow), and CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION so a
// split-K reduction with a 16-bit output still adds in float32. 16-bit outputs are rounded once
// from the float32 result.
//
// The handle: one per thread, created at the thread's first linear() (cuBLAS handles are not
// meant to be shared across threads without care), bound to the backend's current stream before
// every call. cublasSetStream also resets the handle's workspace to cuBLAS's own pool, so each
// call then sets a workspace of ours: one buffer per stream the thread has used, taken from the
// stream-ordered pool on that stream (so it is ready in that stream's order, and never shared by
// two streams that could run at once), kept for the thread's lifetime. cuBLAS then never
// allocates during a call.
#include <climits>
#include <cstdint>
#include <unordered_map>

#include "check.cuh"
#include "dtype.cuh"
#include "gemv.cuh"
#include "kvcache/backend/cuda.hpp"

namespace kvcache::cuda {
namespace {

class CublasContext {
 public:
  CublasContext() = default;
  CublasContext(const CublasContext&) = delete;
  CublasContext& operator=(const CublasContext&) = delete;

  ~CublasContext() {
    // Never throws. Each workspace is freed on the stream it was used on, so the free is ordered
    // after that stream's last GEMM; errors (a stream already destroyed, the driver shutting down
    // at exit) are ignored and leave the memory to the driver.
    const Stream current = current_stream();
    for (auto& [stream, workspace] : workspaces_) {
      set_stream(stream);
      workspace = Tensor();
    }
    set_stream(current);
    if (handle_ != nullptr) (void)cublasDestroy(handle_);
  }

  /// The thread's handle, bound to the current stream with that stream's workspace.
  cublasHandle_t bind() {
    if (handle_ == nullptr) {
      int device = 0, major = 0;
      KVCACHE_CUDA_CHECK(cudaGetDevice(&device));
      KVCACHE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
      // cuBLAS's advice: 32 MiB of workspace on Hopper and newer, 4 MiB before.
      workspace_bytes_ = major >= 9 ? (32u << 20) : (4u << 20);
      cublasHandle_t handle = nullptr;
      KVCACHE_CUBLAS_CHECK(cublasCreate(&handle));
      try {
        KVCACHE_CUBLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
        KVCACHE_CUBLAS_CHECK(cublasSetMathMode(
            handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                              CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
      } catch (...) {
        (void)cublasDestroy(handle);
        throw;
      }
      handle_ = handle;  // only a fully configured handle is kept
    }
    cudaStream_t stream = detail::stream();
    auto found = workspaces_.find(stream);
    if (found == workspaces_.end()) {
      // cuBLAS wants a 256-byte aligned workspace; the pool's blocks already are, the extra 256
      // bytes make sure of it.
      // Kept with the handle for the thread's life: never from a forward pass's scratch.
      const std::int64_t size[1] = {static_cast<std::int64_t>(workspace_bytes_ + 256)};
      Tensor buffer = empty_persistent(size, DType::kUInt8);
      found = workspaces_.emplace(stream, std::move(buffer)).first;
    }
    const auto address = reinterpret_cast<std::uintptr_t>(found->second.data());
    void* workspace = reinterpret_cast<void*>((address + 255) / 256 * 256);
    KVCACHE_CUBLAS_CHECK(cublasSetStream(handle_, stream));
    KVCACHE_CUBLAS_CHECK(cublasSetWorkspace(handle_, workspace, workspace_bytes_));
    return handle_;
  }

 private:
  cublasHandle_t handle_ = nullptr;
  std::size_t workspace_bytes_ = 0;
  std::unordered_map<cudaStream_t, Tensor> workspaces_;  // stream → [workspace_bytes_ + 256] uint8
};

thread_local CublasContext g_cublas;

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return CUDA_R_32F;
    case DType::kFloat16:
      return CUDA_R_16F;
    case DType::kBFloat16:
      return CUDA_R_16BF;
    default:
      KVCACHE_FAIL("cuda::linear: no cuBLAS type for ", dtype_name(dtype));
  }
}

// A [rows, cols] CUDA view with a contiguous last dimension and rows that do not overlap.
bool is_row_view(const Tensor& t) {
  return t.defined() && t.device() == Device::kCuda && t.rank() == 2 &&
         (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}

// cuBLAS's leading dimension for a row view: its row stride, or (one row, where the stride is
// meaningless) the row length; at least 1.
std::int64_t leading_dim(const Tensor& t) {
  const std::int64_t ld = t.size(0) > 1 ? t.stride(0) : t.size(1);
  return ld < 1 ? 1 : ld;
}

}  // namespace

void linear(const Tensor& x, const Tensor& weight, const Tensor& out, float beta) {
  const char* where = "cuda::linear";
  KVCACHE_CHECK(weight.defined() && weight.device() == Device::kCuda && weight.rank() == 2 &&
                    weight.is_contiguous(),
                where, ": expected a contiguous [out_features, in] CUDA weight, got ",
                weight.describe());
  KVCACHE_CHECK(is_row_view(x) && x.size(1) == weight.size(1), where, ": expected x [rows, ",
                weight.size(1), "] on CUDA with a contiguous last dimension, got ", x.describe());
  KVCACHE_CHECK(is_row_view(out) && out.size(0) == x.size(0) && out.size(1) == weight.size(0),
                where, ": expected out [", x.size(0), ", ", weight.size(0),
                "] on CUDA with a contiguous last dimension, got ", out.describe());
  const DType w = weight.dtype();
  KVCACHE_CHECK(is_floating(w) && x.dtype() == w, where,
                ": expected x and weight of one dtype (bfloat16, float16 or float32), got x ",
                dtype_name(x.dtype()), " and weight ", dtype_name(w));
  KVCACHE_CHECK(out.dtype() == w || out.dtype() == DType::kFloat32, where,
                ": expected out in the weight's dtype or float32, got out ",
                dtype_name(out.dtype()), " for weight ", dtype_name(w));
  const std::int64_t rows = x.size(0), in = x.size(1), out_f = weight.size(0);
  if (rows == 0 || out_f == 0) return;
  KVCACHE_CHECK(in > 0, where, ": expected at least one input feature, got x ", x.describe());
  const std::int64_t ldx = leading_dim(x), ldc = leading_dim(out);
  KVCACHE_CHECK(
      rows <= INT_MAX && in <= INT_MAX && out_f <= INT_MAX && ldx <= INT_MAX && ldc <= INT_MAX,
      where, ": sizes and strides must fit cuBLAS's int, got x ", x.describe(), ", weight ",
      weight.describe(), ", out ", out.describe());

  if (rows <= detail::kGemvMaxRows && w != DType::kFloat32) {
    detail::GemvArgs args;
    args.weight = weight.data();
    args.x = x.data();
    args.out = out.data();
    args.ldx = ldx;
    args.ldo = ldc;
    args.rows = static_cast<int>(rows);
    args.in = static_cast<int>(in);
    args.out_features = static_cast<int>(out_f);
    args.weight_dtype = w;
    args.out_dtype = out.dtype();
    args.beta = beta;
    if (detail::gemv_serves(args)) {
      KVCACHE_CUDA_CHECK(detail::launch_gemv(args, detail::stream()));
      return;
    }
  }

  cublasHandle_t handle = g_cublas.bind();
  const float alpha = 1.0f;
  KVCACHE_CUBLAS_CHECK(cublasGemmEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out_f), static_cast<int>(rows),
      static_cast<int>(in), &alpha, weight.data(), cuda_type(w), static_cast<int>(in), x.data(),
      cuda_type(w), static_cast<int>(ldx), &beta, out.data(), cuda_type(out.dtype()),
      static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void linear_silu_mul(const Tensor& gate, const Tensor& up, const Tensor& weight, const Tensor& out,
                     float beta) {
  const char* where = "cuda::linear_silu_mul";
  KVCACHE_CHECK(weight.defined() && weight.device() == Device::kCuda && weight.rank() == 2 &&
                    weight.is_contiguous() && is_floating(weight.dtype()),
                where, ": expected a contiguous [out_features, in] float CUDA weight, got ",
                weight.describe());
  const DType w = weight.dtype();
  KVCACHE_CHECK(is_row_view(gate) && gate.size(1) == weight.size(1) && gate.dtype() == w, where,
                ": expected gate [rows, ", weight.size(1), "] ", dtype_name(w),
                " on CUDA with a contiguous last dimension, got ", gate.describe());
  KVCACHE_CHECK(is_row_view(up) && up.size(0) == gate.size(0) && up.size(1) == gate.size(1) &&
                    up.dtype() == w,
                where, ": expected up like gate ([", gate.size(0), ", ", gate.size(1), "] ",
                dtype_name(w), " on CUDA with a contiguous last dimension), got ", up.describe());
  KVCACHE_CHECK(is_row_view(out) && out.size(0) == gate.size(0) && out.size(1) == weight.size(0),
                where, ": expected out [", gate.size(0), ", ", weight.size(0),
                "] on CUDA with a contiguous last dimension, got ", out.describe());
  KVCACHE_CHECK(out.dtype() == w || out.dtype() == DType::kFloat32, where,
                ": expected out in the weight's dtype or float32, got out ",
                dtype_name(out.dtype()), " for weight ", dtype_name(w));
  const std::int64_t rows = gate.size(0), in = gate.size(1), out_f = weight.size(0);
  if (rows == 0 || out_f == 0) return;

  if (rows <= detail::kGemvMaxRows && in <= INT_MAX && out_f <= INT_MAX) {
    detail::GemvArgs args;
    args.weight = weight.data();
    args.gate = gate.data();
    args.up = up.data();
    args.out = out.data();
    args.ldg = leading_dim(gate);
    args.ldu = leading_dim(up);
    args.ldo = leading_dim(out);
    args.rows = static_cast<int>(rows);
    args.in = static_cast<int>(in);
    args.out_features = static_cast<int>(out_f);
    args.weight_dtype = w;
    args.out_dtype = out.dtype();
    args.beta = beta;
    args.silu_mul = true;
    if (detail::gemv_serves(args)) {
      KVCACHE_CUDA_CHECK(detail::launch_gemv(args, detail::stream()));
      return;
    }
  }
  linear(silu_mul(gate, up), weight, out, beta);
}

void linear_rms_norm(const Tensor& x, const Tensor& norm_weight, float eps, const Tensor& weight,
                     const Tensor& out, float beta) {
  const char* where = "cuda::linear_rms_norm";
  KVCACHE_CHECK(weight.defined() && weight.device() == Device::kCuda && weight.rank() == 2 &&
                    weight.is_contiguous() && is_floating(weight.dtype()),
                where, ": expected a contiguous [out_features, in] float CUDA weight, got ",
                weight.describe());
  const DType w = weight.dtype();
  KVCACHE_CHECK(is_row_view(x) && x.size(1) == weight.size(1) && x.dtype() == DType::kFloat32,
                where, ": expected x [rows, ", weight.size(1),
                "] float32 on CUDA with a contiguous last dimension, got ", x.describe());
  KVCACHE_CHECK(norm_weight.defined() && norm_weight.device() == Device::kCuda &&
                    norm_weight.rank() == 1 && norm_weight.size(0) == x.size(1) &&
                    norm_weight.dtype() == DType::kFloat32 && norm_weight.is_contiguous(),
                where, ": expected norm_weight [", x.size(1), "] float32 on CUDA, got ",
                norm_weight.describe());
  KVCACHE_CHECK(is_row_view(out) && out.size(0) == x.size(0) && out.size(1) == weight.size(0),
                where, ": expected out [", x.size(0), ", ", weight.size(0),
                "] on CUDA with a contiguous last dimension, got ", out.describe());
  KVCACHE_CHECK(out.dtype() == w || out.dtype() == DType::kFloat32, where,
                ": expected out in the weight's dtype or float32, got out ",
                dtype_name(out.dtype()), " for weight ", dtype_name(w));
  const std::int64_t rows = x.size(0), in = x.size(1), out_f = weight.size(0);
  if (rows == 0 || out_f == 0) return;

  if (rows <= detail::kGemvMaxRows && w != DType::kFloat32 && in <= INT_MAX && out_f <= INT_MAX) {
    detail::GemvArgs args;
    args.weight = weight.data();
    args.hidden = x.data();
    args.norm_weight = norm_weight.data();
    args.out = out.data();
    args.ldh = leading_dim(x);
    args.ldo = leading_dim(out);
    args.rows = static_cast<int>(rows);
    args.in = static_cast<int>(in);
    args.out_features = static_cast<int>(out_f);
    args.weight_dtype = w;
    args.out_dtype = out.dtype();
    args.beta = beta;
    args.eps = eps;
    args.rms_norm = true;
    if (detail::gemv_serves(args)) {
      KVCACHE_CUDA_CHECK(detail::launch_gemv(args, detail::stream()));
      return;
    }
  }
  linear(rms_norm(x, norm_weight, eps, w), weight, out, beta);
}

}  // namespace kvcache::cuda
