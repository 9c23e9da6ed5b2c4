// cuda::rope: rotary position embeddings in place, transformers' rotate_half convention (element
// k pairs with k + head_dim / 2), for q or k in [batch, heads, q_len, head_dim] layout with any
// strides.
//
// One block per token (b, i): its threads first fill the token's cos/sin table in shared memory
// (head_dim / 2 values; both halves of transformers' cos/sin rows are the same), then rotate every
// head's pair (k, k + half) with it, so the table is computed once per token and not per head.
//
// Numerics, float32 end to end (RotaryEmbedding::cos_sin + apply_rotary in float32):
// - angle = inv_freq[k] · float(position), one float32 product, as transformers rounds it;
// - cos and sin of that float32 angle are computed in double and rounded to float32, i.e. they are
//   the correctly rounded float32 cos/sin (CUDA's cosf/sinf are within 2 ulp of it, glibc's within
//   about 0.5 ulp, so this matches the CPU's table wherever glibc rounds correctly, which is
//   nearly everywhere); then times attention_scaling;
// - first = x1·c + (−x2·s), second = x2·c + x1·s with every product and sum rounded to float32
//   (__fmul_rn / __fadd_rn: no FMA contraction), torch's elementwise order.
// bfloat16/float16 x is widened, rotated in float32 and rounded once (the CPU path instead rounds
// cos/sin and each product to the 16-bit type, as torch does in that dtype: the two differ by
// about one 16-bit ulp).
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"

namespace kvcache::cuda {
namespace {

constexpr int kThreads = 128;

// x: [batch, heads, q_len, head_dim] T, strides in elements (the last one is 1);
// position_ids: [batch, q_len] int64 contiguous; inv_freq: [half] float32.
// Shared memory: cos[half] then sin[half], float32.
template <class T>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(T* __restrict__ x, std::int64_t stride_b, std::int64_t stride_h,
                std::int64_t stride_i, std::int64_t heads, std::int64_t q_len, std::int64_t half,
                const std::int64_t* __restrict__ position_ids, const float* __restrict__ inv_freq,
                float attention_scaling) {
  extern __shared__ float table[];
  float* cos_t = table;
  float* sin_t = table + half;
  const std::int64_t token = blockIdx.x;  // b * q_len + i
  const std::int64_t b = token / q_len, i = token % q_len;
  const float position = static_cast<float>(position_ids[token]);  // int64 → float32, nearest
  for (std::int64_t k = threadIdx.x; k < half; k += blockDim.x) {
    const float angle = __fmul_rn(inv_freq[k], position);
    double s = 0.0, c = 0.0;
    sincos(static_cast<double>(angle), &s, &c);
    cos_t[k] = __fmul_rn(static_cast<float>(c), attention_scaling);
    sin_t[k] = __fmul_rn(static_cast<float>(s), attention_scaling);
  }
  __syncthreads();
  T* base = x + b * stride_b + i * stride_i;
  for (std::int64_t idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const std::int64_t h = idx / half, k = idx % half;
    T* row = base + h * stride_h;
    const float x1 = detail::to_f32(row[k]);
    const float x2 = detail::to_f32(row[k + half]);
    const float c = cos_t[k], s = sin_t[k];
    const float first = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s));
    const float second = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    row[k] = detail::from_f32<T>(first);
    row[k + half] = detail::from_f32<T>(second);
  }
}

}  // namespace

void rope(const Tensor& x, const Tensor& position_ids, const Tensor& inv_freq,
          float attention_scaling) {
  KVCACHE_CHECK(
      x.defined() && x.device() == Device::kCuda && x.rank() == 4 && is_floating(x.dtype()) &&
          x.size(3) % 2 == 0 && (x.size(3) <= 1 || x.stride(3) == 1),
      "cuda::rope: expected x [batch, heads, q_len, head_dim] float on CUDA with an even, "
      "contiguous head_dim, got ",
      x.describe());
  const std::int64_t batch = x.size(0), heads = x.size(1), q_len = x.size(2), half = x.size(3) / 2;
  KVCACHE_CHECK(position_ids.defined() && position_ids.device() == Device::kCuda &&
                    position_ids.rank() == 2 && position_ids.dtype() == DType::kInt64 &&
                    position_ids.size(0) == batch && position_ids.size(1) == q_len &&
                    position_ids.is_contiguous(),
                "cuda::rope: expected position_ids [", batch, ", ", q_len,
                "] int64 contiguous on CUDA, got ", position_ids.describe());
  KVCACHE_CHECK(inv_freq.defined() && inv_freq.device() == Device::kCuda && inv_freq.rank() == 1 &&
                    inv_freq.size(0) == half && inv_freq.dtype() == DType::kFloat32 &&
                    inv_freq.is_contiguous(),
                "cuda::rope: expected inv_freq [", half, "] float32 on CUDA, got ",
                inv_freq.describe());
  const std::int64_t tokens = batch * q_len;
  if (tokens == 0 || heads == 0 || half == 0) return;
  KVCACHE_CHECK(tokens <= 0x7fffffff, "cuda::rope: expected at most 2^31 - 1 tokens, got ", tokens);
  const std::size_t shared = 2 * static_cast<std::size_t>(half) * sizeof(float);
  KVCACHE_CHECK(shared <= 48 * 1024, "cuda::rope: expected head_dim <= 12288, got ", x.size(3));
  detail::dispatch_float(x.dtype(), "cuda::rope", [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<static_cast<unsigned>(tokens), kThreads, shared, detail::stream()>>>(
        static_cast<T*>(x.data()), x.stride(0), x.stride(1), x.stride(2), heads, q_len, half,
        static_cast<const std::int64_t*>(position_ids.data()),
        static_cast<const float*>(inv_freq.data()), attention_scaling);
  });
  KVCACHE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvcache::cuda
