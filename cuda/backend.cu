// CUDA backend: device memory, stream choice and the strided copy kernel the caches use to
// append new tokens and rearrange batch rows. The copy moves whole elements of 1, 2, 4 or 8 bytes
// (dtype conversion is not its job), one thread per element of the destination.
#include <cstdint>

#include "check.cuh"
#include "kvcache/backend/cuda.hpp"

namespace kvcache::cuda {
namespace {

thread_local cudaStream_t g_stream = nullptr;

struct Strided4 {
  std::int64_t shape[4];
  std::int64_t dst_strides[4];
  std::int64_t src_strides[4];
};

template <class Word>
__global__ void strided_copy_kernel(Word* __restrict__ dst, const Word* __restrict__ src,
                                    Strided4 s, std::int64_t total) {
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

template <class Word>
void launch_copy(const Tensor& dst, const Tensor& src, const Strided4& s, std::int64_t total) {
  constexpr int kThreads = 256;
  const std::int64_t blocks = std::min<std::int64_t>((total + kThreads - 1) / kThreads, 65535);
  strided_copy_kernel<Word><<<static_cast<unsigned>(blocks), kThreads, 0, g_stream>>>(
      static_cast<Word*>(dst.data()), static_cast<const Word*>(src.data()), s, total);
  KVCACHE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

void set_stream(Stream stream) { g_stream = static_cast<cudaStream_t>(stream); }
Stream current_stream() { return g_stream; }

Tensor empty(Shape shape, DType dtype) {
  KVCACHE_CHECK(shape.size() <= static_cast<std::size_t>(kMaxRank),
                "cuda::empty: expected rank <= ", kMaxRank, ", got ", shape.size());
  std::int64_t count = 1;
  for (auto s : shape) {
    KVCACHE_CHECK(s >= 0, "cuda::empty: expected non-negative sizes, got ", s);
    count *= s;
  }
  const std::size_t bytes = static_cast<std::size_t>(count) * dtype_size(dtype);
  void* memory = nullptr;
  KVCACHE_CUDA_CHECK(cudaMalloc(&memory, bytes == 0 ? 1 : bytes));
  // Never throw from a deleter: a failed free at teardown is ignored.
  std::shared_ptr<void> storage(memory, [](void* p) { (void)cudaFree(p); });
  return Tensor::from_storage(std::move(storage), memory, shape, dtype, Device::kCuda);
}

void copy(const Tensor& dst, const Tensor& src) {
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
  const std::int64_t total = dst.numel();
  if (total == 0) return;
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

Tensor to_device(const Tensor& host) {
  KVCACHE_CHECK(host.defined() && host.device() == Device::kCpu && host.is_contiguous(),
                "cuda::to_device: expected a contiguous CPU tensor, got ", host.describe());
  Tensor out = empty(host.shape(), host.dtype());
  KVCACHE_CUDA_CHECK(
      cudaMemcpyAsync(out.data(), host.data(), host.nbytes(), cudaMemcpyHostToDevice, g_stream));
  KVCACHE_CUDA_CHECK(cudaStreamSynchronize(g_stream));
  return out;
}

Tensor to_host(const Tensor& device) {
  KVCACHE_CHECK(device.defined() && device.device() == Device::kCuda,
                "cuda::to_host: expected a CUDA tensor, got ", device.describe());
  Tensor packed = device;
  if (!device.is_contiguous()) {
    packed = empty(device.shape(), device.dtype());
    copy(packed, device);
  }
  Tensor out = Tensor::empty(device.shape(), device.dtype());
  KVCACHE_CUDA_CHECK(
      cudaMemcpyAsync(out.data(), packed.data(), out.nbytes(), cudaMemcpyDeviceToHost, g_stream));
  KVCACHE_CUDA_CHECK(cudaStreamSynchronize(g_stream));
  return out;
}

void synchronize() { KVCACHE_CUDA_CHECK(cudaStreamSynchronize(g_stream)); }

}  // namespace kvcache::cuda
