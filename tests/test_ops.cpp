// The Llama family's network ops (nn/ops.hpp): RMSNorm and rotary position
// embeddings, on the cpu and reference backends. Their vjps against finite
// differences in double, the formulas by hand, and the two backends' bits
// against each other. The same ops on the CUDA backend are checked in
// test_cuda.cpp where a GPU is visible.
#include <catch2/catch.hpp>
#include <cmath>
#include <memory>
#include <vector>

#include "check.hpp"
#include "flowloop/backend/backend.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace {
// The host backends by name: the cpu backend (fused layers) and the reference
// one.
std::vector<std::pair<const char*, Backend<double>*>> host_backends() {
  static std::unique_ptr<Backend<double>> ref = make_backend<double>(Device::cpu);
  return {{"cpu", &cpu_backend<double>()}, {"reference", ref.get()}};
}
}  // namespace

TEST_CASE("SwiGLU: silu(gate) up on separate and fused rows, its vjp against finite differences", "[ops][swiglu]") {
  const int N = 6, F = 10;
  Rng rng(20);
  int runs = 0;
  for (const auto& nb : host_backends()) {
    const char* name = nb.first;
    Backend<double>* be = nb.second;
    for (const int64_t ld : {int64_t{F}, int64_t{2 * F}}) {  // separate arrays, or one fused [gate | up] row
      INFO(name << ", rows " << ld << " apart");
      auto gu = randn(static_cast<size_t>(N) * 2 * F, rng, 2.0), dout = randn(static_cast<size_t>(N) * F, rng);
      std::vector<double> gate_sep(gu.begin(), gu.begin() + N * F), up_sep(gu.begin() + N * F, gu.end());
      double* gate = ld == F ? gate_sep.data() : gu.data();
      double* up = ld == F ? up_sep.data() : gu.data() + F;
      std::vector<double> y(static_cast<size_t>(N) * F);
      be->swiglu_forward(y.data(), gate, up, N, F, ld);
      for (int n = 0; n < N; ++n)
        for (int i = 0; i < F; ++i) {
          const double g = gate[n * ld + i], u = up[n * ld + i];
          CHECK(y[n * F + i] == Approx(g / (1 + std::exp(-g)) * u).epsilon(1e-14));
        }
      const size_t span = static_cast<size_t>(ld == F ? N * F : N * 2 * F);
      std::vector<double> dgate(span, 0.0), dup(span, 0.0);
      be->swiglu_backward(dgate.data(), ld == F ? dup.data() : dgate.data() + F, dout.data(), gate, up, N, F, ld);
      auto loss = [&] {
        std::vector<double> yy(y.size());
        be->swiglu_forward(yy.data(), gate, up, N, F, ld);
        return dot(yy, dout);
      };
      if (ld == F) {
        CHECK(rel_error(dgate, fd_grad(loss, gate, span)) < 1e-8);
        CHECK(rel_error(dup, fd_grad(loss, up, span)) < 1e-8);
      } else {  // one gradient row [dgate | dup] for one fused row
        CHECK(rel_error(dgate, fd_grad(loss, gu.data(), gu.size())) < 1e-8);
      }
      ++runs;
    }
  }
  CHECK(runs == 4);
  // the two backends' bits, on one input
  Rng r2(19);
  auto g = randn(static_cast<size_t>(N) * F, r2), u = randn(g.size(), r2), d = randn(g.size(), r2);
  std::vector<std::vector<double>> ys, ds;
  for (const auto& nb : host_backends()) {
    Backend<double>* be = nb.second;
    std::vector<double> y(g.size()), dg(g.size(), 0.0), du(g.size(), 0.0);
    be->swiglu_forward(y.data(), g.data(), u.data(), N, F, F);
    be->swiglu_backward(dg.data(), du.data(), d.data(), g.data(), u.data(), N, F, F);
    ys.push_back(y);
    ds.push_back(dg);
    ds.push_back(du);
  }
  CHECK(ys[0] == ys[1]);
  CHECK(ds[0] == ds[2]);
  CHECK(ds[1] == ds[3]);
}

