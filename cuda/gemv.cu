// The few-row product out = x · Wᵀ + beta · out (gemv.cuh) for decode: 1 to 8 rows of x against
// a whole weight matrix, which is all weight traffic (a 4096 × 4096 bfloat16 matrix is 32 MiB, x
// 8 KiB). The kernel's one job is to keep enough weight bytes in flight on every SM that HBM
// streams at full rate, and to spend as few instructions as possible per byte.
//
// Reading W. A warp reads 4 rows of W (4 features) at once, 8 lanes × 16 bytes = 128 contiguous
// bytes of each: lane l takes feature l / 8 and the 16 bytes at 8 · (l % 8) elements into every
// 128-byte chunk of its row. On the H200, read-only kernels with that pattern stream a 7B-shaped
// matrix at 3.9-4.1 TB/s where 8 rows × 64 bytes (this kernel's first layout) reached 3.2-3.6
// (benchmarks/README.md, "How the GEMV reads W"): DRAM serves a warp's request faster when it
// spans fewer, longer runs.
//
// Tensor cores for the 16-bit weights, mma.sync.m16n8k16 with float32 accumulation. Seen by the
// mma, that lane (groupID g = l / 4, thread-in-group t = l % 4) holds B's column n = g: feature
// g / 2, at k-range h = g % 2 of the chunk (the chunk's first or second 64 bytes), 8 consecutive k
// at 8t there. A's rows 0-7 are x's rows at k-range 0, rows 8-15 the same rows at k-range 1 (a lane
// whose g ≥ rows repeats row rows-1, whose results are never written), so D[g][2t] is row g ·
// feature t over k-range 0 and D[g + 8][2t + 1] row g · feature t over k-range 1: the lane's d0 +
// d3, accumulated over the chunks, is out[g, t] (d1 and d2 pair a row with the other k-range and
// are dropped). Each 16-byte pack of 8 k feeds two k-steps, and the same permutation of k (k
// 8t+{0..3} ↔ fragment columns 2t, 2t+1, 2t+8, 2t+9) is applied to both operands, so the sum is
// Σ_k x·w; the mma adds its 16 exact products to the float32 accumulator as cuBLAS's tensor-core
// kernels do. Per 512 bytes of W a warp issues one 16-byte load per lane, two shared loads (x's
// rows at both k-ranges; one broadcast when x has one row) and two mma. Rows 8-15 of A, zeros in
// an 8-row-per-instruction layout, carry the second k-range here, so the 4-row reads cost no mma.
// float32 weights (completeness; linear() keeps float32 on cuBLAS) run the same reads with SIMT
// FMAs: each lane accumulates its feature against every row, and the 8 lanes of a feature add up
// at the end.
//
// Schedule. One block of 1024 threads per SM (32 warps, ≤ 64 registers), persistent over the
// feature groups (4 features each). Warps work in groups of `split` (a power of two, chosen on the
// host): the `split` warps of a group share its 4 features, take the chunks of `in` round-robin,
// and add their partial tiles through shared memory in a fixed order. split grows while the GPU
// has idle warps for it and each warp keeps ≥ 2 chunks, so a 2048-feature matrix still puts ~4000
// warps to work (split 8) while a 32000-feature LM head runs one warp per group with no
// reduction at all; whenever split > 1 there is a single round, so the reduction costs one
// __syncthreads. Each lane keeps kUnroll (8) 16-byte loads of W in flight: 4 KiB per warp, up to
// 128 KiB per SM, several times HBM's bandwidth × latency even when only 20 of the 32 warps have
// a group (a 22016-feature gate|up). Feature group fg of block b in round i is
// (i · groups + group) · grid + b, so every SM gets an equal share of the groups.
//
// x in shared memory. Every block first copies x's rows (or, in silu_mul mode, computes
// silu(gate) · up and rounds it to W's dtype, the exact expression of cuda::silu_mul; or, in
// rms_norm mode, normalises the float32 hidden rows as cuda::rms_norm does) into shared
// memory, padded with zeros to whole chunks; the row stride is an odd number of 64-byte halves so
// the two rows each quarter-warp reads at once fall on different banks. The kernel is launched with
// programmatic dependent launch and waits on the previous kernel before it stages x. It issues no
// L2 prefetches of W before that: on the H200 they made decoding slower, not faster. Prefetching
// each lane's first kUnroll chunks gave 906-920 tok/s against 934 without them (TinyLlama,
// graphs on); twice that depth, or prefetching after the staging, was slower still (benchmarks/
// README.md, "Prefetching weights into L2").
//
// rms_norm mode. x must be the bits cuda::rms_norm(hidden, norm_weight, eps, W's dtype) stores, so
// the per-row sum of squares follows norms.cu's order exactly: rms_norm_kernel<Out, 4> runs 256
// threads a row, thread v adds (fmaf) the squares of float4 packs v, v + 256, … in order, a warp
// adds its 32 sums by an xor butterfly (16, 8, 4, 2, 1), then warp 0 butterflies the 8 warp sums
// (lanes 8-31 holding 0). Here the 1024 threads are 4 such virtual blocks of 256, one row each
// (rows 4-7 in a second pass), writing their warp sums to shared memory; warp r then runs the
// second butterfly for row r and the same mean, + eps, sqrt, 1 / · steps (__f*_rn), and the
// staging loop writes from_f32(norm_weight[i] · (hidden[r, i] · inv_rms[r])). norms.cu's scalar
// variant (unaligned rows) sums in another order, so those calls are not served here.
//
// W is read with ld.global.nc.L1::no_allocate (read once, never by another block); x, gate, up,
// hidden and norm_weight with ld.global.cg, out with plain loads, after griddepcontrol.wait.
#include "gemv.cuh"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "check.cuh"
#include "dtype.cuh"
#include "mma.cuh"

