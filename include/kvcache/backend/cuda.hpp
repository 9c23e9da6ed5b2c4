// The CUDA backend, host side: device memory, copies between device tensors and to and from the
// host, the Backend a Cache is instantiated on (DynamicCache<cuda::Backend>), and the operations
// the model's forward pass runs on the GPU (the same set cpu.hpp offers the CPU: embedding,
// RMSNorm, RoPE, linear through cuBLAS, SiLU·mul, residual add, attention, argmax and sampling).
// Compiles without nvcc; the kernels live in cuda/, one file per operation, and are built into the
// library when CMake finds nvcc (KVCACHE_CUDA). A library built without them still declares these
// functions: each then throws kvcache::Error saying the CUDA backend is not built.
//
// Conventions every function here keeps:
// - Every CUDA and cuBLAS call is checked; a failure throws kvcache::Error naming the call and
//   CUDA's message. Tensor arguments are checked (device, dtype, shape) before any launch.
// - Work is issued on the current stream (set_stream; default: the legacy default stream) and is
//   asynchronous: nothing here waits for the GPU except to_host, to_device, synchronize and
//   memory_stats. Kernels never allocate; where a function returns a new tensor, the memory comes
//   from the stream-ordered pool below.
// - Device memory comes from CUDA's stream-ordered allocator (cudaMallocAsync) with a pool that
//   keeps what it has reserved, so once a decode step has run, later steps of the same shapes are
//   served from the pool with no call into the driver (the "workspace sized at first use").
// - "Any row stride" means the last dimension is contiguous (stride 1) and the other strides are
//   free: views into a fused projection's output are accepted without a copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string_view>

#include "kvcache/cache/quantized_view.hpp"  // QuantizedKVView (attention_quantized)
#include "kvcache/tensor.hpp"

