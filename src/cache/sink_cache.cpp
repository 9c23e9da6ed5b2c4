// SinkCache's instantiations: the CPU one used everywhere, and the CUDA one so that the class
// keeps compiling for the GPU backend (its update() there is a clear error until the GPU path).
#include "kvcache/cache/sink_cache.hpp"

#include "kvcache/backend/cuda.hpp"

namespace kvcache {

template class SinkCache<cpu::Backend>;
template class SinkCache<cuda::Backend>;

}  // namespace kvcache
