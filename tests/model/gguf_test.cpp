// GGUF: files built here byte by byte (a tiny writer below) read back with every metadata type,
// arrays of arrays included; F32/F16/BF16 tensors as zero-copy views; Q8_0, Q4_0 and Q4_1 blocks
// dequantized as the formulas say; every kind of broken file (each truncation, random byte flips,
// bad magic, hostile counts, unknown types, bad offsets, overlaps, ...) a kvcache::Error naming the
// file and the problem, never a crash. Real blocks copied from the default model
// (tools/make_gguf_fixtures.py) must dequantize exactly as the gguf package does.
#include "kvcache/model/gguf.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "temp_dir.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::write_bytes;
struct TempDir : testing::TempDir {
  TempDir() : testing::TempDir("kvcache_gguf") {}
};

namespace fs = std::filesystem;
using VT = GgufValue::Type;

// --- a tiny GGUF writer --------------------------------------------------------------------------

template <class T>
std::string le(T value) {  // the host is little-endian, as the reader requires
  std::string bytes(sizeof value, '\0');
  std::memcpy(bytes.data(), &value, sizeof value);
  return bytes;
}
std::string gguf_string(std::string_view text) {
  return le<std::uint64_t>(text.size()) + std::string(text);
}

// One metadata value as the file holds it: its type number and its bytes.
struct Value {
  std::uint32_t type;
  std::string bytes;
};
Value u8(std::uint8_t v) { return {0, le(v)}; }
Value i8(std::int8_t v) { return {1, le(v)}; }
Value u16(std::uint16_t v) { return {2, le(v)}; }
Value i16(std::int16_t v) { return {3, le(v)}; }
Value u32(std::uint32_t v) { return {4, le(v)}; }
Value i32(std::int32_t v) { return {5, le(v)}; }
Value f32(float v) { return {6, le(v)}; }
Value boolean(bool v) { return {7, le<std::uint8_t>(v ? 1 : 0)}; }
Value str(std::string_view v) { return {8, gguf_string(v)}; }
Value u64(std::uint64_t v) { return {10, le(v)}; }
Value i64(std::int64_t v) { return {11, le(v)}; }
Value f64(double v) { return {12, le(v)}; }
// An array header with any element type and count, then `items` as given (for hostile arrays).
Value raw_array(std::uint32_t element_type, std::uint64_t count, const std::string& items) {
  return {9, le(element_type) + le(count) + items};
}
Value array(std::uint32_t element_type, const std::vector<Value>& items) {
  std::string bytes;
  for (const Value& item : items) bytes += item.bytes;
  return raw_array(element_type, items.size(), bytes);
}

struct TensorSpec {
  std::string name;
  std::vector<std::int64_t> ne;
  std::uint32_t type;
  std::string data;                     // the raw bytes
  std::optional<std::uint64_t> offset;  // default: the next multiple of the alignment
};

struct Spec {
  std::string magic = "GGUF";
  std::uint32_t version = 3;
  std::vector<std::pair<std::string, Value>> kvs;
  std::vector<TensorSpec> tensors;
  std::optional<std::uint64_t> tensor_count;  // override the counts written in the header
  std::optional<std::uint64_t> kv_count;
  std::uint64_t alignment = 32;  // layout only: add a general.alignment key to write it
};

struct Built {
  std::string bytes;
  std::uint64_t infos_end = 0;   // where the tensor infos end (the padding starts)
  std::uint64_t data_start = 0;  // where the data section starts
};

std::uint64_t align_up(std::uint64_t x, std::uint64_t a) { return (x + a - 1) / a * a; }

// Header, key/values, tensor infos, padding, then each tensor's bytes at its offset. The file
// ends where the last tensor's bytes end (no trailing padding), so every truncation loses
// something the reader needs.
Built build(const Spec& spec) {
  std::string out = spec.magic + le(spec.version) +
                    le<std::uint64_t>(spec.tensor_count.value_or(spec.tensors.size())) +
                    le<std::uint64_t>(spec.kv_count.value_or(spec.kvs.size()));
  for (const auto& [key, value] : spec.kvs) out += gguf_string(key) + le(value.type) + value.bytes;
  std::vector<std::uint64_t> offsets;
  std::uint64_t next = 0;
  for (const TensorSpec& t : spec.tensors) {
    const std::uint64_t offset = t.offset.value_or(align_up(next, spec.alignment));
    offsets.push_back(offset);
    next = offset + t.data.size();
    out += gguf_string(t.name) + le<std::uint32_t>(static_cast<std::uint32_t>(t.ne.size()));
    for (const std::int64_t size : t.ne) out += le(size);
    out += le(t.type) + le(offset);
  }
  Built built;
  built.infos_end = out.size();
  built.data_start = align_up(out.size(), spec.alignment);
  out.resize(built.data_start, '\0');
  for (std::size_t i = 0; i < spec.tensors.size(); ++i) {
    const std::string& data = spec.tensors[i].data;
    if (data.empty()) continue;  // nothing to place (and the offset may be anything)
    const std::uint64_t at = built.data_start + offsets[i];
    if (out.size() < at + data.size()) out.resize(at + data.size(), '\0');
    out.replace(at, data.size(), data);
  }
  built.bytes = std::move(out);
  return built;
}

