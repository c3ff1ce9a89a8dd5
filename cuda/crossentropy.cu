// cuda/crossentropy.cu: the mean cross-entropy of rows of logits and its gradient, one
// thread per row (kernels.hpp's body); the rows' losses summed by Thrust on the stream.
#include <thrust/count.h>
#include <thrust/execution_policy.h>
#include <thrust/reduce.h>

#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"
#include "thrust_algebra.hpp"  // exec: Thrust on the stream, temporaries from the device's pool

namespace flowloop::cuda {
namespace {
template <class S>
__global__ void crossentropy_kernel(double* loss, S* dlogits, const S* logits, const int32_t* targets, int N, int V,
                                    S dscale) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t o = static_cast<int64_t>(n) * V;
  loss[n] = static_cast<double>(kernels::crossentropy_row(dlogits ? dlogits + o : nullptr, logits + o, targets[n], V, dscale));
}
struct Scored {
  __host__ __device__ bool operator()(int32_t t) const { return t >= 0; }
};
}  // namespace

template <class S>
S crossentropy_forward_backward(S* dlogits, const S* logits, const int32_t* targets, int N, int V, void* stream) {
  if (N <= 0) return S(0);
  const cudaStream_t st = detail::stream_of(stream);
  const auto count = thrust::count_if(algebra::device::exec(st), targets, targets + N, Scored());
  if (count == 0) return S(0);
  DeviceBuffer<double> loss(static_cast<size_t>(N));
  crossentropy_kernel<<<detail::blocks_for(N), detail::kThreads, 0, st>>>(loss.data(), dlogits, logits, targets, N, V,
                                                                         S(1) / static_cast<S>(count));
  FLOWLOOP_CUDA_LAUNCHED("crossentropy_forward_backward");
  const double total = thrust::reduce(algebra::device::exec(st), loss.data(), loss.data() + N, 0.0);
  return static_cast<S>(total / static_cast<double>(count));
}

template float crossentropy_forward_backward<float>(float*, const float*, const int32_t*, int, int, void*);
template double crossentropy_forward_backward<double>(double*, const double*, const int32_t*, int, int, void*);

}  // namespace flowloop::cuda
