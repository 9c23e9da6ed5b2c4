// The strided copy kernel the caches use to append new tokens and rearrange batch rows, and that
// makes strided device tensors contiguous. It moves whole elements of 1, 2, 4 or 8 bytes (dtype
// conversion is cast.cu's job), one thread per element of the destination.
#include <algorithm>
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"
#include "mma.cuh"

namespace kvcache::cuda {
namespace {

struct Strided4 {
  std::int64_t shape[4];
  std::int64_t dst_strides[4];
  std::int64_t src_strides[4];
};

template <class Word>
__global__ void strided_copy_kernel(Word* __restrict__ dst, const Word* __restrict__ src,
                                    Strided4 s, std::int64_t total) {
  detail::grid_dependency_wait();  // launched overlapped: src may be the last kernel's output
  detail::allow_dependent_launch();
  for (std::int64_t linear = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       linear < total; linear += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::int64_t rest = linear, dst_off = 0, src_off = 0;
    for (int d = 3; d >= 0; --d) {
      const std::int64_t i = rest % s.shape[d];
      rest /= s.shape[d];
      dst_off += i * s.dst_strides[d];
      src_off += i * s.src_strides[d];
    }
    dst[dst_off] = src[src_off];
  }
}

// Two copies of one shape in one grid: linear indices [0, total) copy a, [total, 2·total) b. With
// `slot` (append_at), the destination moves along dimension 2 (the cache's slots) by the slot read
// on the device, and nothing is written unless the slots fit `capacity`.
template <class Word>
__global__ void strided_copy2_kernel(Word* __restrict__ dst_a, const Word* __restrict__ src_a,
                                     Strided4 a, Word* __restrict__ dst_b,
                                     const Word* __restrict__ src_b, Strided4 b, std::int64_t total,
                                     const std::int64_t* __restrict__ slot, std::int64_t capacity) {
  detail::grid_dependency_wait();  // launched overlapped: the sources may be the last kernel's
  detail::allow_dependent_launch();
  const std::int64_t at = slot ? *slot : 0;
  if (slot && (at < 0 || at > capacity - a.shape[2])) return;
  for (std::int64_t linear = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       linear < 2 * total; linear += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const bool second = linear >= total;
    const Strided4& s = second ? b : a;
    std::int64_t rest = second ? linear - total : linear, dst_off = 0, src_off = 0;
    for (int d = 3; d >= 0; --d) {
      const std::int64_t i = rest % s.shape[d];
      rest /= s.shape[d];
      dst_off += (d == 2 ? i + at : i) * s.dst_strides[d];
      src_off += i * s.src_strides[d];
    }
    (second ? dst_b : dst_a)[dst_off] = (second ? src_b : src_a)[src_off];
  }
}

template <class Word>
void launch_copy(const Tensor& dst, const Tensor& src, const Strided4& s, std::int64_t total) {
  constexpr int kThreads = 256;
  KVCACHE_CUDA_CHECK(
      detail::launch_overlapped(strided_copy_kernel<Word>, dim3(detail::grid_for(total, kThreads)),
                                dim3(kThreads), 0, detail::stream(), static_cast<Word*>(dst.data()),
                                static_cast<const Word*>(src.data()), s, total));
}

}  // namespace

namespace {

// Checks one same-shape, same-dtype pair of CUDA tensors and returns its shape and strides padded
// to rank 4.
Strided4 plan_copy(const Tensor& dst, const Tensor& src) {
  KVCACHE_CHECK(dst.defined() && src.defined() && dst.device() == Device::kCuda &&
                    src.device() == Device::kCuda,
                "cuda::copy: expected two CUDA tensors, got ", dst.describe(), " and ",
                src.describe());
  KVCACHE_CHECK(dst.dtype() == src.dtype(), "cuda::copy: expected one dtype, got ",
                dtype_name(dst.dtype()), " and ", dtype_name(src.dtype()));
  KVCACHE_CHECK(dst.rank() == src.rank(), "cuda::copy: expected equal shapes, got ",
                dst.shape_string(), " and ", src.shape_string());
  Strided4 s{};
  const int pad = kMaxRank - dst.rank();
  for (int d = 0; d < kMaxRank; ++d) {
    s.shape[d] = 1;
    s.dst_strides[d] = s.src_strides[d] = 0;
  }
  for (int d = 0; d < dst.rank(); ++d) {
    KVCACHE_CHECK(dst.size(d) == src.size(d), "cuda::copy: expected equal shapes, got ",
                  dst.shape_string(), " and ", src.shape_string());
    s.shape[pad + d] = dst.size(d);
    s.dst_strides[pad + d] = dst.stride(d);
    s.src_strides[pad + d] = src.stride(d);
  }
  return s;
}

}  // namespace

void copy(const Tensor& dst, const Tensor& src) {
  const Strided4 s = plan_copy(dst, src);
  const std::int64_t total = dst.numel();
  if (total == 0) return;
  if (dst.is_contiguous() && src.is_contiguous()) {
    KVCACHE_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), dst.nbytes(),
                                       cudaMemcpyDeviceToDevice, detail::stream()));
    return;
  }
  switch (dst.element_size()) {
    case 1:
      return launch_copy<std::uint8_t>(dst, src, s, total);
    case 2:
      return launch_copy<std::uint16_t>(dst, src, s, total);
    case 4:
      return launch_copy<std::uint32_t>(dst, src, s, total);
    case 8:
      return launch_copy<std::uint64_t>(dst, src, s, total);
    default:
      KVCACHE_FAIL("cuda::copy: unsupported element size ", dst.element_size());
  }
}

