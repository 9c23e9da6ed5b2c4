// What a decode step replayed from a CUDA graph is made of, each piece against the CPU or the
// ordinary launch, then generate() with graphs on against graphs off:
//   append_at: keys and values copied into cache slots whose index is read on the device, from
//     contiguous, transposed and column-sliced views; storage poisoned with NaN so a stray write
//     shows, and a slot past the capacity (or negative) writes nothing;
//   attention with kv_len_device: the cache's whole storage passed, slots at and past the length
//     filled with NaN (a kernel that reads one gives NaN), mask bytes past the length garbage; one
//     set of capacity-sized tensors serves lengths from 1 to the capacity (one split plan), with
//     capacities short of one split (37), of a few (600) and of many (5000, where a short length
//     leaves whole splits empty); checked against cpu::attention over the first L keys with
//     attention_cuda_test.cpp's tolerances, and rows that see no key give exact zeros;
//   StreamScope, MirroredBuffer and Graph: capture runs nothing, replays read the host's new bytes,
//     a body that throws leaves no graph and the stream usable; a captured decode step (append_at
//     then attention) replayed step after step;
//   generate(): greedy and sampled, batch 1 and a left-padded batch, a caller's cache holding an
//     earlier turn, EOS and a stopping callback: the same tokens with cuda_graph on and off, and
//     graph_steps counting the replayed steps;
//   prompt reuse (issue #9): a prefilled offloaded, quantized or sink cache cloned twice, the two
//     continuations interleaved, each equal to a fresh run (generation/prompt_reuse.hpp).
// Every test skips where no GPU is usable.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "generation/prompt_reuse.hpp"
#include "kvcache/kvcache.hpp"

namespace kvcache {
namespace {

using testing::compare;
using testing::poisoned_device;
using testing::random_tensor;
using testing::to_doubles;

using testing::kFloatTypes;

double tolerance(DType dtype) { return testing::attention_tolerance(dtype); }

Tensor int64_host(const std::vector<std::int64_t>& values) {
  Tensor t = Tensor::empty({static_cast<std::int64_t>(values.size())}, DType::kInt64);
  std::copy(values.begin(), values.end(), t.data_as<std::int64_t>());
  return t;
}
Tensor int64_device(const std::vector<std::int64_t>& values) {
  return cuda::to_device(int64_host(values));
}

std::int64_t count_nan(const std::vector<double>& values) {
  return std::count_if(values.begin(), values.end(), [](double v) { return std::isnan(v); });
}

// The same random elements on the host and the device, seen through one kind of view.
struct Operand {
  Tensor host, device;
};

enum class View {
  kContiguous,   // [b, h, n, d]
  kTransposed,   // [b, n, h, d] memory seen as [b, h, n, d] (a projection's output)
  kColumnSlice,  // columns [16, 16 + d) of [b, h, n, d + 32]: aligned, rows strided
  kMisaligned,   // columns [1, 1 + d) of [b, h, n, d + 2]: rows start off any vector boundary
};
constexpr View kViews[] = {View::kContiguous, View::kTransposed, View::kColumnSlice,
                           View::kMisaligned};

Operand make_operand(std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t d, View view,
                     DType dtype, std::mt19937& rng, float amplitude = 1.0f) {
  Tensor base;
  switch (view) {
    case View::kContiguous:
      base = random_tensor({b, h, n, d}, dtype, rng, amplitude);
      break;
    case View::kTransposed:
      base = random_tensor({b, n, h, d}, dtype, rng, amplitude);
      break;
    case View::kColumnSlice:
      base = random_tensor({b, h, n, d + 32}, dtype, rng, amplitude);
      break;
    case View::kMisaligned:
      base = random_tensor({b, h, n, d + 2}, dtype, rng, amplitude);
      break;
  }
  const Tensor device = cuda::to_device(base);
  auto as_view = [&](const Tensor& t) {
    switch (view) {
      case View::kContiguous:
        return t;
      case View::kTransposed:
        return t.transpose(1, 2);
      case View::kColumnSlice:
        return t.slice(3, 16, 16 + d);
      case View::kMisaligned:
        return t.slice(3, 1, 1 + d);
    }
    return t;
  };
  return {as_view(base), as_view(device)};
}

// --- append_at ----------------------------------------------------------------------------------

class CudaAppendAt : public testing::CudaTest {};

// Expects `storage` [batch, heads, capacity, head_dim] (host) to hold `states` [batch, heads, n,
// head_dim] (host, any view) at slots [slot, slot + n) and NaN in every other slot.
void expect_slots(const Tensor& storage, const Tensor& states, std::int64_t slot) {
  const std::vector<double> got = to_doubles(storage);
  const std::vector<double> want = to_doubles(states);
  const std::int64_t batch = storage.size(0), heads = storage.size(1), capacity = storage.size(2),
                     d = storage.size(3), n = states.size(2);
  std::int64_t wrong = 0;
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t s = 0; s < capacity; ++s)
        for (std::int64_t e = 0; e < d; ++e) {
          const double g = got[static_cast<std::size_t>(((b * heads + h) * capacity + s) * d + e)];
          const bool written = s >= slot && s < slot + n;
          const double w =
              written ? want[static_cast<std::size_t>(((b * heads + h) * n + (s - slot)) * d + e)]
                      : std::nan("");
          const bool ok = written ? g == w : std::isnan(g);
          if (ok) continue;
          if (++wrong <= 5) {
            ADD_FAILURE() << "batch " << b << ", head " << h << ", slot " << s << ", element " << e
                          << ": expected " << (written ? std::to_string(w) : "NaN (untouched)")
                          << ", got " << g;
          }
        }
  EXPECT_EQ(wrong, 0) << "elements wrong in [" << batch << ", " << heads << ", " << capacity << ", "
                      << d << "] storage, slots [" << slot << ", " << slot + n << ") written";
}

TEST_F(CudaAppendAt, WritesTheSlotsTheDeviceSays) {
  std::mt19937 rng(701);
  const std::int64_t batch = 2, heads = 3, capacity = 37, d = 64;
  for (DType dtype : kFloatTypes)
    for (std::int64_t n : {1, 3})
      for (View view : kViews)
        for (std::int64_t slot : {std::int64_t{0}, std::int64_t{17}, capacity - n}) {
          SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << ", n " << n << ", view "
                                            << static_cast<int>(view) << ", slot " << slot);
          const Operand keys = make_operand(batch, heads, n, d, view, dtype, rng);
          const Operand values = make_operand(batch, heads, n, d, view, dtype, rng);
          const Tensor key_storage = poisoned_device({batch, heads, capacity, d}, dtype);
          const Tensor value_storage = poisoned_device({batch, heads, capacity, d}, dtype);
          cuda::append_at(key_storage, keys.device, value_storage, values.device,
                          int64_device({slot}));
          expect_slots(cuda::to_host(key_storage), keys.host, slot);
          expect_slots(cuda::to_host(value_storage), values.host, slot);
        }
}

// A decode loop's appends: a prompt at slot 0, then one token a step, the slot rewritten in one
// device tensor between launches; the storage ends up as the concatenation.
TEST_F(CudaAppendAt, StepByStepFillsTheStorage) {
  std::mt19937 rng(702);
  const std::int64_t batch = 2, heads = 3, capacity = 37, d = 64, prompt = 5;
  for (DType dtype : kFloatTypes) {
    SCOPED_TRACE(dtype_name(dtype));
    const Tensor all_keys = random_tensor({batch, heads, capacity, d}, dtype, rng);
    const Tensor all_values = random_tensor({batch, heads, capacity, d}, dtype, rng);
    const Tensor keys_device = cuda::to_device(all_keys);
    const Tensor values_device = cuda::to_device(all_values);
    const Tensor key_storage = poisoned_device({batch, heads, capacity, d}, dtype);
    const Tensor value_storage = poisoned_device({batch, heads, capacity, d}, dtype);
    const Tensor slot = int64_device({0});
    for (std::int64_t at = 0; at < capacity;) {
      const std::int64_t n = at == 0 ? prompt : 1;
      cuda::copy(slot, int64_device({at}));
      cuda::append_at(key_storage, keys_device.slice(2, at, at + n), value_storage,
                      values_device.slice(2, at, at + n), slot);
      at += n;
      if (at == prompt || at == 20) {  // part way: the slots so far, NaN past them
        expect_slots(cuda::to_host(key_storage), all_keys.slice(2, 0, at), 0);
        expect_slots(cuda::to_host(value_storage), all_values.slice(2, 0, at), 0);
      }
    }
    expect_slots(cuda::to_host(key_storage), all_keys, 0);
    expect_slots(cuda::to_host(value_storage), all_values, 0);
    // The storage is full: one more token at slot = capacity writes nothing.
    cuda::copy(slot, int64_device({capacity}));
    cuda::append_at(key_storage, keys_device.slice(2, 0, 1), value_storage,
                    values_device.slice(2, 0, 1), slot);
    expect_slots(cuda::to_host(key_storage), all_keys, 0);
    expect_slots(cuda::to_host(value_storage), all_values, 0);
  }
}