namespace kvcache::cuda {

/// True when this library was built with the CUDA kernels (nvcc was found at configure time).
bool built_with_cuda();

/// Number of CUDA devices usable by this process (0 when there is no GPU, no driver, or the
/// library was built without CUDA).
int device_count();

/// Throws kvcache::Error unless a GPU is usable ("--device cuda on a machine without a GPU").
void require_device(const char* where);

/// Bytes a new allocation can take on the current device: its free memory (cudaMemGetInfo) plus
/// what kvcache's stream-ordered pool has reserved and holds unused. 0 with no usable device.
std::uint64_t free_device_memory();

namespace detail {
/// Fault injection for the allocation-failure tests (tests/cache/allocation_failure_cuda_test.cpp):
/// while a hook is set, every device allocation (cudaMallocAsync) and page-locked host allocation
/// (cudaMallocHost) the backend makes calls it first, and a `true` return fails that allocation
/// as an exhausted device or host would (kvcache::Error, cudaErrorMemoryAllocation). nullptr, the
/// default, turns it off; the check then costs one relaxed atomic load per allocation. Set it while
/// no other thread allocates through the backend.
using AllocationFaultHook = bool (*)();
void set_allocation_fault_hook(AllocationFaultHook hook);
}  // namespace detail

/// Opaque cudaStream_t, so this header needs no CUDA headers.
using Stream = void*;
/// Stream used by the backend's kernels and copies on this thread (nullptr = default stream).
void set_stream(Stream stream);
/// The stream this thread's kernels and copies use now (nullptr = the default stream).
Stream current_stream();

/// A new contiguous, uninitialised tensor in device memory (freed, stream-ordered, when its last
/// view goes). Inside a ScratchScope it comes from the thread's scratch workspace instead.
Tensor empty(Shape shape, DType dtype);
/// empty() with the shape as a braced list.
inline Tensor empty(std::initializer_list<std::int64_t> shape, DType dtype) {
  return empty(Shape(shape.begin(), shape.size()), dtype);
}

/// The same, always from the pool, never from scratch: for what outlives a forward pass (cache
/// storage, returned logits, weights).
Tensor empty_persistent(Shape shape, DType dtype);
/// empty_persistent() with the shape as a braced list.
inline Tensor empty_persistent(std::initializer_list<std::int64_t> shape, DType dtype) {
  return empty_persistent(Shape(shape.begin(), shape.size()), dtype);
}

/// While one is alive on a thread, cuda::empty hands out memory from that thread's scratch
/// workspace: one device block carved front to back, restarted when the outermost scope begins.
/// A forward pass opens one, so its intermediates cost no allocator call at all once warm (the
/// block is sized by what the previous scopes asked for: a scope that needs more is served from
/// the pool for the excess, and the next scope starts with a block that big). Reusing the block
/// is safe because work on one stream runs in order; a scope on another stream than the last
/// first waits for that stream. Anything that must outlive the scope comes from
/// empty_persistent (Backend::empty does, so cache storage is never scratch).
class ScratchScope {
 public:
  ScratchScope();
  ~ScratchScope();
  ScratchScope(const ScratchScope&) = delete;
  ScratchScope& operator=(const ScratchScope&) = delete;
};

/// Same-shape, same-dtype copy between two CUDA tensors with any strides.
void copy(const Tensor& dst, const Tensor& src);

/// Two such copies of one shape and dtype in one launch: a decode step's keys and values going
/// into their cache slots (DynamicCache::update uses it when the backend has it).
void copy2(const Tensor& dst_a, const Tensor& src_a, const Tensor& dst_b, const Tensor& src_b);

/// A cache append whose slot is read on the device, for a replayed decode step: keys and values
/// [batch, heads, n, head_dim] (any strides, last dim contiguous) are copied into slots
/// [slot, slot + n) of the storage tensors [batch, heads, capacity, head_dim] (same dtype, last dim
/// contiguous), slot = slot_device[0] (int64 on cuda). Shapes are checked on the host (n larger
/// than the capacity is a kvcache::Error); the slot is only known on the device, where one with
/// slot + n > capacity (or < 0) writes nothing: the caller keeps its bookkeeping within capacity.
void append_at(const Tensor& key_storage, const Tensor& keys, const Tensor& value_storage,
               const Tensor& values, const Tensor& slot_device);

/// A contiguous device copy of a CPU tensor, and a contiguous host copy of a CUDA tensor. Both
/// wait for the copy to finish.
Tensor to_device(const Tensor& host);
/// A contiguous host copy of a CUDA tensor (waits for the copy).
Tensor to_host(const Tensor& device);

/// A device tensor (uint8 [bytes]) holding a copy of `bytes` host bytes, sent on the current stream
/// without waiting for the GPU: the bytes go through a page-locked staging buffer (kept per
/// thread, grown as needed), so the copy is truly asynchronous and `host` may be reused at once.
/// A forward pass sends all of a step's small inputs (ids, positions, mask) in one call.
Tensor upload(const void* host, std::size_t bytes);
/// The same for a contiguous CPU tensor: a device tensor of its shape and dtype, sent without
/// waiting (cuda::to_device's asynchronous twin, for a decode step's small inputs).
Tensor upload(const Tensor& host);
/// The same into storage of its own (as empty_persistent), never a forward pass's scratch: for
/// small tables a cache keeps from step to step.
Tensor upload_persistent(const Tensor& host);

/// Blocks until the backend's stream has finished its work.
void synchronize();

/// A CPU tensor of `shape` in page-locked host memory (cudaMallocHost), contents undefined: copies
/// between it and the GPU run asynchronously (copy_async, CopyStream::copy). Freed when the last
/// tensor sharing it goes, after a device-wide wait, so no copy still in flight can touch it.
Tensor empty_pinned(Shape shape, DType dtype);
/// The same from a braced shape: `cuda::empty_pinned({2, 8}, DType::kFloat32)`.
inline Tensor empty_pinned(std::initializer_list<std::int64_t> shape, DType dtype) {
  return empty_pinned(Shape(shape.begin(), shape.size()), dtype);
}

/// dst = src on the thread's current stream, asynchronously: CUDA and page-locked CPU tensors in
/// any combination, one dtype and shape of rank 1 to 4, each laid out as rows of contiguous
/// elements — the last two dimensions contiguous (stride(-1) = 1, stride(-2) = size(-1)) and the
/// leading ones collapsing into one row index — with any row pitch: a cache layer's
/// [batch, heads, tokens, head_dim] slice of its [batch, heads, capacity, head_dim] storage. One
/// cudaMemcpy2DAsync. Other layouts are a kvcache::Error.
void copy_async(const Tensor& dst, const Tensor& src);

/// A second stream for copies that overlap the work on the thread's stream (the offloaded cache's
/// prefetch of the next layer), with the two waits that order them. Not copyable; the destructor
/// waits for its copies.
class CopyStream {
 public:
  CopyStream();
  ~CopyStream();
  CopyStream(const CopyStream&) = delete;
  CopyStream& operator=(const CopyStream&) = delete;

