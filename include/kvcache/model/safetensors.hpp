// Safetensors checkpoints as Hugging Face ships them: one model.safetensors, or shards
// model-0000N-of-0000M.safetensors listed by model.safetensors.index.json. Files are memory-mapped
// and every tensor is handed out as a zero-copy view whose storage keeps the mapping alive.
//
// Everything is validated before use: the header length against the file size, the JSON, each
// tensor's dtype, shape and data offsets (in range, non-overlapping, dtype × shape equal to the
// byte length). A bad file is a kvcache::Error naming the file and the tensor, never a crash.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvcache/tensor.hpp"

namespace kvcache {

namespace detail {
class MappedFile;
}  // namespace detail

/// One tensor's entry in a safetensors header.
struct SafetensorsEntry {
  /// The tensor's name ("model.layers.0.self_attn.q_proj.weight").
  std::string name{};
  /// The dtype as the file writes it: "F32", "BF16", "F16", "I64", ...
  std::string dtype_name{};  // as written in the file: "F32", "BF16", "F16", "I64", ...
  /// The dtype as kvcache holds it; empty for dtypes it does not (F64, I8, ...).
  std::optional<DType> dtype{};  // empty for dtypes kvcache does not hold (F64, I8, ...)
  /// The sizes, outermost first.
  std::vector<std::int64_t> shape{};
  /// First byte of the data, from the start of the data section.
  std::uint64_t begin = 0;  // byte offsets into the data section, [begin, end)
  /// One past the last byte of the data.
  std::uint64_t end = 0;
};

/// One memory-mapped .safetensors file.
class SafetensorsFile {
 public:
  /// Maps and validates `path`; throws kvcache::Error naming the file (and tensor) on bad input.
  static SafetensorsFile open(const std::string& path);

  /// The path it was opened from.
  const std::string& path() const { return path_; }
  /// Entries sorted by tensor name.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  /// The entry of tensor `name`, or null.
  const SafetensorsEntry* find(const std::string& name) const;
  /// Whether the file holds tensor `name`.
  bool contains(const std::string& name) const { return find(name) != nullptr; }
  /// The "__metadata__" string map (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// A zero-copy CPU view of tensor `name` (rank <= 4); the view keeps the mapping alive.
  /// Throws if the tensor is missing or its dtype is one kvcache does not hold. The memory is
  /// read-only (writing through the view faults) and, as the format does not align data, the
  /// pointer may be misaligned for the dtype: read through bytes/memcpy, or copy first.
  Tensor tensor(const std::string& name) const;

 private:
  std::string path_;
  std::shared_ptr<detail::MappedFile> mapping_;
  std::uint64_t data_start_ = 0;  // 8 + header length: where data_offsets count from
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// A checkpoint folder: model.safetensors, or the shards named by model.safetensors.index.json.
class SafetensorsCheckpoint {
 public:
  /// Opens `dir`; prefers the index when present. Every shard is validated; the index must name
  /// only shards that exist and tensors those shards hold.
  static SafetensorsCheckpoint open(const std::string& dir);

  /// Whether some shard holds tensor `name`.
  bool contains(const std::string& name) const;
  /// Zero-copy view of tensor `name`; the error names the folder and tensor when missing.
  Tensor tensor(const std::string& name) const;
  /// All tensor names, sorted.
  std::vector<std::string> names() const;
  /// The files opened (one, or every shard).
  const std::vector<SafetensorsFile>& files() const { return files_; }

 private:
  std::string dir_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t> file_of_;  // tensor name -> index into files_
};

/// Writes tensors (CPU, any strides) to a .safetensors file, for tests and tools. Throws on I/O
/// errors.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace kvcache
