// Reading and writing .safetensors files: an 8-byte little-endian header length N, N bytes of JSON
// ({name: {dtype, shape, data_offsets}, "__metadata__": {...}}), then the tensors' bytes. Files are
// mapped read-only and every header field is checked against the file before a view is handed
// out, so a truncated or hostile file is a kvcache::Error, never a read past the mapping.
#include "kvcache/model/safetensors.hpp"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string_view>
#include <utility>

#include "../io_util.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/error.hpp"
#include "mapped_file.hpp"

// The file's numbers (header length, tensor elements) are little-endian; views hand the mapped
// bytes out as they are, which is only right on a little-endian host.
static_assert(std::endian::native == std::endian::little,
              "kvcache's safetensors reader maps little-endian data as is");

namespace kvcache {

// Headers and indexes are read as nlohmann::json (keys sorted, so entries() lists tensors by
// name): inserting into ordered_json's vector of (const key, value) pairs copies the values when
// it grows and destroys the old copies, and that destruction allocates inside a noexcept
// destructor (see detail::release_json), which ends in std::terminate when memory runs out.
// save_safetensors writes with ordered_json (the caller's order), its object reserved up front.
using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

namespace {

struct DTypeInfo {
  std::string_view name;
  std::size_t size;            // bytes per element
  std::optional<DType> dtype;  // empty when kvcache holds no such dtype
};

// Every dtype the safetensors format names (except the sub-byte F4/F6 kinds, which have no whole
// byte size). Those kvcache does not hold are still sized, so their entries are validated and
// listed, and only tensor() refuses them.
constexpr DTypeInfo kDTypes[] = {
    {"F32", 4, DType::kFloat32},  {"F16", 2, DType::kFloat16},  {"BF16", 2, DType::kBFloat16},
    {"I64", 8, DType::kInt64},    {"I32", 4, DType::kInt32},    {"U8", 1, DType::kUInt8},
    {"BOOL", 1, DType::kUInt8},   {"F64", 8, std::nullopt},     {"I8", 1, std::nullopt},
    {"I16", 2, std::nullopt},     {"U16", 2, std::nullopt},     {"U32", 4, std::nullopt},
    {"U64", 8, std::nullopt},     {"F8_E4M3", 1, std::nullopt}, {"F8_E5M2", 1, std::nullopt},
    {"F8_E8M0", 1, std::nullopt}, {"C64", 8, std::nullopt},
};

const DTypeInfo* find_dtype(std::string_view name) {
  for (const auto& info : kDTypes)
    if (info.name == name) return &info;
  return nullptr;
}

std::string_view safetensors_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "F32";
    case DType::kFloat16:
      return "F16";
    case DType::kBFloat16:
      return "BF16";
    case DType::kInt32:
      return "I32";
    case DType::kInt64:
      return "I64";
    case DType::kUInt8:
      return "U8";
  }
  return "?";
}

// A JSON value for error messages, cut short so a hostile header cannot flood the message.
std::string show(const Json& value) { return detail::show_json(value); }

std::string errno_text() { return std::strerror(errno); }

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