TEST_F(CudaAppendAt, SlotsPastTheCapacityWriteNothing) {
  std::mt19937 rng(703);
  const std::int64_t batch = 2, heads = 3, capacity = 37, d = 64;
  struct Bad {
    std::int64_t slot, n;
  };
  for (DType dtype : kFloatTypes)
    for (const Bad& bad : {Bad{35, 3}, Bad{36, 3}, Bad{37, 1}, Bad{37, 3}, Bad{1000, 1}, Bad{-1, 1},
                           Bad{-3, 3}, Bad{-2, 3}}) {
      SCOPED_TRACE(::testing::Message()
                   << dtype_name(dtype) << ", slot " << bad.slot << ", n " << bad.n);
      const Operand keys = make_operand(batch, heads, bad.n, d, View::kContiguous, dtype, rng);
      const Operand values = make_operand(batch, heads, bad.n, d, View::kTransposed, dtype, rng);
      const Tensor key_storage = poisoned_device({batch, heads, capacity, d}, dtype);
      const Tensor value_storage = poisoned_device({batch, heads, capacity, d}, dtype);
      cuda::append_at(key_storage, keys.device, value_storage, values.device,
                      int64_device({bad.slot}));
      const std::vector<double> k = to_doubles(cuda::to_host(key_storage));
      const std::vector<double> v = to_doubles(cuda::to_host(value_storage));
      EXPECT_EQ(count_nan(k), static_cast<std::int64_t>(k.size())) << "keys were written";
      EXPECT_EQ(count_nan(v), static_cast<std::int64_t>(v.size())) << "values were written";
    }
}

TEST_F(CudaAppendAt, ChecksArguments) {
  std::mt19937 rng(704);
  const std::int64_t batch = 2, heads = 3, capacity = 37, d = 64;
  const DType f32 = DType::kFloat32;
  const Tensor key_storage = poisoned_device({batch, heads, capacity, d}, f32);
  const Tensor value_storage = poisoned_device({batch, heads, capacity, d}, f32);
  const Tensor keys = cuda::to_device(random_tensor({batch, heads, 1, d}, f32, rng));
  const Tensor values = cuda::to_device(random_tensor({batch, heads, 1, d}, f32, rng));
  const Tensor slot = int64_device({4});
  auto states = [&](std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t e, DType dt) {
    return cuda::to_device(random_tensor({b, h, n, e}, dt, rng));
  };

  // Dtypes: states of another dtype than their storage.
  EXPECT_THROW(cuda::append_at(key_storage, states(batch, heads, 1, d, DType::kFloat16),
                               value_storage, values, slot),
               Error);
  EXPECT_THROW(cuda::append_at(key_storage, keys, value_storage,
                               states(batch, heads, 1, d, DType::kBFloat16), slot),
               Error);
  // Shapes: batch, heads, head_dim unlike the storage's; values unlike keys; storage not rank 4.
  EXPECT_THROW(
      cuda::append_at(key_storage, states(1, heads, 1, d, f32), value_storage, values, slot),
      Error);
  EXPECT_THROW(
      cuda::append_at(key_storage, states(batch, 2, 1, d, f32), value_storage, values, slot),
      Error);
  EXPECT_THROW(
      cuda::append_at(key_storage, states(batch, heads, 1, 32, f32), value_storage, values, slot),
      Error);
  EXPECT_THROW(
      cuda::append_at(key_storage, keys, value_storage, states(batch, heads, 2, d, f32), slot),
      Error);
  EXPECT_THROW(cuda::append_at(key_storage.view({batch * heads, capacity, d}), keys, value_storage,
                               values, slot),
               Error);
  // Devices: states or storage on the host.
  EXPECT_THROW(cuda::append_at(key_storage, cuda::to_host(keys), value_storage, values, slot),
               Error);
  EXPECT_THROW(cuda::append_at(cuda::to_host(key_storage), keys, value_storage, values, slot),
               Error);
  // The slot: int64 on cuda, nothing else.
  std::int32_t four = 4;
  EXPECT_THROW(cuda::append_at(key_storage, keys, value_storage, values,
                               cuda::to_device(Tensor::from_blob(&four, {1}, DType::kInt32))),
               Error);
  EXPECT_THROW(cuda::append_at(key_storage, keys, value_storage, values, int64_host({4})), Error);
  EXPECT_THROW(cuda::append_at(key_storage, keys, value_storage, values, Tensor()), Error);

  // Nothing was written by the calls that threw; the same arguments, corrected, work.
  const std::vector<double> untouched = to_doubles(cuda::to_host(key_storage));
  EXPECT_EQ(count_nan(untouched), static_cast<std::int64_t>(untouched.size()));
  EXPECT_EQ(count_nan(to_doubles(cuda::to_host(value_storage))),
            static_cast<std::int64_t>(untouched.size()));
  cuda::append_at(key_storage, keys, value_storage, values, slot);
  expect_slots(cuda::to_host(key_storage), cuda::to_host(keys), 4);
  expect_slots(cuda::to_host(value_storage), cuda::to_host(values), 4);
}

// --- rope_append: rope and append_at in one launch ---------------------------------------------

class CudaRopeAppend : public testing::CudaTest {};

Tensor float_device(const std::vector<float>& values) {
  Tensor host = Tensor::empty({static_cast<std::int64_t>(values.size())}, DType::kFloat32);
  std::copy(values.begin(), values.end(), host.data_as<float>());
  return cuda::to_device(host);
}

