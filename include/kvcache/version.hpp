// The library's version, kept in step with project(VERSION) in CMakeLists.txt.
#pragma once

#define KVCACHE_VERSION_MAJOR 0
#define KVCACHE_VERSION_MINOR 1
#define KVCACHE_VERSION_PATCH 0

namespace kvcache {
/// The library's version as text, "major.minor.patch".
inline constexpr const char* kVersion = "0.1.0";
}  // namespace kvcache
