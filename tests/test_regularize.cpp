// Regularised solves: the kinetic-energy and Jacobian-norm integrals against closed
// forms, Hutchinson's estimate unbiased, their gradients against finite differences
// for every method, and the cost accounting.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "check.hpp"
#include "flowloop/flowloop.hpp"
#include "flowloop/ode/grad.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace {

// y' = A y for G sequences of n values; the parameters are A (n, n) row-major.
class MatrixLinear : public DiffSystem<double> {
 public:
  MatrixLinear(int G, std::vector<double> A) : G_(G), n_(static_cast<size_t>(std::lround(std::sqrt(A.size())))), A_(std::move(A)) {}
  int groups() const override { return G_; }
  size_t dim() const override { return n_; }
  size_t num_params() const override { return A_.size(); }
  void eval(double* d, const double* y, const double*, const int*, int count) override {
    for (int r = 0; r < count; ++r)
      for (size_t i = 0; i < n_; ++i) {
        double s = 0;
        for (size_t j = 0; j < n_; ++j) s += A_[i * n_ + j] * y[r * n_ + j];
        d[r * n_ + i] = s;
      }
  }
  void reserve_slots(int k) override { rec_.resize(static_cast<size_t>(k)); }
  void eval_record(double* d, const double* y, const double* t, const int* ids, int count, int slot) override {
    rec_.at(static_cast<size_t>(slot)).assign(y, y + count * n_);
    eval(d, y, t, ids, count);
  }
  void vjp(double* dy, double* dp, size_t stride, const double* g, int slot) override {
    const auto& y = rec_.at(static_cast<size_t>(slot));
    const size_t count = y.size() / n_;
    for (size_t r = 0; r < count; ++r)
      for (size_t i = 0; i < n_; ++i)
        for (size_t j = 0; j < n_; ++j) {
          dy[r * n_ + j] += A_[i * n_ + j] * g[r * n_ + i];
          dp[r * stride + i * n_ + j] += g[r * n_ + i] * y[r * n_ + j];
        }
  }

 private:
  int G_;
  size_t n_;
  std::vector<double> A_;
  std::vector<std::vector<double>> rec_;
};

GradOptions reg_opts(GradMethod m, double kinetic, double jacobian, uint64_t seed = 1) {
  GradOptions g;
  g.method = m;
  g.kinetic = kinetic;
  g.jacobian = jacobian;
  g.jacobian_fd = 1e-3;
  g.noise_seed = seed;
  return g;
}

Model<double> reg_model(uint64_t seed) {
  Model<double> m(make_config(13, 6, 8, 2, 12, 1, 2));
  Rng rng(seed);
  for (const auto& t : m.layout.tensors()) {
    const bool ln_w = t.name.find("ln_") != std::string::npos && t.name.find(".weight") != std::string::npos;
    for (size_t i = 0; i < t.numel; ++i) m.params[t.offset + i] = (ln_w ? 1.0 : 0.0) + 0.3 * rng.normal();
  }
  return m;
}

struct RegGrad {
  double loss = 0;  // <w, h(t1)> + kinetic R_K + jacobian R_J
  std::vector<double> dh0, dparams;
  GradStats stats;
};

RegGrad reg_grad(Model<double>& m, const std::vector<double>& h0, int B, int T, const SolveOptions& o,
                 const GradOptions& g, const std::vector<double>& w, bool backward = true) {
  FieldSystem<double> sys(m.field, m.field_params(), B, T);
  OdeGradient<double> og(sys, o, g);
  Buffer<double> h(h0.begin(), h0.end());
  REQUIRE(og.forward(h.data()).ok());
  RegGrad r;
  r.stats = og.stats();
  r.loss = dot(std::vector<double>(h.begin(), h.end()), w) + g.kinetic * r.stats.kinetic + g.jacobian * r.stats.jacobian;
  if (!backward) return r;
  r.dh0.assign(h0.size(), 0.0);
  r.dparams.assign(m.field.num_params(), 0.0);
  r.stats = og.backward(w.data(), r.dh0.data(), r.dparams.data());
  REQUIRE(r.stats.ok());
  return r;
}