TEST_CASE(
    "RMSNorm: the formula, its vjp against finite differences, and the "
    "same bits on both backends",
    "[ops][rmsnorm]") {
  const int N = 5, C = 12;
  const double eps = 1e-6;
  Rng rng(21);
  auto x = randn(static_cast<size_t>(N) * C, rng), w = randn(C, rng), g = randn(x.size(), rng);
  std::vector<std::vector<double>> outs, dins, dws;
  for (const auto& nb : host_backends()) {
    const char* name = nb.first;
    Backend<double>* be = nb.second;
    INFO(name);
    std::vector<double> y(x.size()), rstd(N), din(x.size(), 0.5), dw(C, 0.25);
    be->rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, C, eps);
    for (int n = 0; n < N; ++n) {  // y = x / sqrt(mean(x^2) + eps) w, row by row
      double ss = 0;
      for (int i = 0; i < C; ++i) ss += x[n * C + i] * x[n * C + i];
      const double r = 1.0 / std::sqrt(ss / C + eps);
      CHECK(rstd[n] == Approx(r).epsilon(1e-15));
      for (int i = 0; i < C; ++i) CHECK(y[n * C + i] == Approx(x[n * C + i] * r * w[i]).epsilon(1e-14));
    }
    be->rmsnorm_backward(din.data(), dw.data(), g.data(), x.data(), w.data(), rstd.data(), N, C);
    // L = <g, y(x, w)>: its gradients against central differences (accumulated
    // onto 0.5 and 0.25)
    auto loss = [&] {
      std::vector<double> yy(x.size()), rr(N);
      be->rmsnorm_forward(yy.data(), rr.data(), x.data(), w.data(), N, C, eps);
      return dot(yy, g);
    };
    std::vector<double> din0(din), dw0(dw);
    for (double& v : din0) v -= 0.5;
    for (double& v : dw0) v -= 0.25;
    CHECK(rel_error(din0, fd_grad(loss, x.data(), x.size())) < 1e-8);
    CHECK(rel_error(dw0, fd_grad(loss, w.data(), w.size())) < 1e-8);
    // null gradients are skipped
    be->rmsnorm_backward(nullptr, nullptr, g.data(), x.data(), w.data(), rstd.data(), N, C);
    outs.push_back(y);
    dins.push_back(din);
    dws.push_back(dw);
  }
  CHECK(outs[0] == outs[1]);
  CHECK(dins[0] == dins[1]);
  CHECK(dws[0] == dws[1]);
}

