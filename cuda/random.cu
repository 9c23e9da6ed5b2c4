// Uniform random fills on the device for test and benchmark weights: element i gets a value from
// a hash of (seed, i) (splitmix64's finaliser), so the fill needs no generator state and a
// 7B-parameter model is drawn in milliseconds instead of minutes on the host.
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"

namespace kvcache::cuda {
namespace {

__device__ __forceinline__ std::uint64_t mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <class T>
__global__ void fill_uniform_kernel(T* out, std::int64_t n, std::uint64_t seed, float lo,
                                    float span) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::uint64_t bits = mix(seed * 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(i));
    const float u = static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // 24 bits: [0, 1)
    out[i] = detail::from_f32<T>(lo + span * u);
  }
}

}  // namespace

void fill_uniform(const Tensor& t, std::uint64_t seed, float lo, float hi) {
  KVCACHE_CHECK(t.defined() && t.device() == Device::kCuda && t.is_contiguous(),
                "cuda::fill_uniform: expected a contiguous CUDA tensor, got ", t.describe());
  const std::int64_t n = t.numel();
  if (n == 0) return;
  detail::dispatch_float(t.dtype(), "cuda::fill_uniform", [&](auto zero) {
    using T = decltype(zero);
    constexpr int kThreads = 256;
    fill_uniform_kernel<T><<<detail::grid_for(n, kThreads, 4096), kThreads, 0, detail::stream()>>>(
        static_cast<T*>(t.data()), n, seed, lo, hi - lo);
    KVCACHE_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace kvcache::cuda