std::string bytes_of_floats(const std::vector<float>& values) {
  std::string bytes(values.size() * sizeof(float), '\0');
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

// --- blocks with known values --------------------------------------------------------------------

// fp16 bits of a value and the float it stands for exactly.
struct Half {
  std::uint16_t bits;
  float value;
};
Half half(float x) {
  const float16 h = float_to_fp16(x);
  return {h.bits, fp16_to_float(h)};
}

// Random Q8_0 / Q4_0 / Q4_1 blocks, with the values each element stands for computed by the
// formula in double (exact here: d and m are fp16 of similar magnitude, q is small).
struct Blocks {
  std::string bytes;
  std::vector<float> expected;
};

Blocks q8_0_blocks(std::int64_t blocks, std::mt19937& rng) {
  Blocks out;
  std::uniform_real_distribution<float> scale(0.001f, 0.1f);
  std::uniform_int_distribution<int> q(-128, 127);
  for (std::int64_t b = 0; b < blocks; ++b) {
    const Half d = half(scale(rng));
    out.bytes += le(d.bits);
    for (int j = 0; j < 32; ++j) {
      const int value = q(rng);
      out.bytes += static_cast<char>(static_cast<std::int8_t>(value));
      out.expected.push_back(static_cast<float>(static_cast<double>(d.value) * value));
    }
  }
  return out;
}

// Four-bit blocks: element e (0..31) lives in byte e % 16, low nibble for e < 16, high otherwise.
Blocks q4_blocks(std::int64_t blocks, bool with_min, std::mt19937& rng) {
  Blocks out;
  std::uniform_real_distribution<float> scale(0.001f, 0.1f);
  std::uniform_real_distribution<float> minimum(-1.0f, 0.0f);
  std::uniform_int_distribution<int> nibble(0, 15);
  for (std::int64_t b = 0; b < blocks; ++b) {
    const Half d = half(scale(rng));
    const Half m = half(minimum(rng));
    out.bytes += le(d.bits);
    if (with_min) out.bytes += le(m.bits);
    int q[32];
    for (int& value : q) value = nibble(rng);
    for (int j = 0; j < 16; ++j) out.bytes += static_cast<char>(q[j] | (q[j + 16] << 4));
    for (int e = 0; e < 32; ++e) {
      const double x = with_min ? static_cast<double>(d.value) * q[e] + m.value
                                : static_cast<double>(d.value) * (q[e] - 8);
      out.expected.push_back(static_cast<float>(x));
    }
  }
  return out;
}

std::vector<float> floats_of(const Tensor& t) {
  const float* p = t.data_as<float>();
  return std::vector<float>(p, p + t.numel());
}

std::vector<std::int64_t> shape_of(const Tensor& t) {
  return std::vector<std::int64_t>(t.shape().begin(), t.shape().end());
}

// --- metadata ------------------------------------------------------------------------------------

TEST(GgufMetadata, EveryValueTypeRoundTrips) {
  TempDir dir;
  Spec spec;
  spec.kvs = {
      {"u8", u8(255)},
      {"i8", i8(-128)},
      {"u16", u16(65535)},
      {"i16", i16(-32768)},
      {"u32", u32(4000000000u)},
      {"i32", i32(-2000000000)},
      {"f32", f32(1.5f)},
      {"b_true", boolean(true)},
      {"b_false", boolean(false)},
      {"str", str("h\xc3\xa9llo")},
      {"empty_str", str("")},
      {"u64", u64(std::numeric_limits<std::uint64_t>::max())},
      {"i64", i64(std::numeric_limits<std::int64_t>::min())},
      {"f64", f64(3.141592653589793)},
      {"strings", array(8, {str("a"), str(""), str("bc")})},
      {"ints", array(5, {i32(-1), i32(0), i32(7)})},
      {"floats", array(6, {f32(0.25f), f32(-2.0f)})},
      {"bools", array(7, {boolean(true), boolean(false)})},
      {"empty", array(4, {})},
      {"nested", array(9, {array(3, {i16(1), i16(-2)}), array(3, {}), array(3, {i16(3)})})},
      {"nested_strings", array(9, {array(8, {str("x")}), array(8, {str("y"), str("z")})})},
      {"deep", array(9, {array(9, {array(10, {u64(42)})})})},
  };
  const std::string path = dir.file("meta.gguf");
  write_bytes(path, build(spec).bytes);
  const GgufFile file = GgufFile::open(path);
  EXPECT_EQ(file.path(), path);
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.alignment(), 32u);
  EXPECT_EQ(file.metadata().size(), spec.kvs.size());
  EXPECT_TRUE(file.tensors().empty());

  const auto value = [&](const std::string& key) -> const GgufValue& {
    const GgufValue* v = file.find(key);
    EXPECT_NE(v, nullptr) << key;
    static const GgufValue kNone;
    return v ? *v : kNone;
  };
  EXPECT_EQ(value("u8").type, VT::kUInt8);
  EXPECT_EQ(value("u8").u, 255u);
  EXPECT_EQ(value("i8").type, VT::kInt8);
  EXPECT_EQ(value("i8").i, -128);
  EXPECT_EQ(value("u16").u, 65535u);
  EXPECT_EQ(value("i16").i, -32768);
  EXPECT_EQ(value("u32").u, 4000000000u);
  EXPECT_EQ(value("i32").i, -2000000000);
  EXPECT_EQ(value("f32").type, VT::kFloat32);
  EXPECT_EQ(value("f32").f, 1.5);
  EXPECT_EQ(value("b_true").type, VT::kBool);
  EXPECT_TRUE(value("b_true").b);
  EXPECT_FALSE(value("b_false").b);
  EXPECT_EQ(value("str").type, VT::kString);
  EXPECT_EQ(value("str").s, "h\xc3\xa9llo");
  EXPECT_EQ(value("empty_str").s, "");
  EXPECT_EQ(value("u64").type, VT::kUInt64);
  EXPECT_EQ(value("u64").u, std::numeric_limits<std::uint64_t>::max());
  EXPECT_EQ(value("i64").type, VT::kInt64);
  EXPECT_EQ(value("i64").i, std::numeric_limits<std::int64_t>::min());
  EXPECT_EQ(value("f64").type, VT::kFloat64);
  EXPECT_EQ(value("f64").f, 3.141592653589793);

  const GgufValue& strings = value("strings");
  EXPECT_EQ(strings.type, VT::kArray);
  EXPECT_EQ(strings.array_type, VT::kString);
  ASSERT_EQ(strings.array.size(), 3u);
  EXPECT_EQ(strings.array[2].type, VT::kString);
  EXPECT_EQ(strings.array[2].s, "bc");
  EXPECT_EQ(value("floats").array[1].f, -2.0);
  EXPECT_TRUE(value("bools").array[0].b);
  EXPECT_EQ(value("empty").array_type, VT::kUInt32);
  EXPECT_TRUE(value("empty").array.empty());

  const GgufValue& nested = value("nested");
  EXPECT_EQ(nested.array_type, VT::kArray);
  ASSERT_EQ(nested.array.size(), 3u);
  EXPECT_EQ(nested.array[0].array_type, VT::kInt16);
  ASSERT_EQ(nested.array[0].array.size(), 2u);
  EXPECT_EQ(nested.array[0].array[1].i, -2);
  EXPECT_TRUE(nested.array[1].array.empty());
  EXPECT_EQ(nested.array[2].array[0].i, 3);
  EXPECT_EQ(value("nested_strings").array[1].array[1].s, "z");
  EXPECT_EQ(value("deep").array[0].array[0].array[0].u, 42u);

  // Typed reads: integers of any width and sign, floats, strings, bools and arrays.
  EXPECT_EQ(file.get_int("u8"), 255);
  EXPECT_EQ(file.get_int("i64"), std::numeric_limits<std::int64_t>::min());
  EXPECT_EQ(file.get_int("u32"), 4000000000);
  EXPECT_EQ(file.get_float("f32"), 1.5);
  EXPECT_EQ(file.get_float("f64"), 3.141592653589793);
  EXPECT_EQ(file.get_float("i32"), -2000000000.0);  // integers widen to double
  EXPECT_EQ(file.get_string("str"), "h\xc3\xa9llo");
  EXPECT_EQ(file.get_bool("b_true"), true);
  EXPECT_EQ(file.get_bool("b_false"), false);
  EXPECT_EQ(file.get_string_array("strings"), (std::vector<std::string>{"a", "", "bc"}));
  EXPECT_EQ(file.get_int_array("ints"), (std::vector<std::int64_t>{-1, 0, 7}));
  EXPECT_TRUE(file.get_int_array("empty").empty());

  // Absent keys: empty results, no error.
  EXPECT_EQ(file.find("missing"), nullptr);
  EXPECT_FALSE(file.get_int("missing").has_value());
  EXPECT_FALSE(file.get_float("missing").has_value());
  EXPECT_FALSE(file.get_string("missing").has_value());
  EXPECT_FALSE(file.get_bool("missing").has_value());
  EXPECT_TRUE(file.get_string_array("missing").empty());
  EXPECT_TRUE(file.get_int_array("missing").empty());

  // Wrong types and values that do not fit: the error names the key, the expected and the found.
  EXPECT_KVCACHE_ERROR(file.get_int("u64"), "metadata key 'u64': expected an integer that fits");
  EXPECT_KVCACHE_ERROR(file.get_int("str"), "metadata key 'str': expected an integer, got string");
  EXPECT_KVCACHE_ERROR(file.get_int("f32"), "expected an integer, got float32");
  EXPECT_KVCACHE_ERROR(file.get_float("str"), "metadata key 'str': expected a number, got string");
  EXPECT_KVCACHE_ERROR(file.get_string("u8"), "metadata key 'u8': expected a string, got uint8");
  EXPECT_KVCACHE_ERROR(file.get_bool("u8"), "expected a bool, got uint8");
  EXPECT_KVCACHE_ERROR(file.get_string_array("ints"),
                       "metadata key 'ints': expected an array of string, got array of int32");
  EXPECT_KVCACHE_ERROR(file.get_string_array("str"), "expected an array of string, got string");
  EXPECT_KVCACHE_ERROR(file.get_int_array("strings"),
                       "expected an array of integers, got array of string");
  EXPECT_KVCACHE_ERROR(file.get_int_array("nested"), "got array of array");
  EXPECT_KVCACHE_ERROR(file.get_int("u64"), path);
}

