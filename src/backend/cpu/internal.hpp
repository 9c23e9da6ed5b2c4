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

// y [rows, out] = x [rows, in] · Wᵀ (+ bias), W handed over `panel` output rows at a time by
// `panel_rows`, each panel one Eigen GEMM, threaded over panels.
void linear_panels(const float* x, std::int64_t rows, std::int64_t in, std::int64_t out,
                   std::int64_t panel, const float* bias, float* y, const PanelRows& panel_rows);

}  // namespace kvcache::cpu::detail
