// flowloop/cuda.hpp: the CUDA backend (FLOWLOOP_CUDA=ON, library flowloop_cuda).
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

#include "flowloop/tensor.hpp"

namespace flowloop::cuda {

// GPUs visible to this process (0 without a GPU or a driver: never throws).
int device_count();
// "NVIDIA H100 80GB HBM3, 79.1 GiB" (throws Error without a GPU).
std::string device_description(int device = 0);
// The free and total bytes of the current device.
std::pair<size_t, size_t> memory_info();
// Waits for the device to finish (checked).
void synchronize();

// Raw device memory (checked; allocation failures name the bytes asked and free).
void* device_alloc(size_t bytes);
void device_free(void* p) noexcept;
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
