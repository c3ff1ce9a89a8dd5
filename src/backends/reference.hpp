// src/backends/reference.hpp (internal): the reference backend's class, for the cpu
// backend (src/backends/cpu.cpp), which shares its memory, state algebra and optimiser
// and overrides the network ops with the fused layers of layers.hpp.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "flowloop/ode/algebra.hpp"
#include "flowloop/backend/backend.hpp"
#include "flowloop/backend/kernels.hpp"

namespace flowloop::detail {

// The reference backend: host memory; every network op is a loop over kernels.hpp's
// bodies (the CUDA kernels' own) or the library's GEMM, on one thread, in a fixed order.
// The state algebra (shared with the cpu backend) runs algebra.hpp's functions, its
// element-wise passes split over the OpenMP threads (for_chunks: the same bits on any
// thread count).
template <class S>
class ReferenceBackend : public Backend<S> {
 public:
  Device device() const override { return Device::cpu; }
  std::string name() const override { return "reference (host)"; }

  // Host memory, 64-byte aligned, counted in MemoryStats as Buffers are (the size sits
  // in a header before the block, for free_bytes).
  void* alloc_bytes(size_t bytes) override {
    if (bytes > std::numeric_limits<size_t>::max() - kHeader)
      throw Error("reference backend: cannot allocate " + std::to_string(bytes) + " bytes");
    char* p;
    try {
      p = static_cast<char*>(::operator new(bytes + kHeader, std::align_val_t(kHeader)));
    } catch (const std::bad_alloc&) {
      throw Error("reference backend: cannot allocate " + std::to_string(bytes) + " bytes");
    }
    std::memcpy(p, &bytes, sizeof(bytes));
    MemoryStats::add(static_cast<std::ptrdiff_t>(bytes));
    return p + kHeader;
  }
  void free_bytes(void* q) noexcept override {
    if (!q) return;
    char* p = static_cast<char*>(q) - kHeader;
    size_t bytes = 0;
    std::memcpy(&bytes, p, sizeof(bytes));
    MemoryStats::add(-static_cast<std::ptrdiff_t>(bytes));
    ::operator delete(p, std::align_val_t(kHeader));
  }
  void upload_bytes(void* dst, const void* host, size_t bytes) override { std::memcpy(dst, host, bytes); }
  void download_bytes(void* host, const void* src, size_t bytes) override { std::memcpy(host, src, bytes); }
  void copy(S* dst, const S* src, size_t n) override { std::memmove(dst, src, n * sizeof(S)); }
  void fill(S* x, S value, size_t n) override {
    for_chunks(1, n, [&](size_t, size_t q0, size_t q1) { std::fill(x + q0, x + q1, value); });
  }
  void synchronize() override {}

  void gemm(bool ta, bool tb, int M, int N, int K, S alpha, const S* A, int lda, int64_t sA, const S* B, int ldb,
            int64_t sB, S beta, S* C, int ldc, int64_t sC, int batch) override {
    for (int i = 0; i < batch; ++i)
      flowloop::gemm<S>(ta, tb, M, N, K, alpha, A + i * sA, lda, B + i * sB, ldb, beta, C + i * sC, ldc);
  }

