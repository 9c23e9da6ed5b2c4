// MappedFile: open, stat, mmap and close, each failure a kvcache::Error naming the file.
#include "mapped_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "../io_util.hpp"
#include "kvcache/error.hpp"

namespace kvcache::detail {
namespace {

// Closes the descriptor on every path out of open(); the mapping outlives it (POSIX keeps a
// mapping valid after close), so no descriptor is held per open file.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd_ >= 0) (void)::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

}  // namespace

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path, const char* format,
                                             std::uint64_t min_size, const char* min_size_what) {
  // stat() before open(): opening a FIFO for reading waits for a writer, for ever. O_NONBLOCK
  // covers a path swapped for a FIFO between the two (it changes nothing for a regular file),
  // and fstat() then checks what was actually opened.
  require_regular_file(path, format);
  const FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  KVCACHE_CHECK(fd.get() >= 0, format, " ", path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  KVCACHE_CHECK(::fstat(fd.get(), &st) == 0, format, " ", path,
                ": cannot stat: ", std::strerror(errno));
  KVCACHE_CHECK(S_ISREG(st.st_mode), format, " ", path, ": expected a regular file");
  const auto file_size = static_cast<std::uint64_t>(st.st_size);
  KVCACHE_CHECK(file_size >= min_size, format, " ", path, ": expected at least ", min_size,
                " bytes (", min_size_what, "), got a file of ", file_size, " bytes");
  std::shared_ptr<MappedFile> file(new MappedFile());
  file->size_ = file_size;
  void* addr =
      ::mmap(nullptr, static_cast<std::size_t>(file_size), PROT_READ, MAP_PRIVATE, fd.get(), 0);
  KVCACHE_CHECK(addr != MAP_FAILED, format, " ", path, ": cannot map ", file_size,
                " bytes: ", std::strerror(errno));
  file->addr_ = addr;
  return file;
}

MappedFile::~MappedFile() {
  if (addr_ != nullptr)
    (void)::munmap(addr_, static_cast<std::size_t>(size_));  // nothing to do on failure
}

}  // namespace kvcache::detail