TEST(GgufMetadata, VersionTwoAndAlignmentKey) {
  TempDir dir;
  Spec spec;
  spec.version = 2;
  spec.alignment = 64;
  spec.kvs = {{"general.alignment", u32(64)}};
  spec.tensors = {{"a", {3}, 0, bytes_of_floats({1, 2, 3}), std::nullopt},
                  {"b", {2}, 0, bytes_of_floats({4, 5}), std::nullopt}};
  const std::string path = dir.file("v2.gguf");
  const Built built = build(spec);
  write_bytes(path, built.bytes);
  const GgufFile file = GgufFile::open(path);
  EXPECT_EQ(file.version(), 2u);
  EXPECT_EQ(file.alignment(), 64u);
  ASSERT_EQ(file.tensors().size(), 2u);
  EXPECT_EQ(file.tensors()[1].offset, 64u);
  EXPECT_EQ(file.data(file.tensors()[1]) - file.data(file.tensors()[0]), 64);
  EXPECT_EQ(floats_of(file.to_float32("b")), (std::vector<float>{4, 5}));
}

// --- tensors -------------------------------------------------------------------------------------

TEST(GgufTensors, PlainTypesAreZeroCopyViewsThatOutliveTheFile) {
  TempDir dir;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
  std::vector<float> f32_values(2 * 3 * 4 * 5);
  for (float& x : f32_values) x = dist(rng);
  std::vector<std::uint16_t> f16_bits(6), bf16_bits(6);
  std::vector<float> f16_values, bf16_values;
  for (std::size_t i = 0; i < 6; ++i) {
    const float x = dist(rng);
    f16_bits[i] = float_to_fp16(x).bits;
    bf16_bits[i] = float_to_bf16(x).bits;
    f16_values.push_back(fp16_to_float(float16{f16_bits[i]}));
    bf16_values.push_back(bf16_to_float(bfloat16{bf16_bits[i]}));
  }
  const auto bytes16 = [](const std::vector<std::uint16_t>& bits) {
    return std::string(reinterpret_cast<const char*>(bits.data()), bits.size() * 2);
  };
  Spec spec;
  spec.kvs = {{"general.architecture", str("llama")}};
  spec.tensors = {
      {"w.f32", {5, 4, 3, 2}, 0, bytes_of_floats(f32_values), std::nullopt},  // rank 4
      {"w.f16", {3, 2}, 1, bytes16(f16_bits), std::nullopt},
      {"w.bf16", {6}, 30, bytes16(bf16_bits), std::nullopt},
      {"scalar", {}, 0, bytes_of_floats({42.0f}), std::nullopt},  // n_dims = 0
      {"empty", {0, 4}, 0, "", 0},
  };
  const std::string path = dir.file("plain.gguf");
  write_bytes(path, build(spec).bytes);

  Tensor f32_view, f16_view, bf16_view;
  {
    const GgufFile file = GgufFile::open(path);
    ASSERT_EQ(file.tensors().size(), 5u);
    const GgufTensorInfo* info = file.find_tensor("w.f32");
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->type, GgufType::kF32);
    EXPECT_EQ(info->ne, (std::vector<std::int64_t>{5, 4, 3, 2}));
    EXPECT_EQ(info->shape(), (std::vector<std::int64_t>{2, 3, 4, 5}));
    EXPECT_EQ(info->numel(), 120);
    EXPECT_EQ(info->nbytes, 480u);
    EXPECT_EQ(file.find_tensor("nope"), nullptr);

    f32_view = file.view("w.f32");
    EXPECT_EQ(f32_view.dtype(), DType::kFloat32);
    EXPECT_EQ(shape_of(f32_view), (std::vector<std::int64_t>{2, 3, 4, 5}));
    EXPECT_TRUE(f32_view.is_contiguous());
    EXPECT_TRUE(f32_view.owns_storage());
    EXPECT_EQ(f32_view.data(), static_cast<const void*>(file.data(*info)));  // zero copy
    f16_view = file.view("w.f16");
    EXPECT_EQ(f16_view.dtype(), DType::kFloat16);
    EXPECT_EQ(shape_of(f16_view), (std::vector<std::int64_t>{2, 3}));
    bf16_view = file.view("w.bf16");
    EXPECT_EQ(bf16_view.dtype(), DType::kBFloat16);
    EXPECT_EQ(shape_of(bf16_view), (std::vector<std::int64_t>{6}));

    const Tensor scalar = file.to_float32("scalar");
    EXPECT_EQ(scalar.rank(), 0);
    EXPECT_EQ(floats_of(scalar), (std::vector<float>{42.0f}));
    const Tensor empty = file.to_float32("empty");
    EXPECT_EQ(shape_of(empty), (std::vector<std::int64_t>{4, 0}));
    EXPECT_EQ(file.view("empty").numel(), 0);

    // to_float32 copies (and widens) into new memory.
    const Tensor f32_copy = file.to_float32("w.f32");
    EXPECT_NE(f32_copy.data(), f32_view.data());
    EXPECT_EQ(floats_of(f32_copy), f32_values);
    EXPECT_EQ(floats_of(file.to_float32("w.f16")), f16_values);
    EXPECT_EQ(floats_of(file.to_float32("w.bf16")), bf16_values);
    EXPECT_KVCACHE_ERROR(file.to_float32("nope"), "no tensor 'nope' (the file holds 5 tensors)");
    EXPECT_KVCACHE_ERROR(file.view("nope"), path);
  }
  // The file object is gone; the views keep the mapping alive.
  EXPECT_EQ(floats_of(f32_view), f32_values);
  std::vector<float> widened;
  for (std::int64_t i = 0; i < 6; ++i)
    widened.push_back(static_cast<float>(testing::element(f16_view, i)));
  EXPECT_EQ(widened, f16_values);
  widened.clear();
  for (std::int64_t i = 0; i < 6; ++i)
    widened.push_back(static_cast<float>(testing::element(bf16_view, i)));
  EXPECT_EQ(widened, bf16_values);
}