  /// Later copies on this stream start after the work issued on the thread's current stream so
  /// far (an event recorded there, waited for here).
  void wait_for_current() const;
  /// Later work on the thread's current stream starts after the copies issued here so far.
  void make_current_wait() const;
  /// copy_async's copy, issued on this stream.
  void copy(const Tensor& dst, const Tensor& src) const;
  /// Blocks until this stream's copies are done.
  void synchronize() const;

 private:
  Stream stream_ = nullptr;
  void* to_copy_ = nullptr;     // cudaEvent_t: the current stream's work so far
  void* to_current_ = nullptr;  // cudaEvent_t: this stream's copies so far
};

/// The thread's own stream of this library for the lifetime of the scope: one non-blocking stream
/// per thread, created at the thread's first scope and kept (so memory freed on it stays in one
/// stream's order), made the thread's current stream after the previous one's work so far, and on
/// exit synchronised and replaced by the stream that was current before. A scope inside another
/// keeps the same stream. CUDA graphs cannot be captured on the legacy default stream; generate()
/// runs a generation that replays its decode step inside one.
class StreamScope {
 public:
  StreamScope();
  ~StreamScope();
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  Stream previous_ = nullptr;
  Stream own_ = nullptr;
};

/// A page-locked host buffer and a device buffer of the same size at fixed addresses, so that
/// copies between them can be captured into a CUDA graph and replayed: the host writes host()
/// before a replay and reads it after the stream has finished. Both halves are zeroed at creation.
class MirroredBuffer {
 public:
  MirroredBuffer() = default;
  /// Allocates `bytes` on the host (page-locked) and on the device, both zeroed.
  explicit MirroredBuffer(std::size_t bytes);
  /// The host half, `bytes` long.
  std::uint8_t* host() const { return static_cast<std::uint8_t*>(host_.get()); }
  /// The device half, uint8 [bytes].
  const Tensor& device() const { return device_; }
  /// Bytes of each half.
  std::size_t size() const { return bytes_; }
  /// Bytes [offset, offset + bytes) of the device half seen as a contiguous tensor.
  Tensor device_view(std::size_t offset, Shape shape, DType dtype) const;
  /// device_view() with the shape as a braced list.
  Tensor device_view(std::size_t offset, std::initializer_list<std::int64_t> shape,
                     DType dtype) const {
    return device_view(offset, Shape(shape.begin(), shape.size()), dtype);
  }
  /// Asynchronous copies of bytes [offset, offset + bytes) on the current stream.
  void send(std::size_t offset, std::size_t bytes) const;  // host → device
  /// Copies bytes [offset, offset + bytes) from the device half to the host half, asynchronously.
  void receive(std::size_t offset, std::size_t bytes) const;  // device → host

 private:
  std::shared_ptr<void> host_;
  Tensor device_;
  std::size_t bytes_ = 0;
};

/// Work captured from the current stream once and replayed (a CUDA graph, instantiated). Capture
/// runs `body` with the stream in capture mode (thread-local: other threads are unaffected):
/// kernels and copies it issues are recorded, not run, so body must not wait for the GPU or read
/// results back. A body that throws ends the capture and the exception propagates, leaving no
/// graph. Replays launch the whole recorded sequence on the current stream with one call, reading
/// the memory its kernels were given at capture time: whatever changes from one replay to the next
/// must live in device memory at those addresses.
class Graph {
 public:
  Graph() = default;
  template <class F>
  /// Records the work `body` issues on the current stream and instantiates it; see the class.
  static Graph capture(F&& body) {
    Graph graph;
    graph.begin_capture();
    try {
      body();
    } catch (...) {
      graph.abort_capture();
      throw;
    }
    graph.end_capture();
    return graph;
  }
  /// Whether a graph was captured.
  explicit operator bool() const { return exec_ != nullptr; }
  /// Kernel, copy and memset nodes recorded.
  std::size_t nodes() const { return nodes_; }
  /// Launches the recorded work on the current stream.
  void replay() const;

