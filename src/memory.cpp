// available_memory() and detail::require_memory() (kvcache/memory.hpp). The host's figure is read
// with open()/read() into a buffer on the stack: the check allocates nothing, so it holds under
// the allocation-failure tests and under memory pressure.
#include "kvcache/memory.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include "kvcache/backend/cuda.hpp"
#include "kvcache/error.hpp"

namespace kvcache {
namespace {

// The file's first bytes (NUL-terminated) into `buffer`; false where it cannot be read.
bool read_small_file(const char* path, char* buffer, std::size_t size) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  std::size_t used = 0;
  while (used + 1 < size) {
    const ssize_t n = ::read(fd, buffer + used, size - 1 - used);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    used += static_cast<std::size_t>(n);
  }
  ::close(fd);
  buffer[used] = '\0';
  return used > 0;
}

// The decimal number after "<key>" in text (the value of a /proc/meminfo line, in kB), or -1.
long long field(const char* text, const char* key) {
  const char* at = std::strstr(text, key);
  if (at == nullptr) return -1;
  at += std::strlen(key);
  while (*at == ' ' || *at == '\t') ++at;
  if (*at < '0' || *at > '9') return -1;
  long long value = 0;
  for (; *at >= '0' && *at <= '9'; ++at) {
    if (value > (std::numeric_limits<long long>::max() - 9) / 10) return -1;
    value = value * 10 + (*at - '0');
  }
  return value;
}

// One unsigned number from a cgroup file ("max" or anything else: -1).
long long cgroup_number(const char* path) {
  char text[64];
  if (!read_small_file(path, text, sizeof text)) return -1;
  return field(text, "");
}

std::uint64_t host_available() {
  char text[8192];
  std::uint64_t available = 0;
  if (read_small_file("/proc/meminfo", text, sizeof text)) {
    const long long mem = field(text, "MemAvailable:"), swap = field(text, "SwapFree:");
    if (mem >= 0) available = static_cast<std::uint64_t>(mem) * 1024;
    if (mem >= 0 && swap > 0) available += static_cast<std::uint64_t>(swap) * 1024;
  }
  if (available == 0) available = detail::physical_memory_bytes();
  // A container's memory limit (cgroup v2) binds before the machine's.
  const long long max = cgroup_number("/sys/fs/cgroup/memory.max");
  const long long current = cgroup_number("/sys/fs/cgroup/memory.current");
  if (max >= 0 && current >= 0) {
    const std::uint64_t left = max > current ? static_cast<std::uint64_t>(max - current) : 0;
    available = available == 0 ? left : std::min(available, left);
  }
  return available;
}

// "12.5 GiB"-style text for a message, built without iostreams' locale.
std::string gib(std::uint64_t bytes) {
  const double g = static_cast<double>(bytes) / static_cast<double>(std::uint64_t{1} << 30);
  char text[32];
  std::snprintf(text, sizeof text, "%.3g GiB", g);
  return text;
}

}  // namespace

std::uint64_t available_memory(Device device) {
  return device == Device::kCpu ? host_available() : cuda::free_device_memory();
}

namespace detail {

void require_memory(Device device, std::uint64_t bytes, std::string_view where,
                    std::string_view what, std::uint64_t limit) {
  if (limit > 0 && bytes > limit) {
    KVCACHE_FAIL(where, ": out of memory: ", what, " needs ", bytes, " bytes (", gib(bytes),
                 ") on ", device_name(device), ", more than the limit of ", limit, " bytes (",
                 gib(limit), ") set for it");
  }
  // Small requests are not worth a look at the system (and cannot fail it in practice).
  if (bytes < (std::uint64_t{1} << 20)) return;
  const std::uint64_t available = available_memory(device);
  if (available == 0 || bytes <= available) return;
  KVCACHE_FAIL(where, ": out of memory: ", what, " needs ", bytes, " bytes (", gib(bytes), ") on ",
               device_name(device), ", and ", available, " bytes (", gib(available),
               ") are available there (",
               device == Device::kCpu ? "MemAvailable + SwapFree" : "cudaMemGetInfo's free memory",
               ")");
}

}  // namespace detail
}  // namespace kvcache