// rope_append(x, key_heads, ...) must leave exactly what rope(x) then append_at(keys of x) leaves:
// the query heads of x rotated in place (bit for bit), the rotated keys and the values in slots
// [slot, slot + n) of the storage and NaN elsewhere, for every dtype, head_dim 64 and 128, and a
// q|k view with a row stride (as the model's fused q|k|v output is).
TEST_F(CudaRopeAppend, EqualsRopeThenAppendAt) {
  std::mt19937 rng(711);
  const std::int64_t batch = 2, q_heads = 4, kv_heads = 2, capacity = 23;
  for (DType dtype : kFloatTypes)
    for (std::int64_t d : {64, 128})
      for (std::int64_t n : {1, 3})
        for (std::int64_t slot : {std::int64_t{0}, std::int64_t{9}, capacity - n}) {
          SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << ", head_dim " << d << ", n "
                                            << n << ", slot " << slot);
          std::vector<float> inv_freq(static_cast<std::size_t>(d / 2));
          for (std::size_t k = 0; k < inv_freq.size(); ++k)
            inv_freq[k] = std::pow(10000.0f, -2.0f * static_cast<float>(k) / static_cast<float>(d));
          const Tensor freq = float_device(inv_freq);
          std::vector<std::int64_t> pos(static_cast<std::size_t>(batch * n));
          for (std::size_t i = 0; i < pos.size(); ++i)
            pos[i] = 3 + 7 * static_cast<std::int64_t>(i);
          const Tensor positions = int64_device(pos).view({batch, n});
          // [batch · n, (q_heads + kv_heads + kv_heads) · d]: q | k | v, as the fused projection.
          const std::int64_t width = (q_heads + 2 * kv_heads) * d;
          const Tensor qkv_host = random_tensor({batch * n, width}, dtype, rng, 2.0f);
          auto qk_view = [&](const Tensor& qkv) {
            return Tensor::from_storage(
                qkv.storage(), qkv.data(),
                std::array<std::int64_t, 4>{batch, q_heads + kv_heads, n, d}, dtype, Device::kCuda,
                std::array<std::int64_t, 4>{n * width, d, width, 1});
          };
          auto v_view = [&](const Tensor& qkv) {
            return Tensor::from_storage(
                qkv.storage(),
                static_cast<std::uint8_t*>(qkv.data()) +
                    (q_heads + kv_heads) * d * static_cast<std::int64_t>(dtype_size(dtype)),
                std::array<std::int64_t, 4>{batch, kv_heads, n, d}, dtype, Device::kCuda,
                std::array<std::int64_t, 4>{n * width, d, width, 1});
          };
          // The two-launch way.
          const Tensor qkv_a = cuda::to_device(qkv_host);
          const Tensor keys_a = poisoned_device({batch, kv_heads, capacity, d}, dtype);
          const Tensor values_a = poisoned_device({batch, kv_heads, capacity, d}, dtype);
          const Tensor x_a = qk_view(qkv_a);
          cuda::rope(x_a, positions, freq, 1.0f);
          cuda::append_at(keys_a, x_a.slice(1, q_heads, q_heads + kv_heads), values_a,
                          v_view(qkv_a), int64_device({slot}));
          // The one-launch way.
          const Tensor qkv_b = cuda::to_device(qkv_host);
          const Tensor keys_b = poisoned_device({batch, kv_heads, capacity, d}, dtype);
          const Tensor values_b = poisoned_device({batch, kv_heads, capacity, d}, dtype);
          const Tensor x_b = qk_view(qkv_b);
          cuda::rope_append(x_b, kv_heads, keys_b, values_b, v_view(qkv_b), positions, freq, 1.0f,
                            int64_device({slot}));
          const Tensor x_a_host = cuda::to_host(x_a.slice(1, 0, q_heads));
          const Tensor x_b_host = cuda::to_host(x_b.slice(1, 0, q_heads));
          EXPECT_EQ(to_doubles(x_b_host), to_doubles(x_a_host)) << "query heads";
          // The storage from append_at holds the rotated keys at the slots and NaN elsewhere;
          // rope_append's must be the same bits.
          const std::vector<double> ka = to_doubles(cuda::to_host(keys_a));
          const std::vector<double> kb = to_doubles(cuda::to_host(keys_b));
          const std::vector<double> va = to_doubles(cuda::to_host(values_a));
          const std::vector<double> vb = to_doubles(cuda::to_host(values_b));
          ASSERT_EQ(ka.size(), kb.size());
          std::int64_t wrong = 0, nan_a = 0, nan_b = 0;
          for (std::size_t e = 0; e < ka.size(); ++e) {
            const bool same_k = std::isnan(ka[e]) ? std::isnan(kb[e]) : ka[e] == kb[e];
            const bool same_v = std::isnan(va[e]) ? std::isnan(vb[e]) : va[e] == vb[e];
            wrong += !same_k + !same_v;
            nan_a += std::isnan(ka[e]);
            nan_b += std::isnan(kb[e]);
          }
          EXPECT_EQ(wrong, 0);
          EXPECT_EQ(nan_a, batch * kv_heads * (capacity - n) * d);  // exactly n slots written
          EXPECT_EQ(nan_b, nan_a);
          // rope_append leaves x's key heads as they came (only the storage gets them rotated).
          const Tensor k_b = cuda::to_host(x_b.slice(1, q_heads, q_heads + kv_heads));
          const Tensor k_in =
              qk_view(cuda::to_device(qkv_host)).slice(1, q_heads, q_heads + kv_heads);
          EXPECT_EQ(to_doubles(k_b), to_doubles(cuda::to_host(k_in)));
        }
}

TEST_F(CudaRopeAppend, SlotsPastTheCapacityWriteNoSlotButRotateTheQueries) {
  std::mt19937 rng(712);
  const std::int64_t batch = 1, q_heads = 2, kv_heads = 1, capacity = 8, d = 64, n = 2;
  const Tensor freq = float_device(std::vector<float>(d / 2, 0.25f));
  const Tensor positions = int64_device({5, 6}).view({batch, n});
  for (std::int64_t slot :
       {std::int64_t{7}, std::int64_t{8}, std::int64_t{-1}, std::int64_t{1000}}) {
    SCOPED_TRACE(::testing::Message() << "slot " << slot);
    const Tensor x_host = random_tensor({batch, q_heads + kv_heads, n, d}, DType::kFloat32, rng);
    const Tensor values =
        cuda::to_device(random_tensor({batch, kv_heads, n, d}, DType::kFloat32, rng));
    const Tensor x = cuda::to_device(x_host);
    const Tensor expected = cuda::to_device(x_host);
    cuda::rope(expected, positions, freq, 1.0f);
    const Tensor keys = poisoned_device({batch, kv_heads, capacity, d}, DType::kFloat32);
    const Tensor vals = poisoned_device({batch, kv_heads, capacity, d}, DType::kFloat32);
    cuda::rope_append(x, kv_heads, keys, vals, values, positions, freq, 1.0f, int64_device({slot}));
    EXPECT_EQ(to_doubles(cuda::to_host(x.slice(1, 0, q_heads))),
              to_doubles(cuda::to_host(expected.slice(1, 0, q_heads))));
    const std::vector<double> k = to_doubles(cuda::to_host(keys));
    const std::vector<double> v = to_doubles(cuda::to_host(vals));
    EXPECT_EQ(count_nan(k), static_cast<std::int64_t>(k.size())) << "keys were written";
    EXPECT_EQ(count_nan(v), static_cast<std::int64_t>(v.size())) << "values were written";
  }
}

TEST_F(CudaRopeAppend, ChecksArguments) {
  std::mt19937 rng(713);
  const DType f32 = DType::kFloat32;
  const std::int64_t batch = 2, q_heads = 2, kv_heads = 1, capacity = 8, d = 64;
  const Tensor freq = float_device(std::vector<float>(d / 2, 0.5f));
  const Tensor positions = int64_device({1, 2}).view({batch, 1});
  const Tensor x = cuda::to_device(random_tensor({batch, q_heads + kv_heads, 1, d}, f32, rng));
  const Tensor values = cuda::to_device(random_tensor({batch, kv_heads, 1, d}, f32, rng));
  const Tensor keys = poisoned_device({batch, kv_heads, capacity, d}, f32);
  const Tensor vals = poisoned_device({batch, kv_heads, capacity, d}, f32);
  const Tensor slot = int64_device({0});
  auto call = [&](const Tensor& x_, std::int64_t key_heads, const Tensor& k_, const Tensor& v_,
                  const Tensor& values_, const Tensor& slot_) {
    cuda::rope_append(x_, key_heads, k_, v_, values_, positions, freq, 1.0f, slot_);
  };
  EXPECT_NO_THROW(call(x, kv_heads, keys, vals, values, slot));
  EXPECT_THROW(call(x, 0, keys, vals, values, slot), Error);                       // no key heads
  EXPECT_THROW(call(x, q_heads + kv_heads + 1, keys, vals, values, slot), Error);  // too many
  EXPECT_THROW(call(x, 2, keys, vals, values, slot), Error);  // storage has 1 kv head, not 2
  EXPECT_THROW(call(x, kv_heads, poisoned_device({batch, kv_heads, capacity, d}, DType::kFloat16),
                    vals, values, slot),
               Error);  // dtype
  EXPECT_THROW(call(x, kv_heads, keys, poisoned_device({batch, kv_heads, capacity + 1, d}, f32),
                    values, slot),
               Error);  // capacities differ
  EXPECT_THROW(call(x, kv_heads, keys, vals,
                    cuda::to_device(random_tensor({batch, kv_heads, 2, d}, f32, rng)), slot),
               Error);  // values for 2 tokens, x for 1
  EXPECT_THROW(call(x, kv_heads, keys, vals, values, cuda::to_device(int64_host({0, 1}))), Error);
  EXPECT_THROW(call(x, kv_heads, keys, vals, values, int64_host({0})), Error);  // slot on the host
  EXPECT_THROW(call(x, kv_heads, cuda::to_host(keys), vals, values, slot), Error);
  // Nothing above launched: the storage still holds only NaN but for the one good call's slot 0.
  const std::vector<double> k = to_doubles(cuda::to_host(keys));
  EXPECT_EQ(count_nan(k), static_cast<std::int64_t>(k.size()) - batch * kv_heads * d);
}

// --- attention with the length read on the device -----------------------------------------------

class CudaAttentionKvLen : public testing::CudaTest {};

struct KvLenCase {
  std::int64_t batch = 2;
  std::int64_t num_heads = 4, num_kv_heads = 4;
  std::int64_t q_len = 1, capacity = 37, head_dim = 64;
  std::int64_t left_pad = 0;  // batch row b starts with min(b · left_pad, L) masked keys
  bool use_mask = true;
  bool transposed_query = false;  // query as [b, q, heads, d] memory, as the model has it
  std::int64_t overshoot = 0;     // kv_len_device = L + overshoot where L is the capacity
  DType dtype = DType::kFloat32;
  std::vector<std::int64_t> lengths;  // ascending, each at least q_len, at most the capacity

