// The cpu backend: the reference backend's host memory, state algebra and optimiser,
// with every network op the fused Eigen/OpenBLAS layer of layers.hpp (threaded with
// OpenMP, the same bits on any thread count). The CPU path of every command.
#include <algorithm>

#include "flowloop/nn/layers.hpp"
#include "reference.hpp"

namespace flowloop {
namespace {

template <class S>
class CpuBackend final : public detail::ReferenceBackend<S> {
  using Ref = detail::ReferenceBackend<S>;

 public:
  std::string name() const override { return "cpu (Eigen/OpenBLAS)"; }

  // ---- primitives
  void add_bias(S* out, const S* b, int N, int OUT) override {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * OUT >= kParallelMin)
    for (int n = 0; n < N; ++n) {
      S* o = out + static_cast<size_t>(n) * OUT;
      for (int i = 0; i < OUT; ++i) o[i] += b[i];
    }
  }
  void column_sums(S* out, const S* x, int N, int OUT) override { flowloop::column_sums(out, x, N, OUT); }
  void gelu_forward(S* out, const S* in, int64_t n) override { flowloop::gelu_forward(out, in, n); }
  void gelu_backward(S* din, const S* dout, const S* in, int64_t n) override {
    flowloop::gelu_backward(din, dout, in, n);
  }
  void silu_forward(S* out, const S* in, int64_t n) override { flowloop::silu_forward(out, in, n); }
  void silu_backward(S* din, const S* dout, const S* in, int64_t n) override {
    flowloop::silu_backward(din, dout, in, n);
  }
  void layernorm_forward(S* out, S* mean, S* rstd, const S* in, const S* w, const S* b, int N, int C) override {
    flowloop::layernorm_forward(out, mean, rstd, in, w, b, N, C);
  }
  void layernorm_backward(S* din, S* dw, S* db, const S* dout, const S* in, const S* w, const S* mean,
                          const S* rstd, int N, int C) override {
    if (!dw != !db) return Ref::layernorm_backward(din, dw, db, dout, in, w, mean, rstd, N, C);
    flowloop::layernorm_backward(din, dw, db, dout, in, w, mean, rstd, N, C);
  }
  // SwiGLU, RMSNorm and rotary: kernels.hpp's bodies as the reference runs them, rows on the
  // OpenMP threads (the same bits; the weight's column sums in row order, in bands)
  void swiglu_forward(S* out, const S* gate, const S* up, int N, int F, int64_t ld) override {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * F >= kParallelMin)
    for (int n = 0; n < N; ++n) {
      const size_t r = static_cast<size_t>(n) * ld, o = static_cast<size_t>(n) * F;
      for (int i = 0; i < F; ++i) out[o + i] = kernels::swiglu(gate[r + i], up[r + i]);
    }
  }
  void swiglu_backward(S* dgate, S* dup, const S* dout, const S* gate, const S* up, int N, int F,
                       int64_t ld) override {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * F >= kParallelMin)
    for (int n = 0; n < N; ++n) {
      const size_t r = static_cast<size_t>(n) * ld, o = static_cast<size_t>(n) * F;
      for (int i = 0; i < F; ++i)
        kernels::swiglu_grad(dgate ? dgate + r + i : nullptr, dup ? dup + r + i : nullptr, dout[o + i], gate[r + i],
                             up[r + i]);
    }
  }
  void rmsnorm_forward(S* out, S* rstd, const S* in, const S* w, int N, int C, double eps) override {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * C >= kParallelMin)
    for (int n = 0; n < N; ++n)
      kernels::rmsnorm_row(out + static_cast<size_t>(n) * C, rstd + n, in + static_cast<size_t>(n) * C, w, C, eps);
  }
  void rmsnorm_backward(S* din, S* dw, const S* dout, const S* in, const S* w, const S* rstd, int N,
                        int C) override {
    if (din) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * C >= kParallelMin)
      for (int n = 0; n < N; ++n) {
        const size_t r = static_cast<size_t>(n) * C;
        kernels::rmsnorm_row_backward(din + r, dout + r, in + r, w, rstd[n], C);
      }
    }
    if (dw) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * C >= kParallelMin)
      for (int i = 0; i < C; ++i) kernels::rmsnorm_column_grads(dw, dout, in, rstd, N, C, i);
    }
  }
  void rotary(S* x, int B, int T, int H, int D, int64_t ld, int rot, double theta, bool interleaved,
              bool transpose) override {
    check_rotary_shape(H, D, rot, theta);
    // The cosines and sines of positions 0..T-1 (kernels.hpp's rotary_angle, the same bits),
    // kept per thread for the next call of the same shape: every layer's q and k, and the
    // vjp (the sine's sign flipped, exactly), read one table.
    struct Table {
      int T = -1, rot = 0;
      double theta = 0;
      std::vector<S> c, s;
    };
    thread_local Table own;
    Table& tab = own;  // this thread's, shared with the parallel loop below
    if (tab.T < T || tab.rot != rot || tab.theta != theta) {
      const int half = rot / 2;
      tab.c.resize(static_cast<size_t>(T) * half);
      tab.s.resize(tab.c.size());
      for (int t = 0; t < T; ++t)
        for (int i = 0; i < half; ++i)
          kernels::rotary_angle(&tab.c[static_cast<size_t>(t) * half + i], &tab.s[static_cast<size_t>(t) * half + i], t,
                                i, rot, theta, false);
      tab.T = T;
      tab.rot = rot;
      tab.theta = theta;
    }
    const int64_t rows = static_cast<int64_t>(B) * T;
    const S* ct = tab.c.data();
    const S* st = tab.s.data();
#pragma omp parallel for schedule(static) if (rows * H * rot >= kParallelMin)
    for (int64_t r = 0; r < rows; ++r)
      for (int i = 0; i < rot / 2; ++i) {
        const size_t k = static_cast<size_t>(r % T) * (rot / 2) + i;
        const S c = ct[k], s = transpose ? -st[k] : st[k];
        for (int h = 0; h < H; ++h) kernels::rotary_pair(x + r * ld + static_cast<int64_t>(h) * D, i, rot, interleaved, c, s);
      }
  }
  void modulate_forward(S* out, const S* in, const S* shift, const S* scale, int B, int T, int C,
                        int ld) override {
    flowloop::modulate_forward(out, in, shift, scale, B, T, C, ld);
  }
  void modulate_backward(S* din, S* dshift, S* dscale, const S* dout, const S* in, const S* scale, int B, int T,
                         int C, int ld) override {
    if (!dshift || !dscale) return Ref::modulate_backward(din, dshift, dscale, dout, in, scale, B, T, C, ld);
    flowloop::modulate_backward(din, dshift, dscale, dout, in, scale, B, T, C, ld);
  }
  void gate_forward(S* out, const S* res, const S* in, const S* gate, int B, int T, int C, int ld) override {
    flowloop::gate_forward(out, res, in, gate, B, T, C, ld);
  }
  void gate_backward(S* din, S* dgate, const S* dout, const S* in, const S* gate, int B, int T, int C,
                     int ld) override {
    if (!dgate) return Ref::gate_backward(din, dgate, dout, in, gate, B, T, C, ld);
    flowloop::gate_backward(din, dgate, dout, in, gate, B, T, C, ld);
  }
  void gate_sum_forward(S* out, S* mo, const S* res, const S* gate, int B, int T, int C, int ld) override {
    const int N = B * T;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * C >= kParallelMin)
    for (int n = 0; n < N; ++n) {
      const S* g = gate + static_cast<size_t>(n / T) * ld;
      const size_t r = static_cast<size_t>(n) * C;
      for (int i = 0; i < C; ++i) kernels::gate_sum(out[r + i], mo[r + i], res[r + i], g[i]);
    }
  }

  // ---- composites
  void linear_forward(S* out, const S* in, const S* W, const S* b, int N, int IN, int OUT, bool accumulate) override {
    if (!accumulate) return flowloop::linear_forward(out, in, W, b, N, IN, OUT);
    gemm<S>(false, true, N, OUT, IN, S(1), in, IN, W, IN, S(1), out, OUT);
    if (b) add_bias(out, b, N, OUT);
  }
  // din once for all rows; the parameter gradients per sequence when stride > 0.
  void linear_backward(S* din, S* dW, S* db, const S* dout, const S* in, const S* W, int B, int rows, int IN, int OUT,
                       size_t stride) override {
    const int N = B * rows;
    if (din) gemm<S>(false, false, N, IN, OUT, S(1), dout, OUT, W, IN, S(1), din, IN);
    const int parts = stride ? B : 1, n = stride ? rows : N;
    for (int s = 0; s < parts; ++s) {
      const size_t r = static_cast<size_t>(s) * n, off = static_cast<size_t>(s) * stride;
      if (dW) gemm<S>(true, false, OUT, IN, n, S(1), dout + r * OUT, OUT, in + r * IN, IN, S(1), dW + off, IN);
      if (db) flowloop::column_sums(db + off, dout + r * OUT, n, OUT);
    }
  }
  void vector_linear_forward(S* out, const S* in, const S* W, const S* b, int B, int IN, int OUT) override {
    linear_forward_few(out, in, W, b, B, IN, OUT);
  }
  // W and its gradient stream through once (linear_backward_few), per sequence when stride > 0.
  void vector_linear_backward(S* din, S* dW, S* db, const S* dout, const S* in, const S* W, int B, int IN, int OUT,
                              size_t stride) override {
    if (!dW || !db) return Ref::vector_linear_backward(din, dW, db, dout, in, W, B, IN, OUT, stride);
    if (stride == 0) return linear_backward_few(din, dW, db, dout, in, W, B, IN, OUT);
    for (int s = 0; s < B; ++s) {
      const size_t off = static_cast<size_t>(s) * stride;
      linear_backward_few<S>(din ? din + static_cast<size_t>(s) * IN : nullptr, dW + off, db + off,
                             dout + static_cast<size_t>(s) * OUT, in + static_cast<size_t>(s) * IN, W, 1, IN, OUT);
    }
  }
  void attention_forward(S* y, S* att, const S* qkv, int B, int T, const AttnShape& a) override {
    flowloop::attention_forward(y, att, qkv, B, T, a);
  }
  void attention_backward(S* dqkv, S* datt, const S* dy, const S* qkv, const S* att, int B, int T,
                          const AttnShape& a) override {
    flowloop::attention_backward(dqkv, datt, dy, qkv, att, B, T, a);
  }
  void layernorm_backward_scaled(S* din, S* dw, S* db, const S* dout, const S* scale, int T, int ld, const S* in,
                                 const S* w, const S* mean, const S* rstd, int N, int C, S* scratch) override {
    if (!dw != !db) return Ref::layernorm_backward_scaled(din, dw, db, dout, scale, T, ld, in, w, mean, rstd, N, C, scratch);
    flowloop::layernorm_backward_scaled(din, dw, db, dout, scale, T, ld, in, w, mean, rstd, N, C);
  }
};

}  // namespace

template <class S>
Backend<S>& cpu_backend() {
  static CpuBackend<S> be;
  return be;
}

template Backend<float>& cpu_backend<float>();
template Backend<double>& cpu_backend<double>();

}  // namespace flowloop
