// cuda/rotary.cu: rotary position embeddings in place, one thread per (position, head)
// (kernels.hpp's rotary_head; its transpose is the vjp).
#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"

namespace flowloop::cuda {
namespace {
template <class S>
__global__ void rotary_kernel(S* x, int T, int H, int D, int64_t ld, int rot, double theta, bool interleaved,
                              bool transpose, int64_t heads) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= heads) return;
  const int64_t r = k / H;
  kernels::rotary_head(x + r * ld + (k % H) * D, static_cast<int>(r % T), rot, theta, interleaved, transpose);
}
}  // namespace

template <class S>
void rotary(S* x, int B, int T, int H, int D, int64_t ld, int rot, double theta, bool interleaved, bool transpose,
            void* stream) {
  const int64_t heads = static_cast<int64_t>(B) * T * H;
  if (heads <= 0) return;
  rotary_kernel<<<detail::blocks_for(heads), detail::kThreads, 0, detail::stream_of(stream)>>>(
      x, T, H, D, ld, rot, theta, interleaved, transpose, heads);
  FLOWLOOP_CUDA_LAUNCHED("rotary");
}

template void rotary<float>(float*, int, int, int, int, int64_t, int, double, bool, bool, void*);
template void rotary<double>(double*, int, int, int, int, int64_t, int, double, bool, bool, void*);

}  // namespace flowloop::cuda