 private:
  void begin_capture();
  void abort_capture();
  void end_capture();
  std::shared_ptr<void> exec_;
  std::size_t nodes_ = 0;
};

/// Device memory taken from the pool: bytes in use now and at most since the last reset, and
/// bytes the pool holds from the driver (reserved) now and at most.
struct MemoryStats {
  /// Bytes handed out now.
  std::size_t in_use = 0;
  /// Most bytes handed out at once since the last reset_peak_memory_stats().
  std::size_t peak_in_use = 0;
  /// Bytes the pool holds from the driver now.
  std::size_t reserved = 0;
  /// Most bytes the pool held since the last reset_peak_memory_stats().
  std::size_t peak_reserved = 0;
};
/// The device memory pool's figures now.
MemoryStats memory_stats();
/// Starts the peaks of memory_stats() again from the current figures.
void reset_peak_memory_stats();

/// RoPE re-rotation by a fixed shift (the sink cache's kept keys): dst[b, h, j] =
/// (x1·c − x2·s, x2·c + x1·s) of src[b, h, j] for the rotate_half pairs (k, k + head_dim / 2),
/// c = cos_sin[k], s = cos_sin[head_dim / 2 + k], in float32 and rounded once to the dtype (the
/// bits cpu::rotate_rows stores). src and dst [batch, heads, slots, head_dim] of one float dtype
/// (any strides, last dim contiguous); cos_sin [2, head_dim / 2] float32 contiguous on CUDA. dst
/// may be src itself (in place) but must not otherwise overlap it.
void rotate_rows(const Tensor& src, const Tensor& dst, const Tensor& cos_sin);

/// The backend a Cache of device memory is instantiated on (DynamicCache<cuda::Backend>): storage
/// on the current CUDA device, copies by CUDA kernels.
struct Backend {
  /// The device the storage lives on.
  static constexpr Device kDevice = Device::kCuda;
  /// The backend's name, for messages.
  static constexpr std::string_view kName = "cuda";
  /// Contiguous, uninitialised device storage that lives until its last Tensor goes.
  static Tensor empty(Shape shape, DType dtype) { return cuda::empty_persistent(shape, dtype); }
  /// Same-shape copy between two device tensors (any strides).
  static void copy(const Tensor& dst, const Tensor& src) { cuda::copy(dst, src); }
  /// Two same-shape copies in one launch (keys and values at once).
  static void copy2(const Tensor& dst_a, const Tensor& src_a, const Tensor& dst_b,
                    const Tensor& src_b) {
    cuda::copy2(dst_a, src_a, dst_b, src_b);
  }
  /// A device copy of a small contiguous CPU tensor in storage of its own, sent without waiting
  /// (cuda::upload_persistent).
  static Tensor upload(const Tensor& host) { return cuda::upload_persistent(host); }
  /// RoPE re-rotation by a fixed shift, src to dst (cuda::rotate_rows).
  static void rotate_rows(const Tensor& src, const Tensor& dst, const Tensor& cos_sin) {
    cuda::rotate_rows(src, dst, cos_sin);
  }
};

// --- the model's operations ---------------------------------------------------------------------
// All tensors on the GPU. Float dtypes are float32, bfloat16 and float16; arithmetic is float32
// inside every kernel, results are rounded once to the output dtype (round to nearest even).

/// Fills a contiguous float tensor with uniform values in [lo, hi) from a counter-based generator
/// (element i's value depends only on seed and i), for random test and benchmark weights.
void fill_uniform(const Tensor& t, std::uint64_t seed, float lo, float hi);

/// A new contiguous device tensor holding `src`'s elements (any strides) converted to `dtype`.
Tensor cast(const Tensor& src, DType dtype);

/// Rows of `table` [vocab, hidden] (float32/bfloat16/float16, contiguous) picked by `ids` (int64,
/// contiguous, any shape): returns [numel(ids), hidden] float32. The ids are read on the device,
/// so the caller checks them against vocab on the host first.
Tensor embedding(const Tensor& table, const Tensor& ids);

/// RMSNorm as the CPU computes it: x · rsqrt(mean(x²) + eps) · weight per row, in float32;
/// x [rows, hidden] float32 (any row stride), weight [hidden] float32; returns [rows, hidden] in
/// `out_dtype`.
Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, DType out_dtype);

/// y += bias per row: y [rows, n] float (any row stride), bias [n] float32.
void add_bias(const Tensor& y, const Tensor& bias);

