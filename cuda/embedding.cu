// cuda::embedding: rows of a dense [vocab, hidden] table (float32, bfloat16 or float16) picked by
// int64 token ids, widened to float32 — the lookup at the bottom of the model. Widening is exact,
// so the result equals cpu::embedding's bit for bit. One block per id copies its row, four
// elements per load where the table's rows allow it.
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

constexpr int kThreads = 128;

// table [vocab, hidden] T contiguous; ids [n] int64; out [n, hidden] float32 contiguous.
// Block b handles ids b, b + gridDim.x, ...; kVec elements per thread per step (hidden % kVec ==
// 0 and the table's base aligned to kVec elements when kVec > 1). An id outside [0, vocab) (the
// caller checks on the host; this is only a guard against reading out of bounds) gives a NaN row.
template <class T, int kVec>
__global__ void __launch_bounds__(kThreads)
    embedding_kernel(const T* __restrict__ table, const std::int64_t* __restrict__ ids,
                     float* __restrict__ out, std::int64_t n, std::int64_t vocab,
                     std::int64_t hidden) {
  const std::int64_t packs = hidden / kVec;
  for (std::int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const std::int64_t id = ids[row];
    Pack<float, kVec>* dst = reinterpret_cast<Pack<float, kVec>*>(out + row * hidden);
    if (id < 0 || id >= vocab) {
      Pack<float, kVec> nan;
      for (int j = 0; j < kVec; ++j) nan.v[j] = __int_as_float(0x7fc00000);
      for (std::int64_t p = threadIdx.x; p < packs; p += blockDim.x) dst[p] = nan;
      continue;
    }
    const Pack<T, kVec>* src = reinterpret_cast<const Pack<T, kVec>*>(table + id * hidden);
    for (std::int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const Pack<T, kVec> in = src[p];
      Pack<float, kVec> o;
      for (int j = 0; j < kVec; ++j) o.v[j] = detail::to_f32(in.v[j]);
      dst[p] = o;
    }
  }
}

}  // namespace

Tensor embedding(const Tensor& table, const Tensor& ids) {
  KVCACHE_CHECK(table.defined() && table.device() == Device::kCuda && table.rank() == 2 &&
                    is_floating(table.dtype()) && table.is_contiguous(),
                "cuda::embedding: expected a contiguous [vocab, hidden] float CUDA table, got ",
                table.describe());
  KVCACHE_CHECK(ids.defined() && ids.device() == Device::kCuda && ids.dtype() == DType::kInt64 &&
                    ids.is_contiguous(),
                "cuda::embedding: expected contiguous int64 CUDA ids, got ", ids.describe());
  const std::int64_t vocab = table.size(0), hidden = table.size(1), n = ids.numel();
  Tensor out = empty({n, hidden}, DType::kFloat32);
  if (n == 0 || hidden == 0) return out;
  const unsigned blocks = static_cast<unsigned>(n < 65535 ? n : 65535);
  detail::dispatch_float(table.dtype(), "cuda::embedding", [&](auto tag) {
    using T = decltype(tag);
    const T* t = static_cast<const T*>(table.data());
    const auto* id = static_cast<const std::int64_t*>(ids.data());
    float* o = static_cast<float*>(out.data());
    // out comes from the pool (256-byte aligned) and hidden % 4 == 0 keeps every row aligned.
    const bool vec = hidden % 4 == 0 && reinterpret_cast<std::uintptr_t>(t) % (4 * sizeof(T)) == 0;
    if (vec) {
      embedding_kernel<T, 4><<<blocks, kThreads, 0, detail::stream()>>>(t, id, o, n, vocab, hidden);
    } else {
      embedding_kernel<T, 1><<<blocks, kThreads, 0, detail::stream()>>>(t, id, o, n, vocab, hidden);
    }
  });
  KVCACHE_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace kvcache::cuda