namespace {

// copy2's and append_at's one launch (plans a and b from plan_copy of dst_a/src_a, dst_b/src_b);
// false, launching nothing, for elements other than 2 or 4 bytes.
bool launch_copy2(const Tensor& dst_a, const Tensor& src_a, const Strided4& a, const Tensor& dst_b,
                  const Tensor& src_b, const Strided4& b, const std::int64_t* slot,
                  std::int64_t capacity) {
  const std::int64_t total = src_a.numel();
  auto launch = [&](auto word) {
    using Word = decltype(word);
    if (total == 0) return true;
    constexpr int kThreads = 256;
    KVCACHE_CUDA_CHECK(detail::launch_overlapped(
        strided_copy2_kernel<Word>, dim3(detail::grid_for(2 * total, kThreads)), dim3(kThreads), 0,
        detail::stream(), static_cast<Word*>(dst_a.data()), static_cast<const Word*>(src_a.data()),
        a, static_cast<Word*>(dst_b.data()), static_cast<const Word*>(src_b.data()), b, total, slot,
        capacity));
    return true;
  };
  switch (src_a.element_size()) {
    case 2:
      return launch(std::uint16_t{});
    case 4:
      return launch(std::uint32_t{});
    default:
      return false;
  }
}

}  // namespace

void copy2(const Tensor& dst_a, const Tensor& src_a, const Tensor& dst_b, const Tensor& src_b) {
  const Strided4 a = plan_copy(dst_a, src_a), b = plan_copy(dst_b, src_b);
  KVCACHE_CHECK(dst_a.dtype() == dst_b.dtype() && dst_a.rank() == dst_b.rank(),
                "cuda::copy2: expected two pairs of one dtype and rank, got ", dst_a.describe(),
                " and ", dst_b.describe());
  for (int d = 0; d < dst_a.rank(); ++d) {
    KVCACHE_CHECK(dst_a.size(d) == dst_b.size(d),
                  "cuda::copy2: expected two pairs of one shape, got ", dst_a.shape_string(),
                  " and ", dst_b.shape_string());
  }
  if (!launch_copy2(dst_a, src_a, a, dst_b, src_b, b, nullptr, 0)) {
    copy(dst_a, src_a);
    copy(dst_b, src_b);
  }
}

void append_at(const Tensor& key_storage, const Tensor& keys, const Tensor& value_storage,
               const Tensor& values, const Tensor& slot_device) {
  const char* where = "cuda::append_at";
  for (const Tensor* t : {&key_storage, &keys, &value_storage, &values}) {
    KVCACHE_CHECK(
        t->defined() && t->device() == Device::kCuda && t->rank() == 4 && t->stride(3) == 1, where,
        ": expected 4-d CUDA tensors with a contiguous last dimension, got ", t->describe());
    KVCACHE_CHECK(t->dtype() == keys.dtype(), where, ": expected one dtype, got ",
                  dtype_name(keys.dtype()), " and ", dtype_name(t->dtype()));
  }
  for (const Tensor* t : {&value_storage, &values}) {
    const Tensor& like = t == &values ? keys : key_storage;
    for (int d = 0; d < 4; ++d) {
      KVCACHE_CHECK(t->size(d) == like.size(d), where, ": expected values shaped like keys, got ",
                    like.shape_string(), " and ", t->shape_string());
    }
  }
  for (int d : {0, 1, 3}) {
    KVCACHE_CHECK(keys.size(d) == key_storage.size(d), where, ": expected keys [",
                  key_storage.size(0), ", ", key_storage.size(1), ", n, ", key_storage.size(3),
                  "] for storage ", key_storage.shape_string(), ", got ", keys.shape_string());
  }
  KVCACHE_CHECK(keys.size(2) <= key_storage.size(2), where, ": expected at most ",
                key_storage.size(2), " new slots (the capacity), got ", keys.size(2));
  KVCACHE_CHECK(slot_device.defined() && slot_device.device() == Device::kCuda &&
                    slot_device.dtype() == DType::kInt64 && slot_device.numel() == 1 &&
                    reinterpret_cast<std::uintptr_t>(slot_device.data()) % 8 == 0,
                where, ": expected the slot as int64 [1] on cuda, 8-byte aligned, got ",
                slot_device.defined() ? slot_device.describe() : "undefined");
  // The copy plans of the slots [0, n): the kernel moves them to [slot, slot + n).
  const std::int64_t n = keys.size(2);
  const Strided4 a = plan_copy(key_storage.slice(2, 0, n), keys);
  const Strided4 b = plan_copy(value_storage.slice(2, 0, n), values);
  KVCACHE_CHECK(
      launch_copy2(key_storage, keys, a, value_storage, values, b,
                   static_cast<const std::int64_t*>(slot_device.data()), key_storage.size(2)),
      where, ": expected 2- or 4-byte elements, got ", keys.element_size());
}

}  // namespace kvcache::cuda
