// Flash-decoding: attention for a few query positions against a long cache, bound by the bytes of
// keys and values it reads. Four kernels:
//
// - decode_mma_kernel<T, D> (float16/bfloat16, head_dim D = 64 or 128, 16-byte aligned rows): the
//   same block and pipeline structure as the next one, but the scores and P·V run on tensor cores
//   (mma.sync m16n8k16, the prefill kernel's fragment code), 16 packed rows per block; see its
//   section below. attention.cu's kUseTensorCoreDecode sends these calls back to the SIMT kernel.
// - decode_attention_kernel<T, D, R> (head_dim D = 64 or 128, 16-byte aligned rows): one block of
//   4 warps per (batch row, kv head, key split, block of R packed query rows). All R rows (the
//   kv head's query heads, times the few positions) are scored against every key the block reads,
//   so each key and value byte leaves HBM once. Each warp streams its own tiles of keys (tiles w,
//   w + 4, w + 8, ... of the block's range) through a 4-stage cp.async pipeline in its own slice
//   of shared memory, keeping ~3 tiles (12 KiB) in flight per warp, ~36-48 KiB per SM, which is
//   what HBM3e's latency × bandwidth asks for. The warps never wait for each other inside the
//   loop; each keeps its own online-softmax state, and the four are combined once at the end.
// - generic_attention_kernel<T> (any even head_dim up to 256, any alignment, decode or prefill):
//   a plain SIMT flash-attention, 16 packed rows per block, tiles of 32 keys widened to float32 in
//   shared memory. The float32 prefill and the odd shapes of the tests run here.
// - merge_partials_kernel<T>: when a long context is split across blocks (so that batch × kv
//   heads alone does not leave SMs idle), each split leaves (max, sum, unnormalised output) per
//   row and this kernel rescales them to the common max and normalises, one warp per row.
//
// Numerics: scores are q·k · scale · log2(e) in float32 (the factor folded into q), softmax is
// exp2 of the score minus the running max, accumulation is float32; a row that sees no key keeps
// max = -inf and sum = 0 and is written as zeros. Within a lane, every exp2 is guarded so that
// -inf - -inf never appears.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "attention.cuh"
#include "check.cuh"
#include "dtype.cuh"
#include "quant_kv.cuh"

namespace kvcache::cuda::detail {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr unsigned kFullMask = 0xffffffffu;

// --- 16-byte chunks to float32 -------------------------------------------------------------------

__device__ __forceinline__ void chunk_to_float(const float* p, float (&f)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  f[0] = v.x;
  f[1] = v.y;
  f[2] = v.z;
  f[3] = v.w;
}

__device__ __forceinline__ void chunk_to_float(const __nv_bfloat16* p, float (&f)[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    __nv_bfloat162 pair;
    static_assert(sizeof(pair) == sizeof(unsigned));
    __builtin_memcpy(&pair, &words[k], sizeof(pair));
    const float2 two = __bfloat1622float2(pair);
    f[2 * k] = two.x;
    f[2 * k + 1] = two.y;
  }
}

__device__ __forceinline__ void chunk_to_float(const __half* p, float (&f)[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    __half2 pair;
    static_assert(sizeof(pair) == sizeof(unsigned));
    __builtin_memcpy(&pair, &words[k], sizeof(pair));
    const float2 two = __half22float2(pair);
    f[2 * k] = two.x;
    f[2 * k + 1] = two.y;
  }
}

// --- the flash-decoding kernel
// ---------------------------------------------------------------------

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeStages = 4;
constexpr int kDecodeTileBytes = 2048;  // one warp's key (or value) tile in one stage
// Shared memory of one block: per warp, kDecodeStages × (key tile, value tile).
constexpr int kDecodeSmemBytes = kDecodeWarps * kDecodeStages * 2 * kDecodeTileBytes;  // 64 KiB

// E consecutive elements at p (16-byte aligned, E a multiple of one chunk) as float32.
template <int E, class T>
__device__ __forceinline__ void run_to_float(const T* p, float (&f)[E]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  static_assert(E % kPer == 0);
#pragma unroll
  for (int c = 0; c < E / kPer; ++c) {
    float part[kPer];
    chunk_to_float(p + c * kPer, part);
#pragma unroll
    for (int e = 0; e < kPer; ++e) f[c * kPer + e] = part[e];
  }
}

// --- pieces both SIMT decode kernels share ------------------------------------------------------
//
// The decode kernel and the quantized decode kernel give each lane E channels (at column col) of
// a key row, D / E lanes (LPK) to a key, and hold per lane: q[R][E], the block's R packed query
// rows pre-scaled; m, l and acc[R][E], an online softmax over the lane group's keys (m alike in
// every lane of the warp).

// Loads q (rows past p.rows are zeros that see no key) and each row's visible keys
// [first, limit]; returns the largest limit.
template <class T, int E, int R>
__device__ __forceinline__ int load_query_slice(const AttentionView& p, int b, int kv_head,
                                                int row0, int col, float (&q)[R][E],
                                                int (&limit)[R], int (&first)[R]) {
  int max_limit = -1;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = row0 + r;
    if (row < p.rows) {
      const T* src = static_cast<const T*>(p.query) + query_row_offset(p, b, kv_head, row);
      float f[E];
      run_to_float<E>(src + col, f);
#pragma unroll
      for (int e = 0; e < E; ++e) q[r][e] = f[e] * p.scale_log2;
      limit[r] = row_key_limit(p, row);
      first[r] = row_key_first(p, row);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) q[r][e] = 0.0f;
      limit[r] = -1;
      first[r] = 0;
    }
    max_limit = max(max_limit, limit[r]);
  }
  return max_limit;
}

// The scores of one pass: this lane group's key `key` (its E channels in kf) against the R rows,
// reduced over the LPK lanes of the key, -inf where the key is past key_end, padding, or outside
// a row's [first, limit].
template <int R, int E, int LPK>
__device__ __forceinline__ void score_pass(const float (&q)[R][E], const float (&kf)[E], int key,
                                           int key_end, const std::uint8_t* mask_row,
                                           const int (&limit)[R], const int (&first)[R],
                                           float (&s)[R]) {
  float dot[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    dot[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) dot[r] = fmaf(q[r][e], kf[e], dot[r]);
  }
#pragma unroll
  for (int offset = LPK / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int r = 0; r < R; ++r) dot[r] += __shfl_xor_sync(kFullMask, dot[r], offset);
  }
  const bool attend = key < key_end && (mask_row == nullptr || __ldg(mask_row + key) != 0);
#pragma unroll
  for (int r = 0; r < R; ++r)
    s[r] = attend && key <= limit[r] && key >= first[r] ? dot[r] : kNegInf;
}

// Online softmax over one tile of P passes: the tile max is reduced over the warp's lane groups,
// m moves to it, l and acc are rescaled, and s[pass][r] becomes the probability (0 for -inf).
template <int R, int P, int E, int LPK>
__device__ __forceinline__ void softmax_tile(float (&s)[P][R], float (&m)[R], float (&l)[R],
                                             float (&acc)[R][E]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float tile_max = s[0][r];
#pragma unroll
    for (int pass = 1; pass < P; ++pass) tile_max = fmaxf(tile_max, s[pass][r]);
#pragma unroll
    for (int offset = LPK; offset < 32; offset *= 2)
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, offset));
    const float m_new = fmaxf(m[r], tile_max);
    // m_new == -inf: nothing seen yet, everything is still 0 (and -inf - -inf must not happen).
    const float alpha = m_new == kNegInf ? 1.0f : exp2f(m[r] - m_new);
    m[r] = m_new;
    l[r] *= alpha;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[r][e] *= alpha;
#pragma unroll
    for (int pass = 0; pass < P; ++pass) {
      s[pass][r] = s[pass][r] == kNegInf ? 0.0f : exp2f(s[pass][r] - m_new);
      l[r] += s[pass][r];
    }
  }
}

// acc[r] += p · v for one pass (vf: the pass's value channels of this lane).
template <int R, int E>
__device__ __forceinline__ void accumulate_pass(const float (&prob)[R], const float (&vf)[E],
                                                float (&acc)[R][E]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int e = 0; e < E; ++e) acc[r][e] = fmaf(prob[r], vf[e], acc[r][e]);
  }
}

// Floats of shared memory combine_warps needs.
template <int D, int R>
constexpr int combine_floats() {
  return kDecodeWarps * R * D + 2 * kDecodeWarps * R;
}

// The end of a block: l and acc summed over the lane groups of each warp, the 4 warps' states
// combined through `red` (combine_floats<D, R>() floats; every warp must be done with what `red`
// overlays), and the block's rows written to `out` (one split) or to its partial.
template <class T, int D, int R, int E, int LPK>
__device__ __forceinline__ void combine_warps(const AttentionView& p, const SplitPlan& plan,
                                              float* red, int unit, int split, int b, int kv_head,
                                              int row0, float (&m)[R], float (&l)[R],
                                              float (&acc)[R][E], float* __restrict__ partial_out,
                                              float2* __restrict__ partial_stats) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int chunk = lane % LPK;