  void axpy(S* y, S a, const S* x, size_t n) override {
    for_chunks(1, n, [&](size_t, size_t q0, size_t q1) {
      for (size_t i = q0; i < q1; ++i) y[i] += a * x[i];
    });
  }
  void add_bias(S* out, const S* b, int N, int OUT) override {
    for (int64_t n = 0; n < N; ++n)
      for (int o = 0; o < OUT; ++o) out[n * OUT + o] += b[o];
  }
  void column_sums(S* out, const S* x, int N, int OUT) override {
    for (int o = 0; o < OUT; ++o) out[o] += kernels::column_sum(x, N, OUT, o);
  }
  void gelu_forward(S* out, const S* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) out[i] = kernels::gelu(in[i]);
  }
  void gelu_backward(S* din, const S* dout, const S* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) din[i] += kernels::gelu_grad(in[i]) * dout[i];
  }
  void silu_forward(S* out, const S* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) out[i] = kernels::silu(in[i]);
  }
  void silu_backward(S* din, const S* dout, const S* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) din[i] += kernels::silu_grad(in[i]) * dout[i];
  }
  void layernorm_forward(S* out, S* mean, S* rstd, const S* in, const S* w, const S* b, int N, int C) override {
    for (int64_t n = 0; n < N; ++n) kernels::layernorm_row(out + n * C, mean + n, rstd + n, in + n * C, w, b, C);
  }
  void layernorm_backward(S* din, S* dw, S* db, const S* dout, const S* in, const S* w, const S* mean,
                          const S* rstd, int N, int C) override {
    if (din)
      for (int64_t n = 0; n < N; ++n)
        kernels::layernorm_row_backward(din + n * C, dout + n * C, in + n * C, w, mean[n], rstd[n], C);
    if (dw || db)
      for (int i = 0; i < C; ++i) kernels::layernorm_column_grads(dw, db, dout, in, mean, rstd, N, C, i);
  }
  void swiglu_forward(S* out, const S* gate, const S* up, int N, int F, int64_t ld) override {
    for (int64_t n = 0; n < N; ++n)
      for (int i = 0; i < F; ++i) out[n * F + i] = kernels::swiglu(gate[n * ld + i], up[n * ld + i]);
  }
  void swiglu_backward(S* dgate, S* dup, const S* dout, const S* gate, const S* up, int N, int F,
                       int64_t ld) override {
    for (int64_t n = 0; n < N; ++n)
      for (int i = 0; i < F; ++i) {
        const int64_t k = n * ld + i;
        kernels::swiglu_grad(dgate ? dgate + k : nullptr, dup ? dup + k : nullptr, dout[n * F + i], gate[k], up[k]);
      }
  }
  void rmsnorm_forward(S* out, S* rstd, const S* in, const S* w, int N, int C, double eps) override {
    for (int64_t n = 0; n < N; ++n) kernels::rmsnorm_row(out + n * C, rstd + n, in + n * C, w, C, eps);
  }
  void rmsnorm_backward(S* din, S* dw, const S* dout, const S* in, const S* w, const S* rstd, int N,
                        int C) override {
    if (din)
      for (int64_t n = 0; n < N; ++n) kernels::rmsnorm_row_backward(din + n * C, dout + n * C, in + n * C, w, rstd[n], C);
    if (dw)
      for (int i = 0; i < C; ++i) kernels::rmsnorm_column_grads(dw, dout, in, rstd, N, C, i);
  }
  void rotary(S* x, int B, int T, int H, int D, int64_t ld, int rot, double theta, bool interleaved,
              bool transpose) override {
    check_rotary_shape(H, D, rot, theta);
    for (int64_t r = 0; r < static_cast<int64_t>(B) * T; ++r)
      for (int h = 0; h < H; ++h)
        kernels::rotary_head(x + r * ld + static_cast<int64_t>(h) * D, static_cast<int>(r % T), rot, theta, interleaved,
                             transpose);
  }
  void causal_softmax(S* att, int BH, int T, S scale) override {
    for (int64_t r = 0; r < static_cast<int64_t>(BH) * T; ++r)
      kernels::causal_softmax_row(att + r * T, static_cast<int>(r % T), T, scale);
  }
  void causal_softmax_backward(S* datt, const S* att, int BH, int T, S scale) override {
    for (int64_t r = 0; r < static_cast<int64_t>(BH) * T; ++r)
      kernels::causal_softmax_row_backward(datt + r * T, att + r * T, static_cast<int>(r % T), T, scale);
  }
  void modulate_forward(S* out, const S* in, const S* shift, const S* scale, int B, int T, int C,
                        int ld) override {
    for (int64_t bt = 0; bt < static_cast<int64_t>(B) * T; ++bt) {
      const int64_t v = (bt / T) * ld;
      for (int i = 0; i < C; ++i) out[bt * C + i] = kernels::modulate(in[bt * C + i], shift[v + i], scale[v + i]);
    }
  }
  void modulate_backward(S* din, S* dshift, S* dscale, const S* dout, const S* in, const S* scale, int B, int T,
                         int C, int ld) override {
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < C; ++i) kernels::broadcast_backward(din, dshift, dscale, dout, in, scale, T, C, ld, b, i);
  }
  void gate_forward(S* out, const S* res, const S* in, const S* gate, int B, int T, int C, int ld) override {
    for (int64_t bt = 0; bt < static_cast<int64_t>(B) * T; ++bt) {
      const int64_t v = (bt / T) * ld;
      for (int i = 0; i < C; ++i) out[bt * C + i] = kernels::gated(res[bt * C + i], in[bt * C + i], gate[v + i]);
    }
  }
  void gate_backward(S* din, S* dgate, const S* dout, const S* in, const S* gate, int B, int T, int C,
                     int ld) override {
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < C; ++i)
        kernels::broadcast_backward(din, static_cast<S*>(nullptr), dgate, dout, in, gate, T, C, ld, b, i);
  }

  void gate_sum_forward(S* out, S* mo, const S* res, const S* gate, int B, int T, int C, int ld) override {
    for (int64_t bt = 0; bt < static_cast<int64_t>(B) * T; ++bt) {
      const int64_t v = (bt / T) * ld;
      for (int i = 0; i < C; ++i) kernels::gate_sum(out[bt * C + i], mo[bt * C + i], res[bt * C + i], gate[v + i]);
    }
  }

  void adamw(S* p, S* m, S* v, const S* g, const S* wd, size_t n, const kernels::AdamWStep& s) override {
    for (size_t i = 0; i < n; ++i) kernels::adamw_update(p[i], m[i], v[i], g[i], wd[i], s);
  }

  // The solvers' state: algebra.hpp's functions, so that a host solve keeps its bits.
  void rk_combine_rows(S* out, const S* y, const double* h, const double* c, const S* const* k, int m,
                       const int* rows, int nrows, size_t n) override {
    algebra::rk_combine_rows(out, y, h, c, k, m, rows, nrows, n);
  }
  void error_sum_squares_rows(double* out, const double* h, const double* e, const S* const* k, int m, const S* y0,
                              const S* y1, double rtol, double atol, size_t period, size_t dims, const int* rows,
                              int nrows, size_t n) override {
    if (m > kMaxStages) throw Error("error_sum_squares_rows: at most 32 stages");
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(n) * nrows * m >= kParallelMin)
    for (int i = 0; i < nrows; ++i) {
      const size_t base = static_cast<size_t>(rows[i]) * n;
      const S* kr[kMaxStages];
      for (int l = 0; l < m; ++l) kr[l] = k[l] + base;
      if (period == 0) {
        out[i] = algebra::error_sum_squares(h[rows[i]], e, kr, m, y0 + base, y1 + base, rtol, atol, n);
        continue;
      }
      // only the first dims of every period values, a sum per period
      double sum = 0.0;
      const S* kc[kMaxStages];
      for (size_t off = 0; off < n; off += period) {
        const size_t len = std::min(dims, n - off);
        for (int l = 0; l < m; ++l) kc[l] = kr[l] + off;
        sum += algebra::error_sum_squares(h[rows[i]], e, kc, m, y0 + base + off, y1 + base + off, rtol, atol, len);
      }
      out[i] = sum;
    }
  }
  void sum_squares_rows(double* out, const S* x, const int* rows, int nrows, size_t n) override {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(n) * nrows >= kParallelMin)
    for (int i = 0; i < nrows; ++i) out[i] = algebra::sum_squares(x + static_cast<size_t>(rows ? rows[i] : i) * n, n);
  }
  void scaled_sum_squares_rows(double* out, const S* a, const S* b, const S* y, double rtol, double atol, int nrows,
                               size_t n) override {
    for (int r = 0; r < nrows; ++r) {
      const size_t base = static_cast<size_t>(r) * n;
      out[r] = b ? algebra::scaled_diff_sum_squares(a + base, b + base, y + base, rtol, atol, n)
                 : algebra::scaled_sum_squares(a + base, y + base, rtol, atol, n);
    }
  }
  void scaled_sum_rows(S* out, const double* h, const double* c, const S* const* k, int m, const int* rows, int nrows,
                       size_t n) override {
    if (m > kMaxStages) throw Error("scaled_sum_rows: at most 32 stages");
    for_chunks(static_cast<size_t>(nrows), n, [&](size_t i, size_t q0, size_t q1) {
      const size_t base = static_cast<size_t>(rows[i]) * n + q0;
      const S* kr[kMaxStages];
      for (int l = 0; l < m; ++l) kr[l] = k[l] + base;
      algebra::scaled_sum(out + base, h[rows[i]], c, kr, m, q1 - q0);
    });
  }
  void accumulate_rows(S* y, const S* const* k, int m, const int* rows, int nrows, size_t n) override {
    for_chunks(static_cast<size_t>(nrows), n, [&](size_t i, size_t q0, size_t q1) {
      const size_t base = static_cast<size_t>(rows[i]) * n;
      S* yr = y + base;
      for (int l = 0; l < m; ++l) {
        const S* kr = k[l] + base;
        for (size_t q = q0; q < q1; ++q) yr[q] += kr[q];
      }
    });
  }
  void strided_copy(S* dst, size_t ldd, const S* src, size_t lds, size_t rows, size_t n, S alpha) override {
    for_chunks(rows, n, [&](size_t r, size_t q0, size_t q1) {
      S* d = dst + r * ldd + q0;
      const S* x = src + r * lds + q0;
      if (alpha == S(0))
        std::fill(d, d + (q1 - q0), S(0));
      else if (alpha == S(1))
        std::memmove(d, x, (q1 - q0) * sizeof(S));
      else
        for (size_t v = 0; v < q1 - q0; ++v) d[v] = alpha * x[v];
    });
  }
  void move_rows(S* dst, const int* dst_rows, const S* src, const int* src_rows, int nrows, size_t n) override {
    for_chunks(static_cast<size_t>(nrows), n, [&](size_t i, size_t q0, size_t q1) {
      std::memcpy(dst + static_cast<size_t>(dst_rows ? dst_rows[i] : i) * n + q0,
                  src + static_cast<size_t>(src_rows ? src_rows[i] : i) * n + q0, (q1 - q0) * sizeof(S));
    });
  }

 protected:
  // fn(row, q0, q1) over [q0, q1) pieces of `rows` rows of n values, on the OpenMP threads
  // when there is enough work. Element-wise work only: the bits do not depend on the split.
  template <class Fn>
  static void for_chunks(size_t rows, size_t n, Fn fn) {
    constexpr size_t kChunk = 8192;
    const size_t per_row = n ? (n + kChunk - 1) / kChunk : 0;
    const int64_t pieces = static_cast<int64_t>(rows * per_row);
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(rows * n) >= kParallelMin)
    for (int64_t p = 0; p < pieces; ++p) {
      const size_t r = static_cast<size_t>(p) / per_row, q0 = (static_cast<size_t>(p) % per_row) * kChunk;
      fn(r, q0, std::min(n, q0 + kChunk));
    }
  }

 private:
  static constexpr size_t kHeader = 64;
  static constexpr int kMaxStages = 32;
};

}  // namespace flowloop::detail
