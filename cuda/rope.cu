// cuda::rope: rotary position embeddings in place, transformers' rotate_half convention (element
// k pairs with k + head_dim / 2), for q or k in [batch, heads, q_len, head_dim] layout with any
// strides; cuda::rope_append: the same for a decode step's q|k, with the rotated keys and the
// values written to their cache slots (read on the device) instead of in place, one launch where
// rope + append_at took two.
//
// Grid: x = token (b, i), y = blocks over the token's work items (one rotation pair (h, k) each,
// then, for rope_append, one value element each), one item per thread where the grid allows. A
// block first fills the token's cos/sin table in shared memory (head_dim / 2 values; both halves
// of transformers' cos/sin rows are the same), then each thread loads its pair and stores its
// result, so a step's few thousand pairs take one memory round trip instead of a loop of them
// (the first kernel, one block a token, took 7 µs for TinyLlama's q|k on the H200).
//
// Launched with programmatic dependent launch: the kernel may start while the previous one (the
// q|k|v GEMV) finishes, and waits for it before reading anything.
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
// about one 16-bit ulp). rope_append stores the very bits rope would leave in x.
//
// cuda::rotate_rows: the sink cache's re-rotation of kept keys by a fixed shift, with the shift's
// cos/sin given (the cache computes them once per eviction, as on the CPU): one thread a rotation
// pair, the same float32 expression as rope's (and cpu::rotate_rows': x1·c − x2·s, x2·c + x1·s,
// every product and sum rounded, no FMA), rounded once to the dtype, so both backends store the
// same bits.
#include <algorithm>
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"
#include "mma.cuh"

namespace kvcache::cuda {
namespace {

constexpr int kThreads = 128;

// Where rope_append sends the keys (heads >= first_key_head of x) and the values; slot null for
// rope (everything rotated in place). Strides in elements, the last dimension contiguous.
struct AppendTarget {
  void* key_storage = nullptr;
  std::int64_t ks_b = 0, ks_h = 0, ks_i = 0;
  void* value_storage = nullptr;
  std::int64_t vs_b = 0, vs_h = 0, vs_i = 0;
  const void* values = nullptr;
  std::int64_t v_b = 0, v_h = 0, v_i = 0;
  std::int64_t first_key_head = 0, kv_heads = 0, head_dim = 0, capacity = 0;
  const std::int64_t* slot = nullptr;
};

// x: [batch, heads, q_len, head_dim] T, strides in elements (the last one is 1);
// position_ids: [batch, q_len] int64 contiguous; inv_freq: [half] float32.
// Shared memory: cos[half] then sin[half], float32.
template <class T>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(T* __restrict__ x, std::int64_t stride_b, std::int64_t stride_h,
                std::int64_t stride_i, std::int64_t heads, std::int64_t q_len, std::int64_t half,
                const std::int64_t* __restrict__ position_ids, const float* __restrict__ inv_freq,
                float attention_scaling, AppendTarget target) {
  extern __shared__ float table[];
  float* cos_t = table;
  float* sin_t = table + half;
  detail::grid_dependency_wait();  // x, the values and the positions may be the last kernel's
  detail::allow_dependent_launch();
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
  const bool append = target.slot != nullptr;
  // rope_append's slots [slot, slot + q_len) must lie in the storage; else it writes nothing there.
  std::int64_t slot = 0;
  bool in_range = false;
  if (append) {
    slot = *target.slot;
    in_range = slot >= 0 && slot <= target.capacity - q_len;
  }
  const std::int64_t pairs = heads * half;
  const std::int64_t items = pairs + (append ? target.kv_heads * target.head_dim : 0);
  T* base = x + b * stride_b + i * stride_i;
  for (std::int64_t idx = blockIdx.y * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       idx < items; idx += static_cast<std::int64_t>(gridDim.y) * blockDim.x) {
    if (idx < pairs) {
      const std::int64_t h = idx / half, k = idx % half;
      T* dst = base + h * stride_h;
      const float x1 = detail::to_f32(dst[k]);
      const float x2 = detail::to_f32(dst[k + half]);
      if (append && h >= target.first_key_head) {
        if (!in_range) continue;
        dst = static_cast<T*>(target.key_storage) + b * target.ks_b +
              (h - target.first_key_head) * target.ks_h + (slot + i) * target.ks_i;
      }
      const float c = cos_t[k], s = sin_t[k];
      const float first = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s));
      const float second = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
      dst[k] = detail::from_f32<T>(first);
      dst[k + half] = detail::from_f32<T>(second);
    } else if (in_range) {
      const std::int64_t e = idx - pairs;
      const std::int64_t h = e / target.head_dim, d = e % target.head_dim;
      static_cast<T*>(
          target.value_storage)[b * target.vs_b + h * target.vs_h + (slot + i) * target.vs_i + d] =
          static_cast<const T*>(
              target.values)[b * target.v_b + h * target.v_h + i * target.v_i + d];
    }
  }
}

