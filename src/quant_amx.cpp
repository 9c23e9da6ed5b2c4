// AMX-BF16 prefill kernel for quantized weights (see quant_kernels.hpp). Work in progress.
#include <sys/syscall.h>
#include <unistd.h>

#include "kvcache/error.hpp"
#include "quant_kernels.hpp"

namespace kvcache::cpu::quant {

bool enable_amx() {
#if defined(__x86_64__)
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
  if (!tile || !bf16) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

void linear_amx(const float*, std::int64_t, const QuantizedMatrix&, const float*, float*) {
  KVCACHE_CHECK(false, "linear_amx: not written yet");
}

}  // namespace kvcache::cpu::quant
