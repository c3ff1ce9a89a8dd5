// Every layer's vjp against central finite differences in double.
#include <catch2/catch.hpp>
#include <cstring>

#include "check.hpp"
#include "flowloop/nn/layers.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace {
constexpr double kTol = 1e-6;
constexpr int B = 2, T = 5, C = 8, NH = 2, F = 12, V = 11;
constexpr int N = B * T;
}  // namespace

TEST_CASE("layernorm vjp matches finite differences", "[layers][fd]") {
  Rng rng(1);
  auto in = randn(N * C, rng), w = randn(C, rng), b = randn(C, rng), g = randn(N * C, rng);
  for (auto& x : w) x += 1.0;
  std::vector<double> out(N * C), mean(N), rstd(N);
  auto loss = [&] {
    layernorm_forward(out.data(), mean.data(), rstd.data(), in.data(), w.data(), b.data(), N, C);
    return dot(out, g);
  };
  loss();
  std::vector<double> din(N * C, 0.0), dw(C, 0.0), db(C, 0.0);
  layernorm_backward(din.data(), dw.data(), db.data(), g.data(), in.data(), w.data(), mean.data(),
                     rstd.data(), N, C);
  CHECK(rel_error(din, fd_grad(loss, in.data(), in.size())) < kTol);
  CHECK(rel_error(dw, fd_grad(loss, w.data(), w.size())) < kTol);
  CHECK(rel_error(db, fd_grad(loss, b.data(), b.size())) < kTol);
  // outputs are normalised: each row of (out - b) / w has mean 0, variance ~1
  loss();
  for (int n = 0; n < N; ++n) {
    double m = 0, v = 0;
    for (int c = 0; c < C; ++c) m += (out[n * C + c] - b[c]) / w[c];
    m /= C;
    for (int c = 0; c < C; ++c) v += std::pow((out[n * C + c] - b[c]) / w[c] - m, 2);
    CHECK(std::fabs(m) < 1e-12);
    CHECK(v / C == Approx(1.0).epsilon(1e-4));
  }
}

TEST_CASE("linear vjp matches finite differences", "[layers][fd]") {
  Rng rng(2);
  const int IN = 7, OUT = 9;
  auto in = randn(N * IN, rng), W = randn(OUT * IN, rng), b = randn(OUT, rng), g = randn(N * OUT, rng);
  std::vector<double> out(N * OUT);
  auto loss = [&] {
    linear_forward(out.data(), in.data(), W.data(), b.data(), N, IN, OUT);
    return dot(out, g);
  };
  loss();
  // out = in W^T + b, checked element by element against the definition
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < OUT; ++o) {
      double s = b[o];
      for (int i = 0; i < IN; ++i) s += in[n * IN + i] * W[o * IN + i];
      CHECK(out[n * OUT + o] == Approx(s).epsilon(1e-12));
    }
  std::vector<double> din(N * IN, 0.0), dW(OUT * IN, 0.0), db(OUT, 0.0);
  linear_backward(din.data(), dW.data(), db.data(), g.data(), in.data(), W.data(), N, IN, OUT);
  CHECK(rel_error(din, fd_grad(loss, in.data(), in.size())) < kTol);
  CHECK(rel_error(dW, fd_grad(loss, W.data(), W.size())) < kTol);
  CHECK(rel_error(db, fd_grad(loss, b.data(), b.size())) < kTol);
}

TEST_CASE("causal attention forward and vjp", "[layers][fd]") {
  Rng rng(3);
  auto qkv = randn(N * 3 * C, rng), g = randn(N * C, rng);
  std::vector<double> out(N * C), att(B * NH * T * T), datt(att.size());
  auto loss = [&] {
    attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH);
    return dot(out, g);
  };
  loss();
  const int D = C / NH;
  // probabilities: rows sum to 1, nothing above the diagonal
  for (int bh = 0; bh < B * NH; ++bh)
    for (int t = 0; t < T; ++t) {
      double s = 0;
      for (int u = 0; u < T; ++u) {
        const double a = att[(bh * T + t) * T + u];
        if (u > t) CHECK(a == 0.0);
        s += a;
      }
      CHECK(s == Approx(1.0).epsilon(1e-12));
    }
  // reference: direct evaluation of softmax(q k^T / sqrt(D)) v for one head
  {
    const int b = 1, h = 1, t = T - 1;
    std::vector<double> sc(t + 1);
    double mx = -1e300, z = 0;
    for (int u = 0; u <= t; ++u) {
      double s = 0;
      for (int d = 0; d < D; ++d)
        s += qkv[(b * T + t) * 3 * C + h * D + d] * qkv[(b * T + u) * 3 * C + C + h * D + d];
      sc[u] = s / std::sqrt(double(D));
      mx = std::max(mx, sc[u]);
    }
    for (auto& s : sc) z += (s = std::exp(s - mx));
    for (int d = 0; d < D; ++d) {
      double y = 0;
      for (int u = 0; u <= t; ++u) y += sc[u] / z * qkv[(b * T + u) * 3 * C + 2 * C + h * D + d];
      CHECK(out[(b * T + t) * C + h * D + d] == Approx(y).epsilon(1e-12));
    }
  }
  std::vector<double> dqkv(N * 3 * C, 0.0);
  attention_backward(dqkv.data(), datt.data(), g.data(), qkv.data(), att.data(), B, T, C, NH);
  CHECK(rel_error(dqkv, fd_grad(loss, qkv.data(), qkv.size())) < kTol);
}

