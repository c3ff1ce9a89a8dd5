// flowloop/backend.hpp: where tensors live and the operations the field needs there.
//
// A Backend<S> owns a memory space and runs the field's primitive operations on
// arrays in it: products (batched, strided), LayerNorm, GELU, the causal softmax,
// biases, column sums, axpy. DeviceField (device_field.hpp) composes them into the
// field's forward and vjp, so one composition serves every backend:
//   - "reference" (Device::cpu): host memory, each operation a loop over the bodies of
//     kernels.hpp (one row or one element at a time) and the library's GEMM. It is the
//     CUDA backend's twin: CI, which has no GPU, runs DeviceField on it and checks it
//     against Field, the CPU path, which keeps its own fused and faster code.
//   - "cuda" (Device::cuda, FLOWLOOP_CUDA builds): device memory, the kernels of cuda/
//     and cuBLAS, every operation on the backend's stream.
//
// Conventions: row-major arrays; gradients ACCUMULATE (+=) unless said otherwise;
// pointers are the backend's memory (host pointers only where a function says so).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "flowloop/kernels.hpp"
#include "flowloop/tensor.hpp"

namespace flowloop {

enum class Device { cpu, cuda };

// "cpu" or "cuda"; anything else throws Error naming the accepted values.
Device parse_device(const std::string& name);
const char* device_name(Device d);
// Whether this build has the CUDA backend (FLOWLOOP_CUDA), and the GPUs it sees (0
// without the backend, a driver or a GPU; never throws).
bool cuda_built();
int cuda_device_count();
// cuda when the build has it and a GPU is visible, else cpu.
Device default_device();
// "auto", "cpu" or "cuda", checked with require_device: the device flag of every
// command. auto is the environment's FLOWLOOP_DEVICE when set (cpu, cuda), else
// default_device().
Device resolve_device(const std::string& name);
// Throws Error when `d` cannot run here: cuda without a CUDA build, or without a GPU.
void require_device(Device d);

// The bytes of n values of T; an n whose bytes overflow size_t is an Error naming it.
template <class T>
size_t array_bytes(size_t n) {
  if (n > std::numeric_limits<size_t>::max() / sizeof(T))
    throw Error("cannot allocate " + std::to_string(n) + " values of " + std::to_string(sizeof(T)) +
                " bytes: the size overflows");
  return n * sizeof(T);
}

template <class S>
class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;  // "reference (host)", "cuda: NVIDIA H100 ..., 79.1 GiB"

  // ---- memory: raw bytes (any element type: the solvers keep double step sizes and int
  // row lists beside the S states), and typed wrappers for S.
  virtual void* alloc_bytes(size_t bytes) = 0;  // throws Error naming the bytes asked (and free)
  virtual void free_bytes(void* p) noexcept = 0;
  virtual void upload_bytes(void* dst, const void* host, size_t bytes) = 0;    // returns when host may change
  virtual void download_bytes(void* host, const void* src, size_t bytes) = 0;  // waits for the queued work
  S* alloc(size_t n) { return static_cast<S*>(alloc_bytes(array_bytes<S>(n))); }
  void free(S* p) noexcept { free_bytes(p); }
  void upload(S* dst, const S* host, size_t n) { upload_bytes(dst, host, n * sizeof(S)); }
  void download(S* host, const S* src, size_t n) { download_bytes(host, src, n * sizeof(S)); }
  virtual void copy(S* dst, const S* src, size_t n) = 0;  // within the backend
  virtual void fill(S* x, S value, size_t n) = 0;
  virtual void synchronize() = 0;  // waits for the work queued so far
  // The stream the operations queue on (a cudaStream_t for cuda; null: the host's order),
  // for libraries that join it (NCCL's collectives).
  virtual void* native_stream() { return nullptr; }

  // ---- products: for each of `batch` problems i,
  //   C_i(M,N) = alpha op(A_i) op(B_i) + beta C_i,  A_i = A + i sA, B_i = B + i sB, C_i = C + i sC
  // with tensor.hpp's gemm conventions (op(A) is (M,K): A is (M,K) or (K,M) if ta).
  virtual void gemm(bool ta, bool tb, int M, int N, int K, S alpha, const S* A, int lda, int64_t sA, const S* B,
                    int ldb, int64_t sB, S beta, S* C, int ldc, int64_t sC, int batch) = 0;

