// cuda/modulate.cu: adaLN's modulation in (1 + scale) + shift, the gated residual
// res + (1 + gate) in and the gate of a branch summed onto its residual (gate_sum), one
// thread per value (kernels.hpp's bodies); their vjps one thread per (sequence, channel),
// summing over T in order.
#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"

namespace flowloop::cuda {
namespace {
template <class S>
__global__ void modulate_forward_kernel(S* out, const S* in, const S* shift, const S* scale, int T, int C, int ld,
                                        int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t v = (i / C / T) * ld + i % C;
  out[i] = kernels::modulate(in[i], shift[v], scale[v]);
}
template <class S>
__global__ void gate_forward_kernel(S* out, const S* res, const S* in, const S* gate, int T, int C, int ld,
                                    int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = kernels::gated(res[i], in[i], gate[(i / C / T) * ld + i % C]);
}
template <class S>
__global__ void gate_sum_kernel(S* out, S* mo, const S* res, const S* gate, int T, int C, int ld, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  kernels::gate_sum(out[i], mo[i], res[i], gate[(i / C / T) * ld + i % C]);
}
// kernels::broadcast_backward, one thread per (sequence, channel).
template <class S>
__global__ void broadcast_backward_kernel(S* din, S* da, S* db, const S* dout, const S* x, const S* f, int B, int T,
                                          int C, int ld) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < B * C) kernels::broadcast_backward(din, da, db, dout, x, f, T, C, ld, j / C, j % C);
}
}  // namespace

template <class S>
void modulate_forward(S* out, const S* in, const S* shift, const S* scale, int B, int T, int C, int ld, void* stream) {
  const int64_t n = static_cast<int64_t>(B) * T * C;
  if (n <= 0) return;
  modulate_forward_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(
      out, in, shift, scale, T, C, ld, n);
  FLOWLOOP_CUDA_LAUNCHED("modulate_forward");
}

template <class S>
void modulate_backward(S* din, S* dshift, S* dscale, const S* dout, const S* in, const S* scale, int B, int T, int C,
                       int ld, void* stream) {
  if (B * C <= 0) return;
  broadcast_backward_kernel<<<detail::blocks_for(B * C), detail::kThreads, 0, detail::stream_of(stream)>>>(
      din, dshift, dscale, dout, in, scale, B, T, C, ld);
  FLOWLOOP_CUDA_LAUNCHED("modulate_backward");
}

template <class S>
void gate_forward(S* out, const S* res, const S* in, const S* gate, int B, int T, int C, int ld, void* stream) {
  const int64_t n = static_cast<int64_t>(B) * T * C;
  if (n <= 0) return;
  gate_forward_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(out, res, in, gate, T,
                                                                                                 C, ld, n);
  FLOWLOOP_CUDA_LAUNCHED("gate_forward");
}

template <class S>
void gate_backward(S* din, S* dgate, const S* dout, const S* in, const S* gate, int B, int T, int C, int ld,
                   void* stream) {
  if (B * C <= 0) return;
  broadcast_backward_kernel<<<detail::blocks_for(B * C), detail::kThreads, 0, detail::stream_of(stream)>>>(
      din, static_cast<S*>(nullptr), dgate, dout, in, gate, B, T, C, ld);
  FLOWLOOP_CUDA_LAUNCHED("gate_backward");
}

template <class S>
void gate_sum_forward(S* out, S* mo, const S* res, const S* gate, int B, int T, int C, int ld, void* stream) {
  const int64_t n = static_cast<int64_t>(B) * T * C;
  if (n <= 0) return;
  gate_sum_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(out, mo, res, gate, T, C,
                                                                                             ld, n);
  FLOWLOOP_CUDA_LAUNCHED("gate_sum_forward");
}

#define FLOWLOOP_CUDA_MODULATE(S)                                                                                 \
  template void modulate_forward<S>(S*, const S*, const S*, const S*, int, int, int, int, void*);                \
  template void modulate_backward<S>(S*, S*, S*, const S*, const S*, const S*, int, int, int, int, void*);       \
  template void gate_forward<S>(S*, const S*, const S*, const S*, int, int, int, int, void*);                    \
  template void gate_backward<S>(S*, S*, const S*, const S*, const S*, int, int, int, int, void*);                \
  template void gate_sum_forward<S>(S*, S*, const S*, const S*, int, int, int, int, void*);
FLOWLOOP_CUDA_MODULATE(float)
FLOWLOOP_CUDA_MODULATE(double)

}  // namespace flowloop::cuda
