// GGUF checkpoints (llama.cpp's format): header, metadata key/values of every type (arrays
// included), tensor infos and the aligned data section, memory-mapped. Everything is validated
// before use — counts that fit the file, known value and tensor types, offsets and sizes in range,
// alignment — and a bad file is a kvcache::Error naming the file and the field, never a crash.
//
// Tensor types: F32, F16 and BF16 are viewed in place; Q8_0, Q4_0 and Q4_1 are dequantized to
// float32 (block formats as llama.cpp defines them). Every other ggml type is still sized, so the
// layout of a file holding it (K-quants, IQ quants, ...) is validated and listed; only reading its
// values is an error naming the type.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvcache/tensor.hpp"

namespace kvcache {

/// ggml tensor types, with llama.cpp's numbering (only some are served; see dequantize_row).
/// Numbers 4, 5 and 31..33 are retired in ggml and read as unknown types.
enum class GgufType : std::uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
  kNVFP4 = 40,
  kQ1_0 = 41,
};

/// "Q4_1", "F32", ...; "type N" for numbers it does not know.
std::string gguf_type_name(GgufType type);

namespace detail {
class MappedFile;
struct GgufArrayAccess;  // the reader that fills arrays (gguf.cpp)
}  // namespace detail

/// One metadata value. `type` is GGUF's value type (0 uint8 … 12 float64); integers are held in
/// `i` (signed types) or `u` (unsigned types), floats in `f`, bools in `b`, strings in `s` and
/// arrays in `array` (elements of `array_type`; arrays of arrays nest).
struct GgufValue {
  /// GGUF's metadata value types, with the file format's numbering.
  enum class Type : std::uint32_t {
    kUInt8 = 0,
    kInt8 = 1,
    kUInt16 = 2,
    kInt16 = 3,
    kUInt32 = 4,
    kInt32 = 5,
    kFloat32 = 6,
    kBool = 7,
    kString = 8,
    kArray = 9,
    kUInt64 = 10,
    kInt64 = 11,
    kFloat64 = 12,
  };

  /// The elements of an array value, held compactly: the bytes the file stores them in (plus one
  /// offset per element for strings and nested arrays), decoded into a GgufValue on access. A
  /// 30 MB array of uint8 takes 30 MB, not a GgufValue (about 100 bytes) per element.
  class Array {
   public:
    /// Number of elements.
    std::size_t size() const { return count_; }
    /// Whether the array has no elements.
    bool empty() const { return count_ == 0; }
    /// The type of every element.
    Type element_type() const { return type_; }
    /// Element `i`, decoded; an error when i >= size().
    GgufValue operator[](std::size_t i) const;
    /// Bytes held for the elements (their encoding in the file, and the offsets).
    std::size_t held_bytes() const {
      return bytes_.size() + offsets_.size() * sizeof(std::uint64_t);
    }

   private:
    friend struct detail::GgufArrayAccess;
    Type type_ = Type::kUInt8;
    std::size_t count_ = 0;
    std::vector<std::byte> bytes_;        // the elements as the file encodes them
    std::vector<std::uint64_t> offsets_;  // each element's start in bytes_ (strings, arrays)
  };

  /// The value's type, which says which member below holds it.
  Type type = Type::kUInt8;
  /// The value of an unsigned integer type.
  std::uint64_t u = 0;
  /// The value of a signed integer type.
  std::int64_t i = 0;
  /// The value of a float type.
  double f = 0;
  /// The value of a bool.
  bool b = false;
  /// The value of a string (its bytes as the file holds them).
  std::string s{};
  /// The elements of an array.
  Array array{};
  /// The element type of an array (when type is kArray).
  Type array_type = Type::kUInt8;  // element type when type == kArray
};