#pragma unroll
  for (int offset = LPK; offset < 32; offset *= 2) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      l[r] += __shfl_xor_sync(kFullMask, l[r], offset);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[r][e] += __shfl_xor_sync(kFullMask, acc[r][e], offset);
    }
  }

  allow_dependent_launch();
  __syncthreads();  // every warp is done with what `red` overlays

  //   red_out   [kDecodeWarps][R][D]  each warp's acc
  //   red_max   [kDecodeWarps][R]     each warp's m
  //   red_sum   [kDecodeWarps][R]     each warp's l
  float* red_out = red;
  float* red_max = red_out + kDecodeWarps * R * D;
  float* red_sum = red_max + kDecodeWarps * R;
  if (lane < LPK) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int e = 0; e < E; ++e) red_out[(warp * R + r) * D + chunk * E + e] = acc[r][e];
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      red_max[warp * R + r] = m[r];
      red_sum[warp * R + r] = l[r];
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out);
  for (int idx = static_cast<int>(threadIdx.x); idx < R * D; idx += kDecodeThreads) {
    const int r = idx / D, d = idx % D, row = row0 + r;
    if (row >= p.rows) continue;
    float block_max = kNegInf;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) block_max = fmaxf(block_max, red_max[w * R + r]);
    float o = 0.0f, sum = 0.0f;
    if (block_max != kNegInf) {
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float f = exp2f(red_max[w * R + r] - block_max);  // exp2(-inf) = 0: empty warp
        o = fmaf(f, red_out[(w * R + r) * D + d], o);
        sum = fmaf(f, red_sum[w * R + r], sum);
      }
    }
    if (plan.splits == 1) {
      // sum >= 1 whenever a key was seen (the max key contributes exp2(0)); else zeros.
      out[out_row_offset(p, b, kv_head, row) + d] = from_f32<T>(sum > 0.0f ? o / sum : 0.0f);
    } else {
      const std::int64_t prow =
          (static_cast<std::int64_t>(unit) * plan.splits + split) * p.rows + row;
      partial_out[prow * D + d] = o;
      if (d == 0) partial_stats[prow] = make_float2(block_max, sum);
    }
  }
}

// One block of a split launch: blockIdx.x = (unit · splits + split) · row_blocks + row_block,
// unit = b · num_kv_heads + kv_head (the row blocks of one split read the same keys side by side),
// and the bases of its batch row and kv head. Sets p.kv_len to the step's key count, so every
// later use sees it.
template <class T>
struct SplitBlock {
  int unit, split, b, kv_head, row0;  // unit = b · num_kv_heads + kv_head; row0: first query row
  const T* key_base;
  const T* value_base;
  const std::uint8_t* mask_row;  // null without a padding mask
};

template <class T>
__device__ __forceinline__ SplitBlock<T> split_block(AttentionView& p, const SplitPlan& plan,
                                                     int rows_per_block) {
  int index = static_cast<int>(blockIdx.x);
  const int row_block = index % plan.row_blocks;
  index /= plan.row_blocks;
  const int split = index % plan.splits;
  const int unit = index / plan.splits;
  const int b = unit / p.num_kv_heads, kv_head = unit % p.num_kv_heads;
  p.kv_len = visible_keys(p);
  return {unit,
          split,
          b,
          kv_head,
          row_block * rows_per_block,
          static_cast<const T*>(p.keys) + b * p.k_stride_batch + kv_head * p.k_stride_head,
          static_cast<const T*>(p.values) + b * p.v_stride_batch + kv_head * p.v_stride_head,
          p.mask ? p.mask + b * p.mask_stride : nullptr};
}

// The block's keys [begin, end): its split, cut at the causal frontier of its rows (max_limit, the
// last key any of them sees).
__device__ __forceinline__ int2 split_keys(const AttentionView& p, const SplitPlan& plan, int split,
                                           int max_limit) {
  const int begin = split * plan.keys_per_split;
  return make_int2(begin, min(min(p.kv_len, begin + plan.keys_per_split), max_limit + 1));
}

// How many of the tiles of tile_keys keys over [begin, end) warp `warp` of `warps` takes (tiles
// warp, warp + warps, ...).
__device__ __forceinline__ int warp_tiles(int2 keys, int tile_keys, int warp, int warps) {
  const int tiles = keys.y > keys.x ? (keys.y - keys.x + tile_keys - 1) / tile_keys : 0;
  return tiles > warp ? (tiles - warp + warps - 1) / warps : 0;
}

// How a warp covers key rows of D elements of T: each lane owns one 16-byte chunk of a row, the
// kLanesPerKey lanes of a row reduce their partial dot products with shuffles, and a warp covers
// kKeysPerPass keys at once. Every tile takes kPasses passes (4 for every T and D here).
template <class T, int D>
struct DecodeShape {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));  // elements per chunk
  static constexpr int kLanesPerKey = D / kElems;                  // 8, 16 or 32
  static constexpr int kKeysPerPass = 32 / kLanesPerKey;           // 4, 2 or 1
  static constexpr int kTileKeys = kDecodeTileBytes / (D * static_cast<int>(sizeof(T)));
  static constexpr int kPasses = kTileKeys / kKeysPerPass;
  static constexpr int kChunksPerLane = kDecodeTileBytes / 16 / 32;  // cp.async per lane per tile
  static constexpr int kBlockKeys = kTileKeys * kDecodeWarps;        // keys of one block round
  static_assert(kLanesPerKey >= 1 && kLanesPerKey <= 32 && 32 % kLanesPerKey == 0);
  static_assert(kTileKeys % kKeysPerPass == 0 && kPasses >= 1);
};

template <class T, int D, int R>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_attention_kernel(AttentionView p, const SplitPlan plan, float* __restrict__ partial_out,
                            float2* __restrict__ partial_stats) {
  grid_dependency_wait();  // launched overlapped: q, the keys and values are earlier kernels'
  using S = DecodeShape<T, D>;
  constexpr int E = S::kElems, LPK = S::kLanesPerKey, KPP = S::kKeysPerPass;
  // Pipeline buffers; reused at the end for the cross-warp combine (see below).
  extern __shared__ __align__(16) unsigned char smem[];

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int chunk = lane % LPK;        // the 16-byte chunk of a row this lane reads
  const int key_in_pass = lane / LPK;  // which of the pass's keys this lane's group reads

  const SplitBlock<T> blk = split_block<T>(p, plan, R);  // sets p.kv_len
  const int b = blk.b, kv_head = blk.kv_head, row0 = blk.row0, split = blk.split, unit = blk.unit;

  // This lane's chunk of the block's R query rows, in registers, pre-scaled:
  //   q[r][e] = query[b, h(row0 + r), i(row0 + r), chunk · E + e] · scale · log2(e).
  // key j is visible to row r iff first[r] <= j <= limit[r] (and not padding).
  float q[R][E];
  int limit[R], first[R];
  const int max_limit = load_query_slice<T, E, R>(p, b, kv_head, row0, chunk * E, q, limit, first);

  const int2 keys = split_keys(p, plan, split, max_limit);  // the block's [begin, end)
  const int key_begin = keys.x, key_end = keys.y;
  const int my_tiles = warp_tiles(keys, S::kTileKeys, warp, kDecodeWarps);

  const T *key_base = blk.key_base, *value_base = blk.value_base;
  const std::uint8_t* mask_row = blk.mask_row;

  // This warp's slice: stage s holds the key tile [kTileKeys][D] at s · 2 · kTileBytes and the
  // value tile right after it, rows packed (row k of the tile = key key0 + k), unswizzled: a pass
  // reads 32 consecutive 16-byte chunks, which no two lanes share a bank for.
  unsigned char* const warp_smem = smem + warp * (kDecodeStages * 2 * kDecodeTileBytes);

  // Tile `local` of this warp is block tile warp + local · kDecodeWarps.
  auto tile_key0 = [&](int local) {
    return key_begin + (warp + local * kDecodeWarps) * S::kTileKeys;
  };
  auto load_tile = [&](int stage, int local) {
    unsigned char* key_tile = warp_smem + stage * 2 * kDecodeTileBytes;
    unsigned char* value_tile = key_tile + kDecodeTileBytes;
    const int key0 = tile_key0(local);
#pragma unroll
    for (int c = 0; c < S::kChunksPerLane; ++c) {
      const int flat = c * 32 + lane;  // chunk index inside the tile: row flat / LPK
      const int key = key0 + flat / LPK;
      const bool in_range = key < key_end;
      const std::int64_t row = in_range ? key : key_begin;  // any valid row when zero-filling
      const int col = (flat % LPK) * E;
      cp_async_16(key_tile + flat * 16, key_base + row * p.k_stride_seq + col, in_range);
      cp_async_16(value_tile + flat * 16, value_base + row * p.v_stride_seq + col, in_range);
    }
  };

  // Online softmax state of this lane: m is the same in every lane of the warp (the tile max is
  // reduced over the warp); l and acc hold this lane group's keys only and are reduced over the
  // groups at the end.
  float m[R], l[R], acc[R][E];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[r][e] = 0.0f;
  }

  // Prologue: the first kDecodeStages - 1 tiles. One commit group per tile (empty groups past the
  // end keep the group count, and so the wait below, uniform).