namespace kvcache::cuda::detail {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kFeaturesPerGroup = 4;  // W rows a warp reads at once, 8 lanes (128 bytes) each
constexpr int kLanesPerFeature = 32 / kFeaturesPerGroup;
constexpr int kMinChunksPerWarp = 2;
constexpr int kTileFloats = kGemvMaxRows * kFeaturesPerGroup;  // one warp's [8 rows][4 features]
constexpr int kReduceFloats = kWarps * kTileFloats;            // one buffer of partial tiles
// silu_mul mode computes rows · in elements in every block; past this (~2 µs of one SM's ALUs,
// which the prefetched W hides) a separate silu_mul kernel is cheaper.
constexpr std::int64_t kMaxSiluElements = 24576;
// rms_norm mode reads rows · in float32 of hidden twice (the sum of squares, then the staging)
// and as much of norm_weight in every block: past this (8 rows of a 4096-wide model, 384 KiB
// from L2 per SM) a separate rms_norm kernel is cheaper.
constexpr std::int64_t kMaxRmsElements = 32768;
// norms.cu's block for one row (its kThreads) and its warps, whose reduction order rms_norm mode
// reproduces; the kernel's 1024 threads are kThreads / kNormThreads such blocks.
constexpr int kNormThreads = 256;
constexpr int kNormWarps = kNormThreads / 32;
constexpr int kNormRowsPerPass = kThreads / kNormThreads;
// rms_norm mode's statistics after the staged x (and the reduction buffers): the warp sums
// [kGemvMaxRows][kNormWarps], then inv_rms [kGemvMaxRows].
constexpr int kStatsFloats = kGemvMaxRows * kNormWarps + kGemvMaxRows;

/// How x is made in shared memory.
enum class Prologue {
  kLoad,     // copied from x
  kSiluMul,  // silu(gate) · up
  kRmsNorm,  // rms_norm(hidden, norm_weight, eps)
};

/// How the kernel covers one call (computed on the host from GemvArgs and the SM count).
struct GemvPlan {
  int split;           // warps of a group, sharing 4 features and splitting `in`
  int groups;          // groups per block: kWarps / split
  int feature_groups;  // ceil(out_features / kFeaturesPerGroup)
  int rounds;          // ceil(feature_groups / (groups · grid)): a group's feature groups
  int chunks;          // ceil(in / chunk): 128-byte pieces of a row
  int x_ld;            // row stride of the staged x, elements
  int grid;            // blocks
  int smem_bytes;      // staged x [rows][x_ld]; when split > 1, float [2][kReduceFloats];
                       // in rms_norm mode, float [kStatsFloats]
};

template <class T>
struct Layout {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte pack
  // Elements of a W row one warp instruction reads: 8 lanes × 16 bytes = 128 contiguous bytes.
  static constexpr int kChunk = kLanesPerFeature * kVec;
  // 16-byte loads of W in flight per lane; float32's eight row accumulators leave room for 4.
  static constexpr int kUnroll = sizeof(T) == 2 ? 8 : 4;
};

// --- device helpers ------------------------------------------------------------------------------

__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// d += A · B for one m16n8k16 step. A's rows 0-7 are x's rows g at one k-range (lo: k 2t, 2t+1;
// hi: k 2t+8, 2t+9), rows 8-15 the same rows at a second k-range (lo2, hi2); B is (b_lo, b_hi) at
// the k-range its column n = g belongs to.
template <class T>
__device__ __forceinline__ void mma_two_ranges(float (&d)[4], unsigned a_lo, unsigned a_hi,
                                               unsigned a_lo2, unsigned a_hi2, unsigned b_lo,
                                               unsigned b_hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a_lo), "r"(a_lo2), "r"(a_hi), "r"(a_hi2), "r"(b_lo), "r"(b_hi));
  } else {
    static_assert(std::is_same_v<T, __half>);
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a_lo), "r"(a_lo2), "r"(a_hi), "r"(a_hi2), "r"(b_lo), "r"(b_hi));
  }
}

