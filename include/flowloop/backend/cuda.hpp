// flowloop/backend/cuda.hpp: the CUDA backend (FLOWLOOP_CUDA=ON, library flowloop_cuda).
//
// Device memory is held in DeviceBuffer (RAII); the operations take device pointers,
// sizes and a stream (a cudaStream_t passed as void*, so that this header needs no CUDA
// headers; null: the default stream). Each operation has its kernel and launcher in
// cuda/NAME.cu, and its per-element or per-row body in kernels.hpp, which the CPU tests
// check against the layers. Every CUDA call and launch is checked: a failure throws
// Error naming the operation, the file and line, and CUDA's message.
//
// Gradient rule as in layers.hpp: gradients ACCUMULATE (+=) unless said otherwise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include <memory>

#include "flowloop/backend/backend.hpp"
#include "flowloop/core/tensor.hpp"

namespace flowloop {
class Communicator;
}

namespace flowloop::cuda {

// GPUs visible to this process (0 without a GPU or a driver: never throws).
int device_count();
// The GPU this thread's CUDA calls (and backends made from now on) use; select_device
// checks the ordinal against device_count().
int current_device();
void select_device(int device);
// Whether this build sums over ranks with NCCL (FLOWLOOP_NCCL: found with the toolkit).
bool nccl_built();
// A communicator over the same ranks as `host` whose sum_device is NCCL's allreduce on
// the backend's stream; everything else (and NCCL's set-up: rank 0's unique id
// broadcast) goes through `host`. Every rank must have selected a GPU of its own first.
// Throws Error without NCCL in the build, or naming NCCL's error.
std::shared_ptr<Communicator> nccl_communicator(std::shared_ptr<Communicator> host);
// "NVIDIA H100 80GB HBM3, 79.1 GiB" (throws Error without a GPU).
std::string device_description(int device = 0);
// The free and total bytes of the current device.
std::pair<size_t, size_t> memory_info();
// Waits for the device to finish (checked).
void synchronize();

// Raw device memory (checked; allocation failures name the bytes asked and free).
void* device_alloc(size_t bytes);
void device_free(void* p) noexcept;
// Stream-ordered memory from the device's default pool (cudaMallocAsync), for the
// backend's many short-lived arrays: no device-wide synchronisation per allocation.
// keep_pool_memory() keeps freed blocks in the pool (release threshold: never).
void keep_pool_memory();
void* device_alloc_async(size_t bytes, void* stream);  // the same error as device_alloc
void device_free_async(void* p, void* stream) noexcept;
void copy_to_device(void* dst, const void* src, size_t bytes);
void copy_to_host(void* dst, const void* src, size_t bytes);

// An owned device array of n values of T.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n), p_(n ? static_cast<T*>(device_alloc(n * sizeof(T))) : nullptr) {}
  DeviceBuffer(const T* host, size_t n) : DeviceBuffer(n) { upload(host, n); }
  ~DeviceBuffer() { device_free(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : n_(o.n_), p_(o.p_) { o.n_ = 0, o.p_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(n_, o.n_);
    std::swap(p_, o.p_);
    return *this;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  void upload(const T* host, size_t n) {
    if (n > n_) throw Error("DeviceBuffer::upload: " + std::to_string(n) + " values into " + std::to_string(n_));
    copy_to_device(p_, host, n * sizeof(T));
  }
  void download(T* host, size_t n) const {
    if (n > n_) throw Error("DeviceBuffer::download: " + std::to_string(n) + " values from " + std::to_string(n_));
    copy_to_host(host, p_, n * sizeof(T));
  }

 private:
  size_t n_ = 0;
  T* p_ = nullptr;
};

// The CUDA backend of backend.hpp (its own stream and cuBLAS handle); throws Error
// without a GPU. make_backend(Device::cuda) returns it.
template <class S>
std::unique_ptr<Backend<S>> make_backend();

// ---- products (cuBLAS) -----------------------------------------------------------

// A cuBLAS handle bound to `stream`, and its release.
void* blas_create(void* stream);
void blas_destroy(void* handle) noexcept;
// backend.hpp's strided batched gemm (row-major) on the handle's stream.
template <class S>
void gemm(void* handle, bool ta, bool tb, int M, int N, int K, S alpha, const S* A, int lda, int64_t sA, const S* B,
          int ldb, int64_t sB, S beta, S* C, int ldc, int64_t sC, int batch);

// ---- element-wise -----------------------------------------------------------------

template <class S>
void fill(S* x, S value, int64_t n, void* stream = nullptr);
template <class S>
void axpy(S* y, S a, const S* x, int64_t n, void* stream = nullptr);  // y += a x
template <class S>
void add_bias(S* out /*(N,OUT)*/, const S* b /*(OUT)*/, int N, int OUT, void* stream = nullptr);
// out (OUT) += the column sums of x (N,OUT), one thread per column, rows in order.
template <class S>
void column_sums(S* out, const S* x, int N, int OUT, void* stream = nullptr);
template <class S>
void silu_forward(S* out, const S* in, int64_t n, void* stream = nullptr);
template <class S>
void silu_backward(S* din, const S* dout, const S* in, int64_t n, void* stream = nullptr);
// SwiGLU's product and its vjp (kernels.hpp's swiglu), one thread per value; gate and up rows
// ld apart, out and dout (N,F).
template <class S>
void swiglu_forward(S* out, const S* gate, const S* up, int N, int F, int64_t ld, void* stream = nullptr);
template <class S>
void swiglu_backward(S* dgate, S* dup, const S* dout, const S* gate, const S* up, int N, int F, int64_t ld,
                     void* stream = nullptr);

// AdamW over n parameters (kernels.hpp's adamw_update per value).
template <class S>
void adamw(S* p, S* m, S* v, const S* g, const S* wd, int64_t n, const kernels::AdamWStep& s, void* stream = nullptr);

// adaLN (layers.hpp's modulate_* and gate_*: din written, the broadcast vectors' gradients added).
template <class S>
void modulate_forward(S* out, const S* in, const S* shift, const S* scale, int B, int T, int C, int ld,
                      void* stream = nullptr);
template <class S>
void modulate_backward(S* din, S* dshift, S* dscale, const S* dout, const S* in, const S* scale, int B, int T, int C,
                       int ld, void* stream = nullptr);
template <class S>
void gate_forward(S* out, const S* res, const S* in, const S* gate, int B, int T, int C, int ld,
                  void* stream = nullptr);
template <class S>
void gate_backward(S* din, S* dgate, const S* dout, const S* in, const S* gate, int B, int T, int C, int ld,
                   void* stream = nullptr);
// kernels::gate_sum per value: on entry out = res + m; mo = out - res, then out += gate mo.
template <class S>
void gate_sum_forward(S* out, S* mo, const S* res, const S* gate, int B, int T, int C, int ld, void* stream);

// ---- layers (layers.hpp's semantics, on the device) ----------------------------

// out = gelu(in), din += gelu'(in) dout (N values; one thread per value).
template <class S>
void gelu_forward(S* out, const S* in, int64_t N, void* stream = nullptr);
template <class S>
void gelu_backward(S* din, const S* dout, const S* in, int64_t N, void* stream = nullptr);

// LayerNorm of N rows of C values (one thread per row), with its mean and 1/std cache,
// and the input gradient of its vjp (din +=; the parameters' gradients are column sums,
// a reduction that arrives with the field's vjp).
template <class S>
void layernorm_forward(S* out /*(N,C)*/, S* mean /*(N)*/, S* rstd /*(N)*/, const S* in /*(N,C)*/, const S* w,
                       const S* b, int N, int C, void* stream = nullptr);
template <class S>
void layernorm_backward_input(S* din /*(N,C)*/, const S* dout /*(N,C)*/, const S* in /*(N,C)*/, const S* w,
                              const S* mean, const S* rstd, int N, int C, void* stream = nullptr);
// dw += sum_n dout xhat, db += sum_n dout (either may be null), one thread per column.
template <class S>
void layernorm_backward_params(S* dw, S* db, const S* dout /*(N,C)*/, const S* in /*(N,C)*/, const S* mean,
                               const S* rstd, int N, int C, void* stream = nullptr);

// RMSNorm (kernels.hpp's rmsnorm_row) one thread per row; its input gradient one thread per
// row (din += ...), its weight gradient one thread per column (dw += ..., null: skipped).
template <class S>
void rmsnorm_forward(S* out /*(N,C)*/, S* rstd /*(N)*/, const S* in /*(N,C)*/, const S* w, int N, int C, double eps,
                     void* stream = nullptr);
template <class S>
void rmsnorm_backward(S* din /*(N,C)*/, S* dw /*(C)*/, const S* dout /*(N,C)*/, const S* in /*(N,C)*/, const S* w,
                      const S* rstd /*(N)*/, int N, int C, void* stream = nullptr);
// Rotary position embeddings in place (kernels.hpp's rotary_head), one thread per (row, head).
template <class S>
void rotary(S* x, int B, int T, int H, int D, int64_t ld, int rot, double theta, bool interleaved, bool transpose,
            void* stream = nullptr);

// Causal softmax of the attention scores of BH heads, T rows of T each, in place
// (scale: 1/sqrt(D)); and its vjp in place on datt given the probabilities att.
template <class S>
void causal_softmax(S* att /*(BH,T,T)*/, int BH, int T, S scale, void* stream = nullptr);
template <class S>
void causal_softmax_backward(S* datt /*(BH,T,T)*/, const S* att /*(BH,T,T)*/, int BH, int T, S scale,
                             void* stream = nullptr);

// Mean cross-entropy over the rows whose target is not -1, and dlogits += its gradient
// (dlogits may be null). Returns the loss on the host (one copy of the row losses' sum).
template <class S>
S crossentropy_forward_backward(S* dlogits /*(N,V)*/, const S* logits /*(N,V)*/, const int32_t* targets /*(N)*/,
                                int N, int V, void* stream = nullptr);

}  // namespace flowloop::cuda