// Parses and checks one tensor's header entry against the data section's size.
SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const Json& value,
                             std::uint64_t data_size) {
  const auto where = [&] {
    return detail::concat("safetensors ", path, ": tensor '", detail::show_text(name), "'");
  };
  KVCACHE_CHECK(value.is_object(), where(),
                ": expected an object {dtype, shape, data_offsets}, got ", show(value));
  SafetensorsEntry entry;
  entry.name = name;

  const auto dtype_it = value.find("dtype");
  KVCACHE_CHECK(dtype_it != value.end() && dtype_it->is_string(), where(),
                ": expected a string \"dtype\", got ",
                dtype_it == value.end() ? std::string("none") : show(*dtype_it));
  entry.dtype_name = dtype_it->get<std::string>();
  const DTypeInfo* info = find_dtype(entry.dtype_name);
  KVCACHE_CHECK(info != nullptr, where(), ": unknown dtype '", entry.dtype_name,
                "' (expected F32, F16, BF16, I64, I32, U8, BOOL, F64, I8, I16, U16, U32, U64, "
                "F8_E4M3, F8_E5M2, F8_E8M0 or C64)");
  entry.dtype = info->dtype;

  const auto shape_it = value.find("shape");
  KVCACHE_CHECK(shape_it != value.end() && shape_it->is_array(), where(),
                ": expected an array \"shape\", got ",
                shape_it == value.end() ? std::string("none") : show(*shape_it));
  // Element count in 64 bits with overflow checks: a hostile shape must not wrap around to a
  // byte length that happens to match.
  std::uint64_t numel = 1;
  bool overflow = false;
  for (const Json& dim : *shape_it) {
    // nlohmann stores every non-negative integer as unsigned, so this also refuses negatives.
    KVCACHE_CHECK(dim.is_number_unsigned(), where(),
                  ": expected non-negative integer sizes in \"shape\", got ", show(*shape_it));
    const auto size = dim.get<std::uint64_t>();
    KVCACHE_CHECK(size <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                  where(), ": shape size ", size, " is out of range");
    entry.shape.push_back(static_cast<std::int64_t>(size));
    overflow = overflow || __builtin_mul_overflow(numel, size, &numel);
  }
  std::uint64_t nbytes = 0;
  overflow = overflow || __builtin_mul_overflow(numel, info->size, &nbytes);
  KVCACHE_CHECK(!overflow, where(), ": shape ", shape_text(entry.shape),
                " has more bytes than a file can hold");

  const auto offsets_it = value.find("data_offsets");
  const bool offsets_ok = offsets_it != value.end() && offsets_it->is_array() &&
                          offsets_it->size() == 2 && (*offsets_it)[0].is_number_unsigned() &&
                          (*offsets_it)[1].is_number_unsigned();
  KVCACHE_CHECK(offsets_ok, where(),
                ": expected \"data_offsets\" [begin, end] of non-negative integers, got ",
                offsets_it == value.end() ? std::string("none") : show(*offsets_it));
  entry.begin = (*offsets_it)[0].get<std::uint64_t>();
  entry.end = (*offsets_it)[1].get<std::uint64_t>();
  KVCACHE_CHECK(entry.begin <= entry.end && entry.end <= data_size, where(),
                ": expected data_offsets with begin <= end <= ", data_size,
                " (the data section's size), got [", entry.begin, ", ", entry.end, "]");
  KVCACHE_CHECK(entry.end - entry.begin == nbytes, where(), ": dtype ", entry.dtype_name,
                " x shape ", shape_text(entry.shape), " needs ", nbytes,
                " bytes, but data_offsets span ", entry.end - entry.begin);
  return entry;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const Json& value) {
  KVCACHE_CHECK(value.is_object(), "safetensors ", path,
                ": expected \"__metadata__\" to be an object of strings, got ", show(value));
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    KVCACHE_CHECK(item.is_string(), "safetensors ", path, ": expected \"__metadata__\" value '",
                  key, "' to be a string, got ", show(item));
    metadata[key] = item.get<std::string>();
  }
  return metadata;
}

// Reads a whole (small) text file: the index JSON (a regular file only: a FIFO would block).
std::string read_text_file(const std::string& path) {
  return detail::read_regular_file(path, "safetensors index");
}

}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  file.path_ = path;

  const auto mapping = detail::MappedFile::open(path, "safetensors", 8, "the header length");
  file.mapping_ = mapping;
  const std::uint64_t file_size = mapping->size();
  const std::byte* bytes = mapping->bytes();

  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i)
    header_len = (header_len << 8) | static_cast<std::uint64_t>(bytes[i]);
  KVCACHE_CHECK(header_len <= file_size - 8, "safetensors ", path, ": header length ", header_len,
                " runs past the end of the file (", file_size - 8,
                " bytes follow the 8-byte length)");
  const std::uint64_t data_size = file_size - 8 - header_len;
  file.data_start_ = 8 + header_len;

  const auto* header_begin = reinterpret_cast<const char*>(bytes + 8);
  // Nesting is bounded while parsing (detail::kMaxJsonDepth): the walks below recurse.
  Json header = detail::parse_json(
      std::string_view(header_begin, static_cast<std::size_t>(header_len)),
      detail::concat("safetensors ", path, ": the ", header_len, "-byte header"));
  const detail::ReleaseJsonAtExit release_header(header);  // its destructor must not allocate
  KVCACHE_CHECK(header.is_object(), "safetensors ", path,
                ": expected the header to be a JSON object, got ", show(header));

  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      file.metadata_ = parse_metadata(path, value);
      continue;
    }
    file.index_.emplace(name, file.entries_.size());
    file.entries_.push_back(parse_entry(path, name, value, data_size));
  }

  // Overlap check over the entries sorted by begin. Empty tensors hold no bytes and may sit
  // anywhere. Gaps are allowed: the format's reference reader refuses them, but they harm nothing.
  std::vector<const SafetensorsEntry*> sorted;
  for (const auto& entry : file.entries_)
    if (entry.end > entry.begin) sorted.push_back(&entry);
  std::sort(sorted.begin(), sorted.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return a->begin < b->begin;
  });
  for (std::size_t i = 1; i < sorted.size(); ++i) {
    const SafetensorsEntry& prev = *sorted[i - 1];
    const SafetensorsEntry& cur = *sorted[i];
    KVCACHE_CHECK(cur.begin >= prev.end, "safetensors ", path, ": tensors '", prev.name, "' [",
                  prev.begin, ", ", prev.end, ") and '", cur.name, "' [", cur.begin, ", ", cur.end,
                  ") overlap; expected disjoint data_offsets");
  }
  return file;
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry* entry = find(name);
  KVCACHE_CHECK(entry != nullptr, "safetensors ", path_, ": no tensor '", name,
                "' (the file holds ", entries_.size(), " tensors)");
  KVCACHE_CHECK(entry->dtype.has_value(), "safetensors ", path_, ": tensor '", name, "' has dtype ",
                entry->dtype_name,
                ", which kvcache does not hold (expected F32, F16, BF16, I64, I32, U8 or BOOL)");
  KVCACHE_CHECK(entry->shape.size() <= static_cast<std::size_t>(kMaxRank), "safetensors ", path_,
                ": tensor '", name, "' has rank ", entry->shape.size(), " (shape ",
                shape_text(entry->shape), "); kvcache tensors have rank <= ", kMaxRank);
  // The format does not align tensor data: an entry may start at any byte offset, so the pointer
  // can be misaligned for its dtype (save_safetensors aligns what it writes; other writers may
  // not). kvcache's CPU code reads weights through byte pointers and memcpy or converts them
  // first, which is well-defined either way; code that dereferences data_as<T>() directly must
  // check alignment or copy. The mapping is read-only: writing through the view faults.
  void* data = const_cast<std::byte*>(mapping_->bytes() + data_start_ + entry->begin);
  // The aliasing constructor shares ownership of the whole mapping while pointing at the tensor.
  std::shared_ptr<void> storage(mapping_, data);
  return Tensor::from_storage(std::move(storage), data,
                              Shape(entry->shape.data(), entry->shape.size()), *entry->dtype,
                              Device::kCpu);
}