  std::string describe() const {
    std::ostringstream s;
    s << "batch " << batch << ", heads " << num_heads << "/" << num_kv_heads << ", q_len " << q_len
      << ", capacity " << capacity << ", head_dim " << head_dim << ", left_pad " << left_pad
      << ", mask " << use_mask << ", transposed query " << transposed_query << ", overshoot "
      << overshoot << ", " << dtype_name(dtype);
    return s.str();
  }
};

// Mask byte j of a row whose first `pad` keys are padding, for length L: 0 for padding, 1 for the
// keys taking part, and past L garbage, mostly nonzero (the keys there are NaN: a kernel that
// attends to one shows it).
std::uint8_t mask_byte(std::int64_t j, std::int64_t pad, std::int64_t length) {
  if (j < pad) return 0;
  if (j < length) return 1;
  return j % 5 == 0 ? 0 : static_cast<std::uint8_t>(1 + j % 200);
}

// Runs one case at every length of c.lengths over the same capacity-sized storage; returns the
// number of (batch row, query) pairs that saw no key, over all lengths.
std::int64_t run_kv_len_case(const KvLenCase& c, std::mt19937& rng) {
  SCOPED_TRACE(c.describe());
  const std::int64_t capacity = c.capacity;
  const Tensor all_keys =
      random_tensor({c.batch, c.num_kv_heads, capacity, c.head_dim}, c.dtype, rng);
  const Tensor all_values =
      random_tensor({c.batch, c.num_kv_heads, capacity, c.head_dim}, c.dtype, rng);
  const Tensor keys_device = cuda::to_device(all_keys);
  const Tensor values_device = cuda::to_device(all_values);
  // The cache's storage: slots [0, L) filled as L grows, the rest NaN.
  const Tensor key_storage =
      poisoned_device({c.batch, c.num_kv_heads, capacity, c.head_dim}, c.dtype);
  const Tensor value_storage =
      poisoned_device({c.batch, c.num_kv_heads, capacity, c.head_dim}, c.dtype);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  std::int64_t filled = 0, empty_rows = 0;
  for (std::int64_t length : c.lengths) {
    SCOPED_TRACE(::testing::Message() << "L " << length);
    EXPECT_GE(length, c.q_len);
    EXPECT_LE(length, capacity);
    EXPECT_GE(length, filled) << "lengths must ascend";
    if (length > filled) {
      cuda::copy(key_storage.slice(2, filled, length), keys_device.slice(2, filled, length));
      cuda::copy(value_storage.slice(2, filled, length), values_device.slice(2, filled, length));
      filled = length;
    }
    const Operand query = make_operand(c.batch, c.num_heads, c.q_len, c.head_dim,
                                       c.transposed_query ? View::kTransposed : View::kContiguous,
                                       c.dtype, rng, 3.0f);

    // The device mask covers the capacity, the CPU's the first L keys.
    std::vector<std::uint8_t> mask, full_mask;
    Tensor mask_device;
    if (c.use_mask) {
      full_mask.resize(static_cast<std::size_t>(c.batch * capacity));
      mask.resize(static_cast<std::size_t>(c.batch * length));
      for (std::int64_t b = 0; b < c.batch; ++b) {
        const std::int64_t pad = std::min(b * c.left_pad, length);
        for (std::int64_t j = 0; j < capacity; ++j)
          full_mask[static_cast<std::size_t>(b * capacity + j)] = mask_byte(j, pad, length);
        for (std::int64_t j = 0; j < length; ++j)
          mask[static_cast<std::size_t>(b * length + j)] = mask_byte(j, pad, length);
      }
      mask_device =
          cuda::to_device(Tensor::from_blob(full_mask.data(), {c.batch, capacity}, DType::kUInt8));
    }
    std::vector<std::int64_t> positions(static_cast<std::size_t>(c.q_len));
    for (std::int64_t i = 0; i < c.q_len; ++i)
      positions[static_cast<std::size_t>(i)] = length - c.q_len + i;

    Tensor expected = Tensor::empty({c.batch, c.q_len, c.num_heads, c.head_dim}, c.dtype);
    cpu::attention(query.host, all_keys.slice(2, 0, length), all_values.slice(2, 0, length),
                   std::span<const std::uint8_t>(mask), std::span<const std::int64_t>(positions), 0,
                   scale, expected);
    const Tensor out = poisoned_device({c.batch, c.q_len, c.num_heads, c.head_dim}, c.dtype);
    const std::int64_t device_length = length == capacity ? length + c.overshoot : length;
    cuda::attention(query.device, key_storage, value_storage, mask_device, int64_device(positions),
                    0, scale, out, int64_device({device_length}));
    const std::vector<double> actual = to_doubles(cuda::to_host(out));
    const std::vector<double> reference = to_doubles(expected);
    const testing::ErrorStats error = compare(actual, reference);
    EXPECT_LE(error.max_abs, tolerance(c.dtype))
        << "max abs error " << error.max_abs << ", max rel error " << error.max_rel
        << " (NaN count " << count_nan(actual) << ")";

    // Rows that see no key: exact zeros, in every head.
    const std::int64_t row_elems = c.num_heads * c.head_dim;
    for (std::int64_t b = 0; b < c.batch; ++b)
      for (std::int64_t i = 0; i < c.q_len; ++i) {
        bool sees_any = false;
        for (std::int64_t j = 0; j < length && !sees_any; ++j)
          sees_any = j <= positions[static_cast<std::size_t>(i)] &&
                     (mask.empty() || mask[static_cast<std::size_t>(b * length + j)] != 0);
        if (sees_any) continue;
        ++empty_rows;
        const auto first = actual.begin() + (b * c.q_len + i) * row_elems;
        const auto bad = std::find_if(first, first + row_elems, [](double v) { return v != 0.0; });
        EXPECT_TRUE(bad == first + row_elems)
            << "batch row " << b << ", query " << i << " sees no key, expected zeros, got " << *bad;
      }
  }
  return empty_rows;
}

struct HeadCounts {
  std::int64_t num_heads, num_kv_heads;
};
constexpr HeadCounts kRatios[] = {{4, 4}, {8, 2}, {32, 4}};  // 1, 4, 8

TEST_F(CudaAttentionKvLen, EveryLengthUpToTheCapacityMatchesCpu) {
  std::mt19937 rng(711);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {64, 128, 80})
      for (const HeadCounts& heads : kRatios)
        for (std::int64_t q_len : {1, 2, 4})
          for (std::int64_t capacity : {37, 600}) {
            KvLenCase c;
            c.dtype = dtype;
            c.head_dim = head_dim;
            c.num_heads = heads.num_heads;
            c.num_kv_heads = heads.num_kv_heads;
            c.q_len = q_len;
            c.capacity = capacity;
            c.left_pad = 3;  // row 1: 3 padded keys (all of them at L = q_len <= 3)
            c.transposed_query = head_dim != 128;
            c.lengths = {q_len, capacity / 2 + 1, capacity};
            run_kv_len_case(c, rng);
          }
}

TEST_F(CudaAttentionKvLen, ShortLengthsInALongCapacityLeaveWholeSplitsEmpty) {
  std::mt19937 rng(712);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {64, 128, 80})
      for (std::int64_t q_len : {1, 4}) {
        // Batch 3, 1500 padded keys a row step: row 2 starts with 3000 masked keys, so it sees no
        // key at L = 1600 and one at L = 3001 (with q_len 1).
        KvLenCase c;
        c.dtype = dtype;
        c.head_dim = head_dim;
        c.batch = 3;
        c.num_heads = 8;
        c.num_kv_heads = 2;
        c.q_len = q_len;
        c.capacity = 5000;
        c.left_pad = 1500;
        c.lengths = {q_len, 40, 1600, 3001, 5000};
        run_kv_len_case(c, rng);
        // One kv head of one row: as many splits as the planner allows, nearly all past L.
        c.batch = 1;
        c.num_heads = 4;
        c.num_kv_heads = 1;
        c.left_pad = 0;
        c.lengths = {q_len, 40, 5000};
        run_kv_len_case(c, rng);
      }
}