TEST_CASE("gelu_tanh forward and vjp", "[layers][fd]") {
  Rng rng(4);
  auto in = randn(N * F, rng, 2.0), g = randn(N * F, rng);
  std::vector<double> out(in.size());
  auto loss = [&] {
    gelu_forward(out.data(), in.data(), static_cast<int64_t>(in.size()));
    return dot(out, g);
  };
  loss();
  for (size_t i = 0; i < in.size(); ++i) {
    const double z = in[i];
    CHECK(out[i] == Approx(0.5 * z * (1 + std::tanh(std::sqrt(2 / M_PI) * (z + 0.044715 * z * z * z)))).epsilon(1e-14));
  }
  std::vector<double> din(in.size(), 0.0);
  gelu_backward(din.data(), g.data(), in.data(), static_cast<int64_t>(in.size()));
  CHECK(rel_error(din, fd_grad(loss, in.data(), in.size())) < kTol);
}

TEST_CASE("embedding vjp matches finite differences", "[layers][fd]") {
  Rng rng(5);
  const int Tmax = 7;
  std::vector<int32_t> tokens(N);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.next() % V);
  tokens[0] = tokens[3];  // a repeated token accumulates
  auto wte = randn(V * C, rng), wpe = randn(Tmax * C, rng), g = randn(N * C, rng);
  std::vector<double> out(N * C);
  auto loss = [&] {
    embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
    return dot(out, g);
  };
  loss();
  CHECK(out[C + 2] == wte[tokens[1] * C + 2] + wpe[1 * C + 2]);
  std::vector<double> dwte(V * C, 0.0), dwpe(Tmax * C, 0.0);
  embedding_backward(dwte.data(), dwpe.data(), g.data(), tokens.data(), B, T, C);
  CHECK(rel_error(dwte, fd_grad(loss, wte.data(), wte.size())) < kTol);
  CHECK(rel_error(dwpe, fd_grad(loss, wpe.data(), wpe.size())) < kTol);
}

TEST_CASE("cross-entropy with ignored targets", "[layers][fd]") {
  Rng rng(6);
  auto logits = randn(N * V, rng, 3.0);
  std::vector<int32_t> targets(N);
  for (auto& t : targets) t = static_cast<int32_t>(rng.next() % V);
  targets[1] = -1;
  targets[6] = -1;
  auto loss = [&] { return crossentropy_forward_backward<double>(nullptr, logits.data(), targets.data(), N, V); };
  // reference mean over the 8 counted rows
  double ref = 0;
  for (int n = 0; n < N; ++n) {
    if (targets[n] < 0) continue;
    double z = 0;
    for (int v = 0; v < V; ++v) z += std::exp(logits[n * V + v]);
    ref += std::log(z) - logits[n * V + targets[n]];
  }
  CHECK(loss() == Approx(ref / (N - 2)).epsilon(1e-12));
  std::vector<double> d(N * V, 0.0);
  crossentropy_forward_backward(d.data(), logits.data(), targets.data(), N, V);
  CHECK(rel_error(d, fd_grad(loss, logits.data(), logits.size())) < kTol);
  for (int v = 0; v < V; ++v) CHECK(d[1 * V + v] == 0.0);  // ignored row gets no gradient
  std::vector<int32_t> none(N, -1);
  CHECK(crossentropy_forward_backward<double>(nullptr, logits.data(), none.data(), N, V) == 0.0);
}
