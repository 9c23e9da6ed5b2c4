// Fuzz target: a .safetensors file. Opens it (header length, JSON header, dtypes, shapes,
// offsets), then takes a view of every tensor and reads its first and last bytes, so a view that
// reached past the mapping would fault here.
#include <cstddef>
#include <cstdint>

#include "fuzz_util.hpp"
#include "kvcache/model/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const kvcache::fuzz::MemoryFile file(data, size);
  kvcache::fuzz::expect_only_errors("SafetensorsFile", [&] {
    const kvcache::SafetensorsFile st = kvcache::SafetensorsFile::open(file.path());
    volatile unsigned char sink = 0;
    for (const kvcache::SafetensorsEntry& entry : st.entries()) {
      (void)st.find(entry.name);
      kvcache::fuzz::expect_only_errors("SafetensorsFile::tensor", [&] {
        const kvcache::Tensor t = st.tensor(entry.name);
        const auto* bytes = static_cast<const unsigned char*>(t.data());
        if (t.nbytes() > 0) sink = sink + bytes[0] + bytes[t.nbytes() - 1];
      });
    }
    for (const auto& [key, value] : st.metadata()) sink = sink + key.size() + value.size();
  });
  return 0;
}
