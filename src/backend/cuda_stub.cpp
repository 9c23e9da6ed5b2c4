// The CUDA backend's functions in a library built without nvcc: device_count() is 0 and every
// operation throws kvcache::Error saying the backend is not built, so `--device cuda` and
// DynamicCache<cuda::Backend> fail clearly instead of failing to link.
#include "kvcache/backend/cuda.hpp"
#include "kvcache/error.hpp"

namespace kvcache::cuda {
namespace {
[[noreturn]] void not_built(const char* what) {
  KVCACHE_FAIL("cuda::", what,
               ": kvcache was built without the CUDA backend (nvcc was not found, or "
               "KVCACHE_CUDA=OFF); rebuild with the CUDA toolkit to use the GPU");
}
}  // namespace

bool built_with_cuda() { return false; }
int device_count() { return 0; }
void require_device(const char* where) {
  KVCACHE_FAIL(where, ": expected a CUDA device, but kvcache was built without the CUDA backend");
}
void set_stream(Stream) { not_built("set_stream"); }
Stream current_stream() { return nullptr; }
std::uint64_t free_device_memory() { return 0; }
void detail::set_allocation_fault_hook(detail::AllocationFaultHook) {}
Tensor empty(Shape, DType) { not_built("empty"); }
Tensor empty_persistent(Shape, DType) { not_built("empty_persistent"); }
ScratchScope::ScratchScope() { not_built("ScratchScope"); }
ScratchScope::~ScratchScope() = default;
void copy(const Tensor&, const Tensor&) { not_built("copy"); }
void copy2(const Tensor&, const Tensor&, const Tensor&, const Tensor&) { not_built("copy2"); }
Tensor to_device(const Tensor&) { not_built("to_device"); }
Tensor to_host(const Tensor&) { not_built("to_host"); }
Tensor upload(const void*, std::size_t) { not_built("upload"); }
Tensor upload(const Tensor&) { not_built("upload"); }
Tensor upload_persistent(const Tensor&) { not_built("upload_persistent"); }
void fill_uniform(const Tensor&, std::uint64_t, float, float) { not_built("fill_uniform"); }
void synchronize() { not_built("synchronize"); }
StreamScope::StreamScope() { not_built("StreamScope"); }
StreamScope::~StreamScope() = default;
MirroredBuffer::MirroredBuffer(std::size_t) { not_built("MirroredBuffer"); }
Tensor empty_pinned(Shape, DType) { not_built("empty_pinned"); }
void copy_async(const Tensor&, const Tensor&) { not_built("copy_async"); }
CopyStream::CopyStream() { not_built("CopyStream"); }
CopyStream::~CopyStream() = default;
void CopyStream::wait_for_current() const { not_built("CopyStream"); }
void CopyStream::make_current_wait() const { not_built("CopyStream"); }
void CopyStream::copy(const Tensor&, const Tensor&) const { not_built("CopyStream"); }
void CopyStream::synchronize() const { not_built("CopyStream"); }
Tensor MirroredBuffer::device_view(std::size_t, Shape, DType) const {
  not_built("MirroredBuffer::device_view");
}
void MirroredBuffer::send(std::size_t, std::size_t) const { not_built("MirroredBuffer::send"); }
void MirroredBuffer::receive(std::size_t, std::size_t) const {
  not_built("MirroredBuffer::receive");
}
void Graph::begin_capture() { not_built("Graph::capture"); }
void Graph::abort_capture() {}
void Graph::end_capture() { not_built("Graph::capture"); }
void Graph::replay() const { not_built("Graph::replay"); }
void append_at(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  not_built("append_at");
}
MemoryStats memory_stats() { not_built("memory_stats"); }
void reset_peak_memory_stats() { not_built("reset_peak_memory_stats"); }
Tensor cast(const Tensor&, DType) { not_built("cast"); }
Tensor embedding(const Tensor&, const Tensor&) { not_built("embedding"); }
Tensor rms_norm(const Tensor&, const Tensor&, float, DType) { not_built("rms_norm"); }
void add_bias(const Tensor&, const Tensor&) { not_built("add_bias"); }
Tensor silu_mul(const Tensor&, const Tensor&) { not_built("silu_mul"); }
void add_inplace(const Tensor&, const Tensor&) { not_built("add_inplace"); }
void rope(const Tensor&, const Tensor&, const Tensor&, float) { not_built("rope"); }
void rotate_rows(const Tensor&, const Tensor&, const Tensor&) { not_built("rotate_rows"); }
void rope_append(const Tensor&, std::int64_t, const Tensor&, const Tensor&, const Tensor&,
                 const Tensor&, const Tensor&, float, const Tensor&) {
  not_built("rope_append");
}
void linear(const Tensor&, const Tensor&, const Tensor&, float) { not_built("linear"); }
void linear_silu_mul(const Tensor&, const Tensor&, const Tensor&, const Tensor&, float) {
  not_built("linear_silu_mul");
}
void linear_rms_norm(const Tensor&, const Tensor&, float, const Tensor&, const Tensor&, float) {
  not_built("linear_rms_norm");
}
void attention(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
               std::int64_t, float, const Tensor&, std::optional<std::int64_t>) {
  not_built("attention");
}
void attention(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
               std::int64_t, float, const Tensor&, const Tensor&, std::optional<std::int64_t>) {
  not_built("attention");
}
void attention_quantized(const Tensor&, const QuantizedKVView&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, std::int64_t, float, const Tensor&,
                         std::optional<std::int64_t>) {
  not_built("attention_quantized");
}
void quantize_kv_blocks(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const QuantizedKVView&, std::int64_t, std::int64_t) {
  not_built("quantize_kv_blocks");
}
void dequantize_kv_blocks(const QuantizedKVView&, const Tensor&, const Tensor&) {
  not_built("dequantize_kv_blocks");
}
Tensor argmax(const Tensor&) { not_built("argmax"); }
Tensor sample(const Tensor&, float, std::int64_t, float, const Tensor&) { not_built("sample"); }

}  // namespace kvcache::cuda