#pragma unroll
  for (int s = 0; s < kDecodeStages - 1; ++s) {
    if (s < my_tiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int local = 0; local < my_tiles; ++local) {
    // Refill the stage the previous iteration consumed (every lane is past it: __syncwarp below).
    const int ahead = local + kDecodeStages - 1;
    if (ahead < my_tiles) load_tile(ahead % kDecodeStages, ahead);
    cp_async_commit();
    cp_async_wait<kDecodeStages - 1>();  // this lane's copies of tile `local` have landed
    __syncwarp();                        // ... and every other lane's

    const unsigned char* key_tile = warp_smem + (local % kDecodeStages) * 2 * kDecodeTileBytes;
    const T* keys_s = reinterpret_cast<const T*>(key_tile);
    const T* values_s = reinterpret_cast<const T*>(key_tile + kDecodeTileBytes);
    const int key0 = tile_key0(local);

    // Scores of this lane group's keys, one per pass: s[pass][r] = q[r] · k (scaled), or -inf.
    float s[S::kPasses][R];
#pragma unroll
    for (int pass = 0; pass < S::kPasses; ++pass) {
      const int k = pass * KPP + key_in_pass;
      float kf[E];
      chunk_to_float(keys_s + k * D + chunk * E, kf);
      score_pass<R, E, LPK>(q, kf, key0 + k, key_end, mask_row, limit, first, s[pass]);
    }
    softmax_tile<R, S::kPasses, E, LPK>(s, m, l, acc);

    // acc[r] += p · v over this lane group's keys (masked keys have p = 0 and, past the range,
    // zero-filled rows).
#pragma unroll
    for (int pass = 0; pass < S::kPasses; ++pass) {
      const int k = pass * KPP + key_in_pass;
      float vf[E];
      chunk_to_float(values_s + k * D + chunk * E, vf);
      accumulate_pass<R, E>(s[pass], vf, acc);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();
  // The pipeline buffers are reused for the cross-warp combine.
  static_assert(combine_floats<D, R>() * 4 <= kDecodeSmemBytes);
  combine_warps<T, D, R, E, LPK>(p, plan, reinterpret_cast<float*>(smem), unit, split, b, kv_head,
                                 row0, m, l, acc, partial_out, partial_stats);
}

// --- the quantized decode kernel
// ----------------------------------------------------------------------------
//
// decode_quant_kernel<T, D, R> (a QuantizedCache layer, attention_quantized: head_dim D = 64 or
// 128, word-aligned blocks (QuantBlocksView::vec), 16-byte aligned residual rows, q_len <=
// kMaxDecodeQLen): the decode kernel's shape, one block of 4 warps per (batch row, kv head, key
// split, block of R packed query rows), each warp on its own tiles (w, w + 4, ...) with its own
// online softmax, the warps combined once at the end. Each lane owns a run of 8 channels of a key
// (D / 8 lanes per key, 32 / (D / 8) keys per pass) and nothing is staged in shared memory: for
// every pass of a tile the lane loads its run's codes (one word) and their scales and minimums
// from global memory, all before it uses any, and dequantizes in registers (code · scale + min,
// the CPU's expression). Per-channel key metas are the same for every token of a key block: where
// blocks hold whole tiles the lane keeps them in registers and reloads them once a block. Keys
// from qb.tokens on are the full-precision residual, read 16 bytes at a time.
constexpr int kQuantPasses = 2;  // passes per tile: the loads of 2 keys in flight per lane

template <int D>
struct QuantDecodeShape {
  static constexpr int kElems = 8;                        // channels per lane
  static constexpr int kLanesPerKey = D / kElems;         // 8 or 16
  static constexpr int kKeysPerPass = 32 / kLanesPerKey;  // 4 or 2
  static constexpr int kTileKeys = kKeysPerPass * kQuantPasses;
  static constexpr int kBlockKeys = kTileKeys * kDecodeWarps;  // keys of one block round
};

template <class T, int D, int R>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_quant_kernel(AttentionView p, const SplitPlan plan, float* __restrict__ partial_out,
                        float2* __restrict__ partial_stats, const QuantBlocksView qb) {
  grid_dependency_wait();  // launched overlapped: q and the residual are earlier kernels'
  using S = QuantDecodeShape<D>;
  constexpr int E = S::kElems, LPK = S::kLanesPerKey, KPP = S::kKeysPerPass, P = kQuantPasses;
  __shared__ float red[combine_floats<D, R>()];

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int c0 = (lane % LPK) * E;     // this lane's channels [c0, c0 + 8)
  const int key_in_pass = lane / LPK;  // which of the pass's keys this lane's group reads

  const SplitBlock<T> blk = split_block<T>(p, plan, R);  // sets p.kv_len
  const int b = blk.b, kv_head = blk.kv_head, row0 = blk.row0, split = blk.split, unit = blk.unit;

  float q[R][E];
  int limit[R], first[R];
  const int max_limit = load_query_slice<T, E, R>(p, b, kv_head, row0, c0, q, limit, first);
  const int2 keys = split_keys(p, plan, split, max_limit);  // the block's [begin, end)
  const int key_begin = keys.x, key_end = keys.y;
  const int my_tiles = warp_tiles(keys, S::kTileKeys, warp, kDecodeWarps);

  const T *key_base = blk.key_base, *value_base = blk.value_base;
  const std::uint8_t* mask_row = blk.mask_row;

  float m[R], l[R], acc[R][E];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[r][e] = 0.0f;
  }

  // Per-channel keys in blocks of whole tiles (chunk a multiple of kTileKeys; tiles start at
  // multiples of it, and qb.tokens is a multiple of chunk): a tile lies in one key block, so the
  // lane keeps its 8 channels' (scale, min) of that block in registers, reloaded only when the
  // block changes, and a pass loads one code word for its key.
  const bool cached_metas = qb.keys_per_channel && qb.chunk % S::kTileKeys == 0;
  int meta_block = -1;
  float2 kmeta[E];
  const unsigned char* kcodes = nullptr;  // the key block's codes
  const unsigned char* vblock = nullptr;  // the value block's first token record
  const unsigned code_mask = (1u << qb.nbits) - 1u;
  // Within a value token record: this lane's (scale, min) and its first code byte.
  const int vmeta_at = (c0 / qb.token_group) * qb.meta_bytes;
  const int vcodes_at = (qb.head_dim / qb.token_group) * qb.meta_bytes + (c0 * qb.nbits) / 8;

  for (int local = 0; local < my_tiles; ++local) {
    const int key0 = key_begin + (warp + local * kDecodeWarps) * S::kTileKeys;
    if (cached_metas && key0 < qb.tokens) {  // warp-uniform
      const int block = key0 / qb.chunk;
      if (block != meta_block) {
        meta_block = block;
        const unsigned char* rec =
            qb.keys + b * qb.key_row_stride +
            (static_cast<std::int64_t>(block) * qb.heads + kv_head) * qb.key_head_bytes;
#pragma unroll
        for (int e = 0; e < E; ++e)
          kmeta[e] = quant_meta_aligned(rec + (c0 + e) * qb.meta_bytes, qb.meta_bytes);
        kcodes = rec + qb.head_dim * qb.meta_bytes;
        vblock = qb.values + b * qb.value_row_stride +
                 (static_cast<std::int64_t>(block) * qb.heads + kv_head) * qb.value_head_bytes;
      }
    }
    // Every pass's run of keys and values first (zeros past the range: p = 0 there, and 0 · 0
    // keeps the sum clean), then the math.
    float kf[P][E], vf[P][E];
#pragma unroll
    for (int pass = 0; pass < P; ++pass) {
      const int key = key0 + pass * KPP + key_in_pass;
      if (key < key_end && key < qb.tokens) {
        if (cached_metas) {  // quant_key8's and quant_value8's arithmetic, no division
          const int i = key - meta_block * qb.chunk;
          const unsigned long long kbits =
              quant_codes8(kcodes + ((i * qb.head_dim + c0) * qb.nbits) / 8, qb.nbits);
          const unsigned char* vrec = vblock + i * qb.token_record;
          const float2 vmeta = quant_meta_aligned(vrec + vmeta_at, qb.meta_bytes);
          const unsigned long long vbits = quant_codes8(vrec + vcodes_at, qb.nbits);
#pragma unroll
          for (int e = 0; e < E; ++e) {
            kf[pass][e] =
                static_cast<float>(static_cast<unsigned>(kbits >> (e * qb.nbits)) & code_mask) *
                    kmeta[e].x +
                kmeta[e].y;
            vf[pass][e] =
                static_cast<float>(static_cast<unsigned>(vbits >> (e * qb.nbits)) & code_mask) *
                    vmeta.x +
                vmeta.y;
          }
        } else {
          const Quant8 kq = quant_key8(qb, b, kv_head, key, c0);
          const Quant8 vq = quant_value8(qb, b, kv_head, key, c0);
#pragma unroll
          for (int e = 0; e < E; ++e) {
            kf[pass][e] = kq.x[e];
            vf[pass][e] = vq.x[e];
          }
        }
      } else if (key < key_end) {
        const std::int64_t r = key - qb.tokens;
        run_to_float<E>(key_base + r * p.k_stride_seq + c0, kf[pass]);
        run_to_float<E>(value_base + r * p.v_stride_seq + c0, vf[pass]);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) kf[pass][e] = vf[pass][e] = 0.0f;
      }
    }
    float s[P][R];
#pragma unroll
    for (int pass = 0; pass < P; ++pass) {
      score_pass<R, E, LPK>(q, kf[pass], key0 + pass * KPP + key_in_pass, key_end, mask_row, limit,
                            first, s[pass]);
    }
    softmax_tile<R, P, E, LPK>(s, m, l, acc);
#pragma unroll
    for (int pass = 0; pass < P; ++pass) accumulate_pass<R, E>(s[pass], vf[pass], acc);
  }
  combine_warps<T, D, R, E, LPK>(p, plan, red, unit, split, b, kv_head, row0, m, l, acc,
                                 partial_out, partial_stats);
}

