// Private to the CPU backend: pieces the dense and the quantized layers share.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace kvcache::cpu::detail {

// Returns weight rows [o0, o0 + n) as row-major float32 [n, in]: a pointer into the weight itself
// or into `scratch`, which it may resize and fill.
using PanelRows =
    std::function<const float*(std::int64_t o0, std::int64_t n, std::vector<float>& scratch)>;

// The panel counts of the prefill GEMMs are chosen for this many shares, never for the thread
// count in force: a GEMM's float sums follow the panel's shape, so panels sized per thread made a
// prefill's bits (and, at near-ties, its tokens) depend on the thread count. A count that is a
// multiple of 4 keeps 1, 2 and 4 threads evenly loaded (linear_panels hands panels out
// statically). On 2 threads the quantized path's panels are those the per-thread sizing gave; the
// dense path packs x twice per thread where it packed it once.
constexpr std::int64_t kPanelShares = 4;

// y [rows, out] = x [rows, in] · Wᵀ (+ bias), W handed over `panel` output rows at a time by
// `panel_rows`, each panel one Eigen GEMM, threaded over panels.
void linear_panels(const float* x, std::int64_t rows, std::int64_t in, std::int64_t out,
                   std::int64_t panel, const float* bias, float* y, const PanelRows& panel_rows);

}  // namespace kvcache::cpu::detail