SolveOptions frozen_dopri5(double t1) {  // adaptive code path, steps independent of the parameters
  SolveOptions o = adaptive_opts("dopri5", t1, 1e6, 1e6);
  o.h0 = 0.1;
  o.hmax = 0.45;
  return o;
}

}  // namespace

TEST_CASE("the regularisers' integrals equal their closed forms on y' = A y", "[grad][regularize]") {
  // diagonal A: y_i = y0_i e^{a_i t}, int ||A y||^2 = sum a_i y0_i^2 (e^{2 a_i t1} - 1) / 2,
  // and J e = A e exactly, so ||J e||^2 = sum a_i^2 for every Rademacher e.
  const std::vector<double> a = {-0.7, 0.3, 1.1};
  std::vector<double> A(9, 0.0);
  for (int i = 0; i < 3; ++i) A[i * 4] = a[i];
  const std::vector<double> y0 = {1.0, -2.0, 0.5, 0.25, 1.5, -1.0};  // two sequences
  const double t1 = 1.3;
  double kin = 0, jac = 0;
  for (int g = 0; g < 2; ++g)
    for (int i = 0; i < 3; ++i) kin += a[i] * y0[g * 3 + i] * y0[g * 3 + i] * (std::exp(2 * a[i] * t1) - 1) / 2 / 3 / 2;
  for (int i = 0; i < 3; ++i) jac += a[i] * a[i] * t1 / 3;
  for (GradMethod method : {GradMethod::Backprop, GradMethod::Checkpoint, GradMethod::Adjoint}) {
    for (bool coupled : {false, true}) {
      MatrixLinear sys(2, A);
      SolveOptions o = adaptive_opts("dopri5", t1, 1e-11, 1e-11);
      o.batch_coupled = coupled;
      OdeGradient<double> og(sys, o, reg_opts(method, 1.0, 1.0));
      std::vector<double> y = y0;
      REQUIRE(og.forward(y.data()).ok());
      INFO(grad_method_name(method) << (coupled ? " coupled" : ""));
      CHECK(og.stats().kinetic == Approx(kin).epsilon(1e-8));
      CHECK(og.stats().jacobian == Approx(jac).epsilon(1e-9));
      for (int g = 0; g < 2; ++g)  // the state itself is the unregularised solution
        for (int i = 0; i < 3; ++i) CHECK(y[g * 3 + i] == Approx(y0[g * 3 + i] * std::exp(a[i] * t1)).epsilon(1e-9));
    }
  }
}

TEST_CASE("Hutchinson's estimate is unbiased for the Jacobian's Frobenius norm", "[grad][regularize]") {
  Rng rng(3);
  const std::vector<double> A = randn(16, rng);
  double fro = 0;
  for (double x : A) fro += x * x;
  const double t1 = 0.5;
  double mean = 0, mean_sq = 0;
  const int draws = 2000;
  for (int s = 0; s < draws; ++s) {
    MatrixLinear sys(1, A);
    OdeGradient<double> og(sys, fixed_opts("euler", t1, 1), reg_opts(GradMethod::Backprop, 0.0, 1.0, static_cast<uint64_t>(s)));
    std::vector<double> y = {1.0, 0.0, 0.0, 0.0};
    REQUIRE(og.forward(y.data()).ok());
    const double est = og.stats().jacobian * 4 / t1;  // ||A e||^2 of this draw
    mean += est / draws;
    mean_sq += est * est / draws;
  }
  const double stderr_mean = std::sqrt((mean_sq - mean * mean) / draws);
  INFO("mean " << mean << " vs ||A||_F^2 " << fro << " (standard error " << stderr_mean << ")");
  CHECK(std::fabs(mean - fro) < 4 * stderr_mean);
  CHECK(stderr_mean < 0.05 * fro);
  CHECK(mean_sq - mean * mean > 0);  // the draws differ: the seed is used
}

