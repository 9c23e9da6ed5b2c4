// CUDA backend: device discovery, the stream work is issued on, device memory from a
// stream-ordered pool, and host <-> device copies.
//
// Memory: every device tensor comes from cudaMallocAsync on the current stream, out of the
// device's default pool with its release threshold raised to "keep everything". Freed blocks go
// back to the pool (cudaFreeAsync, stream-ordered), so once a forward pass of some shape has run,
// the next one of that shape is served from memory the pool already holds: a warm decode step
// makes no call that reaches the driver's allocator. memory_stats() reads the pool's counters.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <utility>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/memory.hpp"

namespace kvcache::cuda {
namespace {

thread_local cudaStream_t g_stream = nullptr;

std::atomic<detail::AllocationFaultHook> g_fault_hook{nullptr};

// cudaMallocAsync and cudaMallocHost through the fault-injection hook (detail::
// set_allocation_fault_hook): every allocation of the backend comes through one of these two.
cudaError_t device_malloc(void** memory, std::size_t bytes, cudaStream_t stream) {
  const detail::AllocationFaultHook hook = g_fault_hook.load(std::memory_order_relaxed);
  if (hook != nullptr && hook()) return cudaErrorMemoryAllocation;
  return cudaMallocAsync(memory, bytes, stream);
}

cudaError_t host_malloc(void** memory, std::size_t bytes) {
  const detail::AllocationFaultHook hook = g_fault_hook.load(std::memory_order_relaxed);
  if (hook != nullptr && hook()) return cudaErrorMemoryAllocation;
  return cudaMallocHost(memory, bytes);
}

// The device's default pool, configured once per process to keep what it reserves.
cudaMemPool_t pool() {
  static cudaMemPool_t p = [] {
    int device = 0;
    KVCACHE_CUDA_CHECK(cudaGetDevice(&device));
    cudaMemPool_t handle = nullptr;
    KVCACHE_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&handle, device));
    std::uint64_t keep = std::numeric_limits<std::uint64_t>::max();
    KVCACHE_CUDA_CHECK(cudaMemPoolSetAttribute(handle, cudaMemPoolAttrReleaseThreshold, &keep));
    return handle;
  }();
  return p;
}

// Bytes of a tensor of `shape` and `dtype`, with every product checked against overflow.
std::size_t checked_bytes(Shape shape, DType dtype) {
  std::int64_t count = 1;
  for (auto n : shape) {
    KVCACHE_CHECK(n >= 0, "cuda::empty: expected non-negative sizes, got ", n);
    KVCACHE_CHECK(n == 0 || count <= std::numeric_limits<std::int64_t>::max() / n,
                  "cuda::empty: the element count of this shape overflows");
    count *= n;
  }
  KVCACHE_CHECK(static_cast<std::uint64_t>(count) <=
                    std::numeric_limits<std::uint64_t>::max() / dtype_size(dtype),
                "cuda::empty: the byte count of this shape overflows");
  return static_cast<std::size_t>(count) * dtype_size(dtype);
}

// A shared owner of new memory. Its control block is an allocation of its own: where that fails,
// the deleter has already freed `memory`, and the failure becomes a kvcache::Error naming `where`
// (as Tensor::empty's does), not a std::bad_alloc.
template <class Deleter>
std::shared_ptr<void> own(void* memory, Deleter deleter, const char* where) {
  try {
    return std::shared_ptr<void>(memory, std::move(deleter));
  } catch (const std::bad_alloc&) {
    KVCACHE_FAIL(where, ": out of memory (host memory for the allocation's owner)");
  }
}

}  // namespace

namespace detail {
cudaStream_t stream() { return g_stream; }
void set_allocation_fault_hook(AllocationFaultHook hook) {
  g_fault_hook.store(hook, std::memory_order_relaxed);
}
}  // namespace detail