TEST_F(CudaAttentionKvLen, WithoutMaskMatchesCpu) {
  std::mt19937 rng(713);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {64, 128})
      for (std::int64_t q_len : {1, 4})
        for (std::int64_t capacity : {37, 600, 5000}) {
          KvLenCase c;
          c.dtype = dtype;
          c.head_dim = head_dim;
          c.num_heads = 32;
          c.num_kv_heads = 4;
          c.q_len = q_len;
          c.capacity = capacity;
          c.use_mask = false;
          c.transposed_query = true;
          c.lengths = {q_len, capacity / 3 + 1, capacity};
          run_kv_len_case(c, rng);
        }
}

TEST_F(CudaAttentionKvLen, LengthPastTheCapacityReadsTheCapacity) {
  std::mt19937 rng(714);
  for (DType dtype : kFloatTypes)
    for (std::int64_t overshoot : {std::int64_t{1}, std::int64_t{5}, std::int64_t{1} << 40}) {
      KvLenCase c;
      c.dtype = dtype;
      c.num_heads = 8;
      c.num_kv_heads = 2;
      c.capacity = 600;
      c.left_pad = 10;
      c.overshoot = overshoot;
      c.lengths = {600};
      run_kv_len_case(c, rng);
    }
}

TEST_F(CudaAttentionKvLen, RowsThatSeeNoKeyAreZeros) {
  std::mt19937 rng(715);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {80, 128})
      for (std::int64_t q_len : {1, 4}) {
        // Batch row 1 is padding throughout, at every length.
        KvLenCase c;
        c.dtype = dtype;
        c.head_dim = head_dim;
        c.num_heads = 8;
        c.num_kv_heads = 2;
        c.q_len = q_len;
        c.capacity = 600;
        c.left_pad = 600;
        c.lengths = {4, 300, 600};
        EXPECT_EQ(run_kv_len_case(c, rng), 3 * q_len) << c.describe();
      }
}

TEST_F(CudaAttentionKvLen, ChecksArguments) {
  std::mt19937 rng(716);
  const std::int64_t b = 2, h = 8, kvh = 2, q = 1, capacity = 37, d = 64;
  const DType f32 = DType::kFloat32;
  const Tensor query = cuda::to_device(random_tensor({b, h, q, d}, f32, rng));
  const Tensor keys = cuda::to_device(random_tensor({b, kvh, capacity, d}, f32, rng));
  const Tensor values = cuda::to_device(random_tensor({b, kvh, capacity, d}, f32, rng));
  const Tensor mask = cuda::to_device(Tensor::zeros({b, capacity}, DType::kUInt8));
  const Tensor position = int64_device({9});
  const Tensor kv_len = int64_device({10});
  const Tensor out = poisoned_device({b, q, h, d}, f32);
  const float scale = 0.125f;

  // The length: int64 [1] on cuda.
  EXPECT_THROW(
      cuda::attention(query, keys, values, Tensor(), position, 0, scale, out, int64_host({10})),
      Error);
  std::int32_t ten = 10;
  EXPECT_THROW(cuda::attention(query, keys, values, Tensor(), position, 0, scale, out,
                               cuda::to_device(Tensor::from_blob(&ten, {1}, DType::kInt32))),
               Error);
  EXPECT_THROW(cuda::attention(query, keys, values, Tensor(), position, 0, scale, out, Tensor()),
               Error);
  // The mask covers the capacity, not a shorter length.
  EXPECT_THROW(
      cuda::attention(query, keys, values, cuda::to_device(Tensor::zeros({b, 10}, DType::kUInt8)),
                      position, 0, scale, out, kv_len),
      Error);
  // Decode only: at most 8 query rows.
  const Tensor nine_rows = cuda::to_device(random_tensor({b, h, 9, d}, f32, rng));
  std::vector<std::int64_t> nine_positions(9);
  for (std::int64_t i = 0; i < 9; ++i) nine_positions[static_cast<std::size_t>(i)] = 20 + i;
  EXPECT_THROW(cuda::attention(nine_rows, keys, values, Tensor(), int64_device(nine_positions), 0,
                               scale, poisoned_device({b, 9, h, d}, f32), int64_device({29})),
               Error);
  // The ordinary checks still hold: keys of another dtype than the query.
  EXPECT_THROW(cuda::attention(query, cuda::cast(keys, DType::kBFloat16),
                               cuda::cast(values, DType::kBFloat16), Tensor(), position, 0, scale,
                               out, kv_len),
               Error);

  // Nothing was written by the calls that threw; the same arguments, corrected, work (the mask
  // all zeros: every row sees nothing, so zeros).
  for (double v : to_doubles(cuda::to_host(out))) ASSERT_TRUE(std::isnan(v));
  cuda::attention(query, keys, values, mask, position, 0, scale, out, kv_len);
  for (double v : to_doubles(cuda::to_host(out))) ASSERT_EQ(v, 0.0);
  cuda::attention(query, keys, values, Tensor(), position, 0, scale, out, kv_len);
  for (double v : to_doubles(cuda::to_host(out))) ASSERT_FALSE(std::isnan(v));
}

// --- StreamScope, MirroredBuffer, Graph ---------------------------------------------------------

class CudaGraph : public testing::CudaTest {};

std::vector<std::uint8_t> device_bytes(const cuda::MirroredBuffer& buffer) {
  const Tensor host = cuda::to_host(buffer.device());
  const auto* p = static_cast<const std::uint8_t*>(host.data());
  return {p, p + host.nbytes()};
}

// Four floats of the host half at byte `offset`.
std::vector<float> host_floats(const cuda::MirroredBuffer& buffer, std::size_t offset) {
  std::vector<float> out(4);
  std::memcpy(out.data(), buffer.host() + offset, 4 * sizeof(float));
  return out;
}
void set_host_floats(const cuda::MirroredBuffer& buffer, std::size_t offset,
                     const std::vector<float>& values) {
  std::memcpy(buffer.host() + offset, values.data(), values.size() * sizeof(float));
}
std::vector<float> device_floats(const cuda::MirroredBuffer& buffer, std::size_t offset) {
  const std::vector<std::uint8_t> bytes = device_bytes(buffer);
  std::vector<float> out(4);
  std::memcpy(out.data(), bytes.data() + offset, 4 * sizeof(float));
  return out;
}

TEST_F(CudaGraph, StreamScopeMakesAStreamCurrentAndRestoresThePrevious) {
  const cuda::Stream before = cuda::current_stream();
  cuda::Stream inside = nullptr;
  {
    cuda::StreamScope scope;
    inside = cuda::current_stream();
    EXPECT_NE(inside, nullptr);  // a stream of its own: graphs cannot capture the legacy one
    EXPECT_NE(inside, before);
    {
      cuda::StreamScope nested;  // the thread has one own stream: a nested scope keeps it
      EXPECT_EQ(cuda::current_stream(), inside);
    }
    EXPECT_EQ(cuda::current_stream(), inside);
    // Work issued on it runs.
    std::mt19937 rng(3);
    const Tensor host = random_tensor({64}, DType::kFloat32, rng);
    const Tensor x = cuda::to_device(host);
    cuda::add_inplace(x, x);
    cuda::synchronize();
    const std::vector<double> doubled = to_doubles(cuda::to_host(x));
    const std::vector<double> original = to_doubles(host);
    for (std::size_t i = 0; i < original.size(); ++i) ASSERT_EQ(doubled[i], 2 * original[i]);
  }
  EXPECT_EQ(cuda::current_stream(), before);
}