TEST(GgufTensors, MisalignedDataIsReadButNotViewed) {
  TempDir dir;
  // With general.alignment = 1 a tensor may start at any byte: to_float32 reads it through
  // memcpy, view() refuses a pointer that is not aligned for the dtype.
  Spec spec;
  spec.alignment = 1;
  spec.kvs = {{"general.alignment", u32(1)}};
  spec.tensors = {{"x", {3}, 0, bytes_of_floats({1.5f, -2.0f, 8.0f}), 0}};
  const std::uint64_t data_start = build(spec).data_start;
  spec.tensors[0].offset = (data_start % 4 == 1) ? 0 : (5 - data_start % 4) % 4;
  const std::string path = dir.file("misaligned.gguf");
  write_bytes(path, build(spec).bytes);
  const GgufFile file = GgufFile::open(path);
  EXPECT_EQ(floats_of(file.to_float32("x")), (std::vector<float>{1.5f, -2.0f, 8.0f}));
  EXPECT_KVCACHE_ERROR(file.view("x"), "tensor 'x': data at offset");
  EXPECT_KVCACHE_ERROR(file.view("x"), "is not aligned for F32");
}

TEST(GgufTensors, UnservedTypesAreSizedListedButNotRead) {
  TempDir dir;
  Spec spec;
  spec.tensors = {{"k", {256, 2}, 23, std::string(2 * 136, '\x5a'), std::nullopt},  // IQ4_XS
                  {"x", {2}, 0, bytes_of_floats({1, 2}), std::nullopt}};
  const std::string path = dir.file("q4k.gguf");
  write_bytes(path, build(spec).bytes);
  const GgufFile file = GgufFile::open(path);
  const GgufTensorInfo* info = file.find_tensor("k");
  ASSERT_NE(info, nullptr);
  EXPECT_EQ(info->type, GgufType::kIQ4_XS);
  EXPECT_EQ(info->nbytes, 272u);
  EXPECT_EQ(file.tensors()[1].offset, 288u);  // 272 padded to the 32-byte alignment
  EXPECT_KVCACHE_ERROR(file.to_float32("k"), "GGUF tensor type IQ4_XS is not supported yet");
  EXPECT_KVCACHE_ERROR(file.to_float32("k"), path);
  EXPECT_KVCACHE_ERROR(file.view("k"),
                       "view() serves F32, F16 and BF16 tensors in place, got IQ4_XS");
  float out[256];
  EXPECT_KVCACHE_ERROR(dequantize_row(GgufType::kIQ4_XS, file.data(*info), out, 256),
                       "GGUF tensor type IQ4_XS is not supported yet");
}

