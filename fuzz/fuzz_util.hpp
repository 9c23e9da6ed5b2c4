// Shared by the fuzz targets: the rule every target enforces (bad input may only end in a
// kvcache::Error) and an in-memory file for the readers that take a path.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <typeinfo>

#include "kvcache/error.hpp"

/// A broken expectation of a fuzz target: prints "FINDING: file:line: condition: <message>"
/// (printf-style arguments) and aborts, which libFuzzer reports and saves as a crash input.
#define FUZZ_ASSERT(cond, ...)                                                 \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "FINDING: %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                       \
      std::fprintf(stderr, "\n");                                              \
      std::abort();                                                            \
    }                                                                          \
  } while (false)

namespace kvcache::fuzz {

/// Runs `body`; a kvcache::Error is the accepted outcome of bad input, anything else that
/// escapes (std::bad_alloc, nlohmann's exceptions, std::out_of_range, ...) is a finding and
/// aborts, so libFuzzer saves the input.
template <class F>
void expect_only_errors(const char* what, F&& body) {
  try {
    body();
  } catch (const Error&) {
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FINDING: %s let a %s escape: %s\n", what, typeid(e).name(), e.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "FINDING: %s let a non-std exception escape\n", what);
    std::abort();
  }
}

/// The fuzzer's bytes as a file: an anonymous memory file (memfd), named by /proc/self/fd/N,
/// which stat() sees as a regular file and mmap() maps like one. Nothing touches the disk.
class MemoryFile {
 public:
  MemoryFile(const std::uint8_t* data, std::size_t size) {
    fd_ = ::memfd_create("kvcache-fuzz", MFD_CLOEXEC);
    if (fd_ < 0) std::abort();  // the harness, not the library, failed
    std::size_t written = 0;
    while (written < size) {
      const ssize_t n = ::write(fd_, data + written, size - written);
      if (n <= 0) std::abort();
      written += static_cast<std::size_t>(n);
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;
  ~MemoryFile() { ::close(fd_); }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

/// Reads the fuzzer's bytes as a stream of small numbers; zeros once the bytes run out.
class ByteReader {
 public:
  ByteReader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  /// A value in [0, n) (n >= 1).
  std::int64_t below(std::int64_t n) { return static_cast<std::int64_t>(byte()) % n; }
  std::int64_t i64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = v << 8 | byte();
    return static_cast<std::int64_t>(v);
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

}  // namespace kvcache::fuzz