TEST_F(CudaGraph, MirroredBufferStartsZeroedAndViewsItsDeviceHalf) {
  cuda::StreamScope scope;
  const cuda::MirroredBuffer buffer(64);
  ASSERT_EQ(buffer.size(), 64u);
  ASSERT_NE(buffer.host(), nullptr);
  EXPECT_EQ(buffer.device().device(), Device::kCuda);
  EXPECT_EQ(buffer.device().dtype(), DType::kUInt8);
  EXPECT_EQ(buffer.device().numel(), 64);
  for (std::size_t i = 0; i < 64; ++i) ASSERT_EQ(buffer.host()[i], 0) << "host byte " << i;
  for (std::uint8_t byte : device_bytes(buffer)) ASSERT_EQ(byte, 0);
  const Tensor y = buffer.device_view(16, std::vector<std::int64_t>{2, 2}, DType::kFloat32);
  EXPECT_EQ(y.shape_string(), "[2, 2]");
  EXPECT_EQ(y.dtype(), DType::kFloat32);
  EXPECT_TRUE(y.is_contiguous());
  EXPECT_EQ(static_cast<const std::uint8_t*>(y.data()) -
                static_cast<const std::uint8_t*>(buffer.device().data()),
            16);
  // send and receive without a graph: bytes [16, 32) there and back, and only those.
  set_host_floats(buffer, 0, {7, 7, 7, 7});
  set_host_floats(buffer, 16, {1.5f, -2.0f, 3.25f, 4.0f});
  set_host_floats(buffer, 32, {7, 7, 7, 7});
  buffer.send(16, 16);
  cuda::add_inplace(y, y);
  set_host_floats(buffer, 16, {0, 0, 0, 0});
  buffer.receive(16, 16);
  cuda::synchronize();
  EXPECT_EQ(host_floats(buffer, 16), (std::vector<float>{3.0f, -4.0f, 6.5f, 8.0f}));
  EXPECT_EQ(host_floats(buffer, 0), (std::vector<float>{7, 7, 7, 7}));  // not received
  EXPECT_EQ(host_floats(buffer, 32), (std::vector<float>{7, 7, 7, 7}));
  EXPECT_EQ(device_floats(buffer, 0), (std::vector<float>{0, 0, 0, 0}));  // not sent
  EXPECT_EQ(device_floats(buffer, 32), (std::vector<float>{0, 0, 0, 0}));
  EXPECT_EQ(device_floats(buffer, 16), (std::vector<float>{3.0f, -4.0f, 6.5f, 8.0f}));
}

TEST_F(CudaGraph, CaptureRunsNothingAndReplaysReadTheHostsNewBytes) {
  cuda::StreamScope scope;
  const cuda::MirroredBuffer buffer(64);
  // Bytes [0, 16): x, [16, 32): y, [32, 48): z, four floats each.
  const Tensor x = buffer.device_view(0, std::vector<std::int64_t>{4}, DType::kFloat32);
  const Tensor y = buffer.device_view(16, std::vector<std::int64_t>{4}, DType::kFloat32);
  const Tensor z = buffer.device_view(32, std::vector<std::int64_t>{4}, DType::kFloat32);
  set_host_floats(buffer, 0, {1, 2, 3, 4});
  set_host_floats(buffer, 16, {10, 20, 30, 40});
  set_host_floats(buffer, 32, {-1, -1, -1, -1});
  const cuda::Graph graph = cuda::Graph::capture([&] {
    buffer.send(0, 16);       // x
    buffer.send(16, 16);      // y
    cuda::add_inplace(y, x);  // y = x + y
    cuda::copy(z, y);         // z = y
    buffer.receive(32, 16);   // z back to the host
  });
  ASSERT_TRUE(graph);
  EXPECT_GE(graph.nodes(), 4u);  // two sends, the add, the receive (and the copy)
  cuda::synchronize();
  // Nothing ran at capture time: the host's z is as it was, the device half still zeros.
  EXPECT_EQ(host_floats(buffer, 32), (std::vector<float>{-1, -1, -1, -1}));
  for (std::uint8_t byte : device_bytes(buffer)) ASSERT_EQ(byte, 0);

  for (int r = 0; r < 3; ++r) {
    SCOPED_TRACE(::testing::Message() << "replay " << r);
    const float f = static_cast<float>(r);
    const std::vector<float> xs = {f + 0.5f, f - 7.0f, 2 * f, 100.0f + f};
    const std::vector<float> ys = {1000.0f * (f + 1), -3.0f, f * f, 0.25f};
    std::vector<float> sums(4);
    for (std::size_t i = 0; i < 4; ++i) sums[i] = xs[i] + ys[i];
    set_host_floats(buffer, 0, xs);
    set_host_floats(buffer, 16, ys);
    set_host_floats(buffer, 32, {-1, -1, -1, -1});
    graph.replay();
    cuda::synchronize();
    EXPECT_EQ(host_floats(buffer, 32), sums);  // received
    EXPECT_EQ(host_floats(buffer, 0), xs);     // not received: as the host wrote them
    EXPECT_EQ(host_floats(buffer, 16), ys);
    EXPECT_EQ(device_floats(buffer, 0), xs);  // sent
    EXPECT_EQ(device_floats(buffer, 16), sums);
    EXPECT_EQ(device_floats(buffer, 32), sums);
  }
  EXPECT_FALSE(cuda::Graph());  // a default graph holds nothing
}

TEST_F(CudaGraph, ABodyThatThrowsLeavesNoGraphAndTheStreamUsable) {
  cuda::StreamScope scope;
  const cuda::MirroredBuffer buffer(64);
  const Tensor x = buffer.device_view(0, std::vector<std::int64_t>{4}, DType::kFloat32);
  const Tensor y = buffer.device_view(16, std::vector<std::int64_t>{4}, DType::kFloat32);
  set_host_floats(buffer, 0, {1, 2, 3, 4});
  set_host_floats(buffer, 16, {10, 20, 30, 40});

  // A library call with bad arguments inside the body (y += a three-float view).
  cuda::Graph graph;
  EXPECT_THROW(graph = cuda::Graph::capture([&] {
                 buffer.send(0, 32);
                 cuda::add_inplace(y, x);
                 cuda::add_inplace(
                     y, buffer.device_view(0, std::vector<std::int64_t>{3}, DType::kFloat32));
               }),
               Error);
  EXPECT_FALSE(graph);
  EXPECT_EQ(graph.nodes(), 0u);
  // The body's own error.
  EXPECT_THROW(cuda::Graph::capture([&] {
                 buffer.send(0, 32);
                 throw Error("the body gave up");
               }),
               Error);
  // What was recorded before the throws never ran.
  cuda::synchronize();
  for (std::uint8_t byte : device_bytes(buffer)) ASSERT_EQ(byte, 0);

  // Ordinary launches on the stream work afterwards.
  buffer.send(0, 32);
  cuda::add_inplace(y, x);
  buffer.receive(16, 16);
  cuda::synchronize();
  EXPECT_EQ(host_floats(buffer, 16), (std::vector<float>{11, 22, 33, 44}));
  // And so does a new capture.
  const cuda::Graph again = cuda::Graph::capture([&] {
    buffer.send(0, 16);
    cuda::add_inplace(y, x);
    buffer.receive(16, 16);
  });
  ASSERT_TRUE(again);
  EXPECT_GT(again.nodes(), 0u);
  set_host_floats(buffer, 0, {100, 200, 300, 400});
  again.replay();
  cuda::synchronize();
  EXPECT_EQ(host_floats(buffer, 16), (std::vector<float>{111, 222, 333, 444}));
}

