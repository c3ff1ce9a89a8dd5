// cuda/gelu.cu: GELU (tanh form) and its vjp, one thread per value (kernels.hpp's body).
#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"

namespace flowloop::cuda {
namespace {
template <class S>
__global__ void gelu_forward_kernel(S* out, const S* in, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < N) out[i] = kernels::gelu(in[i]);
}
template <class S>
__global__ void gelu_backward_kernel(S* din, const S* dout, const S* in, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < N) din[i] += dout[i] * kernels::gelu_grad(in[i]);
}
}  // namespace

template <class S>
void gelu_forward(S* out, const S* in, int64_t N, void* stream) {
  if (N <= 0) return;
  gelu_forward_kernel<<<detail::blocks_for(N), detail::kThreads, 0, detail::stream_of(stream)>>>(out, in, N);
  FLOWLOOP_CUDA_LAUNCHED("gelu_forward");
}

template <class S>
void gelu_backward(S* din, const S* dout, const S* in, int64_t N, void* stream) {
  if (N <= 0) return;
  gelu_backward_kernel<<<detail::blocks_for(N), detail::kThreads, 0, detail::stream_of(stream)>>>(din, dout, in, N);
  FLOWLOOP_CUDA_LAUNCHED("gelu_backward");
}

template void gelu_forward<float>(float*, const float*, int64_t, void*);
template void gelu_forward<double>(double*, const double*, int64_t, void*);
template void gelu_backward<float>(float*, const float*, const float*, int64_t, void*);
template void gelu_backward<double>(double*, const double*, const double*, int64_t, void*);

}  // namespace flowloop::cuda
