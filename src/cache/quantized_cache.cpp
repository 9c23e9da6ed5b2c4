// QuantizedCache's instantiations: the CPU one used everywhere, and the CUDA one so that the class
// keeps compiling for the GPU backend (its update() there is a clear error until the GPU path).
#include "kvcache/cache/quantized_cache.hpp"

#include "kvcache/backend/cuda.hpp"

namespace kvcache {

template class QuantizedCache<cpu::Backend>;
template class QuantizedCache<cuda::Backend>;

}  // namespace kvcache
