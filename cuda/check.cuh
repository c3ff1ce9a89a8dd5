// cuda/check.cuh: every CUDA call and kernel launch checked, naming the operation,
// the file and the line (private to the backend's .cu files).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "flowloop/core/tensor.hpp"

namespace flowloop::cuda::detail {

inline void check(cudaError_t e, const char* op, const char* file, int line) {
  if (e == cudaSuccess) return;
  throw Error(std::string("CUDA error in ") + op + " (" + file + ":" + std::to_string(line) +
              "): " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

inline cudaStream_t stream_of(void* s) { return static_cast<cudaStream_t>(s); }

// Threads per block and blocks for n independent items.
constexpr int kThreads = 256;
inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace flowloop::cuda::detail

#define FLOWLOOP_CUDA_CHECK(call) ::flowloop::cuda::detail::check((call), #call, __FILE__, __LINE__)
// after a launch: the launch's own error (bad configuration), named by the kernel
#define FLOWLOOP_CUDA_LAUNCHED(name) ::flowloop::cuda::detail::check(cudaGetLastError(), name, __FILE__, __LINE__)