/// silu(gate) · up elementwise: gate and up [rows, n] of one float dtype (any row stride, so
/// the two halves of a fused gate/up output work); returns contiguous [rows, n] of that dtype.
Tensor silu_mul(const Tensor& gate, const Tensor& up);

/// y += x elementwise: same shape, float32, contiguous.
void add_inplace(const Tensor& y, const Tensor& x);

/// RoPE in place with transformers' rotate_half convention: x [batch, heads, q_len, head_dim]
/// float (any strides, last dim contiguous) becomes x·cos + rotate_half(x)·sin, where
/// cos/sin = cos/sin(inv_freq[k] · position) · attention_scaling in float32 (the angle rounded to
/// float32 as transformers rounds it); position_ids [batch, q_len] int64 contiguous; inv_freq
/// [head_dim / 2] float32.
void rope(const Tensor& x, const Tensor& position_ids, const Tensor& inv_freq,
          float attention_scaling);

/// RoPE for a decode step's q|k with the keys and values appended to cache storage, in one launch
/// (rope followed by append_at): x [batch, heads + key_heads, q_len, head_dim] as for rope, whose
/// last key_heads heads are the new keys; those are rotated into key_storage [batch, key_heads,
/// capacity, head_dim] at slots [slot, slot + q_len) (x's key heads are left as they were) and
/// values [batch, key_heads, q_len, head_dim] are copied into value_storage at the same slots;
/// the other heads of x are rotated in place. slot = slot_device[0] (int64 on cuda); one with
/// slot + q_len > capacity (or < 0) writes no slot, as append_at. One dtype throughout.
void rope_append(const Tensor& x, std::int64_t key_heads, const Tensor& key_storage,
                 const Tensor& value_storage, const Tensor& values, const Tensor& position_ids,
                 const Tensor& inv_freq, float attention_scaling, const Tensor& slot_device);

/// out = x · weightᵀ + beta · out, accumulating in float32 (1–8 rows of 16-bit weights: our GEMV
/// kernel; otherwise cuBLAS): x [rows, in] (any row
/// stride), weight [out_features, in] contiguous, of one dtype (bfloat16, float16 or float32; a
/// float32 product runs in true float32, TF32 off); out [rows, out_features] (any row stride) in
/// the weight's dtype or float32. beta = 1 adds the product into out (the residual add, fused).
void linear(const Tensor& x, const Tensor& weight, const Tensor& out, float beta = 0.0f);

/// out = (silu(gate) · up) · weightᵀ + beta · out: the MLP's down projection with its input made
/// on the fly (gate and up [rows, in], any row stride, the weight's dtype; silu·up rounded to that
/// dtype as silu_mul rounds it). Few rows take one fused kernel; more rows run silu_mul then
/// linear.
void linear_silu_mul(const Tensor& gate, const Tensor& up, const Tensor& weight, const Tensor& out,
                     float beta = 0.0f);

/// out = rms_norm(x, norm_weight, eps) · weightᵀ + beta · out, the norm made inside the
/// projection's kernel when few rows run (bit for bit what rms_norm then linear give); x [rows, in]
/// float32 (any row stride), norm_weight [in] float32, weight [out_features, in] 16-bit or float32,
/// out as for linear. More rows run rms_norm then linear.
void linear_rms_norm(const Tensor& x, const Tensor& norm_weight, float eps, const Tensor& weight,
                     const Tensor& out, float beta = 0.0f);

/// softmax(Q·Kᵀ·scale + mask)·V, as cpu::attention computes it, grouped-query aware:
///   query           [batch, num_heads, q_len, head_dim]        any strides, last dim contiguous
///   keys, values    [batch, num_kv_heads, kv_len, head_dim]    query's dtype, same stride rules
///   mask            [batch, kv_len] uint8 contiguous (nonzero = attend), or undefined (none)
///   cache_position  [q_len] int64: key j (absolute slot kv_offset + j) is visible to query i
///                   when kv_offset + j <= cache_position[i] and mask[b, j] != 0
///   out             [batch, q_len, num_heads, head_dim] contiguous, query's dtype
///   sliding_window  none (full causal attention), or W >= 1: key j is visible to query i only
///                   when also kv_offset + j > cache_position[i] - W (cpu::attention's rule)
/// Softmax and accumulation in float32. Query rows that see no key give zeros, never NaN.
/// Decode (few query rows) splits long contexts across blocks and merges the pieces
/// (flash-decoding); prefill of bfloat16/float16 uses tensor cores. Any even head_dim up to 256.
void attention(const Tensor& query, const Tensor& keys, const Tensor& values, const Tensor& mask,
               const Tensor& cache_position, std::int64_t kv_offset, float scale, const Tensor& out,
               std::optional<std::int64_t> sliding_window = std::nullopt);