/// One tensor's entry in a GGUF file: name, ggml shape, type and where its data lies.
struct GgufTensorInfo {
  /// The tensor's GGUF name ("blk.0.attn_q.weight").
  std::string name{};
  /// The sizes in ggml order: ne[0] is the fastest-varying (contiguous) dimension.
  std::vector<std::int64_t>
      ne{};  // ggml order: ne[0] is the fastest-varying (contiguous) dimension
  /// The element or block type.
  GgufType type = GgufType::kF32;
  /// Where the data starts, from the start of the data section.
  std::uint64_t offset = 0;  // from the start of the data section
  /// Bytes of data.
  std::uint64_t nbytes = 0;
  /// The shape as torch orders it (ne reversed): a weight [out, in] has ne = {in, out}.
  std::vector<std::int64_t> shape() const { return {ne.rbegin(), ne.rend()}; }
  /// Number of elements (the product of ne).
  std::int64_t numel() const;
};

/// A GGUF file (llama.cpp's format), memory-mapped and validated: its metadata, its tensor
/// infos, and the tensors' data as bytes, float32 copies or zero-copy views.
class GgufFile {
 public:
  /// Maps and validates `path`; throws kvcache::Error naming the file (and key or tensor).
  static GgufFile open(const std::string& path);

  /// The path it was opened from.
  const std::string& path() const { return path_; }
  /// The format version (2 or 3).
  std::uint32_t version() const { return version_; }
  /// The data alignment in bytes (general.alignment, 32 by default).
  std::uint64_t alignment() const { return alignment_; }
  /// Every metadata key and value.
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  /// The tensor infos in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  /// The metadata value of `key`, or null.
  const GgufValue* find(const std::string& key) const;
  /// The tensor named `name`, or null.
  const GgufTensorInfo* find_tensor(const std::string& name) const;

  /// Typed metadata reads; the error names the key, the type expected and the type found.
  /// Integers of any width and sign convert when the value fits.
  std::optional<std::int64_t> get_int(const std::string& key) const;
  /// A float (float32 or float64) value; nullopt when absent.
  std::optional<double> get_float(const std::string& key) const;
  /// A string value; nullopt when absent.
  std::optional<std::string> get_string(const std::string& key) const;
  /// A bool value; nullopt when absent.
  std::optional<bool> get_bool(const std::string& key) const;
  /// An array of strings; empty when absent.
  std::vector<std::string> get_string_array(const std::string& key) const;  // empty when absent
  /// An array of integers of any width; empty when absent.
  std::vector<std::int64_t> get_int_array(const std::string& key) const;  // empty when absent

  /// Raw bytes of a tensor (inside the mapping).
  const std::byte* data(const GgufTensorInfo& info) const;

  /// A float32 tensor with the torch-ordered shape, dequantized (or widened) from any served type.
  Tensor to_float32(const std::string& name) const;

  /// A zero-copy view for F32, F16 and BF16 tensors (torch-ordered shape); the view keeps the
  /// mapping alive. Other types: an error naming the type.
  Tensor view(const std::string& name) const;

 private:
  std::string path_;
  std::shared_ptr<detail::MappedFile> mapping_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = 32;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t> tensor_index_;
  const std::byte* data_begin_ = nullptr;
};

/// Elements per block of `type`: 1 for plain types, 32 for Q4_0/Q4_1/Q8_0, 256 for K-quants, ...
/// Throws for a number it does not know.
std::int64_t gguf_block_size(GgufType type);

/// Bytes of `count` elements of `type` (count must fill whole blocks). Every type ggml names is
/// sized, served or not; throws for a number it does not know, a partial block or an overflow.
std::uint64_t gguf_type_bytes(GgufType type, std::int64_t count);

/// Dequantizes `count` elements (whole blocks) of `type` at `src` into `dst`. Served: F32, F16,
/// BF16, Q8_0, Q4_0, Q4_1; others throw kvcache::Error naming the type.
void dequantize_row(GgufType type, const void* src, float* dst, std::int64_t count);

}  // namespace kvcache
