// Umbrella header: everything a C++ inference loop needs from kvcache, on the CPU or the GPU:
// tensors, caches, attention, models and generation (the CUDA backend's host declarations,
// kvcache/backend/cuda.hpp, come with it and need no CUDA headers).
#pragma once

/// \namespace kvcache
/// The library's public API: tensors, caches, the attention module, models, tokenizers and
/// generation. kvcache::detail holds implementation helpers that are not part of it.
/// \namespace kvcache::cpu
/// The CPU backend: copies, attention and the dense and quantized kernels over CPU tensors.
/// \namespace kvcache::cuda
/// The CUDA backend's host declarations: device memory, streams, graphs and the kernels'
/// launchers (they throw where kvcache was built without CUDA).

#include "kvcache/attention/attention.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/attention/rope.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/backend/quantized.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/legacy.hpp"
#include "kvcache/cache/offloaded_cache.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/cache/sink_cache.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "kvcache/error.hpp"
#include "kvcache/float16.hpp"
#include "kvcache/generation/config.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/memory.hpp"
#include "kvcache/model/config.hpp"
#include "kvcache/model/llama.hpp"
#include "kvcache/model/safetensors.hpp"
#include "kvcache/tensor.hpp"
#include "kvcache/tokenizer/chat_template.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"
#include "kvcache/version.hpp"