// cuda::silu_mul's expression (elementwise.cu), operation for operation, so the staged x is the
// value silu_mul would have stored.
__device__ __forceinline__ float silu_times(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

template <class T>
__device__ __forceinline__ uint4 silu_pack(uint4 gate, uint4 up) {
  constexpr int V = Layout<T>::kVec;
  const T* g = reinterpret_cast<const T*>(&gate);
  const T* u = reinterpret_cast<const T*>(&up);
  uint4 out;
  T* o = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int j = 0; j < V; ++j) o[j] = from_f32<T>(silu_times(to_f32(g[j]), to_f32(u[j])));
  return out;
}

// rms_norm mode's inv_rms[r] for every row into stats[kGemvMaxRows · kNormWarps + r], in
// norms.cu's order (see the file comment): rms_norm_kernel<Out, 4>'s per-thread sums and
// block_sum, with each 256-thread slice of this block standing for one of its blocks. Called by
// every thread of the block; ends with a __syncthreads.
__device__ __forceinline__ void rms_statistics(const GemvArgs& a, float* stats) {
  const int tid = static_cast<int>(threadIdx.x);
  const int slice = tid / kNormThreads, v = tid % kNormThreads;  // v: the thread in norms.cu
  const int warp = tid / 32, lane = tid % 32;
  const int packs = a.in / 4;
  for (int r = slice; r < a.rows; r += kNormRowsPerPass) {  // uniform over each warp
    const float4* row = reinterpret_cast<const float4*>(static_cast<const float*>(a.hidden) +
                                                        static_cast<std::int64_t>(r) * a.ldh);
    float sum = 0.0f;
    for (int p = v; p < packs; p += kNormThreads) {
      const float4 h = __ldcg(row + p);
      sum = __fmaf_rn(h.x, h.x, sum);
      sum = __fmaf_rn(h.y, h.y, sum);
      sum = __fmaf_rn(h.z, h.z, sum);
      sum = __fmaf_rn(h.w, h.w, sum);
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) stats[r * kNormWarps + (v / 32)] = sum;
  }
  __syncthreads();
  if (warp < a.rows) {  // block_sum's second level, warp r for row r
    float s = lane < kNormWarps ? stats[warp * kNormWarps + lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (lane == 0) {
      const float mean = __fdiv_rn(s, static_cast<float>(a.in));
      stats[kGemvMaxRows * kNormWarps + warp] = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, a.eps)));
    }
  }
  __syncthreads();
}