// A decode step as generate() captures it: the step's slot, length and position sent from the
// host, the new keys and values appended at the slot, attention over the first `length` slots.
// Replayed step after step over the same storage, each against cpu::attention.
TEST_F(CudaGraph, ReplayedDecodeStepAppendsAndAttendsAtTheDeviceLength) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (std::int64_t head_dim : {64, 80}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << ", head_dim " << head_dim);
      std::mt19937 rng(721);
      cuda::StreamScope scope;
      const std::int64_t batch = 2, heads = 8, kv_heads = 2, d = head_dim, capacity = 300,
                         prompt = 10, last = 45;
      const Tensor all_keys = random_tensor({batch, kv_heads, capacity, d}, dtype, rng);
      const Tensor all_values = random_tensor({batch, kv_heads, capacity, d}, dtype, rng);
      const Tensor keys_device = cuda::to_device(all_keys);
      const Tensor values_device = cuda::to_device(all_values);
      const Tensor key_storage = poisoned_device({batch, kv_heads, capacity, d}, dtype);
      const Tensor value_storage = poisoned_device({batch, kv_heads, capacity, d}, dtype);
      cuda::copy(key_storage.slice(2, 0, prompt), keys_device.slice(2, 0, prompt));
      cuda::copy(value_storage.slice(2, 0, prompt), values_device.slice(2, 0, prompt));
      // The step's fixed buffers: its new key and value, its query, its output.
      const Tensor new_key = poisoned_device({batch, kv_heads, 1, d}, dtype);
      const Tensor new_value = poisoned_device({batch, kv_heads, 1, d}, dtype);
      const Tensor query = poisoned_device({batch, heads, 1, d}, dtype);
      const Tensor out = poisoned_device({batch, 1, heads, d}, dtype);
      const Tensor nan_out = poisoned_device({batch, 1, heads, d}, dtype);
      // Row 1 has 4 padded keys; every byte past them is 1 (also past the length).
      std::vector<std::uint8_t> full_mask(static_cast<std::size_t>(batch * capacity), 1);
      std::fill_n(full_mask.begin() + capacity, 4, std::uint8_t{0});
      const Tensor mask =
          cuda::to_device(Tensor::from_blob(full_mask.data(), {batch, capacity}, DType::kUInt8));
      // Host-written inputs: int64 slot, length, position.
      const cuda::MirroredBuffer inputs(64);
      const Tensor slot = inputs.device_view(0, std::vector<std::int64_t>{1}, DType::kInt64);
      const Tensor length = inputs.device_view(8, std::vector<std::int64_t>{1}, DType::kInt64);
      const Tensor position = inputs.device_view(16, std::vector<std::int64_t>{1}, DType::kInt64);
      const float scale = 1.0f / std::sqrt(static_cast<float>(d));
      const cuda::Graph step = cuda::Graph::capture([&] {
        inputs.send(0, 24);
        cuda::append_at(key_storage, new_key, value_storage, new_value, slot);
        cuda::attention(query, key_storage, value_storage, mask, position, 0, scale, out, length);
      });
      ASSERT_TRUE(step);
      for (std::int64_t n = prompt + 1; n <= last; ++n) {
        SCOPED_TRACE(::testing::Message() << "length " << n);
        const std::int64_t values[3] = {n - 1, n, n - 1};
        std::memcpy(inputs.host(), values, sizeof values);
        // Ordinary launches between replays: the step's new key, value and query, out poisoned.
        const Tensor q_host = random_tensor({batch, heads, 1, d}, dtype, rng, 3.0f);
        cuda::copy(new_key, keys_device.slice(2, n - 1, n));
        cuda::copy(new_value, values_device.slice(2, n - 1, n));
        cuda::copy(query, cuda::to_device(q_host));
        cuda::copy(out, nan_out);
        step.replay();
        cuda::synchronize();

        std::vector<std::uint8_t> mask_bytes(static_cast<std::size_t>(batch * n));
        for (std::int64_t b = 0; b < batch; ++b)
          std::copy_n(full_mask.begin() + b * capacity, n, mask_bytes.begin() + b * n);
        const std::int64_t pos[1] = {n - 1};
        Tensor expected = Tensor::empty({batch, 1, heads, d}, dtype);
        cpu::attention(q_host, all_keys.slice(2, 0, n), all_values.slice(2, 0, n),
                       std::span<const std::uint8_t>(mask_bytes),
                       std::span<const std::int64_t>(pos), 0, scale, expected);
        const std::vector<double> actual = to_doubles(cuda::to_host(out));
        const testing::ErrorStats error = compare(actual, to_doubles(expected));
        ASSERT_LE(error.max_abs, tolerance(dtype))
            << "max abs error " << error.max_abs << " (NaN count " << count_nan(actual) << ")";
      }
      // The storage holds every token appended and NaN past the last.
      expect_slots(cuda::to_host(key_storage), all_keys.slice(2, 0, last), 0);
      expect_slots(cuda::to_host(value_storage), all_values.slice(2, 0, last), 0);
    }
  }
}

// --- generate() with and without CUDA graphs ----------------------------------------------------

class CudaGenerate : public testing::CudaTest {};

ModelConfig small_config(std::int64_t head_dim = 16) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 100;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = head_dim;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  c.rope = {.head_dim = head_dim, .rope_theta = 10000.0};
  return c;
}

LlamaModel gpu_model(DType dtype, std::int64_t head_dim = 16, std::uint64_t seed = 5) {
  const ModelConfig c = small_config(head_dim);
  return LlamaModel::from_weights(c, random_llama_weights(c, seed, dtype, 0.3f, Device::kCuda),
                                  {.device = Device::kCuda});
}

GenerationConfig with_graphs(GenerationConfig config, bool on) {
  config.cuda_graph = on;
  return config;
}

const std::vector<std::vector<std::int64_t>> kOneRow = {{3, 14, 15, 92, 65, 35}};
const std::vector<std::vector<std::int64_t>> kThreeRows = {
    {1, 2, 3, 4, 5, 6, 7}, {40, 41, 42}, {9, 8, 7, 6, 5}};

// Generates with graphs on and off and expects the same tokens; returns {on, off}.
std::pair<GenerateResult, GenerateResult> on_and_off(const LlamaModel& model, const Tensor& ids,
                                                     const Tensor& mask,
                                                     const GenerationConfig& config) {
  const GenerateResult on = generate(model, ids, mask, with_graphs(config, true));
  const GenerateResult off = generate(model, ids, mask, with_graphs(config, false));
  EXPECT_EQ(on.new_tokens, off.new_tokens);
  EXPECT_EQ(on.decode_steps, off.decode_steps);
  EXPECT_EQ(on.cache_length, off.cache_length);
  EXPECT_EQ(on.cache_bytes, off.cache_bytes);
  EXPECT_EQ(off.graph_steps, 0);
  EXPECT_GE(on.graph_steps, 0);
  EXPECT_LE(on.graph_steps, on.decode_steps);
  return {on, off};
}

TEST_F(CudaGenerate, GreedyTokensAreTheSameWithAndWithoutGraphs) {
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {16, 32}) {
      const LlamaModel model = gpu_model(dtype, head_dim);
      for (const auto* rows : {&kOneRow, &kThreeRows}) {
        SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << ", head_dim " << head_dim
                                          << ", batch " << rows->size());
        const auto [ids, mask] = left_pad(*rows, 0);
        const auto [on, off] = on_and_off(model, ids, mask, {.max_new_tokens = 12});
        ASSERT_EQ(on.new_tokens.size(), rows->size());
        for (const auto& row : on.new_tokens) EXPECT_EQ(row.size(), 12u);
        EXPECT_EQ(on.decode_steps, 11);
        EXPECT_GT(on.graph_steps, 0);
        EXPECT_EQ(on.cache_length, ids.size(1) + 11);
      }
    }
}

TEST_F(CudaGenerate, LongerGenerationsAndNoMaskAreTheSameWithAndWithoutGraphs) {
  // 60 new tokens outgrow any small first capacity; no attention mask at all for one row.
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const LlamaModel model = gpu_model(dtype);
    const auto [ids, mask] = left_pad(kOneRow, 0);
    const auto [on, off] = on_and_off(model, ids, Tensor(), {.max_new_tokens = 60});
    EXPECT_EQ(on.new_tokens[0].size(), 60u);
    EXPECT_GT(on.graph_steps, 0);
    const auto [ids3, mask3] = left_pad(kThreeRows, 0);
    const auto [on3, off3] = on_and_off(model, ids3, mask3, {.max_new_tokens = 60});
    EXPECT_GT(on3.graph_steps, 0);
  }
}

TEST_F(CudaGenerate, FewNewTokensAreTheSameWithAndWithoutGraphs) {
  const LlamaModel model = gpu_model(DType::kBFloat16);
  const auto [ids, mask] = left_pad(kThreeRows, 0);
  for (std::int64_t n : {0, 1, 2, 3}) {
    SCOPED_TRACE(::testing::Message() << "max_new_tokens " << n);
    const auto [on, off] = on_and_off(model, ids, mask, {.max_new_tokens = n});
    for (const auto& row : on.new_tokens) EXPECT_EQ(row.size(), static_cast<std::size_t>(n));
    if (n <= 1) {
      EXPECT_EQ(on.graph_steps, 0);  // no decode step at all
    }
  }
}

TEST_F(CudaGenerate, SampledTokensAreTheSameWithAndWithoutGraphs) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const LlamaModel model = gpu_model(dtype);
    for (const auto* rows : {&kOneRow, &kThreeRows}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << ", batch " << rows->size());
      const auto [ids, mask] = left_pad(*rows, 0);
      const GenerationConfig sample{.max_new_tokens = 12,
                                    .do_sample = true,
                                    .temperature = 0.8f,
                                    .top_k = 20,
                                    .top_p = 0.9f,
                                    .seed = 7};
      const auto [on, off] = on_and_off(model, ids, mask, sample);
      EXPECT_GT(on.graph_steps, 0);
      for (const auto& row : on.new_tokens) EXPECT_EQ(row.size(), 12u);
    }
  }
}