bool built_with_cuda() { return true; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

void require_device(const char* where) {
  KVCACHE_CHECK(device_count() > 0, where,
                ": expected a CUDA device, got none (no GPU or no driver on this machine)");
}

std::uint64_t free_device_memory() {
  if (device_count() == 0) return 0;
  // cudaMemGetInfo and the pool's attributes are "potentially unsafe" calls: inside this thread's
  // stream capture (a decode step being recorded) they would fail and invalidate the capture. The
  // thread is put in relaxed capture mode for the queries, and its mode restored before any throw.
  const cudaMemPool_t p = pool();  // may throw: before the mode changes
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  KVCACHE_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  std::size_t free = 0, total = 0;
  std::uint64_t reserved = 0, used = 0;
  cudaError_t status = cudaMemGetInfo(&free, &total);
  if (status == cudaSuccess)
    status = cudaMemPoolGetAttribute(p, cudaMemPoolAttrReservedMemCurrent, &reserved);
  if (status == cudaSuccess)
    status = cudaMemPoolGetAttribute(p, cudaMemPoolAttrUsedMemCurrent, &used);
  KVCACHE_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  KVCACHE_CUDA_CHECK(status);
  return static_cast<std::uint64_t>(free) + (reserved > used ? reserved - used : 0);
}

void set_stream(Stream stream) { g_stream = static_cast<cudaStream_t>(stream); }
Stream current_stream() { return g_stream; }

Tensor empty_persistent(Shape shape, DType dtype) {
  KVCACHE_CHECK(shape.size() <= static_cast<std::size_t>(kMaxRank),
                "cuda::empty: expected rank <= ", kMaxRank, ", got ", shape.size());
  const std::size_t bytes = checked_bytes(shape, dtype);
  void* memory = nullptr;
  (void)pool();
  KVCACHE_CUDA_CHECK(device_malloc(&memory, bytes == 0 ? 1 : bytes, g_stream));
  // Freed on the stream current at the time of the free; never throws from the deleter.
  std::shared_ptr<void> storage = own(
      memory, [](void* p) { (void)cudaFreeAsync(p, g_stream); }, "cuda::empty");
  return Tensor::from_storage(std::move(storage), memory, shape, dtype, Device::kCuda);
}

namespace {

// The thread's scratch workspace (see ScratchScope).
struct Scratch {
  Tensor block;                   // uint8 [capacity] from the pool
  std::size_t used = 0;           // bytes carved from block in this scope
  std::size_t asked = 0;          // bytes asked in this scope (used + what the pool served)
  std::size_t want = 0;           // the most any scope asked: the next block's size
  int depth = 0;                  // nested scopes
  cudaStream_t stream = nullptr;  // the stream the last scope ran on
};
thread_local Scratch g_scratch;
constexpr std::size_t kScratchAlign = 256;

}  // namespace

ScratchScope::ScratchScope() {
  Scratch& s = g_scratch;
  if (s.depth++ > 0) return;
  try {
    if (s.block.defined() && s.stream != g_stream) {
      // The block's last users ran on another stream: let them finish before reuse.
      KVCACHE_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    }
    s.stream = g_stream;
    const std::size_t capacity = s.block.defined() ? static_cast<std::size_t>(s.block.numel()) : 0;
    if (s.want > capacity) {
      s.block = Tensor();  // freed in stream order: the kernels that used it run first
      const std::int64_t size[1] = {static_cast<std::int64_t>(s.want + s.want / 4)};
      s.block = empty_persistent(size, DType::kUInt8);
    }
    s.used = s.asked = 0;
  } catch (...) {
    --s.depth;
    throw;
  }
}

ScratchScope::~ScratchScope() {
  Scratch& s = g_scratch;
  if (--s.depth == 0) s.want = std::max(s.want, s.asked);
}

Tensor empty(Shape shape, DType dtype) {
  Scratch& s = g_scratch;
  if (s.depth == 0) return empty_persistent(shape, dtype);
  KVCACHE_CHECK(shape.size() <= static_cast<std::size_t>(kMaxRank),
                "cuda::empty: expected rank <= ", kMaxRank, ", got ", shape.size());
  const std::size_t bytes =
      (checked_bytes(shape, dtype) + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
  s.asked += bytes;
  const std::size_t capacity = s.block.defined() ? static_cast<std::size_t>(s.block.numel()) : 0;
  if (s.used + bytes > capacity) return empty_persistent(shape, dtype);
  void* at = static_cast<std::uint8_t*>(s.block.data()) + s.used;
  s.used += bytes;
  return Tensor::from_storage(s.block.storage(), at, shape, dtype, Device::kCuda);
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

namespace {

// The page-locked buffer upload() stages through, and an event marking the stream point after
// its last copy: the buffer is rewritten only once that copy has run (by then it has, in a
// generation loop, since each step ends by reading the chosen ids back).
struct Staging {
  void* host = nullptr;
  std::size_t capacity = 0;
  cudaEvent_t copied = nullptr;
  ~Staging() {
    if (copied) (void)cudaEventDestroy(copied);
    if (host) (void)cudaFreeHost(host);
  }
};
thread_local Staging g_staging;

}  // namespace

namespace {

// Sends `bytes` host bytes to `device` on the stream through the page-locked staging buffer.
void upload_into(void* device, const void* host, std::size_t bytes) {
  if (bytes == 0) return;
  Staging& s = g_staging;
  if (s.copied == nullptr)
    KVCACHE_CUDA_CHECK(cudaEventCreateWithFlags(&s.copied, cudaEventDisableTiming));
  KVCACHE_CUDA_CHECK(cudaEventSynchronize(s.copied));
  if (s.capacity < bytes) {
    const std::size_t grown = std::max<std::size_t>(bytes, 2 * s.capacity);
    void* fresh = nullptr;
    KVCACHE_CUDA_CHECK(host_malloc(&fresh, grown));
    if (s.host) (void)cudaFreeHost(s.host);
    s.host = fresh;
    s.capacity = grown;
  }
  std::memcpy(s.host, host, bytes);
  KVCACHE_CUDA_CHECK(cudaMemcpyAsync(device, s.host, bytes, cudaMemcpyHostToDevice, g_stream));
  KVCACHE_CUDA_CHECK(cudaEventRecord(s.copied, g_stream));
}

}  // namespace

Tensor upload(const void* host, std::size_t bytes) {
  Tensor out = empty({static_cast<std::int64_t>(bytes)}, DType::kUInt8);
  upload_into(out.data(), host, bytes);
  return out;
}

Tensor upload(const Tensor& host) {
  KVCACHE_CHECK(host.defined() && host.device() == Device::kCpu && host.is_contiguous(),
                "cuda::upload: expected a contiguous CPU tensor, got ", host.describe());
  const Tensor bytes = upload(host.data(), host.nbytes());
  return Tensor::from_storage(bytes.storage(), bytes.data(), host.shape(), host.dtype(),
                              Device::kCuda);
}

Tensor upload_persistent(const Tensor& host) {
  KVCACHE_CHECK(host.defined() && host.device() == Device::kCpu && host.is_contiguous(),
                "cuda::upload_persistent: expected a contiguous CPU tensor, got ", host.describe());
  Tensor out = empty_persistent(host.shape(), host.dtype());
  upload_into(out.data(), host.data(), host.nbytes());
  return out;
}

void synchronize() { KVCACHE_CUDA_CHECK(cudaStreamSynchronize(g_stream)); }

Tensor empty_pinned(Shape shape, DType dtype) {
  KVCACHE_CHECK(shape.size() <= static_cast<std::size_t>(kMaxRank),
                "cuda::empty_pinned: expected rank <= ", kMaxRank, ", got ", shape.size());
  const std::size_t bytes = checked_bytes(shape, dtype);
  // Page-locked memory cannot be swapped out, and a large request can stall the machine first.
  if (bytes >= ::kvcache::detail::kLargeAllocation)
    ::kvcache::detail::require_memory(Device::kCpu, bytes, "cuda::empty_pinned",
                                      "page-locked host memory");
  void* host = nullptr;
  KVCACHE_CUDA_CHECK(host_malloc(&host, bytes == 0 ? 1 : bytes));
  // A copy still in flight on any stream may read or write it: wait for the device first.
  std::shared_ptr<void> storage = own(
      host,
      [](void* p) {
        (void)cudaDeviceSynchronize();
        (void)cudaFreeHost(p);
      },
      "cuda::empty_pinned");
  return Tensor::from_storage(std::move(storage), host, shape, dtype, Device::kCpu);
}

namespace {

// A tensor as copy_async sees it: `height` rows of `width` bytes, `pitch` bytes apart.
struct Rows {
  void* data;
  std::size_t width, pitch, height;
};

Rows rows_of(const Tensor& t, const char* where) {
  KVCACHE_CHECK(t.defined() && t.rank() >= 1 && t.rank() <= 4, where,
                ": expected a tensor of rank 1 to 4, got ", t.defined() ? t.describe() : "none");
  if (t.device() == Device::kCpu) {
    cudaPointerAttributes attributes{};
    KVCACHE_CUDA_CHECK(cudaPointerGetAttributes(&attributes, t.data()));
    KVCACHE_CHECK(attributes.type == cudaMemoryTypeHost, where,
                  ": expected page-locked CPU memory (cuda::empty_pinned), got ", t.describe());
  }
  const int r = t.rank();
  const std::size_t es = t.element_size();
  const bool rows_contiguous =
      t.stride(r - 1) == 1 && (r < 2 || t.size(r - 1) <= 1 || t.stride(r - 2) == t.size(r - 1));
  const bool leading_collapse =
      r < 4 || t.size(0) <= 1 || t.size(1) <= 1 || t.stride(0) == t.size(1) * t.stride(1);
  KVCACHE_CHECK(rows_contiguous && leading_collapse, where,
                ": expected rows of contiguous elements (the last two dimensions contiguous, the "
                "leading ones collapsing), got strides of ",
                t.describe());
  const std::int64_t row_elements = r >= 2 ? t.size(r - 1) * t.size(r - 2) : t.size(0);
  const std::int64_t height = r == 4 ? t.size(0) * t.size(1) : r == 3 ? t.size(0) : 1;
  // The distance between consecutive rows (a dimension of size 1 has no meaningful stride).
  std::int64_t pitch = row_elements;
  if (r == 4) pitch = t.size(1) > 1 ? t.stride(1) : t.stride(0);
  if (r == 3) pitch = t.stride(0);
  if (height <= 1) pitch = row_elements;
  return {t.data(), static_cast<std::size_t>(row_elements) * es,
          static_cast<std::size_t>(std::max<std::int64_t>(pitch, row_elements)) * es,
          static_cast<std::size_t>(height)};
}

void copy_rows(const Tensor& dst, const Tensor& src, cudaStream_t stream, const char* where) {
  KVCACHE_CHECK(
      dst.defined() && src.defined() && dst.dtype() == src.dtype() && dst.rank() == src.rank(),
      where, ": expected two tensors of one dtype and rank, got ",
      dst.defined() ? dst.describe() : "none", " and ", src.defined() ? src.describe() : "none");
  for (int d = 0; d < dst.rank(); ++d) {
    KVCACHE_CHECK(dst.size(d) == src.size(d), where, ": expected one shape, got ",
                  dst.shape_string(), " and ", src.shape_string());
  }
  if (dst.numel() == 0) return;
  const Rows to = rows_of(dst, where), from = rows_of(src, where);
  KVCACHE_CUDA_CHECK(cudaMemcpy2DAsync(to.data, to.pitch, from.data, from.pitch, to.width,
                                       to.height, cudaMemcpyDefault, stream));
}

}  // namespace

void copy_async(const Tensor& dst, const Tensor& src) {
  copy_rows(dst, src, g_stream, "cuda::copy_async");
}

CopyStream::CopyStream() {
  cudaStream_t stream = nullptr;
  KVCACHE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  stream_ = stream;
  cudaEvent_t a = nullptr, b = nullptr;
  if (cudaEventCreateWithFlags(&a, cudaEventDisableTiming) != cudaSuccess ||
      cudaEventCreateWithFlags(&b, cudaEventDisableTiming) != cudaSuccess) {
    if (a) (void)cudaEventDestroy(a);
    (void)cudaStreamDestroy(stream);
    KVCACHE_FAIL("CopyStream: could not create its events");
  }
  to_copy_ = a;
  to_current_ = b;
}

CopyStream::~CopyStream() {
  (void)cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
  (void)cudaEventDestroy(static_cast<cudaEvent_t>(to_copy_));
  (void)cudaEventDestroy(static_cast<cudaEvent_t>(to_current_));
  (void)cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

void CopyStream::wait_for_current() const {
  KVCACHE_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(to_copy_), g_stream));
  KVCACHE_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream_),
                                         static_cast<cudaEvent_t>(to_copy_), 0));
}

