// Prefill attention on tensor cores (float16 / bfloat16, head_dim 64 or 128): flash-attention-2
// in one pass, no workspace.
//
// A block of 4 warps takes 64 packed query rows of one (batch row, kv head) (attention.cuh: rows
// r = i · group + g, so a block's rows are all query heads of a few positions, and each key tile
// it loads serves every head of the group). Each warp owns 16 rows. Per tile of 64 keys:
//   S = Q·Kᵀ    mma.sync m16n8k16 (bf16/f16 in, float32 accumulators), Q fragments kept in
//               registers for the whole pass, K fragments by ldmatrix from shared memory;
//   mask        causal (key j visible to row r iff j <= cache_position[i(r)] - kv_offset), the
//               sliding window when there is one (and j > that limit - window), and padding,
//               only on tiles that cross the block's diagonal or when a mask or window exists;
//   softmax     online, float32, exp2 of scores pre-multiplied by scale · log2(e);
//   O += P·V    P rounded to the input dtype in registers (the accumulator layout of S is the A
//               operand layout of the next mma, so P never goes through shared memory), V
//               fragments by ldmatrix.trans.
// Key tiles past the block's causal frontier (the largest visible key of its rows) are never
// loaded. K and V tiles are double-buffered with cp.async: tile t + 1 is in flight while tile t
// is multiplied. Shared-memory rows are 16-byte chunks XOR-swizzled by row (chunk c of row r sits
// at c ^ (r mod 8)), so the 8 row addresses of every ldmatrix hit 8 different bank groups.
// Blocks are issued heaviest first (the last rows see the most keys) to shorten the tail.
#include <cstdint>
#include <limits>

#include "attention.cuh"
#include "check.cuh"
#include "dtype.cuh"

namespace kvcache::cuda::detail {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = kPrefillWarps * 32;
constexpr int kBlockRows = 64;  // packed query rows per block (16 per warp)
constexpr int kBlockKeys = 64;  // keys per tile

// Shared memory (elements of T): q [64][D], then keys [2][64][D] and values [2][64][D] (double
// buffer), every row a run of D/8 swizzled 16-byte chunks.
template <int D>
constexpr std::size_t prefill_smem_bytes() {
  return static_cast<std::size_t>(kBlockRows * D + 4 * kBlockKeys * D) * 2;
}

template <class T, int D>
__global__ void __launch_bounds__(kPrefillThreads)
    prefill_attention_kernel(const AttentionView p, int row_blocks) {
  constexpr int kChunks = D / 8;             // 16-byte chunks per row
  constexpr int kDimSteps = D / 16;          // k-steps of S = Q·Kᵀ
  constexpr int kKeyTiles = kBlockKeys / 8;  // n-tiles of S (8 keys each)
  constexpr int kDimTiles = D / 8;           // n-tiles of O (8 dims each)
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);        // [64][D]
  T* k_s = q_s + kBlockRows * D;              // [2][64][D]
  T* v_s = k_s + 2 * kBlockKeys * D;          // [2][64][D]
  __shared__ int frontier[2][kPrefillWarps];  // per warp: max and min key limit of the rows

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int group_id = lane >> 2, tig = lane & 3;  // the mma fragment coordinates

  // Heaviest first: the first units blocks take the last row block of every unit.
  const int units = p.batch * p.num_kv_heads;
  const int row_block = row_blocks - 1 - static_cast<int>(blockIdx.x) / units;
  const int unit = static_cast<int>(blockIdx.x) % units;
  const int b = unit / p.num_kv_heads, kv_head = unit % p.num_kv_heads;
  const int row0 = row_block * kBlockRows;

  // The block's frontier (largest key limit: no later key is needed) and its smallest limit
  // (keys up to it are visible to every row: no causal mask there). Thread t covers row t mod 64.
  {
    const int row = row0 + tid % kBlockRows;
    const bool valid = row < p.rows;
    const int limit = valid ? row_key_limit(p, row) : -1;
    const int max_limit = __reduce_max_sync(kFullMask, limit);
    const int min_limit =
        __reduce_min_sync(kFullMask, valid ? limit : std::numeric_limits<int>::max());
    if (lane == 0) {
      frontier[0][warp] = max_limit;
      frontier[1][warp] = min_limit;
    }
  }

  const T* key_base =
      static_cast<const T*>(p.keys) + b * p.k_stride_batch + kv_head * p.k_stride_head;
  const T* value_base =
      static_cast<const T*>(p.values) + b * p.v_stride_batch + kv_head * p.v_stride_head;
  const std::uint8_t* mask_row = p.mask ? p.mask + b * p.mask_stride : nullptr;

