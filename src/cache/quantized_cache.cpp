// QuantizedCache's CPU instantiation (the GPU cache, QuantizedCache<cuda::Backend>, is a
// specialization defined inline in kvcache/cache/quantized_cache_cuda.hpp).
#include "kvcache/cache/quantized_cache.hpp"

namespace kvcache {

template class QuantizedCache<cpu::Backend>;

}  // namespace kvcache