void CopyStream::make_current_wait() const {
  KVCACHE_CUDA_CHECK(
      cudaEventRecord(static_cast<cudaEvent_t>(to_current_), static_cast<cudaStream_t>(stream_)));
  KVCACHE_CUDA_CHECK(cudaStreamWaitEvent(g_stream, static_cast<cudaEvent_t>(to_current_), 0));
}

void CopyStream::copy(const Tensor& dst, const Tensor& src) const {
  copy_rows(dst, src, static_cast<cudaStream_t>(stream_), "CopyStream::copy");
}

void CopyStream::synchronize() const {
  KVCACHE_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
}

namespace {

// The thread's own stream (non-blocking: no implicit ordering with the legacy default stream,
// whose activity on another thread would otherwise break a capture) and the event StreamScope
// orders it after the previous stream with. Created at the first scope, kept for the thread's
// life, so cuBLAS's per-stream workspace (gemm.cu) is made once, not once per scope.
struct OwnStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;
  ~OwnStream() {
    if (ready) (void)cudaEventDestroy(ready);
    if (stream) (void)cudaStreamDestroy(stream);
  }
};
thread_local OwnStream g_own;

}  // namespace

StreamScope::StreamScope() {
  OwnStream& own = g_own;
  if (own.stream == nullptr) {
    cudaStream_t stream = nullptr;
    KVCACHE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaEvent_t event = nullptr;
    const cudaError_t made = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
    if (made != cudaSuccess) {
      (void)cudaStreamDestroy(stream);
      KVCACHE_CUDA_CHECK(made);
    }
    own.stream = stream;
    own.ready = event;
  }
  // Work issued before the scope (uploads, cache storage filled on the previous stream) comes
  // first: the own stream waits for the previous one's current end.
  KVCACHE_CUDA_CHECK(cudaEventRecord(own.ready, g_stream));
  KVCACHE_CUDA_CHECK(cudaStreamWaitEvent(own.stream, own.ready, 0));
  previous_ = g_stream;
  own_ = own.stream;
  g_stream = own.stream;
}

