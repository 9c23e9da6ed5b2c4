// Private to the checkpoint readers: a whole file mapped read-only, shared by every tensor view
// taken from it and unmapped when the last one goes. Read-only and private, so nothing done
// through a view can reach the file; a file truncated on disk while mapped raises SIGBUS on the
// next read of a lost page, which no check can prevent, so checkpoints must be replaced (written
// elsewhere, renamed), not rewritten in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace kvcache::detail {

class MappedFile {
 public:
  /// Maps `path`; `format` ("safetensors", "GGUF") starts every error message. Files shorter than
  /// `min_size` bytes are an error that says `min_size_what` must fit.
  static std::shared_ptr<MappedFile> open(const std::string& path, const char* format,
                                          std::uint64_t min_size, const char* min_size_what);

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const std::byte* bytes() const { return static_cast<const std::byte*>(addr_); }
  std::uint64_t size() const { return size_; }

 private:
  MappedFile() = default;
  void* addr_ = nullptr;
  std::uint64_t size_ = 0;
};

}  // namespace kvcache::detail
