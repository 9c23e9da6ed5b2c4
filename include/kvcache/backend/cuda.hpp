// The CUDA backend, host side: device allocation, copies between device tensors and to and from
// the host, and the Backend a Cache is instantiated on (DynamicCache<cuda::Backend>). Compiles
// without nvcc; the kernels live in cuda/ and ship in the kvcache::cuda library.
//
// Every CUDA call is checked; a failure throws kvcache::Error naming the call and CUDA's message.
// Work is issued on the current stream (set_stream), default stream 0, and copies to or from the
// host synchronise it.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string_view>

#include "kvcache/tensor.hpp"

namespace kvcache::cuda {

/// Number of CUDA devices usable by this process (0 when there is no GPU or no driver).
int device_count();

/// Opaque cudaStream_t, so this header needs no CUDA headers.
using Stream = void*;
/// Stream used by the backend's kernels and copies on this thread (nullptr = default stream).
void set_stream(Stream stream);
Stream current_stream();

/// A new contiguous, uninitialised tensor in device memory (freed when its last view goes).
Tensor empty(Shape shape, DType dtype);
inline Tensor empty(std::initializer_list<std::int64_t> shape, DType dtype) {
  return empty(Shape(shape.begin(), shape.size()), dtype);
}

/// Same-shape, same-dtype copy between two CUDA tensors with any strides.
void copy(const Tensor& dst, const Tensor& src);

/// A contiguous device copy of a CPU tensor, and a contiguous host copy of a CUDA tensor.
Tensor to_device(const Tensor& host);
Tensor to_host(const Tensor& device);

/// Blocks until the backend's stream has finished its work.
void synchronize();

struct Backend {
  static constexpr Device kDevice = Device::kCuda;
  static constexpr std::string_view kName = "cuda";
  static Tensor empty(Shape shape, DType dtype) { return cuda::empty(shape, dtype); }
  static void copy(const Tensor& dst, const Tensor& src) { cuda::copy(dst, src); }
};

}  // namespace kvcache::cuda