TEST_F(CudaGenerate, EosAndAStoppingCallbackStopTheSameWayWithAndWithoutGraphs) {
  const LlamaModel model = gpu_model(DType::kFloat32);
  const auto [ids, mask] = left_pad(kThreeRows, 0);
  const GenerateResult plain = generate(model, ids, mask, {.max_new_tokens = 12});
  // Row 0 finishes at its fourth token and emits pad (99) afterwards; the others go on.
  const GenerationConfig eos{
      .max_new_tokens = 12, .eos_token_ids = {plain.new_tokens[0][3]}, .pad_token_id = 99};
  const auto [on, off] = on_and_off(model, ids, mask, eos);
  ASSERT_EQ(on.new_tokens[0].size(), off.new_tokens[0].size());
  if (on.new_tokens[0].size() > 4) {
    EXPECT_EQ(on.new_tokens[0][4], 99);
  }
  // A callback that stops after the sixth token of each row.
  for (bool graphs : {true, false}) {
    std::vector<std::int64_t> seen;
    const GenerateResult stopped =
        generate(model, ids, mask, {.max_new_tokens = 12, .cuda_graph = graphs}, nullptr,
                 [&](std::int64_t row, std::int64_t token, std::int64_t step) {
                   if (row == 0) seen.push_back(token);
                   return step < 5;
                 });
    ASSERT_EQ(stopped.new_tokens[0].size(), 6u) << "graphs " << graphs;
    EXPECT_EQ(seen, stopped.new_tokens[0]);
    for (std::size_t b = 0; b < 3; ++b)
      EXPECT_TRUE(std::equal(stopped.new_tokens[b].begin(), stopped.new_tokens[b].end(),
                             plain.new_tokens[b].begin()))
          << "row " << b << ", graphs " << graphs;
    if (!graphs) {
      EXPECT_EQ(stopped.graph_steps, 0);
    }
  }
}

// A conversation of two turns in the caller's cache: the second continues from the first's cache
// with the full mask. Graphs on and off give the same tokens and leave caches of the same length
// holding the same keys and values (to rounding: the replayed attention may split the keys
// differently).
// A StaticCache replays too (its storage never moves): the one cache_implementation "static"
// builds and a caller's with more rows and slots than the generation uses.
TEST_F(CudaGenerate, AStaticCacheReplaysWithTheSameTokens) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (const auto* rows : {&kOneRow, &kThreeRows}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << ", batch " << rows->size());
      const LlamaModel model = gpu_model(dtype);
      const auto [ids, mask] = left_pad(*rows, 0);
      const std::int64_t prompt = ids.size(1);
      GenerationConfig config{.max_new_tokens = 14};
      config.cache_implementation = "static";
      const auto [on, off] = on_and_off(model, ids, mask, config);
      EXPECT_GT(on.graph_steps, 0);
      EXPECT_EQ(on.cache_length, prompt + 13);
      // The same tokens as a DynamicCache with graphs off (the reference path).
      config.cache_implementation = "dynamic";
      const GenerateResult dynamic = generate(model, ids, mask, with_graphs(config, false));
      EXPECT_EQ(on.new_tokens, dynamic.new_tokens);

      const ModelConfig& c = model.config();
      StaticCache<cuda::Backend> mine({.max_batch_size = 4,
                                       .max_cache_len = 64,
                                       .num_layers = static_cast<int>(c.num_hidden_layers),
                                       .num_kv_heads = c.num_key_value_heads,
                                       .head_dim = c.head_dim,
                                       .dtype = dtype});
      const GenerateResult given = generate(model, ids, mask, with_graphs(config, true), &mine);
      EXPECT_EQ(given.new_tokens, dynamic.new_tokens);
      EXPECT_GT(given.graph_steps, 0);
      EXPECT_EQ(mine.get_seq_length(), prompt + 13);
      for (int l = 0; l < static_cast<int>(c.num_hidden_layers); ++l)
        EXPECT_EQ(mine.get_seq_length(l), prompt + 13) << "layer " << l;
    }
  }
}

TEST_F(CudaGenerate, ACallersCacheWithAnEarlierTurnIsTheSameWithAndWithoutGraphs) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (const auto* rows : {&kOneRow, &kThreeRows}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << ", batch " << rows->size());
      const LlamaModel model = gpu_model(dtype);
      const auto [ids, mask] = left_pad(*rows, 0);
      const std::int64_t batch = ids.size(0), prompt = ids.size(1);
      const GenerationConfig config{.max_new_tokens = 12};
      DynamicCache<cuda::Backend> cache_on, cache_off;  // no initial capacity: 16 slots at first
      const GenerateResult first_on =
          generate(model, ids, mask, with_graphs(config, true), &cache_on);
      const GenerateResult first_off =
          generate(model, ids, mask, with_graphs(config, false), &cache_off);
      ASSERT_EQ(first_on.new_tokens, first_off.new_tokens);
      EXPECT_GT(first_on.graph_steps, 0);
      EXPECT_EQ(first_off.graph_steps, 0);
      const std::int64_t past = prompt + 11;  // the last token is not in the cache yet
      for (int layer = 0; layer < 3; ++layer) {
        EXPECT_EQ(cache_on.get_seq_length(layer), past) << "layer " << layer;
        EXPECT_EQ(cache_off.get_seq_length(layer), past) << "layer " << layer;
      }

      // Turn 2: each row's last token and three new ones; the mask covers both turns.
      Tensor ids2 = Tensor::empty({batch, 4}, DType::kInt64);
      for (std::int64_t b = 0; b < batch; ++b) {
        const std::int64_t row[4] = {first_on.new_tokens[static_cast<std::size_t>(b)].back(),
                                     50 + b, 60, 70};
        std::copy_n(row, 4, ids2.data_as<std::int64_t>() + b * 4);
      }
      const Tensor mask2 = extend_attention_mask(mask, 11 + 4);
      ASSERT_EQ(mask2.size(1), past + 4);
      const GenerateResult second_on =
          generate(model, ids2, mask2, with_graphs(config, true), &cache_on);
      const GenerateResult second_off =
          generate(model, ids2, mask2, with_graphs(config, false), &cache_off);
      EXPECT_EQ(second_on.new_tokens, second_off.new_tokens);
      EXPECT_GT(second_on.graph_steps, 0);
      EXPECT_EQ(second_off.graph_steps, 0);
      EXPECT_EQ(second_on.cache_length, past + 4 + 11);
      for (int layer = 0; layer < 3; ++layer)
        EXPECT_EQ(cache_on.get_seq_length(layer), cache_off.get_seq_length(layer));
      EXPECT_EQ(cache_on.get_seq_length(), past + 4 + 11);

      const auto on = cache_on.to_legacy_cache();
      const auto off = cache_off.to_legacy_cache();
      ASSERT_EQ(on.size(), off.size());
      const double bound = dtype == DType::kFloat32 ? 1e-4 : 6e-2;
      for (std::size_t l = 0; l < on.size(); ++l) {
        const auto keys = compare(to_doubles(cuda::to_host(on[l].first)),
                                  to_doubles(cuda::to_host(off[l].first)));
        const auto values = compare(to_doubles(cuda::to_host(on[l].second)),
                                    to_doubles(cuda::to_host(off[l].second)));
        EXPECT_LE(keys.max_abs, bound) << "keys of layer " << l;
        EXPECT_LE(values.max_abs, bound) << "values of layer " << l;
      }
    }
  }
}

// --- prompt reuse on the GPU (issue #9) ----------------------------------------------------------

class PromptReuseCuda : public testing::CudaTest {};

TEST_F(PromptReuseCuda, ClonedOffloadedCachesContinueIndependently) {
  // Each clone has device slots and a copy stream of its own; the host layers must not be shared.
  testing::expect_clones_are_independent<OffloadedCache>(gpu_model(DType::kFloat32),
                                                         [] { return OffloadedCache(); });
}

TEST_F(PromptReuseCuda, ClonedQuantizedCachesContinueIndependently) {
  // Blocks of 8 tokens past a residual of 2: the clones flush their first block at the second step.
  const QuantizedCacheOptions options{.nbits = 4, .group_size = 8, .residual_length = 2};
  testing::expect_clones_are_independent<QuantizedCache<cuda::Backend>>(
      gpu_model(DType::kFloat32), [&] { return QuantizedCache<cuda::Backend>(options); });
}

TEST_F(PromptReuseCuda, ClonedSinkCachesContinueIndependently) {
  // A window of 10: the clones evict (and re-rotate the kept keys) from the third step on.
  const LlamaModel model = gpu_model(DType::kFloat32);
  const SinkCacheOptions options{.window_length = 10,
                                 .num_sink_tokens = 4,
                                 .rope_inv_freq = RotaryEmbedding(model.config().rope).inv_freq()};
  testing::expect_clones_are_independent<SinkCache<cuda::Backend>>(
      model, [&] { return SinkCache<cuda::Backend>(options); });
}

}  // namespace
}  // namespace kvcache