  // ---- element-wise and row-wise
  virtual void axpy(S* y, S a, const S* x, size_t n) = 0;                  // y += a x
  virtual void add_bias(S* out /*(N,OUT)*/, const S* b /*(OUT)*/, int N, int OUT) = 0;  // out[n] += b
  virtual void column_sums(S* out /*(OUT)*/, const S* x /*(N,OUT)*/, int N, int OUT) = 0;  // out += sum_n x[n]
  virtual void gelu_forward(S* out, const S* in, int64_t n) = 0;
  virtual void gelu_backward(S* din, const S* dout, const S* in, int64_t n) = 0;  // din += gelu'(in) dout
  virtual void silu_forward(S* out, const S* in, int64_t n) = 0;
  virtual void silu_backward(S* din, const S* dout, const S* in, int64_t n) = 0;  // din += silu'(in) dout
  virtual void layernorm_forward(S* out, S* mean, S* rstd, const S* in, const S* w, const S* b, int N, int C) = 0;
  // din += LN^T dout (din may be null); dw += sum_n dout xhat, db += sum_n dout (either may be null).
  virtual void layernorm_backward(S* din, S* dw, S* db, const S* dout, const S* in, const S* w, const S* mean,
                                  const S* rstd, int N, int C) = 0;
  // In place on BH (T,T) score matrices: causal softmax of scale * scores; its vjp in place on datt.
  virtual void causal_softmax(S* att, int BH, int T, S scale) = 0;
  virtual void causal_softmax_backward(S* datt, const S* att, int BH, int T, S scale) = 0;
  // adaLN (layers.hpp's modulate and gate; shift, scale, gate are (B, .) rows ld apart):
  //   out = in (1 + scale_b) + shift_b;   out = res + (1 + gate_b) in     over (B,T,C)
  virtual void modulate_forward(S* out, const S* in, const S* shift, const S* scale, int B, int T, int C,
                                int ld) = 0;
  // din = dout (1 + scale) (written; null: skipped); dshift += sum_t dout; dscale += sum_t dout in
  virtual void modulate_backward(S* din, S* dshift, S* dscale, const S* dout, const S* in, const S* scale, int B,
                                 int T, int C, int ld) = 0;
  virtual void gate_forward(S* out, const S* res, const S* in, const S* gate, int B, int T, int C, int ld) = 0;
  // din = (1 + gate) dout (written; null: skipped); dgate += sum_t dout in
  virtual void gate_backward(S* din, S* dgate, const S* dout, const S* in, const S* gate, int B, int T, int C,
                             int ld) = 0;

  // ---- the optimiser: AdamW over n parameters (kernels.hpp's adamw_update per value)
  virtual void adamw(S* p, S* m, S* v, const S* g, const S* wd, size_t n, const kernels::AdamWStep& s) = 0;