// Checks x, position_ids and inv_freq, and launches (target.slot null: rope in place).
void launch_rope(const char* where, const Tensor& x, const Tensor& position_ids,
                 const Tensor& inv_freq, float attention_scaling, const AppendTarget& target) {
  KVCACHE_CHECK(x.defined() && x.device() == Device::kCuda && x.rank() == 4 &&
                    is_floating(x.dtype()) && x.size(3) % 2 == 0 &&
                    (x.size(3) <= 1 || x.stride(3) == 1),
                where,
                ": expected x [batch, heads, q_len, head_dim] float on CUDA with an even, "
                "contiguous head_dim, got ",
                x.describe());
  const std::int64_t batch = x.size(0), heads = x.size(1), q_len = x.size(2), half = x.size(3) / 2;
  KVCACHE_CHECK(position_ids.defined() && position_ids.device() == Device::kCuda &&
                    position_ids.rank() == 2 && position_ids.dtype() == DType::kInt64 &&
                    position_ids.size(0) == batch && position_ids.size(1) == q_len &&
                    position_ids.is_contiguous(),
                where, ": expected position_ids [", batch, ", ", q_len,
                "] int64 contiguous on CUDA, got ", position_ids.describe());
  KVCACHE_CHECK(inv_freq.defined() && inv_freq.device() == Device::kCuda && inv_freq.rank() == 1 &&
                    inv_freq.size(0) == half && inv_freq.dtype() == DType::kFloat32 &&
                    inv_freq.is_contiguous(),
                where, ": expected inv_freq [", half, "] float32 on CUDA, got ",
                inv_freq.describe());
  const std::int64_t tokens = batch * q_len;
  if (tokens == 0 || heads == 0 || half == 0) return;
  KVCACHE_CHECK(tokens <= 0x7fffffff, where, ": expected at most 2^31 - 1 tokens, got ", tokens);
  const std::size_t shared = 2 * static_cast<std::size_t>(half) * sizeof(float);
  KVCACHE_CHECK(shared <= 48 * 1024, where, ": expected head_dim <= 12288, got ", x.size(3));
  const std::int64_t items =
      heads * half + (target.slot != nullptr ? target.kv_heads * target.head_dim : 0);
  const dim3 grid(static_cast<unsigned>(tokens), detail::grid_for(items, kThreads));
  detail::dispatch_float(x.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    KVCACHE_CUDA_CHECK(detail::launch_overlapped(
        rope_kernel<T>, grid, dim3(kThreads), shared, detail::stream(), static_cast<T*>(x.data()),
        x.stride(0), x.stride(1), x.stride(2), heads, q_len, half,
        static_cast<const std::int64_t*>(position_ids.data()),
        static_cast<const float*>(inv_freq.data()), attention_scaling, target));
  });
}

// dst[r, j, :] = rotate(src[r, j, :]) for r = (b, h), slot j; one thread a pair (r, j, k).
template <class T>
__global__ void __launch_bounds__(kThreads)
    rotate_rows_kernel(const T* src, T* dst, std::int64_t heads, std::int64_t slots,
                       std::int64_t half, std::int64_t s_b, std::int64_t s_h, std::int64_t s_j,
                       std::int64_t d_b, std::int64_t d_h, std::int64_t d_j,
                       const float* __restrict__ cos_sin, std::int64_t pairs) {
  detail::grid_dependency_wait();  // src may be the last kernel's output
  detail::allow_dependent_launch();
  for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       idx < pairs; idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t k = idx % half, rest = idx / half;
    const std::int64_t j = rest % slots, bh = rest / slots;
    const std::int64_t b = bh / heads, h = bh % heads;
    const T* x = src + b * s_b + h * s_h + j * s_j;
    T* y = dst + b * d_b + h * d_h + j * d_j;
    const float x1 = detail::to_f32(x[k]), x2 = detail::to_f32(x[k + half]);
    const float c = cos_sin[k], s = cos_sin[half + k];
    const float first = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    const float second = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    y[k] = detail::from_f32<T>(first);
    y[k + half] = detail::from_f32<T>(second);
  }
}

}  // namespace