// --- the tensor-core flash-decoding kernel -------------------------------------------------------
//
// decode_mma_kernel<T, D> (float16/bfloat16, head_dim 64 or 128, 16-byte aligned rows): one block
// of 4 warps per (batch row, kv head, key split, block of 16 packed query rows). Every warp holds
// the block's 16 rows as the A operand of mma.sync m16n8k16 in registers (rows past p.rows are
// zeros and see no key) and streams its own key tiles (tiles w, w + 4, ... of the block's range)
// through a 3-stage cp.async pipeline in its own slice of shared memory, exactly as the SIMT
// decode kernel does, so the warps never wait for each other inside the loop. Per tile (16 keys
// at D = 128, 32 at D = 64; 8 KiB of keys and values), the fragment code of the tensor-core
// prefill (prefill_attention.cu):
//   S = Q·Kᵀ      K fragments by ldmatrix from the swizzled tile, float32 accumulators;
//   mask          key < key_end (the split's end and the causal frontier), key <= the row's
//                 causal limit, and the padding mask; masked scores are -inf;
//   softmax       online, float32, on the accumulator fragments (a row lives in 4 lanes);
//   O += P·V      P rounded to T in registers (the S accumulators are the A operand of P·V), V
//                 fragments by ldmatrix.trans.
// The 4 warps' states are combined once at the end through shared memory, and the block writes
// `out` (one split) or its partial in the layout merge_partials_kernel reads, like the SIMT kernel.
// 16 rows per mma although decode often has only group · q_len = 4: the tensor cores have ~50×
// the throughput this needs, what matters is the few instructions per key.

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaRows = 16;         // packed query rows per block (one m16 tile)
constexpr int kMmaStages = 3;        // per-warp pipeline depth
constexpr int kMmaTileBytes = 4096;  // one warp's key (or value) tile in one stage
constexpr int kMmaSmemBytes = kMmaWarps * kMmaStages * 2 * kMmaTileBytes;  // 96 KiB: 2 blocks/SM

template <int D>
struct MmaShape {
  static constexpr int kChunks = D / 8;                            // 16-byte chunks per row
  static constexpr int kTileKeys = kMmaTileBytes / (D * 2);        // 16 (D = 128) or 32 (D = 64)
  static constexpr int kKeyTiles = kTileKeys / 8;                  // n-tiles of S
  static constexpr int kKeySteps = kTileKeys / 16;                 // k-steps of P·V
  static constexpr int kDimSteps = D / 16;                         // k-steps of S
  static constexpr int kDimTiles = D / 8;                          // n-tiles of O
  static constexpr int kChunksPerLane = kTileKeys * kChunks / 32;  // cp.async per lane per operand
  static constexpr int kBlockKeys = kTileKeys * kMmaWarps;         // keys of one block round
  static_assert(kTileKeys % 16 == 0 && kChunksPerLane >= 1);
};

