// Naive float64 oracles the tests check the library against: a cache that grows by concatenation
// (what transformers' DynamicCache does with torch.cat) and attention computed straight from its
// definition. Written for clarity, never for speed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "test_util.hpp"

namespace kvcache::reference {

/// A dense [d0, d1, d2, d3] float64 array.
struct Array4 {
  std::int64_t dims[4] = {0, 0, 0, 0};
  std::vector<double> data;

  Array4() = default;
  Array4(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d)
      : dims{a, b, c, d}, data(static_cast<std::size_t>(a * b * c * d), 0.0) {}
  static Array4 from(const Tensor& t) {
    Array4 out(t.size(0), t.size(1), t.size(2), t.size(3));
    out.data = testing::to_doubles(t);
    return out;
  }
  double& at(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) {
    return data[static_cast<std::size_t>(((a * dims[1] + b) * dims[2] + c) * dims[3] + d)];
  }
  double at(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) const {
    return data[static_cast<std::size_t>(((a * dims[1] + b) * dims[2] + c) * dims[3] + d)];
  }
};

/// Concatenates along dim 2 (the sequence), like torch.cat(..., dim=-2).
inline Array4 cat_seq(const Array4& a, const Array4& b) {
  if (a.data.empty()) return b;
  Array4 out(a.dims[0], a.dims[1], a.dims[2] + b.dims[2], a.dims[3]);
  for (std::int64_t i = 0; i < out.dims[0]; ++i)
    for (std::int64_t h = 0; h < out.dims[1]; ++h)
      for (std::int64_t s = 0; s < out.dims[2]; ++s)
        for (std::int64_t d = 0; d < out.dims[3]; ++d)
          out.at(i, h, s, d) = s < a.dims[2] ? a.at(i, h, s, d) : b.at(i, h, s - a.dims[2], d);
  return out;
}

/// Keeps batch rows `rows` (index_select along dim 0).
inline Array4 select_batch(const Array4& a, const std::vector<std::int64_t>& rows) {
  Array4 out(static_cast<std::int64_t>(rows.size()), a.dims[1], a.dims[2], a.dims[3]);
  for (std::size_t r = 0; r < rows.size(); ++r)
    for (std::int64_t h = 0; h < a.dims[1]; ++h)
      for (std::int64_t s = 0; s < a.dims[2]; ++s)
        for (std::int64_t d = 0; d < a.dims[3]; ++d)
          out.at(static_cast<std::int64_t>(r), h, s, d) = a.at(rows[r], h, s, d);
  return out;
}

inline Array4 crop_seq(const Array4& a, std::int64_t length) {
  Array4 out(a.dims[0], a.dims[1], std::min(length, a.dims[2]), a.dims[3]);
  for (std::int64_t i = 0; i < out.dims[0]; ++i)
    for (std::int64_t h = 0; h < out.dims[1]; ++h)
      for (std::int64_t s = 0; s < out.dims[2]; ++s)
        for (std::int64_t d = 0; d < out.dims[3]; ++d) out.at(i, h, s, d) = a.at(i, h, s, d);
  return out;
}

/// transformers' DynamicCache semantics, by concatenation.
struct ConcatCache {
  std::vector<Array4> keys, values;