TEST_CASE("regularised gradients match finite differences for every method", "[grad][regularize][fd]") {
  Model<double> m = reg_model(4);
  const int B = 2, T = 4;
  Rng rng(8);
  auto h0 = randn(static_cast<size_t>(B) * T * 8, rng), w = randn(h0.size(), rng);
  for (const SolveOptions& base : {fixed_opts("rk4", 1.2, 3), frozen_dopri5(1.2)})
    for (bool coupled : {false, true})
      for (GradMethod method : {GradMethod::Backprop, GradMethod::Checkpoint}) {
        SolveOptions o = base;
        o.batch_coupled = coupled;
        const GradOptions g = reg_opts(method, 0.7, 0.3);
        const RegGrad r = reg_grad(m, h0, B, T, o, g, w);
        INFO(o.method << (coupled ? " coupled " : " ") << grad_method_name(method));
        CHECK(r.stats.kinetic > 0);
        CHECK(r.stats.jacobian > 0);
        auto loss = [&] { return reg_grad(m, h0, B, T, o, g, w, false).loss; };
        CHECK(rel_error(r.dh0, fd_grad(loss, h0.data(), h0.size())) < 1e-6);
        const size_t P = m.field.num_params();
        CHECK(rel_error(r.dparams, fd_grad(loss, m.params.data() + m.layout.field_begin(), P)) < 1e-6);
      }
}

TEST_CASE("regularised gradients: backprop, checkpoint and adjoint agree", "[grad][regularize][adjoint]") {
  Model<double> m = reg_model(5);
  const int B = 3, T = 4;
  Rng rng(9);
  auto h0 = randn(static_cast<size_t>(B) * T * 8, rng), w = randn(h0.size(), rng);
  const GradOptions gb = reg_opts(GradMethod::Backprop, 0.5, 0.2, 7);
  const SolveOptions o = adaptive_opts("dopri5", 1.5, 1e-9, 1e-9);
  const RegGrad bp = reg_grad(m, h0, B, T, o, gb, w);
  GradOptions gc = gb, ga = gb;
  gc.method = GradMethod::Checkpoint;
  ga.method = GradMethod::Adjoint;
  const RegGrad cp = reg_grad(m, h0, B, T, o, gc, w);
  const RegGrad adj = reg_grad(m, h0, B, T, o, ga, w);
  CHECK(rel_error(bp.dh0, cp.dh0) < 1e-12);
  CHECK(rel_error(bp.dparams, cp.dparams) < 1e-12);
  CHECK(rel_error(adj.dh0, bp.dh0) < 1e-6);
  CHECK(rel_error(adj.dparams, bp.dparams) < 1e-6);
  // the regularisers change the gradient (it is not the plain one)
  const RegGrad plain = reg_grad(m, h0, B, T, o, reg_opts(GradMethod::Backprop, 0.0, 0.0), w);
  CHECK(rel_error(plain.dparams, bp.dparams) > 1e-3);
  // the Jacobian term costs a second field evaluation per stage, and leaves the steps alone
  CHECK(bp.stats.nfe_forward == 2 * plain.stats.nfe_forward);
  CHECK(bp.stats.forward_stats.steps == plain.stats.forward_stats.steps);
  const RegGrad kin = reg_grad(m, h0, B, T, o, reg_opts(GradMethod::Backprop, 0.5, 0.0), w);
  CHECK(kin.stats.nfe_forward == plain.stats.nfe_forward);
  CHECK(kin.stats.jacobian == 0.0);
}

TEST_CASE("regulariser options are checked", "[grad][regularize][errors]") {
  MatrixLinear sys(1, {0.5});
  CHECK_THROWS_WITH(OdeGradient<double>(sys, fixed_opts("rk4", 1.0, 2), reg_opts(GradMethod::Backprop, NAN, 0.0)),
                    Catch::Contains("regulariser weights must be finite"));
  GradOptions g = reg_opts(GradMethod::Backprop, 0.0, 1.0);
  g.jacobian_fd = 0.0;  // the default step
  CHECK_NOTHROW(OdeGradient<double>(sys, fixed_opts("rk4", 1.0, 2), g));
  g.jacobian_fd = -1e-3;
  CHECK_THROWS_WITH(OdeGradient<double>(sys, fixed_opts("rk4", 1.0, 2), g), Catch::Contains("difference step"));
  SolveOptions o = adaptive_opts("dopri5", 1.0, 1e-6, 1e-6);
  o.norm_period = 1;
  o.norm_dims = 1;
  CHECK_THROWS_WITH(OdeGradient<double>(sys, o, reg_opts(GradMethod::Backprop, 1.0, 0.0)),
                    Catch::Contains("norm_dims"));
}