template <class T, int D>
__global__ void __launch_bounds__(kMmaThreads, 2)
    decode_mma_kernel(AttentionView p, const SplitPlan plan, float* __restrict__ partial_out,
                      float2* __restrict__ partial_stats) {
  grid_dependency_wait();  // launched overlapped: q, the keys and values are earlier kernels'
  using S = MmaShape<D>;
  extern __shared__ __align__(128) unsigned char mma_smem[];

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int group_id = lane >> 2, tig = lane & 3;  // the mma fragment coordinates

  const SplitBlock<T> blk = split_block<T>(p, plan, kMmaRows);  // sets p.kv_len
  const int b = blk.b, kv_head = blk.kv_head, row0 = blk.row0, split = blk.split, unit = blk.unit;

  // This thread's two rows in the fragment layouts: row0 + group_id (a) and row0 + group_id + 8.
  const int row_a = row0 + group_id, row_b = row_a + 8;
  const bool valid_a = row_a < p.rows, valid_b = row_b < p.rows;
  int limit_a = valid_a ? row_key_limit(p, row_a) : -1;
  int limit_b = valid_b ? row_key_limit(p, row_b) : -1;
  const int first_a = valid_a ? row_key_first(p, row_a) : 0;  // the sliding window's first key
  const int first_b = valid_b ? row_key_first(p, row_b) : 0;
  // Every warp holds the same 16 rows: the block's frontier is the max over one warp.
  const int max_limit = __reduce_max_sync(kFullMask, max(limit_a, limit_b));

  const int2 keys = split_keys(p, plan, split, max_limit);  // the block's [begin, end)
  const int key_begin = keys.x, key_end = keys.y;
  // Clamped to the block's keys, the limits alone decide the range: key j of a tile is in range
  // and causally visible to row a iff j <= limit_a (j >= key_begin always holds).
  limit_a = min(limit_a, key_end - 1);
  limit_b = min(limit_b, key_end - 1);
  const int my_tiles = warp_tiles(keys, S::kTileKeys, warp, kMmaWarps);

  // A fragments of Q (16 rows × D), straight from global memory: for k-step ks,
  //   [0] = Q[a][ks·16 + 2·tig, +1], [1] = Q[b][same], [2] = Q[a][ks·16 + 8 + 2·tig, +1],
  //   [3] = Q[b][same]; zeros for rows past p.rows.
  std::uint32_t q_frag[S::kDimSteps][4];
  {
    const T* query = static_cast<const T*>(p.query);
    const T* qa = valid_a ? query + query_row_offset(p, b, kv_head, row_a) : nullptr;
    const T* qb = valid_b ? query + query_row_offset(p, b, kv_head, row_b) : nullptr;
#pragma unroll
    for (int ks = 0; ks < S::kDimSteps; ++ks) {
      const int d0 = ks * 16 + 2 * tig;
      q_frag[ks][0] = qa ? *reinterpret_cast<const std::uint32_t*>(qa + d0) : 0u;
      q_frag[ks][1] = qb ? *reinterpret_cast<const std::uint32_t*>(qb + d0) : 0u;
      q_frag[ks][2] = qa ? *reinterpret_cast<const std::uint32_t*>(qa + d0 + 8) : 0u;
      q_frag[ks][3] = qb ? *reinterpret_cast<const std::uint32_t*>(qb + d0 + 8) : 0u;
    }
  }

  const T *key_base = blk.key_base, *value_base = blk.value_base;
  const std::uint8_t* mask_row = blk.mask_row;

  // This warp's slice: stage s holds the key tile [kTileKeys][D] (swizzled) at s · 2 · kTileBytes
  // and the value tile right after it.
  unsigned char* const warp_smem = mma_smem + warp * (kMmaStages * 2 * kMmaTileBytes);
  auto tile_key0 = [&](int local) { return key_begin + (warp + local * kMmaWarps) * S::kTileKeys; };
  // Rows past key_end are zero-filled: never stale memory in P·V (their p is 0 as well).
  auto load_tile = [&](int stage, int local) {
    T* keys_dst = reinterpret_cast<T*>(warp_smem + stage * 2 * kMmaTileBytes);
    T* values_dst = reinterpret_cast<T*>(warp_smem + stage * 2 * kMmaTileBytes + kMmaTileBytes);
    const int key0 = tile_key0(local);
#pragma unroll
    for (int c = 0; c < S::kChunksPerLane; ++c) {
      const int flat = c * 32 + lane;
      const int r = flat / S::kChunks, chunk = flat % S::kChunks, key = key0 + r;
      const bool in_range = key < key_end;
      const std::int64_t at = in_range ? key : key_begin;  // any valid row when zero-filling
      const int dst = swizzled<D>(r, chunk);
      cp_async_16(keys_dst + dst, key_base + at * p.k_stride_seq + chunk * 8, in_range);
      cp_async_16(values_dst + dst, value_base + at * p.v_stride_seq + chunk * 8, in_range);
    }
  };

  float o[S::kDimTiles][4];  // O rows (a: [0], [1]; b: [2], [3]), dims dt · 8 + 2 · tig, + 1
#pragma unroll
  for (int dt = 0; dt < S::kDimTiles; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m_a = kNegInf, m_b = kNegInf, l_a = 0.0f, l_b = 0.0f;

  // Prologue: the first kMmaStages - 1 tiles, one commit group per tile (empty groups past the
  // end keep the group count, and so the wait below, uniform).
#pragma unroll
  for (int s = 0; s < kMmaStages - 1; ++s) {
    if (s < my_tiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int local = 0; local < my_tiles; ++local) {
    // Refill the stage the previous iteration consumed (every lane is past it: __syncwarp below).
    const int ahead = local + kMmaStages - 1;
    if (ahead < my_tiles) load_tile(ahead % kMmaStages, ahead);
    cp_async_commit();
    cp_async_wait<kMmaStages - 1>();  // this lane's copies of tile `local` have landed
    __syncwarp();                     // ... and every other lane's

    const unsigned char* stage_smem = warp_smem + (local % kMmaStages) * 2 * kMmaTileBytes;
    const T* keys_s = reinterpret_cast<const T*>(stage_smem);
    const T* values_s = reinterpret_cast<const T*>(stage_smem + kMmaTileBytes);
    const int key0 = tile_key0(local);

    // S = Q·Kᵀ: 16 rows × kTileKeys keys.
    float s[S::kKeyTiles][4];
#pragma unroll
    for (int nt = 0; nt < S::kKeyTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < S::kDimSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < S::kKeyTiles / 2; ++np) {
        // B fragments of key tiles 2np, 2np + 1: matrices (keys 0-7, dims 0-7), (0-7, 8-15),
        // (8-15, 0-7), (8-15, 8-15) of the pair's 16 keys and the k-step's 16 dims.
        std::uint32_t kf[4];
        const int key = np * 16 + (lane / 16) * 8 + lane % 8;
        ldmatrix_x4(kf, keys_s + swizzled<D>(key, ks * 2 + (lane / 8) % 2));
        mma_16816<T>(s[2 * np], q_frag[ks], kf[0], kf[1]);
        mma_16816<T>(s[2 * np + 1], q_frag[ks], kf[2], kf[3]);
      }
    }

    // Scale and mask: s[nt][e] is row (e < 2 ? a : b), key key0 + nt · 8 + 2 · tig + (e & 1).
#pragma unroll
    for (int nt = 0; nt < S::kKeyTiles; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int key = key0 + nt * 8 + 2 * tig + j;
        // key <= max(limit_a, limit_b) <= key_end - 1 keeps the mask read inside the keys.
        const bool padded =
            mask_row != nullptr && key <= max(limit_a, limit_b) && __ldg(mask_row + key) == 0;
        s[nt][j] = key <= limit_a && key >= first_a && !padded ? s[nt][j] * p.scale_log2 : kNegInf;
        s[nt][2 + j] =
            key <= limit_b && key >= first_b && !padded ? s[nt][2 + j] * p.scale_log2 : kNegInf;
      }
    }

    // Online softmax for the two rows (a row's scores live in the 4 lanes of a group_id).
    float tile_max_a = kNegInf, tile_max_b = kNegInf;
#pragma unroll
    for (int nt = 0; nt < S::kKeyTiles; ++nt) {
      tile_max_a = fmaxf(tile_max_a, fmaxf(s[nt][0], s[nt][1]));
      tile_max_b = fmaxf(tile_max_b, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int offset = 1; offset < 4; offset *= 2) {
      tile_max_a = fmaxf(tile_max_a, __shfl_xor_sync(kFullMask, tile_max_a, offset));
      tile_max_b = fmaxf(tile_max_b, __shfl_xor_sync(kFullMask, tile_max_b, offset));
    }
    const float new_a = fmaxf(m_a, tile_max_a), new_b = fmaxf(m_b, tile_max_b);
    // new == -inf: nothing seen yet, everything is still 0 (and -inf - -inf must not happen).
    const float alpha_a = new_a == kNegInf ? 1.0f : exp2f(m_a - new_a);
    const float alpha_b = new_b == kNegInf ? 1.0f : exp2f(m_b - new_b);
    m_a = new_a;
    m_b = new_b;
    l_a *= alpha_a;
    l_b *= alpha_b;
#pragma unroll
    for (int dt = 0; dt < S::kDimTiles; ++dt) {
      o[dt][0] *= alpha_a;
      o[dt][1] *= alpha_a;
      o[dt][2] *= alpha_b;
      o[dt][3] *= alpha_b;
    }
#pragma unroll
    for (int nt = 0; nt < S::kKeyTiles; ++nt) {
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
    for (int kk = 0; kk < S::kKeySteps; ++kk) {
      const std::uint32_t pf[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                                   pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < S::kDimTiles / 2; ++dp) {
        // B fragments of dim tiles 2dp, 2dp + 1, transposed from [key][dim] rows: matrices
        // (keys 0-7, dims 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
        std::uint32_t vf[4];
        ldmatrix_x4_trans(vf, values_s + swizzled<D>(kk * 16 + lane % 16, dp * 2 + lane / 16));
        mma_16816<T>(o[2 * dp], pf, vf[0], vf[1]);
        mma_16816<T>(o[2 * dp + 1], pf, vf[2], vf[3]);
      }
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // nothing in flight (empty groups only, by now) before the buffer is reused

  // l over the 4 lanes of each row.
#pragma unroll
  for (int offset = 1; offset < 4; offset *= 2) {
    l_a += __shfl_xor_sync(kFullMask, l_a, offset);
    l_b += __shfl_xor_sync(kFullMask, l_b, offset);
  }

  allow_dependent_launch();
  __syncthreads();  // every warp is done with its pipeline slice: the buffer is reused below

  // Cross-warp combine, in the same shared memory (floats):
  //   red_out   [kMmaWarps][16][D + 8]  each warp's o (rows padded against bank conflicts)
  //   red_max   [kMmaWarps][16]         each warp's m
  //   red_sum   [kMmaWarps][16]         each warp's l
  constexpr int kRedStride = D + 8;
  float* red_out = reinterpret_cast<float*>(mma_smem);
  float* red_max = red_out + kMmaWarps * kMmaRows * kRedStride;
  float* red_sum = red_max + kMmaWarps * kMmaRows;
  static_assert((kMmaWarps * kMmaRows * kRedStride + 2 * kMmaWarps * kMmaRows) * 4 <=
                kMmaSmemBytes);
  {
    float* mine_a = red_out + (warp * kMmaRows + group_id) * kRedStride;
    float* mine_b = mine_a + 8 * kRedStride;
#pragma unroll
    for (int dt = 0; dt < S::kDimTiles; ++dt) {
      const int d = dt * 8 + 2 * tig;
      *reinterpret_cast<float2*>(mine_a + d) = make_float2(o[dt][0], o[dt][1]);
      *reinterpret_cast<float2*>(mine_b + d) = make_float2(o[dt][2], o[dt][3]);
    }
    if (tig == 0) {
      red_max[warp * kMmaRows + group_id] = m_a;
      red_max[warp * kMmaRows + group_id + 8] = m_b;
      red_sum[warp * kMmaRows + group_id] = l_a;
      red_sum[warp * kMmaRows + group_id + 8] = l_b;
    }
  }
  __syncthreads();

  // Thread t combines dim pairs (2·(idx mod D/2), + 1) of row idx / (D/2).
  T* out = static_cast<T*>(p.out);
  for (int idx = static_cast<int>(threadIdx.x); idx < kMmaRows * D / 2; idx += kMmaThreads) {
    const int r = idx / (D / 2), d = 2 * (idx % (D / 2)), row = row0 + r;
    if (row >= p.rows) break;  // rows only grow with idx
    float block_max = kNegInf;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) block_max = fmaxf(block_max, red_max[w * kMmaRows + r]);
    float o0 = 0.0f, o1 = 0.0f, sum = 0.0f;
    if (block_max != kNegInf) {
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) {
        const float f = exp2f(red_max[w * kMmaRows + r] - block_max);  // exp2(-inf) = 0: empty
        const float2 v =
            *reinterpret_cast<const float2*>(red_out + (w * kMmaRows + r) * kRedStride + d);
        o0 = fmaf(f, v.x, o0);
        o1 = fmaf(f, v.y, o1);
        sum = fmaf(f, red_sum[w * kMmaRows + r], sum);
      }
    }
    if (plan.splits == 1) {
      // sum >= 1 whenever a key was seen (the max key contributes exp2(0)); else zeros.
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      *reinterpret_cast<std::uint32_t*>(out + out_row_offset(p, b, kv_head, row) + d) =
          pack2<T>(o0 * inv, o1 * inv);
    } else {
      const std::int64_t prow =
          (static_cast<std::int64_t>(unit) * plan.splits + split) * p.rows + row;
      *reinterpret_cast<float2*>(partial_out + prow * D + d) = make_float2(o0, o1);
      if (d == 0) partial_stats[prow] = make_float2(block_max, sum);
    }
  }
}

// --- the generic SIMT kernel
// -----------------------------------------------------------------------

constexpr int kGenericWarps = 4;
constexpr int kGenericThreads = kGenericWarps * 32;
constexpr int kGenericRowsPerWarp = 4;
constexpr int kGenericRows = kGenericWarps * kGenericRowsPerWarp;  // packed rows per block
constexpr int kGenericTileKeys = 32;                               // one key per lane
constexpr int kGenericMaxDimsPerLane = 256 / 32;

// Shared memory (floats) for head_dim d: q rows [16][d], key tile [32][d + 1] (odd row stride:
// lane j reads row j column c, so the 32 lanes hit 32 banks), value tile [32][d], probabilities
// [4 warps][4 rows][32].
constexpr std::size_t generic_smem_bytes(int d) {
  return sizeof(float) *
         (static_cast<std::size_t>(kGenericRows) * d + kGenericTileKeys * (d + 1) +
          kGenericTileKeys * d + kGenericWarps * kGenericRowsPerWarp * kGenericTileKeys);
}

// kQuant: a QuantizedCache layer (attention_quantized). Keys [0, qb.tokens) come from the
// quantized blocks, dequantized as the tile is staged, and keys from qb.tokens on from p.keys /
// p.values at index key - qb.tokens (the full-precision residual); p.kv_len counts both.
template <class T, bool kQuant = false>
__global__ void __launch_bounds__(kGenericThreads)
    generic_attention_kernel(AttentionView p, const SplitPlan plan, float* __restrict__ partial_out,
                             float2* __restrict__ partial_stats, const QuantBlocksView qb) {
  grid_dependency_wait();  // launched overlapped: q, the keys and values are earlier kernels'
  extern __shared__ float gsmem[];
  const int D = p.head_dim;
  float* q_s = gsmem;                             // [16][D]   q · scale · log2(e)
  float* k_s = q_s + kGenericRows * D;            // [32][D+1] key tile, float32
  float* v_s = k_s + kGenericTileKeys * (D + 1);  // [32][D]   value tile, float32
  float* p_s = v_s + kGenericTileKeys * D;        // [4][4][32] probabilities per warp row
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;

  const SplitBlock<T> blk = split_block<T>(p, plan, kGenericRows);  // sets p.kv_len
  const int b = blk.b, kv_head = blk.kv_head, row0 = blk.row0, split = blk.split, unit = blk.unit;

  // This warp's rows are row0 + warp · 4 + k; the block's frontier is the max over all 16.
  int limit[kGenericRowsPerWarp], first[kGenericRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kGenericRowsPerWarp; ++k) {
    const int row = row0 + warp * kGenericRowsPerWarp + k;
    limit[k] = row < p.rows ? row_key_limit(p, row) : -1;
    first[k] = row < p.rows ? row_key_first(p, row) : 0;
  }
  int max_limit = -1;
  for (int rr = 0; rr < kGenericRows; ++rr) {
    if (row0 + rr < p.rows) max_limit = max(max_limit, row_key_limit(p, row0 + rr));
  }
  const int2 keys = split_keys(p, plan, split, max_limit);  // the block's [begin, end)
  const int key_begin = keys.x, key_end = keys.y;

  const T* query = static_cast<const T*>(p.query);
  for (int idx = tid; idx < kGenericRows * D; idx += kGenericThreads) {
    const int rr = idx / D, d = idx % D, row = row0 + rr;
    q_s[idx] = row < p.rows ? to_f32(query[query_row_offset(p, b, kv_head, row) + d]) * p.scale_log2
                            : 0.0f;
  }

  const T *key_base = blk.key_base, *value_base = blk.value_base;
  const std::uint8_t* mask_row = blk.mask_row;

  float m[kGenericRowsPerWarp], l[kGenericRowsPerWarp];
  float acc[kGenericRowsPerWarp][kGenericMaxDimsPerLane];  // dims lane + 32 t
#pragma unroll
  for (int k = 0; k < kGenericRowsPerWarp; ++k) {
    m[k] = kNegInf;
    l[k] = 0.0f;
#pragma unroll
    for (int t = 0; t < kGenericMaxDimsPerLane; ++t) acc[k][t] = 0.0f;
  }
  const float* my_q = q_s + warp * kGenericRowsPerWarp * D;
  float* my_p = p_s + warp * kGenericRowsPerWarp * kGenericTileKeys;

  for (int key0 = key_begin; key0 < key_end; key0 += kGenericTileKeys) {
    __syncthreads();  // the previous tile is consumed (first pass: q_s is written)
    bool staged = false;
    if constexpr (kQuant) {
      if (qb.vec) {  // block-uniform
        staged = true;
        // Runs of 8 channels of one key: the key's and the value's code words and metas are all
        // loaded before any is used, so each thread has a few loads in flight, not one byte.
        const int runs = D / 8;
#pragma unroll 2
        for (int u = tid; u < kGenericTileKeys * runs; u += kGenericThreads) {
          const int j = u / runs, c0 = (u % runs) * 8, key = key0 + j;
          Quant8 kq{}, vq{};
          if (key < key_end && key < qb.tokens) {
            kq = quant_key8(qb, b, kv_head, key, c0);
            vq = quant_value8(qb, b, kv_head, key, c0);
          } else if (key < key_end) {
            const std::int64_t r = key - qb.tokens;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
              kq.x[k] = to_f32(key_base[r * p.k_stride_seq + c0 + k]);
              vq.x[k] = to_f32(value_base[r * p.v_stride_seq + c0 + k]);
            }
          }
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            k_s[j * (D + 1) + c0 + k] = kq.x[k];
            v_s[j * D + c0 + k] = vq.x[k];
          }
        }
      }
    }
    for (int idx = tid; !staged && idx < kGenericTileKeys * D; idx += kGenericThreads) {
      const int j = idx / D, d = idx % D, key = key0 + j;
      const bool in_range = key < key_end;
      float kf = 0.0f, vf = 0.0f;
      if constexpr (kQuant) {
        if (in_range && key < qb.tokens) {
          kf = quant_key(qb, b, kv_head, key, d);
          vf = quant_value(qb, b, kv_head, key, d);
        } else if (in_range) {
          const std::int64_t r = key - qb.tokens;
          kf = to_f32(key_base[r * p.k_stride_seq + d]);
          vf = to_f32(value_base[r * p.v_stride_seq + d]);
        }
      } else if (in_range) {
        kf = to_f32(key_base[key * p.k_stride_seq + d]);
        vf = to_f32(value_base[key * p.v_stride_seq + d]);
      }
      k_s[j * (D + 1) + d] = kf;
      v_s[j * D + d] = vf;
    }
    __syncthreads();

    // Lane j scores key key0 + j against the warp's 4 rows.
    const int key = key0 + lane;
    float s[kGenericRowsPerWarp] = {};
    const float* krow = k_s + lane * (D + 1);
    for (int d = 0; d < D; ++d) {
      const float kd = krow[d];
#pragma unroll
      for (int k = 0; k < kGenericRowsPerWarp; ++k) s[k] = fmaf(my_q[k * D + d], kd, s[k]);
    }
    const bool attend = key < key_end && (mask_row == nullptr || __ldg(mask_row + key) != 0);
#pragma unroll
    for (int k = 0; k < kGenericRowsPerWarp; ++k) {
      s[k] = attend && key <= limit[k] && key >= first[k] ? s[k] : kNegInf;
      float tile_max = s[k];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2)
        tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, offset));
      const float m_new = fmaxf(m[k], tile_max);
      const float alpha = m_new == kNegInf ? 1.0f : exp2f(m[k] - m_new);
      m[k] = m_new;
      const float prob = s[k] == kNegInf ? 0.0f : exp2f(s[k] - m_new);
      l[k] = l[k] * alpha + prob;  // this lane's keys only; summed over the warp at the end