StreamScope::~StreamScope() {
  // What the scope issued is finished before the previous stream goes on, so memory freed on it
  // afterwards (its deleters use the current stream) is no longer in use. Never throws.
  (void)cudaStreamSynchronize(static_cast<cudaStream_t>(own_));
  g_stream = static_cast<cudaStream_t>(previous_);
}

MirroredBuffer::MirroredBuffer(std::size_t bytes) : bytes_(bytes) {
  void* host = nullptr;
  KVCACHE_CUDA_CHECK(host_malloc(&host, bytes == 0 ? 1 : bytes));
  host_ = own(
      host, [](void* p) { (void)cudaFreeHost(p); }, "cuda::MirroredBuffer");
  std::memset(host, 0, bytes);
  device_ = empty_persistent({static_cast<std::int64_t>(bytes)}, DType::kUInt8);
  if (bytes > 0) KVCACHE_CUDA_CHECK(cudaMemsetAsync(device_.data(), 0, bytes, g_stream));
}

Tensor MirroredBuffer::device_view(std::size_t offset, Shape shape, DType dtype) const {
  const std::size_t need = checked_bytes(shape, dtype);  // sizes and their products checked
  KVCACHE_CHECK(offset <= bytes_ && need <= bytes_ - offset, "MirroredBuffer::device_view: ", need,
                " bytes at offset ", offset, " pass the buffer's ", bytes_, " bytes");
  KVCACHE_CHECK(offset % dtype_size(dtype) == 0, "MirroredBuffer::device_view: offset ", offset,
                " is not aligned to ", dtype_name(dtype));
  return Tensor::from_storage(device_.storage(),
                              static_cast<std::uint8_t*>(device_.data()) + offset, shape, dtype,
                              Device::kCuda);
}

