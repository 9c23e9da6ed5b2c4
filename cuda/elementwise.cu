// The model's elementwise steps: the projection bias (add_bias), the SiLU-gated MLP's middle
// (silu_mul) and the residual add (add_inplace). All memory-bound: each moves four elements per
// load where the rows allow it and does its arithmetic in float32, rounding once to the output
// dtype.
//
// Numerics against the CPU: add_bias and add_inplace are one IEEE float32 add per element, bit
// for bit cpu::add_inplace's. silu_mul computes g / (1 + e^−g) · up with CUDA's expf (within 2 ulp,
// no fast math) and IEEE division and product; the CPU's e^x is a vectorised polynomial (about
// 1 ulp), so the two agree to a few float32 ulps, not bit for bit.
//
// Launch shape for the [rows, n] kernels: blockIdx.y walks rows (strided by gridDim.y, so any
// number of rows works), blockIdx.x and threadIdx.x walk the row's packs of kVec elements.
#include <algorithm>
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"

namespace kvcache::cuda {
namespace {

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr int kThreads = 256;
constexpr int kVec = 4;

bool aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// A [rows, n] CUDA view whose rows do not overlap and whose last dimension is contiguous.
bool is_row_view(const Tensor& t) {
  return t.defined() && t.device() == Device::kCuda && t.rank() == 2 &&
         (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}

std::int64_t row_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

dim3 grid_2d(std::int64_t rows, std::int64_t packs) {
  const std::int64_t x = std::clamp<std::int64_t>((packs + kThreads - 1) / kThreads, 1, 1024);
  const std::int64_t y = std::clamp<std::int64_t>(rows, 1, 65535);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

// --- add_bias: y [rows, n] T (row stride ld_y) += bias [n] float32 -------------------------------
template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    add_bias_kernel(T* __restrict__ y, std::int64_t ld_y, const float* __restrict__ bias,
                    std::int64_t rows, std::int64_t n) {
  const std::int64_t packs = n / V;
  for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    auto* yr = reinterpret_cast<Pack<T, V>*>(y + r * ld_y);
    const auto* b = reinterpret_cast<const Pack<float, V>*>(bias);
    for (std::int64_t p = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
         p < packs; p += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      Pack<T, V> v = yr[p];
      const Pack<float, V> bv = b[p];
      for (int j = 0; j < V; ++j) {
        v.v[j] = detail::from_f32<T>(__fadd_rn(detail::to_f32(v.v[j]), bv.v[j]));
      }
      yr[p] = v;
    }
  }
}

// --- silu_mul: out [rows, n] T contiguous = silu(gate) · up, gate/up with row strides ------------
__device__ __forceinline__ float silu_times(float g, float u) {
  // torch's silu in float32: x / (1 + exp(-x)). For g ≪ 0, e^−g overflows to inf and the
  // quotient is −0, as on the CPU.
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    silu_mul_kernel(const T* __restrict__ gate, std::int64_t ld_g, const T* __restrict__ up,
                    std::int64_t ld_u, T* __restrict__ out, std::int64_t rows, std::int64_t n) {
  const std::int64_t packs = n / V;
  for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const auto* g = reinterpret_cast<const Pack<T, V>*>(gate + r * ld_g);
    const auto* u = reinterpret_cast<const Pack<T, V>*>(up + r * ld_u);
    auto* o = reinterpret_cast<Pack<T, V>*>(out + r * n);
    for (std::int64_t p = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
         p < packs; p += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      const Pack<T, V> gv = g[p], uv = u[p];
      Pack<T, V> ov;
      for (int j = 0; j < V; ++j) {
        ov.v[j] = detail::from_f32<T>(silu_times(detail::to_f32(gv.v[j]), detail::to_f32(uv.v[j])));
      }
      o[p] = ov;
    }
  }
}

// --- add_inplace: y [n] float32 += x [n] float32, both contiguous --------------------------------
// Packs of V for the first n / V · V elements, then the tail one element per thread.
template <int V>
__global__ void __launch_bounds__(kThreads)
    add_inplace_kernel(float* __restrict__ y, const float* __restrict__ x, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t first = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  const std::int64_t packs = n / V;
  auto* yp = reinterpret_cast<Pack<float, V>*>(y);
  const auto* xp = reinterpret_cast<const Pack<float, V>*>(x);
  for (std::int64_t p = first; p < packs; p += stride) {
    Pack<float, V> a = yp[p];
    const Pack<float, V> b = xp[p];
    for (int j = 0; j < V; ++j) a.v[j] = __fadd_rn(a.v[j], b.v[j]);
    yp[p] = a;
  }
  for (std::int64_t i = packs * V + first; i < n; i += stride) y[i] = __fadd_rn(y[i], x[i]);
}

}  // namespace

void add_bias(const Tensor& y, const Tensor& bias) {
  KVCACHE_CHECK(is_row_view(y) && is_floating(y.dtype()),
                "cuda::add_bias: expected y as a [rows, n] float CUDA tensor with a contiguous "
                "last dimension, got ",
                y.describe());
  KVCACHE_CHECK(
      bias.defined() && bias.device() == Device::kCuda && bias.rank() == 1 &&
          bias.size(0) == y.size(1) && bias.dtype() == DType::kFloat32 && bias.is_contiguous(),
      "cuda::add_bias: expected bias [", y.size(1), "] float32 on CUDA, got ", bias.describe());
  const std::int64_t rows = y.size(0), n = y.size(1), ld = row_stride(y);
  if (rows == 0 || n == 0) return;
  detail::dispatch_float(y.dtype(), "cuda::add_bias", [&](auto tag) {
    using T = decltype(tag);
    T* yp = static_cast<T*>(y.data());
    const float* bp = static_cast<const float*>(bias.data());
    const bool vec = n % kVec == 0 && ld % kVec == 0 && aligned(yp, kVec * sizeof(T)) &&
                     aligned(bp, kVec * sizeof(float));
    if (vec) {
      add_bias_kernel<T, kVec>
          <<<grid_2d(rows, n / kVec), kThreads, 0, detail::stream()>>>(yp, ld, bp, rows, n);
    } else {
      add_bias_kernel<T, 1>
          <<<grid_2d(rows, n), kThreads, 0, detail::stream()>>>(yp, ld, bp, rows, n);
    }
  });
  KVCACHE_CUDA_CHECK(cudaGetLastError());
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  KVCACHE_CHECK(is_row_view(gate) && is_floating(gate.dtype()),
                "cuda::silu_mul: expected gate as a [rows, n] float CUDA tensor with a contiguous "
                "last dimension, got ",
                gate.describe());
  KVCACHE_CHECK(is_row_view(up) && up.dtype() == gate.dtype() && up.size(0) == gate.size(0) &&
                    up.size(1) == gate.size(1),
                "cuda::silu_mul: expected up like gate ([", gate.size(0), ", ", gate.size(1), "] ",
                dtype_name(gate.dtype()), " cuda, contiguous last dimension), got ", up.describe());
  const std::int64_t rows = gate.size(0), n = gate.size(1);
  const std::int64_t ld_g = row_stride(gate), ld_u = row_stride(up);
  Tensor out = empty({rows, n}, gate.dtype());
  if (rows == 0 || n == 0) return out;
  detail::dispatch_float(gate.dtype(), "cuda::silu_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(gate.data());
    const T* u = static_cast<const T*>(up.data());
    T* o = static_cast<T*>(out.data());
    const std::size_t bytes = kVec * sizeof(T);
    const bool vec = n % kVec == 0 && ld_g % kVec == 0 && ld_u % kVec == 0 && aligned(g, bytes) &&
                     aligned(u, bytes);
    if (vec) {
      silu_mul_kernel<T, kVec><<<grid_2d(rows, n / kVec), kThreads, 0, detail::stream()>>>(
          g, ld_g, u, ld_u, o, rows, n);
    } else {
      silu_mul_kernel<T, 1>
          <<<grid_2d(rows, n), kThreads, 0, detail::stream()>>>(g, ld_g, u, ld_u, o, rows, n);
    }
  });
  KVCACHE_CUDA_CHECK(cudaGetLastError());
  return out;
}

void add_inplace(const Tensor& y, const Tensor& x) {
  KVCACHE_CHECK(y.defined() && x.defined() && y.device() == Device::kCuda &&
                    x.device() == Device::kCuda && y.dtype() == DType::kFloat32 &&
                    x.dtype() == DType::kFloat32 && y.is_contiguous() && x.is_contiguous() &&
                    y.numel() == x.numel(),
                "cuda::add_inplace: expected two contiguous float32 CUDA tensors of one size, got ",
                y.describe(), " and ", x.describe());
  const std::int64_t n = y.numel();
  if (n == 0) return;
  float* yp = static_cast<float*>(y.data());
  const float* xp = static_cast<const float*>(x.data());
  if (aligned(yp, 16) && aligned(xp, 16)) {
    add_inplace_kernel<kVec>
        <<<detail::grid_for(n / kVec + 1, kThreads, 4096), kThreads, 0, detail::stream()>>>(yp, xp,
                                                                                            n);
  } else {
    add_inplace_kernel<1>
        <<<detail::grid_for(n, kThreads, 4096), kThreads, 0, detail::stream()>>>(yp, xp, n);
  }
  KVCACHE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvcache::cuda
