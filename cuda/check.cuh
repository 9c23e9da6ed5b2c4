// The one checking macro every CUDA runtime call goes through: a failure becomes kvcache::Error
// naming the call and CUDA's own message, never an abort.
#pragma once

#include <cuda_runtime.h>

#include "kvcache/error.hpp"

#define KVCACHE_CUDA_CHECK(call)                                                              \
  do {                                                                                        \
    const cudaError_t kvcache_status_ = (call);                                               \
    if (kvcache_status_ != cudaSuccess) [[unlikely]] {                                        \
      KVCACHE_FAIL("CUDA call ", #call, " failed: ", cudaGetErrorName(kvcache_status_), " (", \
                   cudaGetErrorString(kvcache_status_), ")");                                 \
    }                                                                                         \
  } while (false)
