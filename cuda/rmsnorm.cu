// cuda/rmsnorm.cu: RMSNorm and the input gradient of its vjp, one thread per row, and its
// weight's gradient, one thread per column (kernels.hpp's bodies).
#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"

namespace flowloop::cuda {
namespace {
template <class S>
__global__ void rmsnorm_forward_kernel(S* out, S* rstd, const S* in, const S* w, int N, int C, double eps) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t r = static_cast<int64_t>(n) * C;
  kernels::rmsnorm_row(out + r, rstd + n, in + r, w, C, eps);
}
template <class S>
__global__ void rmsnorm_backward_input_kernel(S* din, const S* dout, const S* in, const S* w, const S* rstd, int N,
                                              int C) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t r = static_cast<int64_t>(n) * C;
  kernels::rmsnorm_row_backward(din + r, dout + r, in + r, w, rstd[n], C);
}
template <class S>
__global__ void rmsnorm_backward_weight_kernel(S* dw, const S* dout, const S* in, const S* rstd, int N, int C) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < C) kernels::rmsnorm_column_grads(dw, dout, in, rstd, N, C, i);
}
}  // namespace

template <class S>
void rmsnorm_forward(S* out, S* rstd, const S* in, const S* w, int N, int C, double eps, void* stream) {
  if (N <= 0) return;
  rmsnorm_forward_kernel<<<detail::blocks_for(N), detail::kThreads, 0, detail::stream_of(stream)>>>(out, rstd, in, w, N,
                                                                                                     C, eps);
  FLOWLOOP_CUDA_LAUNCHED("rmsnorm_forward");
}

template <class S>
void rmsnorm_backward(S* din, S* dw, const S* dout, const S* in, const S* w, const S* rstd, int N, int C,
                      void* stream) {
  if (N <= 0 || C <= 0) return;
  if (din) {
    rmsnorm_backward_input_kernel<<<detail::blocks_for(N), detail::kThreads, 0, detail::stream_of(stream)>>>(
        din, dout, in, w, rstd, N, C);
    FLOWLOOP_CUDA_LAUNCHED("rmsnorm_backward (input)");
  }
  if (dw) {
    rmsnorm_backward_weight_kernel<<<detail::blocks_for(C), detail::kThreads, 0, detail::stream_of(stream)>>>(
        dw, dout, in, rstd, N, C);
    FLOWLOOP_CUDA_LAUNCHED("rmsnorm_backward (weight)");
  }
}

#define FLOWLOOP_CUDA_RMSNORM(S)                                                                              \
  template void rmsnorm_forward<S>(S*, S*, const S*, const S*, int, int, double, void*);                     \
  template void rmsnorm_backward<S>(S*, S*, const S*, const S*, const S*, const S*, int, int, void*);
FLOWLOOP_CUDA_RMSNORM(float)
FLOWLOOP_CUDA_RMSNORM(double)

}  // namespace flowloop::cuda