  // ---- the solvers' state (integrate()'s driver on this memory; algebra.hpp's operations).
  // States are (rows, n) arrays; h (double, one per row of the batch), rows (int, the listed
  // rows) and out (double, one per listed row) are arrays of this backend; the tableau's
  // coefficients c, e and the array k of stage pointers are host arrays (k's pointers are
  // this backend's). The reference backend runs algebra.hpp's own functions (the CPU
  // solver's bits); the CUDA one Thrust (cuda/thrust_algebra.hpp).
  //   out[r] = y[r] + h[r] sum_j c[j] k[j][r]  for r in rows (out may alias y)
  virtual void rk_combine_rows(S* out, const S* y, const double* h, const double* c, const S* const* k, int m,
                               const int* rows, int nrows, size_t n) = 0;
  //   out[i] = sum over the values v of row r = rows[i] with v % period < dims (period 0: all) of
  //   ((h[r] sum_j e[j] k[j])_v / (atol + rtol max(|y0_v|, |y1_v|)))^2; NaN when y1's row is not finite
  virtual void error_sum_squares_rows(double* out, const double* h, const double* e, const S* const* k, int m,
                                      const S* y0, const S* y1, double rtol, double atol, size_t period,
                                      size_t dims, const int* rows, int nrows, size_t n) = 0;
  //   out[i] = sum_v x[rows[i]]_v^2 (rows null: row i; NaN or Inf when the row is not finite)
  virtual void sum_squares_rows(double* out, const S* x, const int* rows, int nrows, size_t n) = 0;
  //   out[r] = sum_v ((a_v - b_v) / (atol + rtol |y_v|))^2 for rows r < nrows, in double (b null: a_v alone)
  virtual void scaled_sum_squares_rows(double* out, const S* a, const S* b, const S* y, double rtol, double atol,
                                       int nrows, size_t n) = 0;
  //   out[r] = h[r] sum_j c[j] k[j][r]  for r in rows (m >= 1; the reverse pass's stage cotangents)
  virtual void scaled_sum_rows(S* out, const double* h, const double* c, const S* const* k, int m, const int* rows,
                               int nrows, size_t n) = 0;
  //   y[r] += k[0][r], then += k[1][r], ... += k[m-1][r]  for r in rows (in that order)
  virtual void accumulate_rows(S* y, const S* const* k, int m, const int* rows, int nrows, size_t n) = 0;
  //   dst[dst_rows[i]] = src[src_rows[i]] for i < nrows (a null list: row i); dst and src do not overlap
  virtual void move_rows(S* dst, const int* dst_rows, const S* src, const int* src_rows, int nrows, size_t n) = 0;
  //   dst[r*ldd + v] = alpha src[r*lds + v] for r < rows, v < n (packs and unpacks states that carry
  //   more per sequence); alpha 0 writes zeros without reading src; dst may be src (ldd == lds)
  virtual void strided_copy(S* dst, size_t ldd, const S* src, size_t lds, size_t rows, size_t n, S alpha) = 0;
  //   gather: dst[i] = src[rows[i]]; scatter: dst[rows[i]] = src[i]; copy: dst[r] = src[r] for r in rows
  void gather_rows(S* dst, const S* src, const int* rows, int nrows, size_t n) {
    move_rows(dst, nullptr, src, rows, nrows, n);
  }
  void scatter_rows(S* dst, const S* src, const int* rows, int nrows, size_t n) {
    move_rows(dst, rows, src, nullptr, nrows, n);
  }
  void copy_rows(S* dst, const S* src, const int* rows, int nrows, size_t n) { move_rows(dst, rows, src, rows, nrows, n); }
};

// The process's reference backend (host memory), for host solves: integrate() runs
// systems without a backend of their own on it.
template <class S>
Backend<S>& host_backend();

// The backend of a device: the reference host backend for cpu, the CUDA one for cuda
// (require_device's errors otherwise).
template <class S>
std::unique_ptr<Backend<S>> make_backend(Device d);

// An owned array of n values of T in a backend's memory (T is S unless said: the
// solvers' step sizes and row lists are Array<double, S> and Array<int, S>).
template <class S, class T = S>
class Array {
 public:
  Array() = default;
  Array(Backend<S>& be, size_t n)
      : be_(&be), n_(n), p_(n ? static_cast<T*>(be.alloc_bytes(array_bytes<T>(n))) : nullptr) {}
  ~Array() {
    if (p_) be_->free_bytes(p_);
  }
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  Array(Array&& o) noexcept : be_(o.be_), n_(o.n_), p_(o.p_) { o.n_ = 0, o.p_ = nullptr; }
  Array& operator=(Array&& o) noexcept {
    std::swap(be_, o.be_);
    std::swap(n_, o.n_);
    std::swap(p_, o.p_);
    return *this;
  }
  // Allocates n values anew on `be` (contents undefined) unless it holds n there already.
  void resize(Backend<S>& be, size_t n) {
    if (be_ == &be && n_ == n) return;
    *this = Array(be, n);
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  void upload(const T* host, size_t n) {
    check(n, "upload");
    if (n) be_->upload_bytes(p_, host, n * sizeof(T));
  }
  void download(T* host, size_t n) const {
    check(n, "download");
    if (n) be_->download_bytes(host, p_, n * sizeof(T));
  }
  void zero() {
    if (!n_) return;
    if constexpr (std::is_same_v<T, S>) {
      be_->fill(p_, S(0), n_);
    } else {
      const std::vector<T> z(n_, T(0));
      upload(z.data(), n_);
    }
  }

 private:
  void check(size_t n, const char* what) const {
    if (n > n_) throw Error("Array::" + std::string(what) + ": " + std::to_string(n) + " values, the array holds " +
                            std::to_string(n_));
  }
  Backend<S>* be_ = nullptr;
  size_t n_ = 0;
  T* p_ = nullptr;
};

}  // namespace flowloop