  // Q rows (zeros past p.rows), then key/value tile `tile` into buffer `buf`; rows past kv_len
  // are zero-filled so that P·V never multiplies stale memory.
  const T* query = static_cast<const T*>(p.query);
  for (int c = tid; c < kBlockRows * kChunks; c += kPrefillThreads) {
    const int r = c / kChunks, chunk = c % kChunks, row = row0 + r;
    const bool valid = row < p.rows;
    const T* src = query + (valid ? query_row_offset(p, b, kv_head, row) : 0) + chunk * 8;
    cp_async_16(q_s + swizzled<D>(r, chunk), src, valid);
  }
  auto load_tile = [&](int buf, int tile) {
    T* keys_dst = k_s + buf * kBlockKeys * D;
    T* values_dst = v_s + buf * kBlockKeys * D;
    for (int c = tid; c < kBlockKeys * kChunks; c += kPrefillThreads) {
      const int r = c / kChunks, chunk = c % kChunks, key = tile * kBlockKeys + r;
      const bool valid = key < p.kv_len;
      const std::int64_t at = valid ? key : 0;
      cp_async_16(keys_dst + swizzled<D>(r, chunk), key_base + at * p.k_stride_seq + chunk * 8,
                  valid);
      cp_async_16(values_dst + swizzled<D>(r, chunk), value_base + at * p.v_stride_seq + chunk * 8,
                  valid);
    }
  };

  __syncthreads();  // frontier[] is written
  int max_limit = frontier[0][0], min_limit = frontier[1][0];
#pragma unroll
  for (int w = 1; w < kPrefillWarps; ++w) {
    max_limit = max(max_limit, frontier[0][w]);
    min_limit = min(min_limit, frontier[1][w]);
  }
  const int tiles = (max_limit + 1 + kBlockKeys - 1) / kBlockKeys;  // limits are <= kv_len - 1
  if (tiles > 0) load_tile(0, 0);
  cp_async_commit();

  // This thread's two rows in the accumulator layout: warp · 16 + group_id and + 8.
  const int row_a = row0 + warp * 16 + group_id, row_b = row_a + 8;
  const int limit_a = row_a < p.rows ? row_key_limit(p, row_a) : -1;
  const int limit_b = row_b < p.rows ? row_key_limit(p, row_b) : -1;
  const int first_a = row_a < p.rows ? row_key_first(p, row_a) : 0;  // the sliding window's
  const int first_b = row_b < p.rows ? row_key_first(p, row_b) : 0;

  std::uint32_t q_frag[kDimSteps][4];
  float o[kDimTiles][4];  // O rows (row_a: [0], [1]; row_b: [2], [3]), dims dt · 8 + 2 · tig
#pragma unroll
  for (int dt = 0; dt < kDimTiles; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m_a = kNegInf, m_b = kNegInf, l_a = 0.0f, l_b = 0.0f;

  for (int tile = 0; tile < tiles; ++tile) {
    cp_async_wait<0>();  // tile `tile` (and, the first time, Q) has landed for this thread
    __syncthreads();     // ... for every thread; and everyone is done with tile - 1's buffer
    if (tile == 0) {
#pragma unroll
      for (int ks = 0; ks < kDimSteps; ++ks) {
        // A fragment: matrices (rows 0-7 | 8-15) × (dims 0-7 | 8-15) of the warp's 16 rows.
        ldmatrix_x4(q_frag[ks], q_s + swizzled<D>(warp * 16 + lane % 16, ks * 2 + lane / 16));
      }
    }
    if (tile + 1 < tiles) load_tile((tile + 1) & 1, tile + 1);
    cp_async_commit();

    const T* keys_s = k_s + (tile & 1) * kBlockKeys * D;
    const T* values_s = v_s + (tile & 1) * kBlockKeys * D;

    // S = Q·Kᵀ: 16 rows × 64 keys per warp.
    float s[kKeyTiles][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kDimSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < kKeyTiles / 2; ++np) {
        // B fragments of key tiles 2np, 2np + 1: matrices (keys 0-7 | 8-15) × (dims 0-7 | 8-15)
        // in the order (keys 0-7, dims 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15).
        std::uint32_t kf[4];
        const int key = np * 16 + (lane / 16) * 8 + lane % 8;
        ldmatrix_x4(kf, keys_s + swizzled<D>(key, ks * 2 + (lane / 8) % 2));
        mma_16816<T>(s[2 * np], q_frag[ks], kf[0], kf[1]);
        mma_16816<T>(s[2 * np + 1], q_frag[ks], kf[2], kf[3]);
      }
    }

    // Scale, then mask where this tile may hold an invisible key for some row.
    const int key0 = tile * kBlockKeys;
    const bool needs_mask =
        mask_row != nullptr || key0 + kBlockKeys - 1 > min_limit || p.window > 0;
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[nt][e] * p.scale_log2;
        if (needs_mask) {
          const int key = key0 + nt * 8 + 2 * tig + (e & 1);
          const int limit = e < 2 ? limit_a : limit_b;
          const int first = e < 2 ? first_a : first_b;
          // key <= limit keeps key < kv_len before the mask byte is read.
          const bool visible =
              key <= limit && key >= first && (mask_row == nullptr || mask_row[key] != 0);
          v = visible ? v : kNegInf;
        }
        s[nt][e] = v;
      }
    }

    // Online softmax for the two rows (a row's 64 scores live in the 4 lanes of a group_id).
    float tile_max_a = kNegInf, tile_max_b = kNegInf;
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
      tile_max_a = fmaxf(tile_max_a, fmaxf(s[nt][0], s[nt][1]));
      tile_max_b = fmaxf(tile_max_b, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int offset = 1; offset < 4; offset *= 2) {
      tile_max_a = fmaxf(tile_max_a, __shfl_xor_sync(kFullMask, tile_max_a, offset));
      tile_max_b = fmaxf(tile_max_b, __shfl_xor_sync(kFullMask, tile_max_b, offset));
    }
    const float new_a = fmaxf(m_a, tile_max_a), new_b = fmaxf(m_b, tile_max_b);
    const float alpha_a = new_a == kNegInf ? 1.0f : exp2f(m_a - new_a);
    const float alpha_b = new_b == kNegInf ? 1.0f : exp2f(m_b - new_b);
    m_a = new_a;
    m_b = new_b;
    l_a *= alpha_a;
    l_b *= alpha_b;
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      o[dt][0] *= alpha_a;
      o[dt][1] *= alpha_a;
      o[dt][2] *= alpha_b;
      o[dt][3] *= alpha_b;
    }
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float mx = e < 2 ? new_a : new_b;
        s[nt][e] = s[nt][e] == kNegInf ? 0.0f : exp2f(s[nt][e] - mx);
      }
      l_a += s[nt][0] + s[nt][1];
      l_b += s[nt][2] + s[nt][3];
    }

    // O += P·V: the accumulators of key tiles 2kk, 2kk + 1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockKeys / 16; ++kk) {
      const std::uint32_t pf[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                                   pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kDimTiles / 2; ++dp) {
        // B fragments of dim tiles 2dp, 2dp + 1, transposed from [key][dim] rows: matrices
        // (keys 0-7, dims 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
        std::uint32_t vf[4];
        ldmatrix_x4_trans(vf, values_s + swizzled<D>(kk * 16 + lane % 16, dp * 2 + lane / 16));
        mma_16816<T>(o[2 * dp], pf, vf[0], vf[1]);
        mma_16816<T>(o[2 * dp + 1], pf, vf[2], vf[3]);
      }
    }
  }
  cp_async_wait<0>();  // nothing may be in flight when the block exits (no tiles: Q only)

  // l over the 4 lanes of the row; rows that saw no key (l = 0) are written as zeros.
