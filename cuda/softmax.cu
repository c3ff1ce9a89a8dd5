// cuda/softmax.cu: the causal softmax of attention scores and its vjp, in place, one
// thread per row (kernels.hpp's bodies).
#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"

namespace flowloop::cuda {
namespace {
template <class S>
__global__ void causal_softmax_kernel(S* att, int rows, int T, S scale) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  kernels::causal_softmax_row(att + static_cast<int64_t>(r) * T, r % T, T, scale);
}
template <class S>
__global__ void causal_softmax_backward_kernel(S* datt, const S* att, int rows, int T, S scale) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int64_t o = static_cast<int64_t>(r) * T;
  kernels::causal_softmax_row_backward(datt + o, att + o, r % T, T, scale);
}
}  // namespace

template <class S>
void causal_softmax(S* att, int BH, int T, S scale, void* stream) {
  const int rows = BH * T;
  if (rows <= 0) return;
  causal_softmax_kernel<<<detail::blocks_for(rows), detail::kThreads, 0, detail::stream_of(stream)>>>(att, rows, T,
                                                                                                       scale);
  FLOWLOOP_CUDA_LAUNCHED("causal_softmax");
}

template <class S>
void causal_softmax_backward(S* datt, const S* att, int BH, int T, S scale, void* stream) {
  const int rows = BH * T;
  if (rows <= 0) return;
  causal_softmax_backward_kernel<<<detail::blocks_for(rows), detail::kThreads, 0, detail::stream_of(stream)>>>(
      datt, att, rows, T, scale);
  FLOWLOOP_CUDA_LAUNCHED("causal_softmax_backward");
}

template void causal_softmax<float>(float*, int, int, float, void*);
template void causal_softmax<double>(double*, int, int, double, void*);
template void causal_softmax_backward<float>(float*, const float*, int, int, float, void*);
template void causal_softmax_backward<double>(double*, const double*, int, int, double, void*);

}  // namespace flowloop::cuda
