// cuda/adamw.cu: the optimiser's update on the device, one thread per parameter
// (kernels.hpp's adamw_update, the CPU's own body).
#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"

namespace flowloop::cuda {
namespace {
template <class S>
__global__ void adamw_kernel(S* p, S* m, S* v, const S* g, const S* wd, int64_t n, kernels::AdamWStep s) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) kernels::adamw_update(p[i], m[i], v[i], g[i], wd[i], s);
}
}  // namespace

template <class S>
void adamw(S* p, S* m, S* v, const S* g, const S* wd, int64_t n, const kernels::AdamWStep& s, void* stream) {
  if (n <= 0) return;
  adamw_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream_of(stream)>>>(p, m, v, g, wd, n, s);
  FLOWLOOP_CUDA_LAUNCHED("adamw");
}

template void adamw<float>(float*, float*, float*, const float*, const float*, int64_t, const kernels::AdamWStep&,
                           void*);
template void adamw<double>(double*, double*, double*, const double*, const double*, int64_t,
                            const kernels::AdamWStep&, void*);

}  // namespace flowloop::cuda