void rotate_rows(const Tensor& src, const Tensor& dst, const Tensor& cos_sin) {
  const char* where = "cuda::rotate_rows";
  KVCACHE_CHECK(src.defined() && src.device() == Device::kCuda && src.rank() == 4 &&
                    is_floating(src.dtype()) && src.size(3) % 2 == 0 &&
                    (src.size(3) <= 1 || src.stride(3) == 1),
                where,
                ": expected src [batch, heads, slots, head_dim] float on CUDA with an even, "
                "contiguous head_dim, got ",
                src.defined() ? src.describe() : "undefined");
  KVCACHE_CHECK(dst.defined() && dst.device() == Device::kCuda && dst.dtype() == src.dtype() &&
                    std::ranges::equal(dst.shape(), src.shape()) &&
                    (dst.size(3) <= 1 || dst.stride(3) == 1),
                where, ": expected dst shaped and typed as src ", src.describe(), ", got ",
                dst.defined() ? dst.describe() : "undefined");
  const std::int64_t half = src.size(3) / 2;
  KVCACHE_CHECK(cos_sin.defined() && cos_sin.device() == Device::kCuda &&
                    cos_sin.dtype() == DType::kFloat32 && cos_sin.is_contiguous() &&
                    cos_sin.numel() == 2 * half,
                where, ": expected cos_sin [2, ", half, "] float32 contiguous on CUDA, got ",
                cos_sin.defined() ? cos_sin.describe() : "undefined");
  const std::int64_t pairs = src.numel() / 2;
  if (pairs == 0) return;
  detail::dispatch_float(src.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    KVCACHE_CUDA_CHECK(detail::launch_overlapped(
        rotate_rows_kernel<T>, dim3(detail::grid_for(pairs, kThreads)), dim3(kThreads), 0,
        detail::stream(), static_cast<const T*>(src.data()), static_cast<T*>(dst.data()),
        src.size(1), src.size(2), half, src.stride(0), src.stride(1), src.stride(2), dst.stride(0),
        dst.stride(1), dst.stride(2), static_cast<const float*>(cos_sin.data()), pairs));
  });
}

void rope(const Tensor& x, const Tensor& position_ids, const Tensor& inv_freq,
          float attention_scaling) {
  launch_rope("cuda::rope", x, position_ids, inv_freq, attention_scaling, AppendTarget{});
}

void rope_append(const Tensor& x, std::int64_t key_heads, const Tensor& key_storage,
                 const Tensor& value_storage, const Tensor& values, const Tensor& position_ids,
                 const Tensor& inv_freq, float attention_scaling, const Tensor& slot_device) {
  const char* where = "cuda::rope_append";
  KVCACHE_CHECK(x.defined() && x.rank() == 4, where,
                ": expected x [batch, heads + key_heads, q_len, head_dim], got ",
                x.defined() ? x.describe() : "undefined");
  KVCACHE_CHECK(key_heads > 0 && key_heads <= x.size(1), where, ": expected 1 to ", x.size(1),
                " key heads (the last heads of x), got ", key_heads);
  const std::int64_t batch = x.size(0), q_len = x.size(2), head_dim = x.size(3);
  for (const Tensor* t : {&key_storage, &value_storage, &values}) {
    KVCACHE_CHECK(t->defined() && t->device() == Device::kCuda && t->rank() == 4 &&
                      t->dtype() == x.dtype() && t->stride(3) == 1,
                  where, ": expected 4-d ", dtype_name(x.dtype()),
                  " CUDA tensors with a contiguous last dimension (x's dtype), got ",
                  t->describe());
  }
  for (const Tensor* t : {&key_storage, &value_storage}) {
    KVCACHE_CHECK(t->size(0) == batch && t->size(1) == key_heads && t->size(3) == head_dim &&
                      t->size(2) == key_storage.size(2),
                  where, ": expected storage [", batch, ", ", key_heads, ", capacity, ", head_dim,
                  "] for keys and values alike, got ", key_storage.shape_string(), " and ",
                  value_storage.shape_string());
  }
  KVCACHE_CHECK(values.size(0) == batch && values.size(1) == key_heads && values.size(2) == q_len &&
                    values.size(3) == head_dim,
                where, ": expected values [", batch, ", ", key_heads, ", ", q_len, ", ", head_dim,
                "], got ", values.shape_string());
  KVCACHE_CHECK(q_len <= key_storage.size(2), where, ": expected at most ", key_storage.size(2),
                " new slots (the capacity), got ", q_len);
  KVCACHE_CHECK(slot_device.defined() && slot_device.device() == Device::kCuda &&
                    slot_device.dtype() == DType::kInt64 && slot_device.numel() == 1 &&
                    reinterpret_cast<std::uintptr_t>(slot_device.data()) % 8 == 0,
                where, ": expected the slot as int64 [1] on cuda, 8-byte aligned, got ",
                slot_device.defined() ? slot_device.describe() : "undefined");
  AppendTarget target;
  target.key_storage = key_storage.data();
  target.ks_b = key_storage.stride(0);
  target.ks_h = key_storage.stride(1);
  target.ks_i = key_storage.stride(2);
  target.value_storage = value_storage.data();
  target.vs_b = value_storage.stride(0);
  target.vs_h = value_storage.stride(1);
  target.vs_i = value_storage.stride(2);
  target.values = values.data();
  target.v_b = values.stride(0);
  target.v_h = values.stride(1);
  target.v_i = values.stride(2);
  target.first_key_head = x.size(1) - key_heads;
  target.kv_heads = key_heads;
  target.head_dim = head_dim;
  target.capacity = key_storage.size(2);
  target.slot = static_cast<const std::int64_t*>(slot_device.data());
  launch_rope(where, x, position_ids, inv_freq, attention_scaling, target);
}

}  // namespace kvcache::cuda
