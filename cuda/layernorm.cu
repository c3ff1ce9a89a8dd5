// cuda/layernorm.cu: LayerNorm and the input gradient of its vjp, one thread per row, and
// its parameters' gradients, one thread per column (kernels.hpp's bodies).
#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"

namespace flowloop::cuda {
namespace {
template <class S>
__global__ void layernorm_forward_kernel(S* out, S* mean, S* rstd, const S* in, const S* w, const S* b, int N, int C) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t r = static_cast<int64_t>(n) * C;
  kernels::layernorm_row(out + r, mean + n, rstd + n, in + r, w, b, C);
}
template <class S>
__global__ void layernorm_backward_input_kernel(S* din, const S* dout, const S* in, const S* w, const S* mean,
                                                const S* rstd, int N, int C) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t r = static_cast<int64_t>(n) * C;
  kernels::layernorm_row_backward(din + r, dout + r, in + r, w, mean[n], rstd[n], C);
}
template <class S>
__global__ void layernorm_backward_params_kernel(S* dw, S* db, const S* dout, const S* in, const S* mean,
                                                 const S* rstd, int N, int C) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < C) kernels::layernorm_column_grads(dw, db, dout, in, mean, rstd, N, C, i);
}
}  // namespace

template <class S>
void layernorm_backward_params(S* dw, S* db, const S* dout, const S* in, const S* mean, const S* rstd, int N, int C,
                               void* stream) {
  if (C <= 0 || N <= 0 || (!dw && !db)) return;
  layernorm_backward_params_kernel<<<detail::blocks_for(C), detail::kThreads, 0, detail::stream_of(stream)>>>(
      dw, db, dout, in, mean, rstd, N, C);
  FLOWLOOP_CUDA_LAUNCHED("layernorm_backward_params");
}

template <class S>
void layernorm_forward(S* out, S* mean, S* rstd, const S* in, const S* w, const S* b, int N, int C, void* stream) {
  if (N <= 0) return;
  layernorm_forward_kernel<<<detail::blocks_for(N), detail::kThreads, 0, detail::stream_of(stream)>>>(
      out, mean, rstd, in, w, b, N, C);
  FLOWLOOP_CUDA_LAUNCHED("layernorm_forward");
}

template <class S>
void layernorm_backward_input(S* din, const S* dout, const S* in, const S* w, const S* mean, const S* rstd, int N, int C,
                              void* stream) {
  if (N <= 0) return;
  layernorm_backward_input_kernel<<<detail::blocks_for(N), detail::kThreads, 0, detail::stream_of(stream)>>>(
      din, dout, in, w, mean, rstd, N, C);
  FLOWLOOP_CUDA_LAUNCHED("layernorm_backward_input");
}

#define FLOWLOOP_CUDA_LAYERNORM(S)                                                                           \
  template void layernorm_forward<S>(S*, S*, S*, const S*, const S*, const S*, int, int, void*);            \
  template void layernorm_backward_input<S>(S*, const S*, const S*, const S*, const S*, const S*, int, int, void*); \
  template void layernorm_backward_params<S>(S*, S*, const S*, const S*, const S*, const S*, int, int, void*);
FLOWLOOP_CUDA_LAYERNORM(float)
FLOWLOOP_CUDA_LAYERNORM(double)

}  // namespace flowloop::cuda
