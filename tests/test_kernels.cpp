// The CUDA kernels' bodies (kernels.hpp: one element or one row, __host__ __device__)
// run on the CPU against the layers they must reproduce: CI has no GPU, so this is where
// the device code's arithmetic is checked.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "check.hpp"
#include "flowloop/backend/kernels.hpp"
#include "flowloop/nn/layers.hpp"
#include "flowloop/core/tensor.hpp"

using namespace flowloop;
using namespace flowloop::test;

TEST_CASE("kernel bodies: GELU and SiLU elements against the layers", "[kernels]") {
  Rng rng(1);
  const int64_t N = 1000;
  auto z = randn(static_cast<size_t>(N), rng, 3.0), g = randn(static_cast<size_t>(N), rng);
  std::vector<double> y(z.size()), dz(z.size(), 0.0), sy(z.size()), sdz(z.size(), 0.0);
  gelu_forward(y.data(), z.data(), N);
  gelu_backward(dz.data(), g.data(), z.data(), N);
  silu_forward(sy.data(), z.data(), N);
  silu_backward(sdz.data(), g.data(), z.data(), N);
  std::vector<double> ky(z.size()), kdz(z.size()), ksy(z.size()), ksdz(z.size());
  for (size_t i = 0; i < z.size(); ++i) {
    ky[i] = kernels::gelu(z[i]);
    kdz[i] = g[i] * kernels::gelu_grad(z[i]);
    ksy[i] = kernels::silu(z[i]);
    ksdz[i] = g[i] * kernels::silu_grad(z[i]);
  }
  CHECK(rel_error(ky, y) < 1e-14);
  CHECK(rel_error(kdz, dz) < 1e-14);
  CHECK(rel_error(ksy, sy) < 1e-14);
  CHECK(rel_error(ksdz, sdz) < 1e-14);
  // the derivatives against central differences
  for (double x : {-2.5, -0.3, 0.0, 0.7, 4.0}) {
    const double h = 1e-6;
    CHECK(kernels::gelu_grad(x) == Approx((kernels::gelu(x + h) - kernels::gelu(x - h)) / (2 * h)).epsilon(1e-8));
    CHECK(kernels::silu_grad(x) == Approx((kernels::silu(x + h) - kernels::silu(x - h)) / (2 * h)).epsilon(1e-8));
  }
  CHECK(kernels::gelu(1.0f) == Approx(kernels::gelu(1.0)).epsilon(1e-6));
}

TEST_CASE("kernel bodies: a LayerNorm row and its vjp against the layer", "[kernels]") {
  Rng rng(2);
  const int N = 7, C = 37;
  auto x = randn(static_cast<size_t>(N) * C, rng, 2.0), w = randn(C, rng), b = randn(C, rng),
       g = randn(x.size(), rng), din0 = randn(x.size(), rng);
  std::vector<double> out(x.size()), mean(N), rstd(N), din = din0, dw(C, 0.0), db(C, 0.0);
  layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C);
  layernorm_backward(din.data(), dw.data(), db.data(), g.data(), x.data(), w.data(), mean.data(), rstd.data(), N, C);
  std::vector<double> kout(x.size()), kmean(N), krstd(N), kdin = din0;
  for (int n = 0; n < N; ++n) {
    const size_t r = static_cast<size_t>(n) * C;
    kernels::layernorm_row(kout.data() + r, &kmean[n], &krstd[n], x.data() + r, w.data(), b.data(), C);
    kernels::layernorm_row_backward(kdin.data() + r, g.data() + r, x.data() + r, w.data(), kmean[n], krstd[n], C);
  }
  CHECK(rel_error(kout, out) < 1e-13);
  CHECK(rel_error(kmean, mean) < 1e-13);
  CHECK(rel_error(krstd, rstd) < 1e-13);
  CHECK(rel_error(kdin, din) < 1e-13);  // accumulated onto din0, as the layer does
  // float: the same to float rounding
  std::vector<float> xf(x.begin(), x.end()), wf(w.begin(), w.end()), bf(b.begin(), b.end()), of(static_cast<size_t>(C));
  float mf = 0, rf = 0;
  kernels::layernorm_row(of.data(), &mf, &rf, xf.data(), wf.data(), bf.data(), C);
  for (int i = 0; i < C; ++i) CHECK(of[static_cast<size_t>(i)] == Approx(out[static_cast<size_t>(i)]).margin(1e-5));
}