// One 16-byte pack of x in rms_norm mode from kVec floats of a hidden row and of norm_weight
// (16-byte aligned), norms.cu's from_f32(weight · (x · inv)) for each.
template <class T>
__device__ __forceinline__ uint4 rms_pack(const float* hidden, const float* norm_weight,
                                          float inv) {
  constexpr int V = Layout<T>::kVec;
  uint4 out;
  T* o = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int q = 0; q < V / 4; ++q) {
    const float4 h = __ldcg(reinterpret_cast<const float4*>(hidden) + q);
    const float4 w = __ldcg(reinterpret_cast<const float4*>(norm_weight) + q);
    o[4 * q + 0] = from_f32<T>(__fmul_rn(w.x, __fmul_rn(h.x, inv)));
    o[4 * q + 1] = from_f32<T>(__fmul_rn(w.y, __fmul_rn(h.y, inv)));
    o[4 * q + 2] = from_f32<T>(__fmul_rn(w.z, __fmul_rn(h.z, inv)));
    o[4 * q + 3] = from_f32<T>(__fmul_rn(w.w, __fmul_rn(h.w, inv)));
  }
  return out;
}

// --- the kernel ----------------------------------------------------------------------------------

template <class T, class O, Prologue kMode>
__global__ void __launch_bounds__(kThreads, 1) gemv_kernel(const GemvArgs a, const GemvPlan plan) {
  constexpr int kVec = Layout<T>::kVec, kChunk = Layout<T>::kChunk, kUnroll = Layout<T>::kUnroll;
  constexpr bool kTensorCores = !std::is_same_v<T, float>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);  // [rows][x_ld]
  float* red = reinterpret_cast<float*>(smem + static_cast<std::size_t>(a.rows) * plan.x_ld *
                                                   sizeof(T));  // [2][kWarps][8 rows][8 features]

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;  // the mma fragment's groupID and thread-in-group
  const int split = plan.split;
  const int group = warp / split, part = warp % split;  // part: which chunks of `in` (round-robin)
  const int rows = a.rows, in = a.in, out_features = a.out_features;
  const T* weight = static_cast<const T*>(a.weight);
  O* out = static_cast<O*>(a.out);
  auto feature_group = [&](int round) {
    return (round * plan.groups + group) * plan.grid + static_cast<int>(blockIdx.x);
  };

  grid_dependency_wait();  // x, gate, up, hidden and out are the previous kernels' outputs
  allow_dependent_launch();

  float* stats = red + (split > 1 ? 2 * kReduceFloats : 0);  // rms_norm mode: [kStatsFloats]
  if constexpr (kMode == Prologue::kRmsNorm) rms_statistics(a, stats);

  // Stage x [rows][in] (zeros up to x_ld) in shared memory, 16 bytes per pack.
  {
    const int packs_per_row = plan.x_ld / kVec, in_packs = in / kVec;
    uint4* xs_packs = reinterpret_cast<uint4*>(xs);
    for (int p = static_cast<int>(threadIdx.x); p < rows * packs_per_row; p += kThreads) {
      const int r = p / packs_per_row, c = p - r * packs_per_row;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (c < in_packs) {
        if constexpr (kMode == Prologue::kSiluMul) {
          const T* gate = static_cast<const T*>(a.gate) + r * a.ldg + c * kVec;
          const T* up = static_cast<const T*>(a.up) + r * a.ldu + c * kVec;
          v = silu_pack<T>(__ldcg(reinterpret_cast<const uint4*>(gate)),
                           __ldcg(reinterpret_cast<const uint4*>(up)));
        } else if constexpr (kMode == Prologue::kRmsNorm) {
          const float* hidden = static_cast<const float*>(a.hidden) + r * a.ldh + c * kVec;
          const float* norm_weight = static_cast<const float*>(a.norm_weight) + c * kVec;
          v = rms_pack<T>(hidden, norm_weight, stats[kGemvMaxRows * kNormWarps + r]);
        } else {
          const T* x = static_cast<const T*>(a.x) + r * a.ldx + c * kVec;
          v = __ldcg(reinterpret_cast<const uint4*>(x));
        }
      }
      xs_packs[p] = v;
    }
  }
  __syncthreads();

  // out[r, f] = value + beta · out[r, f], one rounding.
  auto emit = [&](int r, int f, float value) {
    if (r >= rows || f >= out_features) return;
    O* p = out + r * a.ldo + f;
    if (a.beta != 0.0f) value = __fmaf_rn(a.beta, to_f32(*p), value);
    *p = from_f32<O>(value);
  };

  const int chunks = plan.chunks, stride = split * kUnroll;
  for (int round = 0; round < plan.rounds; ++round) {
    const int fg = feature_group(round);
    const bool active = fg < plan.feature_groups;  // uniform over the group
    const int f0 = fg * kFeaturesPerGroup;
    // This lane's W row and its 16 bytes of each chunk: 8 lanes (128 contiguous bytes) a row.
    const int f = f0 + lane / kLanesPerFeature, j = lane % kLanesPerFeature;
    const bool f_ok = active && f < out_features;
    const T* w_row = weight + static_cast<std::int64_t>(f_ok ? f : 0) * in + j * kVec;

    // The lane's one value of the group's [8 rows][4 features] tile: row r_out, feature f_out.
    //   tensor cores: row g, feature t (the mma's d0 + d3; see the file comment)
    //   SIMT: row j, feature lane / 8 (after the 8 lanes' sum)
    float tile;
    int r_out, f_out;
    if constexpr (kTensorCores) {
      float d[2][4] = {};  // two accumulators (a pack's first and second k-step): shorter chains
      const T* x_row = xs + (g < rows ? g : rows - 1) * plan.x_ld + t * kVec;
      if (active) {
        for (int c0 = part; c0 < chunks; c0 += stride) {
          uint4 wv[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int kc = (c0 + u * split) * kChunk;  // the chunk's first k
            wv[u] = f_ok && kc + j * kVec < in ? load_streaming(w_row + kc)
                                               : make_uint4(0u, 0u, 0u, 0u);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int c = c0 + u * split;
            if (c < chunks) {  // uniform over the warp
              const T* xc = x_row + c * kChunk;
              const uint4 x0 = *reinterpret_cast<const uint4*>(xc);  // the chunk's first half
              const uint4 x1 = *reinterpret_cast<const uint4*>(xc + kChunk / 2);  // second half
              mma_two_ranges<T>(d[0], x0.x, x0.y, x1.x, x1.y, wv[u].x, wv[u].y);
              mma_two_ranges<T>(d[1], x0.z, x0.w, x1.z, x1.w, wv[u].z, wv[u].w);
            }
          }
        }
      }
      tile = (d[0][0] + d[1][0]) + (d[0][3] + d[1][3]);
      r_out = g;
      f_out = t;
    } else {
      float acc[kGemvMaxRows] = {};
      if (active) {
        for (int c0 = part; c0 < chunks; c0 += stride) {
          uint4 wv[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int kc = (c0 + u * split) * kChunk;  // the chunk's first k
            wv[u] = f_ok && kc + j * kVec < in ? load_streaming(w_row + kc)
                                               : make_uint4(0u, 0u, 0u, 0u);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int c = c0 + u * split;
            if (c < chunks) {
              const float4 wf = *reinterpret_cast<const float4*>(&wv[u]);
              const int k = c * kChunk + j * kVec;
#pragma unroll
              for (int r = 0; r < kGemvMaxRows; ++r) {
                if (r < rows) {
                  const float4 xv = *reinterpret_cast<const float4*>(xs + r * plan.x_ld + k);
                  acc[r] = __fmaf_rn(wf.x, xv.x, acc[r]);
                  acc[r] = __fmaf_rn(wf.y, xv.y, acc[r]);
                  acc[r] = __fmaf_rn(wf.z, xv.z, acc[r]);
                  acc[r] = __fmaf_rn(wf.w, xv.w, acc[r]);
                }
              }
            }
          }
        }
      }
      tile = 0.0f;
#pragma unroll
      for (int r = 0; r < kGemvMaxRows; ++r) {  // the 8 lanes' k-slices; lane j keeps row j
        float v = acc[r];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        if (r == j) tile = v;
      }
      r_out = j;
      f_out = lane / kLanesPerFeature;
    }

    if (split == 1) {
      if (active) emit(r_out, f0 + f_out, tile);
    } else {
      // The group's partial tiles through shared memory: [warp][row · 4 + feature].
      float* buffer = red + (round & 1) * kReduceFloats;
      buffer[warp * kTileFloats + r_out * kFeaturesPerGroup + f_out] = tile;
      __syncthreads();                    // uniform: every warp runs every round
      const int item = part * 32 + lane;  // one (row, feature) of the tile per thread
      if (active && item < kTileFloats) {
        const float* partial = buffer + group * split * kTileFloats + item;
        float sum = 0.0f;
        for (int w = 0; w < split; ++w) sum += partial[w * kTileFloats];
        emit(item / kFeaturesPerGroup, f0 + item % kFeaturesPerGroup, sum);
      }
      // The next round writes the other buffer; the round after it comes after the next
      // __syncthreads, which every thread reaches only once done reading this one.
    }
  }
}

