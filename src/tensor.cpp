// Tensor construction, views and descriptions. CPU allocation lives here; device allocation lives
// in each backend.
#include "kvcache/tensor.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>

#if __has_include(<sys/mman.h>)
#include <sys/mman.h>
#endif

namespace kvcache {

DType parse_dtype(std::string_view name) {
  if (name == "float32" || name == "f32" || name == "fp32") return DType::kFloat32;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  if (name == "float16" || name == "f16" || name == "fp16" || name == "half")
    return DType::kFloat16;
  KVCACHE_FAIL("parse_dtype: expected float32, bfloat16 or float16, got '", name, "'");
}

std::array<std::int64_t, kMaxRank> contiguous_strides(Shape shape) {
  std::array<std::int64_t, kMaxRank> strides{};
  std::int64_t running = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    strides[i] = running;
    running *= shape[i];
  }
  return strides;
}

namespace {

constexpr std::size_t kHugePage = std::size_t{2} << 20;

std::string shape_text(Shape shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

// Checks rank and sizes and returns the element count. Every product of sizes a tensor forms
// (its count, each contiguous stride, and the bytes count × element size) must fit int64: the
// sizes with zeros counted as ones are multiplied with overflow checks, so a huge shape is an
// error here rather than a count that wraps into a tiny buffer and a copy past its end.
std::int64_t check_shape(Shape shape, const char* where, std::size_t element_size = 1) {
  KVCACHE_CHECK(shape.size() <= static_cast<std::size_t>(kMaxRank), where,
                ": expected rank <= ", kMaxRank, ", got rank ", shape.size());
  std::int64_t count = 1, span = static_cast<std::int64_t>(element_size);
  for (std::size_t i = 0; i < shape.size(); ++i) {
    KVCACHE_CHECK(shape[i] >= 0, where, ": expected non-negative sizes, got ", shape[i],
                  " in dimension ", i);
    KVCACHE_CHECK(!__builtin_mul_overflow(span, std::max<std::int64_t>(shape[i], 1), &span), where,
                  ": shape ", shape_text(shape), " of ", element_size,
                  "-byte elements has more bytes than 64 bits can count");
    count *= shape[i];  // cannot overflow: count <= span, which was just checked
  }
  return count;
}

}  // namespace

Tensor Tensor::from_storage(std::shared_ptr<void> storage, void* data, Shape shape, DType dtype,
                            Device device, Shape strides) {
  check_shape(shape, "Tensor", dtype_size(dtype));
  KVCACHE_CHECK(strides.empty() || strides.size() == shape.size(),
                "Tensor: expected one stride per dimension (", shape.size(), "), got ",
                strides.size());
  Tensor t;
  t.storage_ = std::move(storage);
  t.data_ = data;
  t.rank_ = static_cast<int>(shape.size());
  t.dtype_ = dtype;
  t.device_ = device;
  t.defined_ = true;
  const auto contiguous = contiguous_strides(shape);
  for (std::size_t i = 0; i < shape.size(); ++i) {
    t.shape_[i] = shape[i];
    t.strides_[i] = strides.empty() ? contiguous[i] : strides[i];
  }
  KVCACHE_CHECK(data != nullptr || t.numel() == 0, "Tensor: null data pointer for a tensor of ",
                t.numel(), " elements");
  return t;
}

Tensor Tensor::from_blob(void* data, Shape shape, DType dtype, Device device, Shape strides) {
  return from_storage(nullptr, data, shape, dtype, device, strides);
}

Tensor Tensor::empty(Shape shape, DType dtype) {
  const std::int64_t count = check_shape(shape, "Tensor::empty", dtype_size(dtype));
  // count × element size fits int64 (check_shape), so the padding below cannot wrap.
  const std::size_t bytes = static_cast<std::size_t>(count) * dtype_size(dtype);
  // Large buffers (caches, weights) are aligned to 2 MiB and offered to transparent huge pages:
  // first touch then faults once per 2 MiB instead of once per 4 KiB, which is most of what
  // growing a cache costs. Small ones are 64-byte aligned (a cache line, an AVX-512 vector).
  const bool large = bytes >= kHugePage;
  const std::size_t alignment = large ? kHugePage : 64;
  // Round up to the alignment so aligned_alloc's size rule holds; never allocate zero bytes.
  const std::size_t padded = (bytes + alignment - 1) / alignment * alignment + (large ? 0 : 64);
  // Through the global operator new (its aligned, nothrow form), so a program that replaces the
  // allocator sees tensor storage too (the allocation-failure tests fail it on purpose).
  void* memory = ::operator new (padded, std::align_val_t{alignment}, std::nothrow);
  KVCACHE_CHECK(memory != nullptr, "Tensor::empty: cannot allocate ", bytes, " bytes for ",
                dtype_name(dtype), " ", shape_text(shape), " (out of memory)");
#ifdef MADV_HUGEPAGE
  if (large) (void)madvise(memory, padded, MADV_HUGEPAGE);  // a hint: failure changes nothing
#endif
  std::shared_ptr<void> storage;
  try {
    storage = std::shared_ptr<void>(
        memory, [alignment](void* p) { ::operator delete (p, std::align_val_t{alignment}); });
  } catch (const std::bad_alloc&) {  // the control block; the deleter has already freed memory
    KVCACHE_FAIL("Tensor::empty: out of memory");
  }
  return from_storage(std::move(storage), memory, shape, dtype, Device::kCpu);
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  std::memset(t.data(), 0, t.nbytes());
  return t;
}

std::int64_t Tensor::numel() const {
  std::int64_t count = 1;
  for (int i = 0; i < rank_; ++i) count *= shape_[static_cast<std::size_t>(i)];
  return count;
}

void Tensor::throw_bad_dim(int dim) const {
  KVCACHE_FAIL("Tensor: dimension ", dim, " out of range for a tensor of rank ", rank_);
}

bool Tensor::is_contiguous() const {
  std::int64_t expected = 1;
  for (int i = rank_; i-- > 0;) {
    const auto idx = static_cast<std::size_t>(i);
    if (shape_[idx] != 1 && strides_[idx] != expected) return false;
    expected *= shape_[idx];
  }
  return true;
}

Tensor Tensor::slice(int dim, std::int64_t start, std::int64_t end) const {
  const auto d = static_cast<std::size_t>(wrap_dim(dim));
  KVCACHE_CHECK(0 <= start && start <= end && end <= shape_[d],
                "Tensor::slice: expected 0 <= start <= end <= ", shape_[d], " in dimension ", dim,
                ", got [", start, ", ", end, ")");
  Tensor t = *this;
  t.shape_[d] = end - start;
  t.data_ = static_cast<std::byte*>(data_) +
            start * strides_[d] * static_cast<std::int64_t>(element_size());
  return t;
}

Tensor Tensor::transpose(int d0, int d1) const {
  const auto a = static_cast<std::size_t>(wrap_dim(d0));
  const auto b = static_cast<std::size_t>(wrap_dim(d1));
  Tensor t = *this;
  std::swap(t.shape_[a], t.shape_[b]);
  std::swap(t.strides_[a], t.strides_[b]);
  return t;
}

Tensor Tensor::view(Shape shape) const {
  const std::int64_t count = check_shape(shape, "Tensor::view", element_size());
  KVCACHE_CHECK(count == numel(), "Tensor::view: expected a shape of ", numel(), " elements, got ",
                count);
  KVCACHE_CHECK(is_contiguous(), "Tensor::view: expected a contiguous tensor, got strides of ",
                describe());
  return from_storage(storage_, data_, shape, dtype_, device_);
}

std::int64_t Tensor::offset(std::initializer_list<std::int64_t> index) const {
  KVCACHE_CHECK(static_cast<int>(index.size()) == rank_, "Tensor::offset: expected ", rank_,
                " indices, got ", index.size());
  std::int64_t off = 0;
  std::size_t i = 0;
  for (auto v : index) {
    KVCACHE_CHECK(v >= 0 && v < shape_[i], "Tensor::offset: index ", v, " out of range [0, ",
                  shape_[i], ") in dimension ", i);
    off += v * strides_[i++];
  }
  return off;
}

std::string Tensor::shape_string() const {
  std::ostringstream out;
  out << '[';
  for (int i = 0; i < rank_; ++i) out << (i ? ", " : "") << shape_[static_cast<std::size_t>(i)];
  out << ']';
  return out.str();
}

std::string Tensor::describe() const {
  if (!defined_) return "undefined tensor";
  std::ostringstream out;
  out << shape_string() << ' ' << dtype_name(dtype_) << ' ' << device_name(device_);
  if (!is_contiguous()) {
    out << " strides (";
    for (int i = 0; i < rank_; ++i) out << (i ? ", " : "") << strides_[static_cast<std::size_t>(i)];
    out << ')';
  }
  return out.str();
}

}  // namespace kvcache