TEST(GgufTensors, TypeNamesAndSizes) {
  EXPECT_EQ(gguf_type_name(GgufType::kQ4_1), "Q4_1");
  EXPECT_EQ(gguf_type_name(GgufType::kBF16), "BF16");
  EXPECT_EQ(gguf_type_name(GgufType::kIQ4_XS), "IQ4_XS");
  EXPECT_EQ(gguf_type_name(static_cast<GgufType>(99)), "type 99");
  EXPECT_EQ(gguf_type_name(static_cast<GgufType>(4)), "type 4");  // retired Q4_2
  struct Size {
    GgufType type;
    std::int64_t block;
    std::uint64_t bytes;
  };
  const Size sizes[] = {
      {GgufType::kF32, 1, 4},      {GgufType::kF16, 1, 2},      {GgufType::kBF16, 1, 2},
      {GgufType::kQ8_0, 32, 34},   {GgufType::kQ4_0, 32, 18},   {GgufType::kQ4_1, 32, 20},
      {GgufType::kQ5_0, 32, 22},   {GgufType::kQ5_1, 32, 24},   {GgufType::kQ8_1, 32, 36},
      {GgufType::kQ2_K, 256, 84},  {GgufType::kQ3_K, 256, 110}, {GgufType::kQ4_K, 256, 144},
      {GgufType::kQ5_K, 256, 176}, {GgufType::kQ6_K, 256, 210}, {GgufType::kQ8_K, 256, 292},
      {GgufType::kI8, 1, 1},       {GgufType::kI16, 1, 2},      {GgufType::kI32, 1, 4},
      {GgufType::kI64, 1, 8},      {GgufType::kF64, 1, 8},
  };
  for (const Size& s : sizes) {
    EXPECT_EQ(gguf_block_size(s.type), s.block) << gguf_type_name(s.type);
    EXPECT_EQ(gguf_type_bytes(s.type, 3 * s.block), 3 * s.bytes) << gguf_type_name(s.type);
    EXPECT_EQ(gguf_type_bytes(s.type, 0), 0u);
  }
  EXPECT_KVCACHE_ERROR(gguf_type_bytes(GgufType::kQ4_1, 33), "whole 32-element blocks");
  EXPECT_KVCACHE_ERROR(gguf_type_bytes(GgufType::kF32, -1), "got -1");
  EXPECT_KVCACHE_ERROR(gguf_type_bytes(static_cast<GgufType>(99), 32),
                       "unknown GGUF tensor type 99");
  EXPECT_KVCACHE_ERROR(gguf_type_bytes(GgufType::kF64, std::numeric_limits<std::int64_t>::max()),
                       "64 bits");
  float out[32];
  const std::string zeros(64, '\0');
  EXPECT_KVCACHE_ERROR(dequantize_row(GgufType::kQ8_0, zeros.data(), out, 16),
                       "whole 32-element blocks, got 16");
  EXPECT_KVCACHE_ERROR(dequantize_row(static_cast<GgufType>(5), zeros.data(), out, 32),
                       "unknown GGUF tensor type 5");
}

// --- dequantization ------------------------------------------------------------------------------

struct QuantCase {
  const char* name;
  std::uint32_t type;
};

class GgufDequantize : public ::testing::TestWithParam<QuantCase> {};

TEST_P(GgufDequantize, BlocksMatchTheFormula) {
  const QuantCase& c = GetParam();
  std::mt19937 rng(c.type * 1000 + 1);
  const std::int64_t row = 96, rows = 3;  // 3 blocks per row
  const Blocks blocks = c.type == 8   ? q8_0_blocks(row / 32 * rows, rng)
                        : c.type == 2 ? q4_blocks(row / 32 * rows, false, rng)
                                      : q4_blocks(row / 32 * rows, true, rng);
  TempDir dir;
  Spec spec;
  spec.tensors = {{"w", {row, rows}, c.type, blocks.bytes, std::nullopt}};
  const std::string path = dir.file("q.gguf");
  write_bytes(path, build(spec).bytes);
  const GgufFile file = GgufFile::open(path);
  const GgufTensorInfo& info = file.tensors()[0];
  EXPECT_EQ(gguf_type_name(info.type), c.name);
  EXPECT_EQ(info.nbytes, blocks.bytes.size());

  const Tensor out = file.to_float32("w");
  EXPECT_EQ(out.dtype(), DType::kFloat32);
  EXPECT_EQ(shape_of(out), (std::vector<std::int64_t>{rows, row}));
  EXPECT_EQ(floats_of(out), blocks.expected);  // exact: the products are exact in float32
  EXPECT_KVCACHE_ERROR(file.view("w"), std::string("got ") + c.name);

  // dequantize_row on its own, from an odd (unaligned) address.
  std::string shifted = "x" + blocks.bytes;
  std::vector<float> direct(blocks.expected.size(), std::nanf(""));
  dequantize_row(info.type, shifted.data() + 1, direct.data(),
                 static_cast<std::int64_t>(direct.size()));
  EXPECT_EQ(direct, blocks.expected);
}