// --- host side -----------------------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The SM count and the opt-in shared memory per block of the current device, cached per device.
struct DeviceFacts {
  int sms = 0;
  int smem_optin = 0;
};

constexpr int kCachedDevices = 64;
std::atomic<int> g_sms[kCachedDevices];
std::atomic<int> g_smem_optin[kCachedDevices];

cudaError_t device_facts(int& device, DeviceFacts& facts) {
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  const bool cached = device >= 0 && device < kCachedDevices;
  if (cached) {
    facts.sms = g_sms[device].load(std::memory_order_relaxed);
    facts.smem_optin = g_smem_optin[device].load(std::memory_order_relaxed);
    if (facts.sms > 0 && facts.smem_optin > 0) return cudaSuccess;
  }
  status = cudaDeviceGetAttribute(&facts.sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  status =
      cudaDeviceGetAttribute(&facts.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;
  if (cached) {
    g_sms[device].store(facts.sms, std::memory_order_relaxed);
    g_smem_optin[device].store(facts.smem_optin, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

GemvPlan make_plan(const GemvArgs& a, int sms) {
  const int elem = static_cast<int>(dtype_size(a.weight_dtype));
  const int chunk = kLanesPerFeature * (16 / elem);
  GemvPlan plan{};
  plan.chunks = (a.in + chunk - 1) / chunk;
  plan.feature_groups = (a.out_features + kFeaturesPerGroup - 1) / kFeaturesPerGroup;
  // Double the warps per group while the GPU still has idle warps for them and each warp keeps
  // at least kMinChunksPerWarp chunks.
  const std::int64_t warps = static_cast<std::int64_t>(sms) * kWarps;
  int split = 1;
  while (split < kWarps && static_cast<std::int64_t>(plan.feature_groups) * split * 2 <= warps &&
         plan.chunks >= split * 2 * kMinChunksPerWarp) {
    split *= 2;
  }
  // More groups than one round holds: the last round may leave most warps idle (Llama-2-7B's
  // gate|up, 5504 groups on 132 x 32 warps, fills 1.3 of 2 rounds). Splitting each group over 2
  // or 4 warps makes the rounds finer; take the smallest split that fills at least a tenth more
  // of the rounds' warps (measured on the H200: that shape 3.88 -> 4.03 TB/s, while the LM heads,
  // which fill 0.95 unsplit, lose to the extra merge).
  if (split == 1 && plan.feature_groups > warps) {
    const auto fill = [&](int s) {
      const std::int64_t per_round = warps / s;
      const std::int64_t rounds = (plan.feature_groups + per_round - 1) / per_round;
      return static_cast<double>(plan.feature_groups) / static_cast<double>(rounds * per_round);
    };
    const double unsplit = fill(1);
    for (int s = 2; s <= 4; s *= 2) {
      if (plan.chunks >= s * kMinChunksPerWarp && fill(s) >= unsplit + 0.1) {
        split = s;
        break;
      }
    }
  }
  plan.split = split;
  plan.groups = kWarps / split;
  plan.grid = plan.feature_groups < sms ? plan.feature_groups : sms;
  const std::int64_t per_round = static_cast<std::int64_t>(plan.groups) * plan.grid;
  plan.rounds = static_cast<int>((plan.feature_groups + per_round - 1) / per_round);
  // Whole chunks and a half per staged row (64 bytes past a multiple of 128): the two rows a
  // quarter-warp reads at once, g and g + 1, fall on different banks.
  plan.x_ld = plan.chunks * chunk + chunk / 2;
  plan.smem_bytes = a.rows * plan.x_ld * elem +
                    (split > 1 ? 2 * kReduceFloats * static_cast<int>(sizeof(float)) : 0) +
                    (a.rms_norm ? kStatsFloats * static_cast<int>(sizeof(float)) : 0);
  return plan;
}

template <class T, class O, Prologue kMode>
cudaError_t launch_typed(const GemvArgs& a, const GemvPlan& plan, int device,
                         const DeviceFacts& facts, cudaStream_t stream) {
  auto* kernel = gemv_kernel<T, O, kMode>;
  if (plan.smem_bytes > 48 * 1024) {
    // Opt in to the device's whole shared memory once per device (the attribute is per context).
    static std::atomic<std::uint64_t> opted_in{0};
    const std::uint64_t bit = device < 64 ? std::uint64_t{1} << device : 0;
    if (bit == 0 || (opted_in.load(std::memory_order_relaxed) & bit) == 0) {
      const cudaError_t status = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, facts.smem_optin);
      if (status != cudaSuccess) return status;
      opted_in.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const cudaError_t status =
      launch_overlapped(kernel, dim3(static_cast<unsigned>(plan.grid)), dim3(kThreads),
                        static_cast<std::size_t>(plan.smem_bytes), stream, a, plan);
  const cudaError_t last = cudaGetLastError();  // consumed, so no later check reports it again
  return status != cudaSuccess ? status : last;
}

template <class T, Prologue kMode>
cudaError_t launch_out(const GemvArgs& a, const GemvPlan& plan, int device,
                       const DeviceFacts& facts, cudaStream_t stream) {
  if (a.out_dtype == DType::kFloat32) {
    return launch_typed<T, float, kMode>(a, plan, device, facts, stream);
  }
  if constexpr (std::is_same_v<T, float>) {
    return cudaErrorNotSupported;  // unreachable: gemv_serves wants out in W's dtype or float32
  } else {
    return launch_typed<T, T, kMode>(a, plan, device, facts, stream);
  }
}

template <class T>
cudaError_t launch_mode(const GemvArgs& a, const GemvPlan& plan, int device,
                        const DeviceFacts& facts, cudaStream_t stream) {
  if (a.silu_mul) return launch_out<T, Prologue::kSiluMul>(a, plan, device, facts, stream);
  if (a.rms_norm) {
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorNotSupported;  // unreachable: gemv_serves wants a 16-bit weight
    } else {
      return launch_out<T, Prologue::kRmsNorm>(a, plan, device, facts, stream);
    }
  }
  return launch_out<T, Prologue::kLoad>(a, plan, device, facts, stream);
}

// gemv_serves for the current device's facts.
bool serves(const GemvArgs& a, const DeviceFacts& facts) {
  if (a.rows < 1 || a.rows > kGemvMaxRows || a.in < 1 || a.out_features < 1) return false;
  if (!is_floating(a.weight_dtype)) return false;
  if (a.out_dtype != a.weight_dtype && a.out_dtype != DType::kFloat32) return false;
  const std::int64_t vec = 16 / static_cast<std::int64_t>(dtype_size(a.weight_dtype));
  // A row stride matters only where there is a second row.
  auto rows_aligned = [&](const void* p, std::int64_t ld) {
    return aligned16(p) && (a.rows == 1 || ld % vec == 0);
  };
  if (a.in % vec != 0 || !aligned16(a.weight) || a.out == nullptr) return false;
  if (a.silu_mul && a.rms_norm) return false;
  if (a.silu_mul) {
    if (!rows_aligned(a.gate, a.ldg) || !rows_aligned(a.up, a.ldu)) return false;
    if (static_cast<std::int64_t>(a.rows) * a.in > kMaxSiluElements) return false;
  } else if (a.rms_norm) {
    // 16-bit weights only (float32 stays on cuBLAS), and norms.cu's 4-wide variant: hidden rows
    // (float32, 4 to a pack) and norm_weight 16-byte aligned (in is a multiple of 8 here).
    if (a.weight_dtype == DType::kFloat32) return false;
    if (!aligned16(a.hidden) || (a.rows > 1 && a.ldh % 4 != 0) || !aligned16(a.norm_weight))
      return false;
    if (static_cast<std::int64_t>(a.rows) * a.in > kMaxRmsElements) return false;
  } else if (!rows_aligned(a.x, a.ldx)) {
    return false;
  }
  // The staged x alone must fit (checked in 64 bits before the plan's int arithmetic).
  const std::int64_t staged = static_cast<std::int64_t>(a.rows) * (a.in + 12 * vec) *
                              static_cast<std::int64_t>(dtype_size(a.weight_dtype));
  if (staged > facts.smem_optin) return false;
  return make_plan(a, facts.sms).smem_bytes <= facts.smem_optin;
}

}  // namespace

bool gemv_serves(const GemvArgs& a) {
  int device = 0;
  DeviceFacts facts;
  if (device_facts(device, facts) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;  // the fallback meets the error again and reports it
  }
  return serves(a, facts);
}

cudaError_t launch_gemv(const GemvArgs& a, cudaStream_t stream) {
  int device = 0;
  DeviceFacts facts;
  const cudaError_t status = device_facts(device, facts);
  if (status != cudaSuccess) return status;
  if (!serves(a, facts)) return cudaErrorNotSupported;
  const GemvPlan plan = make_plan(a, facts.sms);
  switch (a.weight_dtype) {
    case DType::kBFloat16:
      return launch_mode<__nv_bfloat16>(a, plan, device, facts, stream);
    case DType::kFloat16:
      return launch_mode<__half>(a, plan, device, facts, stream);
    case DType::kFloat32:
      return launch_mode<float>(a, plan, device, facts, stream);
    default:
      return cudaErrorNotSupported;
  }
}

}  // namespace kvcache::cuda::detail