#pragma unroll
  for (int offset = 1; offset < 4; offset *= 2) {
    l_a += __shfl_xor_sync(kFullMask, l_a, offset);
    l_b += __shfl_xor_sync(kFullMask, l_b, offset);
  }
  T* out = static_cast<T*>(p.out);
  auto store_row = [&](int row, float sum, int first) {
    if (row >= p.rows) return;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    T* dst = out + out_row_offset(p, b, kv_head, row);
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      const std::uint32_t word = pack2<T>(o[dt][first] * inv, o[dt][first + 1] * inv);
      *reinterpret_cast<std::uint32_t*>(dst + dt * 8 + 2 * tig) = word;
    }
  };
  store_row(row_a, l_a, 0);
  store_row(row_b, l_b, 2);
}

template <class T, int D>
cudaError_t launch(const AttentionView& view, cudaStream_t stream) {
  constexpr std::size_t kSmem = prefill_smem_bytes<D>();
  static const bool configured = [] {
    KVCACHE_CUDA_CHECK(cudaFuncSetAttribute(prefill_attention_kernel<T, D>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kSmem)));
    return true;
  }();
  (void)configured;
  const int row_blocks = (view.rows + kBlockRows - 1) / kBlockRows;
  const std::int64_t blocks =
      static_cast<std::int64_t>(row_blocks) * view.batch * view.num_kv_heads;
  KVCACHE_CHECK(blocks <= std::numeric_limits<int>::max(),
                "cuda::attention: expected fewer than 2^31 blocks, got ", blocks);
  prefill_attention_kernel<T, D>
      <<<static_cast<unsigned>(blocks), kPrefillThreads, kSmem, stream>>>(view, row_blocks);
  return cudaGetLastError();
}

}  // namespace

bool prefill_supported(const AttentionView& view, DType dtype) {
  return (dtype == DType::kBFloat16 || dtype == DType::kFloat16) &&
         (view.head_dim == 64 || view.head_dim == 128) && rows_are_16b_aligned(view, dtype);
}

cudaError_t launch_prefill_attention(const AttentionView& view, DType dtype, cudaStream_t stream) {
  return dispatch_float(dtype, "cuda::attention", [&](auto type_tag) -> cudaError_t {
    using T = decltype(type_tag);
    if constexpr (std::is_same_v<T, float>) {
      KVCACHE_FAIL("cuda::attention: the tensor-core prefill serves float16 and bfloat16 only");
    } else {
      return dispatch_head_dim(view.head_dim, "cuda::attention", [&](auto dim) -> cudaError_t {
        constexpr int D = decltype(dim)::value;
        if constexpr (D == 0) {
          KVCACHE_FAIL("cuda::attention: the tensor-core prefill serves head_dim 64 or 128, got ",
                       view.head_dim);
        } else {
          return launch<T, D>(view, stream);
        }
      });
    }
  });
}

}  // namespace kvcache::cuda::detail