INSTANTIATE_TEST_SUITE_P(Gguf, GgufDequantize,
                         ::testing::Values(QuantCase{"Q8_0", 8}, QuantCase{"Q4_0", 2},
                                           QuantCase{"Q4_1", 3}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(GgufTensors, LargeTensorsDequantizeInParallelLikeRowByRow) {
  // Big enough (4096 x 64) for to_float32 to split rows across threads.
  std::mt19937 rng(3);
  const std::int64_t row = 4096, rows = 64;
  const Blocks blocks = q8_0_blocks(row / 32 * rows, rng);
  TempDir dir;
  Spec spec;
  spec.tensors = {{"embd", {row, rows}, 8, blocks.bytes, std::nullopt}};
  const std::string path = dir.file("big.gguf");
  write_bytes(path, build(spec).bytes);
  const GgufFile file = GgufFile::open(path);
  EXPECT_EQ(floats_of(file.to_float32("embd")), blocks.expected);
}

// --- broken files --------------------------------------------------------------------------------

// A small valid file with a bit of everything, used whole, cut short and scrambled.
Spec small_spec() {
  std::mt19937 rng(11);
  Spec spec;
  spec.kvs = {
      {"general.architecture", str("llama")},
      {"llama.block_count", u32(2)},
      {"tokens", array(8, {str("a"), str("bc")})},
      {"nested", array(9, {array(5, {i32(1)}), array(5, {})})},
      {"flag", boolean(true)},
      {"eps", f32(1e-5f)},
  };
  spec.tensors = {
      {"w", {3, 2}, 0, bytes_of_floats({1, 2, 3, 4, 5, 6}), std::nullopt},
      {"q8", {32, 1}, 8, q8_0_blocks(1, rng).bytes, std::nullopt},
      {"q41", {32}, 3, q4_blocks(1, true, rng).bytes, std::nullopt},
  };
  return spec;
}

// Writes `bytes` and expects open() to throw an Error naming the file and containing `needle`.
void expect_open_error(const TempDir& dir, const std::string& bytes, const std::string& needle) {
  const std::string path = dir.file("bad.gguf");
  write_bytes(path, bytes);
  EXPECT_KVCACHE_ERROR(GgufFile::open(path), needle);
  EXPECT_KVCACHE_ERROR(GgufFile::open(path), "GGUF " + path + ": ");
}

TEST(GgufCorrupt, TheSmallFileIsValid) {
  TempDir dir;
  const std::string path = dir.file("small.gguf");
  write_bytes(path, build(small_spec()).bytes);
  const GgufFile file = GgufFile::open(path);
  EXPECT_EQ(file.tensors().size(), 3u);
  EXPECT_EQ(file.get_string_array("tokens"), (std::vector<std::string>{"a", "bc"}));
  EXPECT_EQ(file.to_float32("q41").numel(), 32);
}

TEST(GgufCorrupt, EveryTruncationIsAnError) {
  TempDir dir;
  const std::string full = build(small_spec()).bytes;
  const std::string path = dir.file("cut.gguf");
  for (std::size_t size = 0; size < full.size(); ++size) {
    write_bytes(path, full.substr(0, size));
    try {
      (void)GgufFile::open(path);
      ADD_FAILURE() << "a file cut to " << size << " of " << full.size() << " bytes opened";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
}

TEST(GgufCorrupt, RandomByteChangesNeverCrash) {
  // Each mutant either opens (and then reads every tensor) or throws kvcache::Error: never a
  // crash, a hang or another exception.
  TempDir dir;
  const std::string full = build(small_spec()).bytes;
  const std::string path = dir.file("fuzz.gguf");
  std::mt19937 rng(5);
  std::uniform_int_distribution<std::size_t> where(0, full.size() - 1);
  std::uniform_int_distribution<int> byte(0, 255), changes(1, 4);
  int opened = 0, refused = 0;
  for (int iteration = 0; iteration < 3000; ++iteration) {
    std::string bytes = full;
    for (int k = changes(rng); k > 0; --k) {
      const std::size_t at = where(rng);
      // Half the time a byte of 0xFF or 0x00, which makes huge or empty counts and lengths.
      const int mode = byte(rng) % 4;
      bytes[at] = static_cast<char>(mode == 0 ? 0xFF : mode == 1 ? 0x00 : byte(rng));
    }
    write_bytes(path, bytes);
    try {
      const GgufFile file = GgufFile::open(path);
      ++opened;
      for (const GgufTensorInfo& info : file.tensors()) {
        try {
          (void)file.to_float32(info.name);
          (void)file.view(info.name);
        } catch (const Error&) {
        }
      }
    } catch (const Error&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 0);
  EXPECT_GT(opened, 0);  // changes to values (not structure) leave a readable file
}

TEST(GgufCorrupt, NotAGgufFile) {
  TempDir dir;
  EXPECT_KVCACHE_ERROR(GgufFile::open(dir.file("missing.gguf")), "cannot open");
  EXPECT_KVCACHE_ERROR(GgufFile::open(dir.file("")), "expected a regular file");
  expect_open_error(dir, "", "expected at least 24 bytes");
  expect_open_error(dir, std::string("GGUF\3\0\0\0", 8), "got a file of 8 bytes");
  Spec spec = small_spec();
  spec.magic = "GGML";
  expect_open_error(dir, build(spec).bytes, "expected the magic 'GGUF' at the start, got 'GGML'");
  spec.magic = std::string("\x89PNG", 4);
  expect_open_error(dir, build(spec).bytes, "not a GGUF file");
}

TEST(GgufCorrupt, UnsupportedVersions) {
  TempDir dir;
  Spec spec = small_spec();
  spec.version = 1;
  expect_open_error(dir, build(spec).bytes, "expected version 2 or 3, got 1");
  spec.version = 4;
  expect_open_error(dir, build(spec).bytes, "expected version 2 or 3, got 4");
  spec.version = 0x03000000;  // a big-endian file's version
  expect_open_error(dir, build(spec).bytes, "big-endian GGUF files are not supported");
}

TEST(GgufCorrupt, HugeCountsAreRefusedBeforeAllocating) {
  TempDir dir;
  Spec spec = small_spec();
  spec.kv_count = std::uint64_t{1} << 62;
  expect_open_error(dir, build(spec).bytes, "4611686018427387904 metadata entries");
  spec.kv_count = std::numeric_limits<std::uint64_t>::max();
  expect_open_error(dir, build(spec).bytes, "do not fit the");
  spec = small_spec();
  spec.tensor_count = std::numeric_limits<std::uint64_t>::max();
  expect_open_error(dir, build(spec).bytes, "18446744073709551615 tensor infos");
  spec.tensor_count = 1000;
  expect_open_error(dir, build(spec).bytes, "1000 tensor infos");

  // A count one larger than the entries written runs into the tensor infos and is caught there
  // or at the end of the file, whatever those bytes say.
  spec = small_spec();
  spec.kv_count = spec.kvs.size() + 1;
  expect_open_error(dir, build(spec).bytes, "");

  spec = small_spec();
  spec.kvs.emplace_back("big", raw_array(4, std::uint64_t{1} << 60, ""));
  expect_open_error(dir, build(spec).bytes, "metadata key 'big': an array of 1152921504606846976");
  spec.kvs.back() = {"big", raw_array(9, std::numeric_limits<std::uint64_t>::max(), "")};
  expect_open_error(dir, build(spec).bytes, "array values (at least 12 bytes each) does not fit");
  spec.kvs.back() = {"big", Value{8, le(std::numeric_limits<std::uint64_t>::max()) + "abc"}};
  expect_open_error(dir, build(spec).bytes,
                    "metadata key 'big': expected 18446744073709551615 bytes for a string value");
  spec.kvs.back() = {"big", array(8, {str("ok"), Value{8, le(std::uint64_t{1} << 40)}})};
  expect_open_error(dir, build(spec).bytes, "bytes for a string value");

  // A key length past the end.
  spec = small_spec();
  std::string bytes = build(spec).bytes;
  const std::string huge = le(std::numeric_limits<std::uint64_t>::max() - 3);
  bytes.replace(24, 8, huge);  // the first key's length
  expect_open_error(dir, bytes, "metadata entry 0 (of 6): expected 18446744073709551612 bytes");
  // A tensor name length past the end.
  spec = small_spec();
  spec.tensors[0].name = "\x01\x02";
  bytes = build(spec).bytes;
  const std::size_t name_at = bytes.find(std::string("\x01\x02", 2)) - 8;
  bytes.replace(name_at, 8, le(std::uint64_t{1} << 50));
  expect_open_error(dir, bytes, "tensor info 0 (of 3): expected 1125899906842624 bytes for");
}

TEST(GgufCorrupt, UnknownValueTypes) {
  TempDir dir;
  Spec spec = small_spec();
  spec.kvs.emplace_back("odd", Value{13, "xxxx"});
  expect_open_error(dir, build(spec).bytes, "metadata key 'odd': unknown value type 13");
  spec.kvs.back() = {"odd", raw_array(200, 1, "x")};
  expect_open_error(dir, build(spec).bytes, "metadata key 'odd': unknown array element type 200");
  spec.kvs.back() = {"odd", array(9, {raw_array(77, 0, "")})};
  expect_open_error(dir, build(spec).bytes, "unknown array element type 77");
  spec.kvs.back() = {"odd", Value{7, std::string(1, '\x02')}};
  expect_open_error(dir, build(spec).bytes, "metadata key 'odd': expected a bool of 0 or 1");
}

TEST(GgufCorrupt, DeeplyNestedArraysAreRefused) {
  TempDir dir;
  Value deep = array(4, {u32(1)});
  for (int level = 0; level < 100; ++level) deep = array(9, {deep});
  Spec spec = small_spec();
  spec.kvs.emplace_back("deep", deep);
  expect_open_error(dir, build(spec).bytes, "metadata key 'deep': arrays nest deeper than 16");
  // A hundred thousand levels of array headers: refused at the limit, no stack overflow.
  std::string headers;
  for (int level = 0; level < 100000; ++level)
    headers += le<std::uint32_t>(9) + le<std::uint64_t>(1);
  spec.kvs.back() = {"deep", Value{9, headers}};
  expect_open_error(dir, build(spec).bytes, "arrays nest deeper than");
}

TEST(GgufCorrupt, DuplicateKeysAndTensorNames) {
  TempDir dir;
  Spec spec = small_spec();
  spec.kvs.emplace_back("flag", boolean(false));
  expect_open_error(dir, build(spec).bytes, "metadata key 'flag': the key appears twice");
  // Keys are quoted in messages with control bytes and bytes that are not UTF-8 escaped.
  spec = small_spec();
  const std::string odd_key = std::string("\xff\x01") + "caf\xc3\xa9";
  spec.kvs.emplace_back(odd_key, u8(1));
  spec.kvs.emplace_back(odd_key, u8(2));
  expect_open_error(dir, build(spec).bytes,
                    "metadata key '\\xff\\x01caf\xc3\xa9': the key appears");
  spec = small_spec();
  spec.tensors.push_back(spec.tensors[0]);
  spec.tensors.back().offset = std::nullopt;
  expect_open_error(dir, build(spec).bytes, "tensor 'w': the name appears twice");
}

TEST(GgufCorrupt, BadAlignment) {
  TempDir dir;
  Spec spec = small_spec();
  spec.kvs.emplace_back("general.alignment", u32(3));
  expect_open_error(dir, build(spec).bytes,
                    "metadata key 'general.alignment': expected a power of two, got 3");
  spec.kvs.back().second = u32(0);
  expect_open_error(dir, build(spec).bytes, "expected a power of two, got 0");
  spec.kvs.back().second = i32(32);
  expect_open_error(dir, build(spec).bytes, "'general.alignment': expected a uint32, got int32");
}

TEST(GgufCorrupt, BadTensorInfos) {
  TempDir dir;
  Spec spec = small_spec();
  spec.tensors[1].type = 99;
  expect_open_error(dir, build(spec).bytes, "tensor 'q8': unknown tensor type 99");
  spec.tensors[1].type = 4;  // Q4_2, retired from ggml
  expect_open_error(dir, build(spec).bytes, "tensor 'q8': unknown tensor type 4");

  spec = small_spec();
  spec.tensors[0].ne = {1, 1, 1, 2, 3};
  expect_open_error(dir, build(spec).bytes,
                    "tensor 'w': expected at most 4 dimensions, got n_dims = 5");
  spec.tensors[0].ne = {6, 1, 1, 1, 1, 1, 1, 1, 1};
  expect_open_error(dir, build(spec).bytes, "got n_dims = 9");
  spec.tensors[0].ne = {-6};
  expect_open_error(dir, build(spec).bytes, "tensor 'w': expected sizes >= 0, got ne[0] = -6");
  spec.tensors[0].ne = {std::int64_t{1} << 40, std::int64_t{1} << 40};
  expect_open_error(dir, build(spec).bytes, "has more elements than int64 can count");
  spec.tensors[0].ne = {std::int64_t{1} << 62, 1};
  expect_open_error(dir, build(spec).bytes, "F32 x [4611686018427387904, 1] has more bytes");

  spec = small_spec();
  spec.tensors[1].ne = {16, 2};  // Q8_0 rows of 16: half a block
  expect_open_error(dir, build(spec).bytes,
                    "tensor 'q8': Q8_0 stores blocks of 32 elements along ne[0], but ne = [16, 2]");
}

TEST(GgufCorrupt, BadOffsets) {
  TempDir dir;
  Spec spec = small_spec();
  spec.tensors[1].offset = 40;
  expect_open_error(dir, build(spec).bytes,
                    "tensor 'q8': expected a data offset that is a multiple of the alignment 32, "
                    "got 40");

  // Past the end: offsets and sizes that do not fit the data section (and offsets that would
  // wrap around 64 bits when the size is added).
  spec = small_spec();
  spec.tensors[2].offset = 4096;
  std::string bytes = build(spec).bytes;
  bytes.resize(bytes.size() - (4096 - 96));  // what build padded to reach the far offset
  expect_open_error(dir, bytes, "tensor 'q41': Q4_1 x [32] needs bytes [4096, 4096 + 20)");
  spec.tensors[2].offset = std::numeric_limits<std::uint64_t>::max() / 32 * 32;
  spec.tensors[2].data.clear();  // build does not place it
  expect_open_error(dir, build(spec).bytes, "of the data section, which has");
  spec = small_spec();
  spec.tensors[0].ne = {3, 4};  // 48 bytes claimed, 24 written, next tensor at 32
  std::string grown = build(spec).bytes;
  expect_open_error(dir, grown, "tensors 'w' (data bytes [0, 48)) and 'q8' (data bytes [32, 66))");

  // Overlap, whatever the order of the infos.
  spec = small_spec();
  spec.tensors[2].offset = 32;  // q41 [32, 52) on top of q8 [32, 66)
  expect_open_error(dir, build(spec).bytes, "overlap");
  spec = small_spec();
  spec.tensors[0].offset = 32;
  spec.tensors[1].offset = 0;  // q8 [0, 34) runs into w [32, 56)
  expect_open_error(dir, build(spec).bytes, "tensors 'q8' (data bytes [0, 34)) and 'w'");

  // The data section must start inside a file that has tensors.
  const Built built = build(small_spec());
  ASSERT_LT(built.infos_end, built.data_start);  // the small file has padding to cut
  expect_open_error(dir, built.bytes.substr(0, built.infos_end),
                    "data section: expected to start at");
}

TEST(GgufCorrupt, FileWithoutTensorsMayEndBeforeThePadding) {
  TempDir dir;
  Spec spec;
  spec.kvs = {{"general.architecture", str("llama")}};
  const Built built = build(spec);
  ASSERT_LT(built.infos_end, built.data_start);
  const std::string path = dir.file("meta_only.gguf");
  write_bytes(path, built.bytes.substr(0, built.infos_end));  // no padding after the last value
  const GgufFile file = GgufFile::open(path);
  EXPECT_EQ(file.get_string("general.architecture"), "llama");
}

// --- real blocks ---------------------------------------------------------------------------------

TEST(GgufRealBlocks, MatchTheGgufPackagesDequantizer) {
  // Rows copied byte for byte from SmolLM2-135M-Instruct.Q4_1.gguf by tools/make_gguf_fixtures.py,
  // with the values gguf.quants.dequantize gives for them. It computes in float32 too (d * q + m
  // with fp16 d, m widened first), so the values must match exactly.
  const std::string dir = std::string(KVCACHE_TEST_DATA_DIR) + "/gguf";
  const GgufFile file = GgufFile::open(dir + "/smollm2_blocks.gguf");
  std::ifstream in(dir + "/smollm2_blocks.expected.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json expected = nlohmann::json::parse(in);

  ASSERT_EQ(file.tensors().size(), expected["tensors"].size());
  for (const auto& [name, want] : expected["tensors"].items()) {
    SCOPED_TRACE(name);
    const GgufTensorInfo* info = file.find_tensor(name);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(gguf_type_name(info->type), want["type"].get<std::string>());
    EXPECT_EQ(info->shape(), want["shape"].get<std::vector<std::int64_t>>());
    const Tensor out = file.to_float32(name);
    const std::vector<float> got = floats_of(out);
    const auto values = want["values"].get<std::vector<double>>();
    ASSERT_EQ(got.size(), values.size());
    std::size_t mismatches = 0;
    double max_abs = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      const auto expect = static_cast<float>(values[i]);
      if (std::bit_cast<std::uint32_t>(got[i]) != std::bit_cast<std::uint32_t>(expect))
        ++mismatches;
      max_abs = std::max(max_abs, std::abs(static_cast<double>(got[i]) - values[i]));
    }
    EXPECT_EQ(mismatches, 0u) << "max abs difference " << max_abs;
  }

  for (const auto& [key, want] : expected["metadata"].items()) {
    SCOPED_TRACE(key);
    const std::string type = want["type"].get<std::string>();
    if (type == "STRING") {
      EXPECT_EQ(file.get_string(key), want["value"].get<std::string>());
    } else if (type == "UINT32") {
      EXPECT_EQ(file.find(key)->type, VT::kUInt32);
      EXPECT_EQ(file.get_int(key), want["value"].get<std::int64_t>());
    } else if (type == "FLOAT32") {
      EXPECT_EQ(file.find(key)->type, VT::kFloat32);
      EXPECT_EQ(file.get_float(key), want["value"].get<double>());
    } else if (type == "BOOL") {
      EXPECT_EQ(file.get_bool(key), want["value"].get<bool>());
    } else if (type == "ARRAY" && want["element_type"] == "STRING") {
      EXPECT_EQ(file.get_string_array(key), want["value"].get<std::vector<std::string>>());
    } else if (type == "ARRAY" && want["element_type"] == "INT32") {
      EXPECT_EQ(file.find(key)->array_type, VT::kInt32);
      EXPECT_EQ(file.get_int_array(key), want["value"].get<std::vector<std::int64_t>>());
    } else {
      ADD_FAILURE() << "the fixture has a metadata type the test does not check: " << type;
    }
  }
  EXPECT_EQ(file.get_int("llama.embedding_length"), 576);
  EXPECT_EQ(file.find_tensor("token_embd.weight")->type, GgufType::kQ8_0);
  EXPECT_EQ(file.find_tensor("blk.0.attn_q.weight")->type, GgufType::kQ4_1);
  // The F32 norm weight is also a zero-copy view with the same values.
  const Tensor norm = file.view("blk.0.attn_norm.weight");
  EXPECT_EQ(floats_of(norm), floats_of(file.to_float32("blk.0.attn_norm.weight")));
}

}  // namespace
}  // namespace kvcache