TEST_CASE(
    "rotary: both conventions by hand, partial rotation, the transpose "
    "is the inverse and the vjp",
    "[ops][rotary]") {
  SECTION(
      "one head of 4 at position 2, theta 100: rotate-half pairs (0, 2), "
      "(1, 3); interleaved (0, 1), (2, 3)") {
    for (const auto& nb : host_backends()) {
      const char* name = nb.first;
      Backend<double>* be = nb.second;
      INFO(name);
      const double a0 = 2.0, a1 = 2.0 * std::pow(100.0, -0.5);  // angles of pairs 0 and 1
      // x laid out as B = 1, T = 3 positions, H = 1 head of D = 4; position 2
      // is the last row
      std::vector<double> x(12, 0.0);
      const double v[4] = {1.0, 2.0, 3.0, 4.0};
      for (int i = 0; i < 4; ++i) x[8 + i] = v[i];
      std::vector<double> half = x, inter = x;
      be->rotary(half.data(), 1, 3, 1, 4, 4, 4, 100.0, false, false);
      CHECK(half[8] == Approx(v[0] * std::cos(a0) - v[2] * std::sin(a0)));
      CHECK(half[10] == Approx(v[2] * std::cos(a0) + v[0] * std::sin(a0)));
      CHECK(half[9] == Approx(v[1] * std::cos(a1) - v[3] * std::sin(a1)));
      CHECK(half[11] == Approx(v[3] * std::cos(a1) + v[1] * std::sin(a1)));
      be->rotary(inter.data(), 1, 3, 1, 4, 4, 4, 100.0, true, false);
      CHECK(inter[8] == Approx(v[0] * std::cos(a0) - v[1] * std::sin(a0)));
      CHECK(inter[9] == Approx(v[1] * std::cos(a0) + v[0] * std::sin(a0)));
      CHECK(inter[10] == Approx(v[2] * std::cos(a1) - v[3] * std::sin(a1)));
      CHECK(inter[11] == Approx(v[3] * std::cos(a1) + v[2] * std::sin(a1)));
      for (int i = 0; i < 4; ++i) CHECK(half[i] == 0.0);  // position 0 is not turned (zeros stay)
    }
  }
  SECTION(
      "interleaved equals rotate-half on the permuted dims; a partial "
      "rotation leaves the rest") {
    for (const auto& nb : host_backends()) {
      const char* name = nb.first;
      Backend<double>* be = nb.second;
      INFO(name);
      const int B = 2, T = 5, H = 3, D = 8;
      Rng rng(22);
      auto x = randn(static_cast<size_t>(B) * T * H * D, rng);
      std::vector<double> perm(x.size());  // dims (0..7) -> (0, 2, 4, 6, 1, 3, 5, 7)
      for (size_t h = 0; h < x.size() / D; ++h)
        for (int i = 0; i < D / 2; ++i) {
          perm[h * D + i] = x[h * D + 2 * i];
          perm[h * D + D / 2 + i] = x[h * D + 2 * i + 1];
        }
      auto a = x, b = perm;
      be->rotary(a.data(), B, T, H, D, H * D, D, 10000.0, true, false);
      be->rotary(b.data(), B, T, H, D, H * D, D, 10000.0, false, false);
      for (size_t h = 0; h < x.size() / D; ++h)
        for (int i = 0; i < D / 2; ++i) {
          CHECK(a[h * D + 2 * i] == b[h * D + i]);
          CHECK(a[h * D + 2 * i + 1] == b[h * D + D / 2 + i]);
        }
      auto p = x;
      be->rotary(p.data(), B, T, H, D, H * D, 4, 10000.0, false,
                 false);  // partial: the first 4 of 8
      for (size_t h = 0; h < x.size() / D; ++h)
        for (int i = 4; i < D; ++i) CHECK(p[h * D + i] == x[h * D + i]);
      CHECK(rel_error(p, x) > 1e-3);
    }
  }
  SECTION(
      "the transpose undoes the turn and is its vjp (rows ld apart, inside "
      "a wider row)") {
    for (const auto& nb : host_backends()) {
      const char* name = nb.first;
      Backend<double>* be = nb.second;
      INFO(name);
      const int B = 2, T = 4, H = 2, D = 6;
      const int64_t ld = 3 * H * D;  // heads of q inside a qkv row
      Rng rng(23);
      auto x = randn(static_cast<size_t>(B) * T * ld, rng), g = randn(x.size(), rng);
      auto y = x;
      be->rotary(y.data(), B, T, H, D, ld, D, 500.0, false, false);
      auto back = y;
      be->rotary(back.data(), B, T, H, D, ld, D, 500.0, false, true);
      CHECK(rel_error(back, x) < 1e-15);
      for (size_t i = 0; i < x.size(); ++i)
        if (static_cast<int64_t>(i) % ld >= H * D) CHECK(y[i] == x[i]);  // the rest of the row is not touched
      // L = <g, R x>: dL/dx = R^T g
      auto dx = g;
      be->rotary(dx.data(), B, T, H, D, ld, D, 500.0, false, true);
      auto loss = [&] {
        auto r = x;
        be->rotary(r.data(), B, T, H, D, ld, D, 500.0, false, false);
        return dot(r, g);
      };
      CHECK(rel_error(dx, fd_grad(loss, x.data(), x.size())) < 1e-8);
    }
  }
  SECTION("bad shapes are refused by name") {
    for (const auto& nb : host_backends()) {
      const char* name = nb.first;
      Backend<double>* be = nb.second;
      INFO(name);
      std::vector<double> x(8, 1.0);
      CHECK_THROWS_WITH(be->rotary(x.data(), 1, 1, 1, 8, 8, 3, 100.0, false, false), Catch::Contains("even"));
      CHECK_THROWS_WITH(be->rotary(x.data(), 1, 1, 1, 8, 8, 10, 100.0, false, false), Catch::Contains("at most"));
      CHECK_THROWS_WITH(be->rotary(x.data(), 1, 1, 1, 8, 8, 8, 0.5, false, false), Catch::Contains("theta"));
    }
  }
  SECTION("the cpu and reference backends give the same bits") {
    const int B = 3, T = 7, H = 4, D = 16;
    Rng rng(24);
    auto x = randn(static_cast<size_t>(B) * T * H * D, rng);
    auto a = x, b = x;
    auto bes = host_backends();
    bes[0].second->rotary(a.data(), B, T, H, D, H * D, 12, 10000.0, false, false);
    bes[1].second->rotary(b.data(), B, T, H, D, H * D, 12, 10000.0, false, false);
    CHECK(a == b);
  }
}

