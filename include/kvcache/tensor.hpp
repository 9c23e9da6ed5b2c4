// The library's tensor: a dtype, a device, a shape and strides of rank 0..4, and a pointer into
// storage that is either owned (shared with every view taken from it) or borrowed from the caller.
// It is a handle, like torch.Tensor: copying a Tensor copies the handle, never the elements, and
// `const Tensor&` promises not to re-point the handle, not that the elements stay unchanged.
// Strides count elements, not bytes. The cache layout is [batch, heads, seq, head_dim].
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include "kvcache/error.hpp"
#include "kvcache/float16.hpp"

namespace kvcache {

/// Element types: the float types activations, weights and caches use, and integer types for
/// ids (int64) and masks (int64, int32, uint8).
enum class DType : std::uint8_t { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kUInt8 };
/// Where a tensor's elements live: host memory or the current CUDA device.
enum class Device : std::uint8_t { kCpu, kCuda };

/// The most dimensions a Tensor has.
inline constexpr int kMaxRank = 4;

/// Bytes of one element.
constexpr std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kInt64:
      return 8;
    case DType::kUInt8:
      return 1;
  }
  return 0;
}

/// "float32", "bfloat16", ...: the dtype's name, as error messages and parse_dtype write it.
constexpr std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
    case DType::kUInt8:
      return "uint8";
  }
  return "?";
}

/// Whether `dtype` is float32, float16 or bfloat16.
constexpr bool is_floating(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

/// "cpu" or "cuda".
constexpr std::string_view device_name(Device device) {
  return device == Device::kCpu ? "cpu" : "cuda";
}

/// Parses "float32" / "bfloat16" / "float16" (and the short forms f32, bf16, f16, fp16).
DType parse_dtype(std::string_view name);

/// The DType of a C++ element type, for typed access.
template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>)
    return DType::kFloat32;
  else if constexpr (std::is_same_v<T, float16>)
    return DType::kFloat16;
  else if constexpr (std::is_same_v<T, bfloat16>)
    return DType::kBFloat16;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return DType::kInt32;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return DType::kInt64;
  else if constexpr (std::is_same_v<T, std::uint8_t>)
    return DType::kUInt8;
  else
    static_assert(sizeof(T) == 0, "kvcache: no DType for this element type");
}

/// A shape or strides: sizes of the dimensions, outermost first (a view; braced lists convert).
using Shape = std::span<const std::int64_t>;

/// A tensor handle, like torch.Tensor: a dtype, a device, a shape and strides (in elements) of
/// rank 0..4, and a pointer into storage that is owned (shared by every view taken from it) or
/// borrowed from the caller. Copying a Tensor copies the handle, never the elements.
class Tensor {
 public:
  /// An undefined tensor (no storage, rank 0, defined() == false).
  Tensor() = default;

  /// A new contiguous CPU tensor (64-byte aligned, uninitialised). CUDA tensors come from
  /// kvcache::cuda::Backend::empty, which knows how to allocate device memory.
  static Tensor empty(Shape shape, DType dtype);
  /// empty() with the shape as a braced list: `Tensor::empty({2, 3}, DType::kFloat32)`.
  static Tensor empty(std::initializer_list<std::int64_t> shape, DType dtype) {
    return empty(Shape(shape.begin(), shape.size()), dtype);
  }
  /// A new contiguous CPU tensor filled with zeros.
  static Tensor zeros(Shape shape, DType dtype);
  /// zeros() with the shape as a braced list.
  static Tensor zeros(std::initializer_list<std::int64_t> shape, DType dtype) {
    return zeros(Shape(shape.begin(), shape.size()), dtype);
  }

  /// A non-owning view of memory the caller owns and keeps alive for as long as the view (and any
  /// view taken from it) is used. `strides` empty means contiguous (row-major).
  static Tensor from_blob(void* data, Shape shape, DType dtype, Device device = Device::kCpu,
                          Shape strides = {});
  /// from_blob() of a contiguous buffer with the shape as a braced list.
  static Tensor from_blob(void* data, std::initializer_list<std::int64_t> shape, DType dtype,
                          Device device = Device::kCpu) {
    return from_blob(data, Shape(shape.begin(), shape.size()), dtype, device);
  }