SafetensorsCheckpoint SafetensorsCheckpoint::open(const std::string& dir) {
  namespace fs = std::filesystem;
  SafetensorsCheckpoint checkpoint;
  checkpoint.dir_ = dir;
  const fs::path root(dir);
  std::error_code ec;  // the non-throwing overloads: a filesystem_error is not a kvcache::Error

  const fs::path index_path = root / "model.safetensors.index.json";
  if (fs::is_regular_file(index_path, ec)) {
    const std::string where = index_path.string();
    Json index = detail::parse_json(read_text_file(where), "safetensors index " + where);
    const detail::ReleaseJsonAtExit release_index(index);  // its destructor must not allocate
    KVCACHE_CHECK(index.is_object(), "safetensors index ", where, ": expected a JSON object, got ",
                  show(index));
    const auto map_it = index.find("weight_map");
    KVCACHE_CHECK(map_it != index.end() && map_it->is_object() && !map_it->empty(),
                  "safetensors index ", where,
                  ": expected \"weight_map\" to be a non-empty object {tensor: shard file}, got ",
                  map_it == index.end() ? std::string("none") : show(*map_it));

    std::map<std::string, std::size_t> shard_index;  // shard file name -> index into files_
    std::vector<std::pair<std::string, std::string>> listed;  // (tensor, shard)
    for (const auto& [name, shard] : map_it->items()) {
      KVCACHE_CHECK(shard.is_string(), "safetensors index ", where, ": tensor '",
                    detail::show_text(name), "': expected a shard file name, got ", show(shard));
      const auto file_name = shard.get<std::string>();
      // Shards live next to the index; a name with a path in it could reach any file.
      KVCACHE_CHECK(!file_name.empty() && file_name.find('/') == std::string::npos &&
                        file_name.find("..") == std::string::npos,
                    "safetensors index ", where, ": tensor '", detail::show_text(name),
                    "': expected a plain shard file name (no '/' or '..'), got '",
                    detail::show_text(file_name), "'");
      shard_index.emplace(file_name, 0);
      listed.emplace_back(name, file_name);
    }
    // Each distinct shard is opened once, in name order (model-00001-of-00004, ...).
    for (auto& [file_name, slot] : shard_index) {
      const fs::path shard_path = root / file_name;
      KVCACHE_CHECK(fs::is_regular_file(shard_path, ec), "safetensors index ", where,
                    ": names shard '", file_name, "', but ", shard_path.string(),
                    " does not exist");
      slot = checkpoint.files_.size();
      checkpoint.files_.push_back(SafetensorsFile::open(shard_path.string()));
    }
    for (const auto& [name, file_name] : listed) {
      const std::size_t slot = shard_index.at(file_name);
      KVCACHE_CHECK(checkpoint.files_[slot].contains(name), "safetensors index ", where,
                    ": tensor '", name, "' is listed in shard '", file_name,
                    "', which does not hold it");
      checkpoint.file_of_.emplace(name, slot);
    }
    return checkpoint;
  }

  const fs::path single = root / "model.safetensors";
  KVCACHE_CHECK(fs::is_regular_file(single, ec),
                "safetensors: expected model.safetensors or model.safetensors.index.json in ", dir);
  checkpoint.files_.push_back(SafetensorsFile::open(single.string()));
  for (const auto& entry : checkpoint.files_.front().entries())
    checkpoint.file_of_.emplace(entry.name, 0);
  return checkpoint;
}

