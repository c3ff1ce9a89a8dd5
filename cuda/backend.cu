// cuda/backend.cu: the CUDA backend of backend.hpp: device memory, one stream per
// backend (every kernel, product and copy is queued on it), a cuBLAS handle bound to
// the stream, and the operations of cuda.hpp.
#include "check.cuh"
#include "flowloop/ode/algebra.hpp"
#include "flowloop/backend/backend.hpp"
#include "flowloop/backend/cuda.hpp"

namespace flowloop::cuda {
namespace {

template <class S>
class CudaBackend final : public Backend<S> {
 public:
  CudaBackend() : name_("cuda: " + device_description(current_device())) {
    cudaStream_t s = nullptr;
    FLOWLOOP_CUDA_CHECK(cudaStreamCreate(&s));
    stream_ = s;
    try {
      keep_pool_memory();
      blas_ = blas_create(stream_);
    } catch (...) {
      cudaStreamDestroy(s);
      throw;
    }
  }
  ~CudaBackend() override {
    blas_destroy(blas_);
    cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
  }
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  Device device() const override { return Device::cuda; }
  std::string name() const override { return name_; }
  void* native_stream() override { return stream_; }

  // stream-ordered, from the device's pool (kept between solves)
  void* alloc_bytes(size_t bytes) override { return device_alloc_async(bytes, stream_); }
  void free_bytes(void* p) noexcept override { device_free_async(p, stream_); }
  void upload_bytes(void* dst, const void* host, size_t bytes) override {
    if (!bytes) return;
    FLOWLOOP_CUDA_CHECK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, stream()));
    FLOWLOOP_CUDA_CHECK(cudaStreamSynchronize(stream()));  // the host array may change once this returns
  }
  void download_bytes(void* host, const void* src, size_t bytes) override {
    if (!bytes) return;
    FLOWLOOP_CUDA_CHECK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, stream()));
    FLOWLOOP_CUDA_CHECK(cudaStreamSynchronize(stream()));
  }
  void copy(S* dst, const S* src, size_t n) override {
    if (n) FLOWLOOP_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(S), cudaMemcpyDeviceToDevice, stream()));
  }
  void fill(S* x, S value, size_t n) override { cuda::fill(x, value, static_cast<int64_t>(n), stream_); }
  void synchronize() override { FLOWLOOP_CUDA_CHECK(cudaStreamSynchronize(stream())); }

  void gemm(bool ta, bool tb, int M, int N, int K, S alpha, const S* A, int lda, int64_t sA, const S* B, int ldb,
            int64_t sB, S beta, S* C, int ldc, int64_t sC, int batch) override {
    cuda::gemm<S>(blas_, ta, tb, M, N, K, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch);
  }
  void axpy(S* y, S a, const S* x, size_t n) override { cuda::axpy(y, a, x, static_cast<int64_t>(n), stream_); }
  void add_bias(S* out, const S* b, int N, int OUT) override { cuda::add_bias(out, b, N, OUT, stream_); }
  void column_sums(S* out, const S* x, int N, int OUT) override { cuda::column_sums(out, x, N, OUT, stream_); }
  void gelu_forward(S* out, const S* in, int64_t n) override { cuda::gelu_forward(out, in, n, stream_); }
  void gelu_backward(S* din, const S* dout, const S* in, int64_t n) override {
    cuda::gelu_backward(din, dout, in, n, stream_);
  }
  void silu_forward(S* out, const S* in, int64_t n) override { cuda::silu_forward(out, in, n, stream_); }
  void silu_backward(S* din, const S* dout, const S* in, int64_t n) override {
    cuda::silu_backward(din, dout, in, n, stream_);
  }
  void layernorm_forward(S* out, S* mean, S* rstd, const S* in, const S* w, const S* b, int N, int C) override {
    cuda::layernorm_forward(out, mean, rstd, in, w, b, N, C, stream_);
  }
  void layernorm_backward(S* din, S* dw, S* db, const S* dout, const S* in, const S* w, const S* mean, const S* rstd,
                          int N, int C) override {
    if (din) cuda::layernorm_backward_input(din, dout, in, w, mean, rstd, N, C, stream_);
    cuda::layernorm_backward_params(dw, db, dout, in, mean, rstd, N, C, stream_);
  }
  void swiglu_forward(S* out, const S* gate, const S* up, int N, int F, int64_t ld) override {
    cuda::swiglu_forward(out, gate, up, N, F, ld, stream_);
  }
  void swiglu_backward(S* dgate, S* dup, const S* dout, const S* gate, const S* up, int N, int F,
                       int64_t ld) override {
    cuda::swiglu_backward(dgate, dup, dout, gate, up, N, F, ld, stream_);
  }
  void rmsnorm_forward(S* out, S* rstd, const S* in, const S* w, int N, int C, double eps) override {
    cuda::rmsnorm_forward(out, rstd, in, w, N, C, eps, stream_);
  }
  void rmsnorm_backward(S* din, S* dw, const S* dout, const S* in, const S* w, const S* rstd, int N,
                        int C) override {
    cuda::rmsnorm_backward(din, dw, dout, in, w, rstd, N, C, stream_);
  }
  void rotary(S* x, int B, int T, int H, int D, int64_t ld, int rot, double theta, bool interleaved,
              bool transpose) override {
    check_rotary_shape(H, D, rot, theta);
    cuda::rotary(x, B, T, H, D, ld, rot, theta, interleaved, transpose, stream_);
  }
  void causal_softmax(S* att, int BH, int T, S scale) override { cuda::causal_softmax(att, BH, T, scale, stream_); }
  void causal_softmax_backward(S* datt, const S* att, int BH, int T, S scale) override {
    cuda::causal_softmax_backward(datt, att, BH, T, scale, stream_);
  }
  void modulate_forward(S* out, const S* in, const S* shift, const S* scale, int B, int T, int C, int ld) override {
    cuda::modulate_forward(out, in, shift, scale, B, T, C, ld, stream_);
  }
  void modulate_backward(S* din, S* dshift, S* dscale, const S* dout, const S* in, const S* scale, int B, int T, int C,
                         int ld) override {
    cuda::modulate_backward(din, dshift, dscale, dout, in, scale, B, T, C, ld, stream_);
  }
  void gate_forward(S* out, const S* res, const S* in, const S* gate, int B, int T, int C, int ld) override {
    cuda::gate_forward(out, res, in, gate, B, T, C, ld, stream_);
  }
  void gate_backward(S* din, S* dgate, const S* dout, const S* in, const S* gate, int B, int T, int C,
                     int ld) override {
    cuda::gate_backward(din, dgate, dout, in, gate, B, T, C, ld, stream_);
  }

  void gate_sum_forward(S* out, S* mo, const S* res, const S* gate, int B, int T, int C, int ld) override {
    cuda::gate_sum_forward(out, mo, res, gate, B, T, C, ld, stream_);
  }

  void adamw(S* p, S* m, S* v, const S* g, const S* wd, size_t n, const kernels::AdamWStep& s) override {
    cuda::adamw(p, m, v, g, wd, static_cast<int64_t>(n), s, stream_);
  }

  // The solvers' state: cuda/thrust_algebra.hpp on the backend's stream.
  void rk_combine_rows(S* out, const S* y, const double* h, const double* c, const S* const* k, int m,
                       const int* rows, int nrows, size_t n) override {
    algebra::device::rk_combine_rows(out, y, h, c, k, m, rows, nrows, n, stream_);
  }
  void error_sum_squares_rows(double* out, const double* h, const double* e, const S* const* k, int m, const S* y0,
                              const S* y1, double rtol, double atol, size_t period, size_t dims, const int* rows,
                              int nrows, size_t n) override {
    algebra::device::error_sum_squares_rows(out, h, e, k, m, y0, y1, rtol, atol, rows, nrows, n, period, dims,
                                            stream_);
  }
  void sum_squares_rows(double* out, const S* x, const int* rows, int nrows, size_t n) override {
    algebra::device::sum_squares_rows(out, x, rows, nrows, n, stream_);
  }
  void scaled_sum_squares_rows(double* out, const S* a, const S* b, const S* y, double rtol, double atol, int nrows,
                               size_t n) override {
    algebra::device::scaled_sum_squares_rows(out, a, b, y, rtol, atol, nrows, n, stream_);
  }
  void scaled_sum_rows(S* out, const double* h, const double* c, const S* const* k, int m, const int* rows, int nrows,
                       size_t n) override {
    algebra::device::scaled_sum_rows(out, h, c, k, m, rows, nrows, n, stream_);
  }
  void accumulate_rows(S* y, const S* const* k, int m, const int* rows, int nrows, size_t n) override {
    algebra::device::accumulate_rows(y, k, m, rows, nrows, n, stream_);
  }
  void strided_copy(S* dst, size_t ldd, const S* src, size_t lds, size_t rows, size_t n, S alpha) override {
    algebra::device::strided_copy(dst, ldd, src, lds, rows, n, alpha, stream_);
  }
  void move_rows(S* dst, const int* dst_rows, const S* src, const int* src_rows, int nrows, size_t n) override {
    algebra::device::move_rows(dst, dst_rows, src, src_rows, nrows, n, stream_);
  }

 private:
  cudaStream_t stream() const { return static_cast<cudaStream_t>(stream_); }
  std::string name_;
  void* stream_ = nullptr;
  void* blas_ = nullptr;
};

}  // namespace

template <class S>
std::unique_ptr<Backend<S>> make_backend() {
  return std::make_unique<CudaBackend<S>>();
}

template std::unique_ptr<Backend<float>> make_backend<float>();
template std::unique_ptr<Backend<double>> make_backend<double>();

}  // namespace flowloop::cuda