  /// A tensor over `data`, which lies inside memory kept alive by `storage` (shared ownership).
  /// Backends use it to hand out owning tensors over memory they allocated.
  static Tensor from_storage(std::shared_ptr<void> storage, void* data, Shape shape, DType dtype,
                             Device device, Shape strides = {});

  /// Whether the tensor refers to elements (false for a default-constructed Tensor).
  bool defined() const { return defined_; }
  /// Number of dimensions, 0..4.
  int rank() const { return rank_; }
  /// The element type.
  DType dtype() const { return dtype_; }
  /// Where the elements live.
  Device device() const { return device_; }

  /// Size of dimension `dim`; negative counts from the end (-1 is the last).
  std::int64_t size(int dim) const { return shape_[static_cast<std::size_t>(wrap_dim(dim))]; }
  /// Stride of dimension `dim` in elements; negative counts from the end.
  std::int64_t stride(int dim) const { return strides_[static_cast<std::size_t>(wrap_dim(dim))]; }
  /// The sizes of all dimensions.
  Shape shape() const { return Shape(shape_.data(), static_cast<std::size_t>(rank_)); }
  /// The strides of all dimensions, in elements.
  Shape strides() const { return Shape(strides_.data(), static_cast<std::size_t>(rank_)); }
  /// Number of elements (the product of the sizes; 1 for rank 0).
  std::int64_t numel() const;
  /// Bytes of one element.
  std::size_t element_size() const { return dtype_size(dtype_); }
  /// Bytes spanned by the elements (numel × element size), whatever the strides.
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * element_size(); }

  /// The first element (untyped); see data_as() for typed access.
  void* data() const { return data_; }
  /// Typed pointer; throws if T does not match dtype().
  template <class T>
  T* data_as() const {
    KVCACHE_CHECK(dtype_of<T>() == dtype_, "Tensor::data_as: expected dtype ",
                  dtype_name(dtype_of<T>()), ", got ", dtype_name(dtype_));
    return static_cast<T*>(data_);
  }

  /// Whether the elements are laid out row-major without gaps (the strides contiguous_strides()
  /// would give).
  bool is_contiguous() const;
  /// True when the tensor keeps its memory alive (owning or a view of owned storage).
  bool owns_storage() const { return storage_ != nullptr; }
  /// The storage keeping the elements alive (null for borrowed memory).
  const std::shared_ptr<void>& storage() const { return storage_; }

  /// View of elements [start, end) along `dim`.
  Tensor slice(int dim, std::int64_t start, std::int64_t end) const;
  /// View with dimensions d0 and d1 swapped.
  Tensor transpose(int d0, int d1) const;
  /// View with a new shape; the tensor must be contiguous and the element count must match.
  Tensor view(Shape shape) const;
  /// view() with the shape as a braced list: `t.view({6})`.
  Tensor view(std::initializer_list<std::int64_t> shape) const {
    return view(Shape(shape.begin(), shape.size()));
  }

  /// Element offset (in elements) of a multi-index, for tests and reference code.
  std::int64_t offset(std::initializer_list<std::int64_t> index) const;

  /// "[2, 4, 7, 64] float32 cpu", for error messages.
  std::string describe() const;
  /// "[2, 4, 7, 64]", for error messages.
  std::string shape_string() const;

 private:
  // Inline: size()/stride() sit on every cache step's path. Out of range throws.
  int wrap_dim(int dim) const {
    const int wrapped = dim < 0 ? dim + rank_ : dim;
    if (wrapped < 0 || wrapped >= rank_) [[unlikely]]
      throw_bad_dim(dim);
    return wrapped;
  }
  [[noreturn]] void throw_bad_dim(int dim) const;

  std::shared_ptr<void> storage_;  // keeps owned memory alive; null for borrowed memory
  void* data_ = nullptr;           // first element
  std::array<std::int64_t, kMaxRank> shape_{};
  std::array<std::int64_t, kMaxRank> strides_{};  // in elements
  int rank_ = 0;
  DType dtype_ = DType::kFloat32;
  Device device_ = Device::kCpu;
  bool defined_ = false;
};

/// Contiguous (row-major) strides for `shape`.
std::array<std::int64_t, kMaxRank> contiguous_strides(Shape shape);

}  // namespace kvcache