#pragma unroll
      for (int t = 0; t < kGenericMaxDimsPerLane; ++t) acc[k][t] *= alpha;
      my_p[k * kGenericTileKeys + lane] = prob;
    }
    __syncwarp();

    const int keys_here = min(kGenericTileKeys, key_end - key0);
    for (int j = 0; j < keys_here; ++j) {
#pragma unroll
      for (int t = 0; t < kGenericMaxDimsPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < D) {
          const float v = v_s[j * D + d];
#pragma unroll
          for (int k = 0; k < kGenericRowsPerWarp; ++k)
            acc[k][t] = fmaf(my_p[k * kGenericTileKeys + j], v, acc[k][t]);
        }
      }
    }
  }

  allow_dependent_launch();
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int k = 0; k < kGenericRowsPerWarp; ++k) {
    float sum = l[k];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
    const int row = row0 + warp * kGenericRowsPerWarp + k;
    if (row >= p.rows) continue;  // warp-uniform
    if (plan.splits == 1) {
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // a row that saw no key: zeros
      T* dst = out + out_row_offset(p, b, kv_head, row);
#pragma unroll
      for (int t = 0; t < kGenericMaxDimsPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < D) dst[d] = from_f32<T>(acc[k][t] * inv);
      }
    } else {
      const std::int64_t prow =
          (static_cast<std::int64_t>(unit) * plan.splits + split) * p.rows + row;
#pragma unroll
      for (int t = 0; t < kGenericMaxDimsPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < D) partial_out[prow * D + d] = acc[k][t];
      }
      if (lane == 0) partial_stats[prow] = make_float2(m[k], sum);
    }
  }
}

// --- the merge
// ---------------------------------------------------------------------------------------

constexpr int kMergeWarps = 4;