TEST_CASE("kernel bodies: causal softmax rows and their vjp against attention", "[kernels]") {
  // one head (NH 1, D = C): the attention layer's probabilities and score gradients
  const int B = 2, T = 6, C = 4, NH = 1;
  Rng rng(3);
  auto qkv = randn(static_cast<size_t>(B) * T * 3 * C, rng), dy = randn(static_cast<size_t>(B) * T * C, rng);
  std::vector<double> y(static_cast<size_t>(B) * T * C), att(static_cast<size_t>(B) * T * T), dqkv(qkv.size(), 0.0),
      datt(att.size(), 0.0);
  attention_forward(y.data(), att.data(), qkv.data(), B, T, C, NH);
  attention_backward(dqkv.data(), datt.data(), dy.data(), qkv.data(), att.data(), B, T, C, NH);
  const double scale = 1.0 / std::sqrt(static_cast<double>(C));
  std::vector<double> katt(att.size()), kds(att.size());
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      double* row = katt.data() + (static_cast<size_t>(b) * T + t) * T;
      const double* q = qkv.data() + (static_cast<size_t>(b) * T + t) * 3 * C;
      for (int j = 0; j < T; ++j) {
        const double* k = qkv.data() + (static_cast<size_t>(b) * T + j) * 3 * C + C;
        double s = 0;
        for (int i = 0; i < C; ++i) s += q[i] * k[i];
        row[j] = s;
      }
      kernels::causal_softmax_row(row, t, T, scale);
      // dL/da_tj = dy_t . v_j, then the softmax's vjp
      double* d = kds.data() + (static_cast<size_t>(b) * T + t) * T;
      for (int j = 0; j < T; ++j) {
        const double* v = qkv.data() + (static_cast<size_t>(b) * T + j) * 3 * C + 2 * C;
        double s = 0;
        for (int i = 0; i < C; ++i) s += dy[(static_cast<size_t>(b) * T + t) * C + i] * v[i];
        d[j] = j <= t ? s : 123.0;  // beyond t: overwritten with 0
      }
      kernels::causal_softmax_row_backward(d, row, t, T, scale);
    }
  CHECK(rel_error(katt, att) < 1e-14);
  CHECK(rel_error(kds, datt) < 1e-13);  // the layer leaves dL/dscores (scaled) in datt
}

TEST_CASE("kernel bodies: cross-entropy rows against the layer", "[kernels]") {
  const int N = 5, V = 11;
  Rng rng(4);
  auto logits = randn(static_cast<size_t>(N) * V, rng, 3.0);
  const std::vector<int32_t> targets = {3, -1, 0, 10, 7};
  std::vector<double> d(logits.size(), 0.5), kd(logits.size(), 0.5);
  const double loss = crossentropy_forward_backward(d.data(), logits.data(), targets.data(), N, V);
  double ksum = 0;
  for (int n = 0; n < N; ++n)
    ksum += kernels::crossentropy_row(kd.data() + static_cast<size_t>(n) * V, logits.data() + static_cast<size_t>(n) * V,
                                      targets[static_cast<size_t>(n)], V, 1.0 / 4);
  CHECK(ksum / 4 == Approx(loss).epsilon(1e-14));
  CHECK(rel_error(kd, d) < 1e-14);
  for (int v = 0; v < V; ++v) CHECK(kd[static_cast<size_t>(V + v)] == 0.5);  // the unscored row is untouched
}