void MirroredBuffer::send(std::size_t offset, std::size_t bytes) const {
  KVCACHE_CHECK(offset <= bytes_ && bytes <= bytes_ - offset, "MirroredBuffer::send: bytes [",
                offset, ", ", offset + bytes, ") pass the buffer's ", bytes_);
  if (bytes == 0) return;
  KVCACHE_CUDA_CHECK(cudaMemcpyAsync(static_cast<std::uint8_t*>(device_.data()) + offset,
                                     host() + offset, bytes, cudaMemcpyHostToDevice, g_stream));
}

void MirroredBuffer::receive(std::size_t offset, std::size_t bytes) const {
  KVCACHE_CHECK(offset <= bytes_ && bytes <= bytes_ - offset, "MirroredBuffer::receive: bytes [",
                offset, ", ", offset + bytes, ") pass the buffer's ", bytes_);
  if (bytes == 0) return;
  KVCACHE_CUDA_CHECK(cudaMemcpyAsync(host() + offset,
                                     static_cast<const std::uint8_t*>(device_.data()) + offset,
                                     bytes, cudaMemcpyDeviceToHost, g_stream));
}

void Graph::begin_capture() {
  KVCACHE_CHECK(g_stream != nullptr,
                "cuda::Graph::capture: the legacy default stream cannot be captured; capture "
                "inside a cuda::StreamScope (or on a stream given to set_stream)");
  // Thread-local mode: only this thread's unsafe calls (a synchronize, a blocking copy) break it.
  KVCACHE_CUDA_CHECK(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal));
}

