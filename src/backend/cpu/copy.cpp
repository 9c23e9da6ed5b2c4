// Element copies for the CPU backend. The cache's hot path (same dtype, innermost dimension
// contiguous on both sides) is a memcpy per row; everything else converts element by element.
#include <cstring>

#include "kvcache/backend/cpu.hpp"

namespace kvcache::cpu {
namespace {

// Pads a tensor's shape and strides on the left to rank 4, so one loop nest serves every rank.
struct Dims4 {
  std::int64_t shape[4];
  std::int64_t strides[4];
};

Dims4 pad_to_4(const Tensor& t) {
  Dims4 d{{1, 1, 1, 1}, {0, 0, 0, 0}};
  const int pad = kMaxRank - t.rank();
  for (int i = 0; i < t.rank(); ++i) {
    d.shape[pad + i] = t.size(i);
    d.strides[pad + i] = t.stride(i);
  }
  return d;
}

template <class Dst, class Src>
void convert_row(Dst* dst, std::int64_t dst_stride, const Src* src, std::int64_t src_stride,
                 std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<Dst, Src>) {
      dst[i * dst_stride] = src[i * src_stride];
    } else if constexpr (std::is_integral_v<Dst> && std::is_integral_v<Src>) {
      dst[i * dst_stride] = static_cast<Dst>(src[i * src_stride]);
    } else if constexpr (std::is_integral_v<Src>) {
      dst[i * dst_stride] = from_float<Dst>(static_cast<float>(src[i * src_stride]));
    } else if constexpr (std::is_integral_v<Dst>) {
      dst[i * dst_stride] = static_cast<Dst>(to_float(src[i * src_stride]));
    } else {
      dst[i * dst_stride] = from_float<Dst>(to_float(src[i * src_stride]));
    }
  }
}

template <class F>
void dispatch_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(float16{});
    case DType::kBFloat16:
      return f(bfloat16{});
    case DType::kInt32:
      return f(std::int32_t{});
    case DType::kInt64:
      return f(std::int64_t{});
    case DType::kUInt8:
      return f(std::uint8_t{});
  }
}

}  // namespace

void copy(const Tensor& dst, const Tensor& src) {
  KVCACHE_CHECK(dst.defined() && src.defined(), "cpu::copy: expected defined tensors, got ",
                dst.describe(), " and ", src.describe());
  KVCACHE_CHECK(dst.device() == Device::kCpu && src.device() == Device::kCpu,
                "cpu::copy: expected CPU tensors, got ", dst.describe(), " and ", src.describe());
  KVCACHE_CHECK(dst.rank() == src.rank(), "cpu::copy: expected equal shapes, got ",
                dst.shape_string(), " and ", src.shape_string());
  for (int i = 0; i < dst.rank(); ++i) {
    KVCACHE_CHECK(dst.size(i) == src.size(i), "cpu::copy: expected equal shapes, got ",
                  dst.shape_string(), " and ", src.shape_string());
  }
  if (dst.numel() == 0) return;
  const Dims4 d = pad_to_4(dst);
  const Dims4 s = pad_to_4(src);
  const std::int64_t row = d.shape[3];
  const std::size_t elt = dst.element_size();
  const bool memcpy_rows =
      dst.dtype() == src.dtype() && (row == 1 || (d.strides[3] == 1 && s.strides[3] == 1));
  auto* dst_base = static_cast<std::byte*>(dst.data());
  const auto* src_base = static_cast<const std::byte*>(src.data());
  if (memcpy_rows) {
    for (std::int64_t i0 = 0; i0 < d.shape[0]; ++i0)
      for (std::int64_t i1 = 0; i1 < d.shape[1]; ++i1)
        for (std::int64_t i2 = 0; i2 < d.shape[2]; ++i2) {
          const std::int64_t doff = i0 * d.strides[0] + i1 * d.strides[1] + i2 * d.strides[2];
          const std::int64_t soff = i0 * s.strides[0] + i1 * s.strides[1] + i2 * s.strides[2];
          std::memcpy(dst_base + doff * static_cast<std::int64_t>(elt),
                      src_base + soff * static_cast<std::int64_t>(elt),
                      static_cast<std::size_t>(row) * elt);
        }
    return;
  }
  dispatch_type(dst.dtype(), [&](auto dst_tag) {
    using Dst = decltype(dst_tag);
    dispatch_type(src.dtype(), [&](auto src_tag) {
      using Src = decltype(src_tag);
      for (std::int64_t i0 = 0; i0 < d.shape[0]; ++i0)
        for (std::int64_t i1 = 0; i1 < d.shape[1]; ++i1)
          for (std::int64_t i2 = 0; i2 < d.shape[2]; ++i2) {
            const std::int64_t doff = i0 * d.strides[0] + i1 * d.strides[1] + i2 * d.strides[2];
            const std::int64_t soff = i0 * s.strides[0] + i1 * s.strides[1] + i2 * s.strides[2];
            convert_row(static_cast<Dst*>(dst.data()) + doff, d.strides[3],
                        static_cast<const Src*>(src.data()) + soff, s.strides[3], row);
          }
    });
  });
}

Tensor cast(const Tensor& src, DType dtype) {
  KVCACHE_CHECK(src.defined() && src.device() == Device::kCpu,
                "cpu::cast: expected a CPU tensor, got ", src.describe());
  Tensor out = Tensor::empty(src.shape(), dtype);
  copy(out, src);
  return out;
}

}  // namespace kvcache::cpu
