// cuda/elementwise.cu: fill, axpy, bias rows, column sums, SiLU and SwiGLU, one thread per
// value (or per column: a column's sum runs down its rows in order, so it has the same
// bits on every launch).
#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"

namespace flowloop::cuda {
namespace {
template <class S>
__global__ void fill_kernel(S* x, S value, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = value;
}
template <class S>
__global__ void axpy_kernel(S* y, S a, const S* x, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] += a * x[i];
}
template <class S>
__global__ void add_bias_kernel(S* out, const S* b, int64_t n, int OUT) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] += b[i % OUT];
}
template <class S>
__global__ void column_sums_kernel(S* out, const S* x, int N, int OUT) {
  const int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o < OUT) out[o] += kernels::column_sum(x, N, OUT, o);
}
template <class S>
__global__ void silu_forward_kernel(S* out, const S* in, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = kernels::silu(in[i]);
}
template <class S>
__global__ void silu_backward_kernel(S* din, const S* dout, const S* in, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) din[i] += kernels::silu_grad(in[i]) * dout[i];
}
template <class S>
__global__ void swiglu_forward_kernel(S* out, const S* gate, const S* up, int F, int64_t ld, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t k = (i / F) * ld + i % F;
  out[i] = kernels::swiglu(gate[k], up[k]);
}
template <class S>
__global__ void swiglu_backward_kernel(S* dgate, S* dup, const S* dout, const S* gate, const S* up, int F, int64_t ld,
                                       int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t k = (i / F) * ld + i % F;
  kernels::swiglu_grad(dgate ? dgate + k : nullptr, dup ? dup + k : nullptr, dout[i], gate[k], up[k]);
}
}  // namespace

template <class S>
void swiglu_forward(S* out, const S* gate, const S* up, int N, int F, int64_t ld, void* stream) {
  const int64_t n = static_cast<int64_t>(N) * F;
  if (n <= 0) return;
  swiglu_forward_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(out, gate, up, F, ld,
                                                                                                    n);
  FLOWLOOP_CUDA_LAUNCHED("swiglu_forward");
}

template <class S>
void swiglu_backward(S* dgate, S* dup, const S* dout, const S* gate, const S* up, int N, int F, int64_t ld,
                     void* stream) {
  const int64_t n = static_cast<int64_t>(N) * F;
  if (n <= 0 || (!dgate && !dup)) return;
  swiglu_backward_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(dgate, dup, dout,
                                                                                                     gate, up, F, ld, n);
  FLOWLOOP_CUDA_LAUNCHED("swiglu_backward");
}

template <class S>
void fill(S* x, S value, int64_t n, void* stream) {
  if (n <= 0) return;
  fill_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(x, value, n);
  FLOWLOOP_CUDA_LAUNCHED("fill");
}

template <class S>
void axpy(S* y, S a, const S* x, int64_t n, void* stream) {
  if (n <= 0) return;
  axpy_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(y, a, x, n);
  FLOWLOOP_CUDA_LAUNCHED("axpy");
}

template <class S>
void add_bias(S* out, const S* b, int N, int OUT, void* stream) {
  const int64_t n = static_cast<int64_t>(N) * OUT;
  if (n <= 0) return;
  add_bias_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(out, b, n, OUT);
  FLOWLOOP_CUDA_LAUNCHED("add_bias");
}

template <class S>
void column_sums(S* out, const S* x, int N, int OUT, void* stream) {
  if (OUT <= 0 || N <= 0) return;
  column_sums_kernel<<<detail::blocks_for(OUT), detail::kThreads, 0, detail::stream_of(stream)>>>(out, x, N, OUT);
  FLOWLOOP_CUDA_LAUNCHED("column_sums");
}

template <class S>
void silu_forward(S* out, const S* in, int64_t n, void* stream) {
  if (n <= 0) return;
  silu_forward_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(out, in, n);
  FLOWLOOP_CUDA_LAUNCHED("silu_forward");
}

template <class S>
void silu_backward(S* din, const S* dout, const S* in, int64_t n, void* stream) {
  if (n <= 0) return;
  silu_backward_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(din, dout, in, n);
  FLOWLOOP_CUDA_LAUNCHED("silu_backward");
}

#define FLOWLOOP_CUDA_ELEMENTWISE(S)                                      \
  template void fill<S>(S*, S, int64_t, void*);                           \
  template void axpy<S>(S*, S, const S*, int64_t, void*);                 \
  template void add_bias<S>(S*, const S*, int, int, void*);               \
  template void column_sums<S>(S*, const S*, int, int, void*);            \
  template void silu_forward<S>(S*, const S*, int64_t, void*);            \
  template void silu_backward<S>(S*, const S*, const S*, int64_t, void*);        \
  template void swiglu_forward<S>(S*, const S*, const S*, int, int, int64_t, void*); \
  template void swiglu_backward<S>(S*, S*, const S*, const S*, const S*, int, int, int64_t, void*);
FLOWLOOP_CUDA_ELEMENTWISE(float)
FLOWLOOP_CUDA_ELEMENTWISE(double)

}  // namespace flowloop::cuda