// One warp per (unit, packed row): out = Σ_s exp2(m_s - M) o_s / Σ_s exp2(m_s - M) l_s with
// M = max_s m_s; zeros when no split saw a key (M = -inf). Each lane owns dims 2·lane + 64·t.
template <class T>
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_partials_kernel(const AttentionView p, const SplitPlan plan,
                          const float* __restrict__ partial_out,
                          const float2* __restrict__ partial_stats) {
  grid_dependency_wait();  // the split kernel's partials are complete and visible
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  const std::int64_t units = static_cast<std::int64_t>(p.batch) * p.num_kv_heads;
  if (item >= units * p.rows) return;  // warp-uniform
  const int unit = static_cast<int>(item / p.rows), row = static_cast<int>(item % p.rows);
  const int D = p.head_dim;
  // Split s of this row: stats at (unit · splits + s) · rows + row, outputs at that index · D.
  const std::int64_t first = static_cast<std::int64_t>(unit) * plan.splits * p.rows + row;
  const std::int64_t split_stride = p.rows;

  float max_all = kNegInf;
  for (int s = lane; s < plan.splits; s += 32)
    max_all = fmaxf(max_all, partial_stats[first + s * split_stride].x);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    max_all = fmaxf(max_all, __shfl_xor_sync(kFullMask, max_all, offset));

  constexpr int kPairs = 256 / 64;  // dims per lane / 2 at head_dim 256
  float2 o[kPairs];
#pragma unroll
  for (int t = 0; t < kPairs; ++t) o[t] = make_float2(0.0f, 0.0f);
  float sum = 0.0f;
  if (max_all != kNegInf) {
    for (int s = 0; s < plan.splits; ++s) {
      const std::int64_t at = first + s * split_stride;
      const float2 stats = partial_stats[at];
      const float f = exp2f(stats.x - max_all);  // 0 for a split that saw nothing
      sum = fmaf(f, stats.y, sum);
      const float* src = partial_out + at * D;
#pragma unroll
      for (int t = 0; t < kPairs; ++t) {
        const int d = 2 * lane + 64 * t;
        if (d < D) {
          const float2 v = *reinterpret_cast<const float2*>(src + d);
          o[t].x = fmaf(f, v.x, o[t].x);
          o[t].y = fmaf(f, v.y, o[t].y);
        }
      }
    }
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  const int b = unit / p.num_kv_heads, kv_head = unit % p.num_kv_heads;
  T* dst = static_cast<T*>(p.out) + out_row_offset(p, b, kv_head, row);
#pragma unroll
  for (int t = 0; t < kPairs; ++t) {
    const int d = 2 * lane + 64 * t;
    if (d < D) {
      dst[d] = from_f32<T>(o[t].x * inv);
      dst[d + 1] = from_f32<T>(o[t].y * inv);
    }
  }
}

// --- host side -----------------------------------------------------------------------------------

int sm_count() {
  int device = 0, count = 0;
  KVCACHE_CUDA_CHECK(cudaGetDevice(&device));
  KVCACHE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Opt-in to more than 48 KiB of dynamic shared memory once per kernel, and its blocks per SM.
template <class Kernel>
int configure(Kernel kernel, int threads, std::size_t smem_bytes) {
  KVCACHE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem_bytes)));
  int blocks = 0;
  KVCACHE_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem_bytes));
  return std::max(blocks, 1);
}

template <class T, int D, int R>
int decode_blocks_per_sm() {
  static const int blocks =
      configure(decode_attention_kernel<T, D, R>, kDecodeThreads, kDecodeSmemBytes);
  return blocks;
}

template <class T, int D, int R>
int quant_decode_blocks_per_sm() {
  static const int blocks = configure(decode_quant_kernel<T, D, R>, kDecodeThreads, 0);
  return blocks;
}

template <class T, int D>
int mma_blocks_per_sm() {
  static const int blocks = configure(decode_mma_kernel<T, D>, kMmaThreads, kMmaSmemBytes);
  return blocks;
}

template <class T>
int generic_blocks_per_sm() {
  // Configured for the largest head_dim, so any call's shared memory fits under the opt-in.
  static const int blocks =
      configure(generic_attention_kernel<T>, kGenericThreads, generic_smem_bytes(256));
  return blocks;
}

template <class T>
int quant_generic_blocks_per_sm() {
  static const int blocks =
      configure(generic_attention_kernel<T, true>, kGenericThreads, generic_smem_bytes(256));
  return blocks;
}

// Calls f(std::integral_constant<int, R>{}) for the decode kernel's rows per block.
template <class F>
decltype(auto) dispatch_decode_rows(int rows_per_block, F&& f) {
  switch (rows_per_block) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    default:
      KVCACHE_FAIL("cuda::attention: no decode kernel for ", rows_per_block, " rows per block");
  }
}

constexpr std::int64_t kMinSplitBytes = 128 * 1024;

struct KernelFacts {
  int blocks_per_sm;
  int tile_keys;       // keys_per_split is a multiple of this (one round of the whole block)
  int min_split_keys;  // a split shorter than this cannot fill the load pipeline
};

KernelFacts kernel_facts(const AttentionView& view, DType dtype, const SplitPlan& plan) {
  return dispatch_float(dtype, "cuda::attention", [&](auto type_tag) -> KernelFacts {
    using T = decltype(type_tag);
    if (plan.kernel == SplitKernel::kGeneric) {
      return {generic_blocks_per_sm<T>(), kGenericTileKeys, 4 * kGenericTileKeys};
    }
    return dispatch_head_dim(view.head_dim, "cuda::attention", [&](auto dim) -> KernelFacts {
      constexpr int D = decltype(dim)::value;
      if constexpr (D == 0) {
        KVCACHE_FAIL("cuda::attention: the decode kernel serves head_dim 64 or 128, got ",
                     view.head_dim);
      } else if (plan.kernel == SplitKernel::kDecodeMma) {
        if constexpr (std::is_same_v<T, float>) {
          KVCACHE_FAIL("cuda::attention: the tensor-core decode serves float16 and bfloat16 only");
        } else {
          // A split of at least two block rounds: every warp runs two tiles or more.
          constexpr int kRound = MmaShape<D>::kBlockKeys;
          return {mma_blocks_per_sm<T, D>(), kRound, 2 * kRound};
        }
      } else if (plan.kernel == SplitKernel::kDecodeQuant) {
        using Shape = QuantDecodeShape<D>;
        return dispatch_decode_rows(plan.rows_per_block, [&](auto rows) -> KernelFacts {
          constexpr int R = decltype(rows)::value;
          return {quant_decode_blocks_per_sm<T, D, R>(), Shape::kBlockKeys, 2 * Shape::kBlockKeys};
        });
      } else {
        using Shape = DecodeShape<T, D>;
        return dispatch_decode_rows(plan.rows_per_block, [&](auto rows) -> KernelFacts {
          constexpr int R = decltype(rows)::value;
          return {decode_blocks_per_sm<T, D, R>(), Shape::kBlockKeys,
                  Shape::kBlockKeys * kDecodeStages};
        });
      }
    });
  });
}

template <class T>
cudaError_t launch_merge(const AttentionView& view, const SplitPlan& plan, const float* partial_out,
                         const float2* partial_stats, cudaStream_t stream) {
  const std::int64_t items = static_cast<std::int64_t>(view.batch) * view.num_kv_heads * view.rows;
  return launch_overlapped(merge_partials_kernel<T>,
                           dim3(static_cast<unsigned>((items + kMergeWarps - 1) / kMergeWarps)),
                           dim3(kMergeWarps * 32), 0, stream, view, plan, partial_out,
                           partial_stats);
}

}  // namespace

std::int64_t split_workspace_floats(const AttentionView& view, const SplitPlan& plan) {
  const std::int64_t rows =
      static_cast<std::int64_t>(view.batch) * view.num_kv_heads * plan.splits * view.rows;
  return rows * (view.head_dim + 2);
}

bool rows_are_16b_aligned(const AttentionView& view, DType dtype) {
  const std::int64_t elems = 16 / static_cast<std::int64_t>(dtype_size(dtype));
  auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
  // A stride multiplies a nonzero index only where its dimension has more than one element.
  auto stride_ok = [&](std::int64_t stride, std::int64_t size) {
    return size <= 1 || stride % elems == 0;
  };
  return view.head_dim % elems == 0 && aligned(view.query) && aligned(view.keys) &&
         aligned(view.values) && aligned(view.out) && stride_ok(view.q_stride_batch, view.batch) &&
         stride_ok(view.q_stride_head, view.num_heads) &&
         stride_ok(view.q_stride_seq, view.q_len) && stride_ok(view.k_stride_batch, view.batch) &&
         stride_ok(view.k_stride_head, view.num_kv_heads) &&
         stride_ok(view.k_stride_seq, view.kv_len) && stride_ok(view.v_stride_batch, view.batch) &&
         stride_ok(view.v_stride_head, view.num_kv_heads) &&
         stride_ok(view.v_stride_seq, view.kv_len);
}