bool SafetensorsCheckpoint::contains(const std::string& name) const {
  return file_of_.count(name) != 0;
}

Tensor SafetensorsCheckpoint::tensor(const std::string& name) const {
  const auto it = file_of_.find(name);
  KVCACHE_CHECK(it != file_of_.end(), "safetensors checkpoint ", dir_, ": no tensor '", name,
                "' (the checkpoint holds ", file_of_.size(), " tensors)");
  return files_[it->second].tensor(name);
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(file_of_.size());
  for (const auto& [name, slot] : file_of_) out.push_back(name);
  return out;  // std::map iterates in sorted order
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    KVCACHE_CHECK(name != "__metadata__", "save_safetensors ", path,
                  ": \"__metadata__\" is reserved, not a tensor name");
    KVCACHE_CHECK(seen.insert(name).second, "save_safetensors ", path, ": tensor '", name,
                  "' appears twice");
    KVCACHE_CHECK(t.defined() && t.device() == Device::kCpu, "save_safetensors ", path,
                  ": tensor '", name, "': expected a defined CPU tensor, got ",
                  t.defined() ? t.describe() : std::string("an undefined tensor"));
  }

  // Data goes in order of decreasing element size (stable, so equal sizes keep the caller's
  // order): the data section starts at a multiple of 8, so every tensor then starts aligned for
  // its dtype and readers can use the mapped pointers directly. The section stays contiguous, as
  // the reference reader requires.
  std::vector<std::size_t> order(tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return tensors[a].second.element_size() > tensors[b].second.element_size();
  });
  std::vector<std::pair<std::uint64_t, std::uint64_t>> offsets(tensors.size());
  std::uint64_t cursor = 0;
  for (const std::size_t i : order) {
    offsets[i] = {cursor, cursor + tensors[i].second.nbytes()};
    cursor += tensors[i].second.nbytes();
  }

  OrderedJson header = OrderedJson::object();
  const detail::ReleaseJsonAtExit release_header(header);  // its destructor must not allocate
  // Room for every key first: growing ordered_json's vector would copy and destroy values.
  header.get_ptr<OrderedJson::object_t*>()->reserve(tensors.size() + 1);
  if (!metadata.empty()) {
    OrderedJson meta = OrderedJson::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i].second;
    OrderedJson shape = OrderedJson::array();
    for (const std::int64_t size : t.shape()) shape.push_back(size);
    header[tensors[i].first] =
        OrderedJson{{"dtype", std::string(safetensors_dtype_name(t.dtype()))},
                    {"shape", std::move(shape)},
                    {"data_offsets", {offsets[i].first, offsets[i].second}}};
  }
  std::string header_text = header.dump();
  // Spaces are JSON whitespace; the format pads with them so the data section starts at a
  // multiple of 8.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::unique_ptr<std::FILE, int (*)(std::FILE*)> out(std::fopen(path.c_str(), "wb"), &std::fclose);
  KVCACHE_CHECK(out != nullptr, "save_safetensors ", path, ": cannot create: ", errno_text());
  const auto fail = [&](const char* what) {
    const std::string reason = errno_text();
    out.reset();
    std::remove(path.c_str());  // no half-written file left to be mistaken for a checkpoint
    KVCACHE_FAIL("save_safetensors ", path, ": ", what, ": ", reason);
  };
  const auto write = [&](const void* data, std::size_t size) {
    if (size != 0 && std::fwrite(data, 1, size, out.get()) != size) fail("write failed");
  };

  unsigned char length[8];
  const std::uint64_t header_len = header_text.size();
  for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(header_len >> (8 * i));
  write(length, sizeof length);
  write(header_text.data(), header_text.size());
  for (const std::size_t i : order) {
    const Tensor& t = tensors[i].second;
    const Tensor contiguous = t.is_contiguous() ? t : cpu::clone(t);
    write(contiguous.data(), contiguous.nbytes());
  }
  if (std::fflush(out.get()) != 0) fail("write failed");
  if (std::fclose(out.release()) != 0) {
    const std::string reason = errno_text();
    std::remove(path.c_str());
    KVCACHE_FAIL("save_safetensors ", path, ": close failed: ", reason);
  }
}

}  // namespace kvcache