void Graph::abort_capture() {
  cudaGraph_t graph = nullptr;
  (void)cudaStreamEndCapture(g_stream, &graph);
  if (graph) (void)cudaGraphDestroy(graph);
  (void)cudaGetLastError();  // a failed capture leaves its error; the stream is usable again
}

void Graph::end_capture() {
  cudaGraph_t graph = nullptr;
  KVCACHE_CUDA_CHECK(cudaStreamEndCapture(g_stream, &graph));
  std::size_t count = 0;
  cudaGraphExec_t exec = nullptr;
  cudaError_t status = cudaGraphGetNodes(graph, nullptr, &count);
  if (status == cudaSuccess) status = cudaGraphInstantiate(&exec, graph, 0);
  (void)cudaGraphDestroy(graph);
  KVCACHE_CUDA_CHECK(status);
  exec_ = own(
      exec, [](void* e) { (void)cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(e)); },
      "cuda::Graph::end_capture");
  nodes_ = count;
}

void Graph::replay() const {
  KVCACHE_CHECK(exec_ != nullptr, "cuda::Graph::replay: nothing was captured");
  KVCACHE_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_.get()), g_stream));
}

MemoryStats memory_stats() {
  synchronize();
  MemoryStats stats;
  std::uint64_t value = 0;
  KVCACHE_CUDA_CHECK(cudaMemPoolGetAttribute(pool(), cudaMemPoolAttrUsedMemCurrent, &value));
  stats.in_use = value;
  KVCACHE_CUDA_CHECK(cudaMemPoolGetAttribute(pool(), cudaMemPoolAttrUsedMemHigh, &value));
  stats.peak_in_use = value;
  KVCACHE_CUDA_CHECK(cudaMemPoolGetAttribute(pool(), cudaMemPoolAttrReservedMemCurrent, &value));
  stats.reserved = value;
  KVCACHE_CUDA_CHECK(cudaMemPoolGetAttribute(pool(), cudaMemPoolAttrReservedMemHigh, &value));
  stats.peak_reserved = value;
  return stats;
}

void reset_peak_memory_stats() {
  synchronize();
  std::uint64_t zero = 0;
  KVCACHE_CUDA_CHECK(cudaMemPoolSetAttribute(pool(), cudaMemPoolAttrUsedMemHigh, &zero));
  KVCACHE_CUDA_CHECK(cudaMemPoolSetAttribute(pool(), cudaMemPoolAttrReservedMemHigh, &zero));
}

}  // namespace kvcache::cuda