  void update(const Tensor& k, const Tensor& v, int layer) {
    if (static_cast<std::size_t>(layer) == keys.size()) {
      keys.emplace_back();
      values.emplace_back();
    }
    keys[static_cast<std::size_t>(layer)] =
        cat_seq(keys[static_cast<std::size_t>(layer)], Array4::from(k));
    values[static_cast<std::size_t>(layer)] =
        cat_seq(values[static_cast<std::size_t>(layer)], Array4::from(v));
  }
  std::int64_t length(int layer = 0) const {
    return static_cast<std::size_t>(layer) < keys.size()
               ? keys[static_cast<std::size_t>(layer)].dims[2]
               : 0;
  }
  void crop(std::int64_t max_length) {
    if (max_length < 0) max_length = length() + max_length;
    for (auto* side : {&keys, &values})
      for (auto& a : *side) a = crop_seq(a, max_length);
  }
  void select(const std::vector<std::int64_t>& rows) {
    for (auto* side : {&keys, &values})
      for (auto& a : *side) a = select_batch(a, rows);
  }
};

/// softmax(Q·Kᵀ·scale + mask)·V in float64. q [b, h, q, d], k/v [b, kvh, kv, d]; mask [b][kv]
/// (empty = no padding); returns [b, q, h, d]. Rows that see no key give zeros. sliding_window
/// W > 0 also hides key slots <= cache_position - W (transformers' sliding window).
inline Array4 attention(const Array4& q, const Array4& k, const Array4& v,
                        const std::vector<std::vector<int>>& mask,
                        const std::vector<std::int64_t>& cache_position, std::int64_t kv_offset,
                        double scale, std::int64_t sliding_window = 0) {
  const std::int64_t batch = q.dims[0], heads = q.dims[1], q_len = q.dims[2], d = q.dims[3];
  const std::int64_t kv_heads = k.dims[1], kv_len = k.dims[2], n_rep = heads / kv_heads;
  Array4 out(batch, q_len, heads, d);
  std::vector<double> scores(static_cast<std::size_t>(kv_len));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < q_len; ++i) {
        const std::int64_t kvh = h / n_rep;
        double mx = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < kv_len; ++j) {
          const std::int64_t query_slot = cache_position[static_cast<std::size_t>(i)];
          const bool visible =
              kv_offset + j <= query_slot &&
              (sliding_window == 0 || kv_offset + j > query_slot - sliding_window) &&
              (mask.empty() || mask[static_cast<std::size_t>(b)][static_cast<std::size_t>(j)] != 0);
          double s = -std::numeric_limits<double>::infinity();
          if (visible) {
            s = 0;
            for (std::int64_t c = 0; c < d; ++c) s += q.at(b, h, i, c) * k.at(b, kvh, j, c);
            s *= scale;
          }
          scores[static_cast<std::size_t>(j)] = s;
          mx = std::max(mx, s);
        }
        if (mx == -std::numeric_limits<double>::infinity()) continue;  // zeros
        double sum = 0;
        for (auto& s : scores) {
          s = std::exp(s - mx);
          sum += s;
        }
        for (std::int64_t c = 0; c < d; ++c) {
          double acc = 0;
          for (std::int64_t j = 0; j < kv_len; ++j)
            acc += scores[static_cast<std::size_t>(j)] * v.at(b, kvh, j, c);
          out.at(b, i, h, c) = acc / sum;
        }
      }
  return out;
}

/// Rotates x [b, h, q, d] by RoPE in float64 for positions pos[b][i] and given inv_freq.
inline Array4 rope(const Array4& x, const std::vector<std::vector<std::int64_t>>& pos,
                   const std::vector<double>& inv_freq) {
  Array4 out = x;
  const std::int64_t half = x.dims[3] / 2;
  for (std::int64_t b = 0; b < x.dims[0]; ++b)
    for (std::int64_t h = 0; h < x.dims[1]; ++h)
      for (std::int64_t i = 0; i < x.dims[2]; ++i)
        for (std::int64_t k = 0; k < half; ++k) {
          const double angle =
              inv_freq[static_cast<std::size_t>(k)] *
              static_cast<double>(pos[static_cast<std::size_t>(b)][static_cast<std::size_t>(i)]);
          const double x1 = x.at(b, h, i, k), x2 = x.at(b, h, i, k + half);
          out.at(b, h, i, k) = x1 * std::cos(angle) - x2 * std::sin(angle);
          out.at(b, h, i, k + half) = x2 * std::cos(angle) + x1 * std::sin(angle);
        }
  return out;
}

}  // namespace kvcache::reference