TEST_CASE("Grouped-query attention: equal to multi-head attention on repeated key/value heads, its vjp against "
          "finite differences",
          "[ops][attention][gqa]") {
  const int B = 2, T = 5, D = 3;
  for (const auto& nb : host_backends()) {
    for (const AttnShape a : {AttnShape{4, 2, D}, AttnShape{6, 1, D}, AttnShape{3, 3, D}}) {
      INFO(nb.first << ", NH " << a.NH << ", NKV " << a.NKV);
      Backend<double>* be = nb.second;
      Rng rng(31 + a.NKV);
      const size_t W = static_cast<size_t>(a.width()), Y = static_cast<size_t>(a.q_width());
      const size_t TT = static_cast<size_t>(T) * T;
      auto qkv = randn(static_cast<size_t>(B) * T * W, rng), dy = randn(static_cast<size_t>(B) * T * Y, rng);
      std::vector<double> y(static_cast<size_t>(B) * T * Y), att(static_cast<size_t>(B) * a.NH * TT);
      be->attention_forward(y.data(), att.data(), qkv.data(), B, T, a);
      // the same heads as multi-head attention, every key/value head repeated for its group
      const AttnShape m = AttnShape{a.NH, a.NH, D};
      const size_t Wm = static_cast<size_t>(m.width());
      std::vector<double> full(static_cast<size_t>(B) * T * Wm);
      for (size_t r = 0; r < static_cast<size_t>(B) * T; ++r)
        for (int h = 0; h < a.NH; ++h)
          for (int i = 0; i < D; ++i) {
            const size_t g = static_cast<size_t>(h / a.group());
            full[r * Wm + h * D + i] = qkv[r * W + h * D + i];
            full[r * Wm + m.k_offset() + h * D + i] = qkv[r * W + a.k_offset() + g * D + i];
            full[r * Wm + m.v_offset() + h * D + i] = qkv[r * W + a.v_offset() + g * D + i];
          }
      std::vector<double> ym(y.size()), attm(att.size());
      be->attention_forward(ym.data(), attm.data(), full.data(), B, T, m);
      CHECK(rel_error(y, ym) < 1e-14);
      CHECK(rel_error(att, attm) < 1e-14);
      // the vjp: finite differences of dy . y through q, k and v
      std::vector<double> dqkv(qkv.size(), 0.0), datt(att.size());
      be->attention_backward(dqkv.data(), datt.data(), dy.data(), qkv.data(), att.data(), B, T, a);
      auto loss = [&] {
        std::vector<double> yy(y.size()), aa(att.size());
        be->attention_forward(yy.data(), aa.data(), qkv.data(), B, T, a);
        return dot(yy, dy);
      };
      CHECK(rel_error(dqkv, fd_grad(loss, qkv.data(), qkv.size())) < 1e-8);
      // the vjp accumulates
      std::vector<double> twice(dqkv);
      be->attention_backward(twice.data(), datt.data(), dy.data(), qkv.data(), att.data(), B, T, a);
      for (size_t i = 0; i < twice.size(); ++i) CHECK(twice[i] == Approx(2 * dqkv[i]).epsilon(1e-12).margin(1e-14));
    }
  }
  // heads that do not divide
  std::vector<double> z(1000);
  CHECK_THROWS_WITH(cpu_backend<double>().attention_forward(z.data(), z.data(), z.data(), 1, 2, AttnShape{4, 3, 2}),
                    Catch::Contains("3 key/value heads must divide 4 query heads"));
}