/// The same with the number of keys read on the device, for a decode step replayed from a CUDA
/// graph: keys and values are the cache's whole storage [batch, num_kv_heads, capacity, head_dim],
/// mask (if defined) [batch, capacity] uint8 contiguous, and only the first
/// min(kv_len_device[0], capacity) keys take part (kv_len_device: int64 [1] on cuda). The work
/// split is planned for `capacity` keys, so one launch serves every length up to it; q_len at most
/// 8 (decode).
void attention(const Tensor& query, const Tensor& keys, const Tensor& values, const Tensor& mask,
               const Tensor& cache_position, std::int64_t kv_offset, float scale, const Tensor& out,
               const Tensor& kv_len_device,
               std::optional<std::int64_t> sliding_window = std::nullopt);

/// attention() over a QuantizedCache layer on the GPU, as cpu::attention_quantized computes it:
/// key slots [0, blocks.tokens) read from the quantized blocks (device memory, every row at
/// blocks.key_row_stride / value_row_stride bytes from the first), dequantized in registers as a
/// tile of keys is staged (x' = code · scale + min in float32, never rounded to the query's dtype),
/// and slots [blocks.tokens, kv_len) from keys / values [batch, num_kv_heads, kv_len -
/// blocks.tokens, head_dim] (full precision, the query's dtype, contiguous head_dim). kv_len =
/// blocks.tokens + keys.size(2); mask [batch, kv_len] uint8 (or undefined), cache_position,
/// kv_offset and sliding_window as for attention(). Any q_len (the SIMT flash kernel, split over
/// the keys and merged for decode); blocks.tokens = 0 is attention() over keys / values.
void attention_quantized(const Tensor& query, const QuantizedKVView& blocks, const Tensor& keys,
                         const Tensor& values, const Tensor& mask, const Tensor& cache_position,
                         std::int64_t kv_offset, float scale, const Tensor& out,
                         std::optional<std::int64_t> sliding_window = std::nullopt);

/// QuantizedCache's flush on the GPU: quantizes residual slots [0, chunks · layout.chunk) of
/// res_k / res_v (token-major [slots, batch, heads, head_dim] contiguous, float32, float16 or
/// bfloat16) into blocks first_chunk, ..., first_chunk + chunks − 1 of every row of key_blocks /
/// value_blocks (uint8 [batch, row bytes] contiguous, on cuda), with layout's geometry (nbits,
/// scale_dtype, keys_per_channel, chunk, token_group, record sizes). The bytes equal the CPU
/// cache's (detail::QuantCodec) bit for bit: the same float32 operations in the same order.
void quantize_kv_blocks(const Tensor& res_k, const Tensor& res_v, const Tensor& key_blocks,
                        const Tensor& value_blocks, const QuantizedKVView& layout,
                        std::int64_t first_chunk, std::int64_t chunks);

/// The blocks of a GPU QuantizedKVView dequantized into slots [0, view.tokens) of out_k / out_v
/// ([batch, heads, >= tokens, head_dim] contiguous on cuda, any float dtype; rounded once).
void dequantize_kv_blocks(const QuantizedKVView& view, const Tensor& out_k, const Tensor& out_v);

/// The first maximum of every row: logits [rows, vocab] float32 (any row stride) → [rows] int64.
Tensor argmax(const Tensor& logits);

/// One token per row drawn from softmax(logits / temperature) restricted to the top_k best
/// (0 = all) and then to the smallest set whose probability reaches top_p (1 = all), as
/// kvcache::choose_token applies them: logits [rows, vocab] float32 (any row stride), `uniforms`
/// [rows] float32 in [0, 1), one draw per row, made by the caller (so a seed gives the same tokens
/// on every backend); returns [rows] int64.
Tensor sample(const Tensor& logits, float temperature, std::int64_t top_k, float top_p,
              const Tensor& uniforms);

}  // namespace kvcache::cuda
