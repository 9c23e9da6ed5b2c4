// The checking macros every CUDA runtime and cuBLAS call goes through: a failure becomes
// kvcache::Error naming the call and the library's own message, never an abort.
#pragma once

#include <cublas_v2.h>
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

#define KVCACHE_CUBLAS_CHECK(call)                                                                 \
  do {                                                                                             \
    const cublasStatus_t kvcache_status_ = (call);                                                 \
    if (kvcache_status_ != CUBLAS_STATUS_SUCCESS) [[unlikely]] {                                   \
      KVCACHE_FAIL("cuBLAS call ", #call, " failed: ", cublasGetStatusName(kvcache_status_), " (", \
                   cublasGetStatusString(kvcache_status_), ")");                                   \
    }                                                                                              \
  } while (false)