SplitPlan plan_split(const AttentionView& view, DType dtype, SplitKernel kernel) {
  SplitPlan plan{};
  plan.kernel = kernel;
  if (kernel == SplitKernel::kDecodeMma) {
    plan.rows_per_block = kMmaRows;  // one m16 tile; padding rows cost no bytes
  } else if (kernel == SplitKernel::kDecode || kernel == SplitKernel::kDecodeQuant) {
    // The smallest of 1, 2, 4, 8 that holds all rows, or 8 (more rows: more row blocks, each
    // reading the same keys; they run side by side, so the repeats mostly come from L2).
    const int want = std::min(view.rows, 8);
    plan.rows_per_block = want <= 1 ? 1 : want <= 2 ? 2 : want <= 4 ? 4 : 8;
  } else {
    plan.rows_per_block = kGenericRows;
  }
  plan.row_blocks = (view.rows + plan.rows_per_block - 1) / plan.rows_per_block;
  plan.splits = 1;
  plan.keys_per_split = std::max(view.kv_len, 1);
  const KernelFacts facts = kernel_facts(view, dtype, plan);

  // One wave: as many splits as keep every block resident at once (all blocks then stream side
  // by side and finish together; a second, partial wave would leave HBM idle at the end), and no
  // more than leave each split a full pipeline's worth of keys.
  const std::int64_t base = static_cast<std::int64_t>(view.batch) * view.num_kv_heads *
                            plan.row_blocks;  // blocks at one split
  const std::int64_t capacity = static_cast<std::int64_t>(sm_count()) * facts.blocks_per_sm;
  // And no split reads less than kMinSplitBytes (128 KiB) of keys and values: below it the
  // merge's launch costs more than the parallelism gains. On the H200 this took TinyLlama's decode
  // (4 kv heads, a few hundred keys: now one block a kv head, no merge) from 895 to 924 tok/s and
  // BM_DecodeAttentionCuda/1/4096 from 335 to 268 µs, other shapes within noise.
  // The quantized decode kernel is bound by its instructions, not by bytes: its splits need only
  // keep each warp a few tiles (on the H200, 1 x 4096 at 4 bits went from 16 to 32 splits and from
  // 68 to 34 µs; 2 passes a tile instead of 4 took it from 243 to 203 registers).
  const std::int64_t row_bytes = 2 * static_cast<std::int64_t>(view.head_dim) * dtype_size(dtype);
  const std::int64_t min_keys =
      kernel == SplitKernel::kDecodeQuant
          ? facts.min_split_keys
          : std::max<std::int64_t>(facts.min_split_keys,
                                   (kMinSplitBytes + row_bytes - 1) / row_bytes);
  const std::int64_t max_splits =
      std::max<std::int64_t>(1, (view.kv_len + min_keys - 1) / min_keys);
  const std::int64_t splits = std::clamp<std::int64_t>(capacity / base, 1, max_splits);
  if (splits > 1) {
    const std::int64_t per_split = (view.kv_len + splits - 1) / splits;
    const std::int64_t rounded = (per_split + facts.tile_keys - 1) / facts.tile_keys *
                                 facts.tile_keys;  // whole block rounds
    plan.keys_per_split = static_cast<int>(rounded);
    plan.splits = static_cast<int>((view.kv_len + rounded - 1) / rounded);  // none left empty
  }
  return plan;
}

namespace {

// Where a split launch's partials go in the workspace, and its grid (one block per batch row, kv
// head, split and row block).
struct SplitLaunch {
  float* partial_out;
  float2* partial_stats;  // null with one split: the kernel writes the output itself
  dim3 grid;
};

SplitLaunch split_launch(const AttentionView& view, const SplitPlan& plan, float* workspace,
                         const char* where) {
  SplitLaunch launch{workspace, nullptr, dim3(1)};
  if (plan.splits > 1) {
    // Right after partial_out; an even float offset (head_dim is even), so 8-byte aligned.
    const std::int64_t out_floats = static_cast<std::int64_t>(view.batch) * view.num_kv_heads *
                                    plan.splits * view.rows * view.head_dim;
    launch.partial_stats = reinterpret_cast<float2*>(workspace + out_floats);
  }
  const std::int64_t blocks64 =
      static_cast<std::int64_t>(view.batch) * view.num_kv_heads * plan.splits * plan.row_blocks;
  KVCACHE_CHECK(blocks64 <= std::numeric_limits<int>::max(), where,
                ": expected fewer than 2^31 blocks, got ", blocks64);
  launch.grid = dim3(static_cast<unsigned>(blocks64));
  return launch;
}

}  // namespace

cudaError_t launch_split_attention(const AttentionView& view, DType dtype, const SplitPlan& plan,
                                   float* workspace, cudaStream_t stream) {
  const SplitLaunch launch = split_launch(view, plan, workspace, "cuda::attention");
  float* const partial_out = launch.partial_out;
  float2* const partial_stats = launch.partial_stats;
  const dim3 grid = launch.grid;
  return dispatch_float(dtype, "cuda::attention", [&](auto type_tag) -> cudaError_t {
    using T = decltype(type_tag);
    cudaError_t status = cudaSuccess;
    if (plan.kernel == SplitKernel::kGeneric) {
      (void)generic_blocks_per_sm<T>();  // makes sure the shared-memory opt-in is done
      status = launch_overlapped(generic_attention_kernel<T>, grid, dim3(kGenericThreads),
                                 generic_smem_bytes(view.head_dim), stream, view, plan, partial_out,
                                 partial_stats, QuantBlocksView{});
    } else {
      dispatch_head_dim(view.head_dim, "cuda::attention", [&](auto dim) {
        constexpr int D = decltype(dim)::value;
        if constexpr (D == 0) {
          KVCACHE_FAIL("cuda::attention: the decode kernel serves head_dim 64 or 128, got ",
                       view.head_dim);
        } else if (plan.kernel == SplitKernel::kDecodeMma) {
          if constexpr (std::is_same_v<T, float>) {
            KVCACHE_FAIL("cuda::attention: the tensor-core decode serves float16 and bfloat16");
          } else {
            (void)mma_blocks_per_sm<T, D>();  // makes sure the shared-memory opt-in is done
            status =
                launch_overlapped(decode_mma_kernel<T, D>, grid, dim3(kMmaThreads), kMmaSmemBytes,
                                  stream, view, plan, partial_out, partial_stats);
          }
        } else {
          dispatch_decode_rows(plan.rows_per_block, [&](auto rows) {
            constexpr int R = decltype(rows)::value;
            (void)decode_blocks_per_sm<T, D, R>();
            status =
                launch_overlapped(decode_attention_kernel<T, D, R>, grid, dim3(kDecodeThreads),
                                  kDecodeSmemBytes, stream, view, plan, partial_out, partial_stats);
          });
        }
      });
    }
    const cudaError_t last = cudaGetLastError();  // consumed, so no later check reports it again
    if (status == cudaSuccess) status = last;
    if (status != cudaSuccess || plan.splits == 1) return status;
    return launch_merge<T>(view, plan, partial_out, partial_stats, stream);
  });
}

cudaError_t launch_split_attention_quantized(const AttentionView& view, const QuantBlocksView& qb,
                                             DType dtype, const SplitPlan& plan, float* workspace,
                                             cudaStream_t stream) {
  KVCACHE_CHECK(plan.kernel == SplitKernel::kGeneric || plan.kernel == SplitKernel::kDecodeQuant,
                "cuda::attention_quantized: expected a plan for the generic or the quantized "
                "decode kernel");
  KVCACHE_CHECK(plan.kernel == SplitKernel::kGeneric || qb.vec,
                "cuda::attention_quantized: the quantized decode kernel needs word-aligned blocks");
  const SplitLaunch launch = split_launch(view, plan, workspace, "cuda::attention_quantized");
  return dispatch_float(dtype, "cuda::attention_quantized", [&](auto type_tag) -> cudaError_t {
    using T = decltype(type_tag);
    cudaError_t status = cudaSuccess;
    if (plan.kernel == SplitKernel::kDecodeQuant) {
      dispatch_head_dim(view.head_dim, "cuda::attention_quantized", [&](auto dim) {
        constexpr int D = decltype(dim)::value;
        if constexpr (D == 0) {
          KVCACHE_FAIL(
              "cuda::attention_quantized: the decode kernel serves head_dim 64 or 128, got ",
              view.head_dim);
        } else {
          dispatch_decode_rows(plan.rows_per_block, [&](auto rows) {
            constexpr int R = decltype(rows)::value;
            status = launch_overlapped(decode_quant_kernel<T, D, R>, launch.grid,
                                       dim3(kDecodeThreads), 0, stream, view, plan,
                                       launch.partial_out, launch.partial_stats, qb);
          });
        }
      });
    } else {
      (void)quant_generic_blocks_per_sm<T>();  // makes sure the shared-memory opt-in is done
      status = launch_overlapped(generic_attention_kernel<T, true>, launch.grid,
                                 dim3(kGenericThreads), generic_smem_bytes(view.head_dim), stream,
                                 view, plan, launch.partial_out, launch.partial_stats, qb);
    }
    const cudaError_t last = cudaGetLastError();
    if (status == cudaSuccess) status = last;
    if (status != cudaSuccess || plan.splits == 1) return status;
    return launch_merge<T>(view, plan, launch.partial_out, launch.partial_stats, stream);
  });
}

}  // namespace kvcache::cuda::detail
