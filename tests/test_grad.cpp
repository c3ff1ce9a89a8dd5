// Gradients through the solve: every solver and method against finite differences,
// backprop == checkpoint, loop == Euler, the adjoint's convergence, failures, memory.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "check.hpp"
#include "grad_check.hpp"
#include "flowloop/flowloop.hpp"
#include "flowloop/ode/grad.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace {

GradOptions grad_opts(GradMethod m) {
  GradOptions g;
  g.method = m;
  return g;
}

Model<double> grad_model(uint64_t seed, int L = 1) {
  Model<double> m(make_config(13, 6, 8, 2, 12, L, 2));
  Rng rng(seed);
  for (const auto& t : m.layout.tensors()) {
    const bool ln_w = t.name.find("ln_") != std::string::npos && t.name.find(".weight") != std::string::npos;
    for (size_t i = 0; i < t.numel; ++i) m.params[t.offset + i] = (ln_w ? 1.0 : 0.0) + 0.3 * rng.normal();
  }
  return m;
}



void check_against_fd(Model<double>& m, const SolveOptions& o, GradMethod method, double tol) {
  const int B = 2, T = 5;
  Rng rng(77);
  auto h0 = randn(static_cast<size_t>(B) * T * 8, rng), w = randn(h0.size(), rng);
  const Grads g = ode_grad(m, h0, B, T, o, method, w);
  INFO("solver " << o.method << (o.adaptive ? " (adaptive)" : " (fixed)") << ", method " << grad_method_name(method));
  auto loss_h = [&] { return ode_loss(m, h0, B, T, o, w); };
  CHECK(rel_error(g.dh0, fd_grad(loss_h, h0.data(), h0.size())) < tol);
  for (const auto& t : m.layout.tensors()) {
    if (t.offset < m.layout.field_begin() || t.offset >= m.layout.field_end()) continue;
    INFO(t.name);
    const size_t off = t.offset - m.layout.field_begin();
    std::vector<double> an(g.dparams.begin() + static_cast<long>(off), g.dparams.begin() + static_cast<long>(off + t.numel));
    CHECK(rel_error(an, fd_grad(loss_h, m.params.data() + t.offset, t.numel)) < tol);
  }
}

}  // namespace

TEST_CASE("backprop and checkpoint match finite differences for every solver", "[grad][fd]") {
  Model<double> m = grad_model(1);
  for (const auto& name : tableau_names()) {
    const ButcherTableau& tab = tableau(name);
    for (GradMethod method : {GradMethod::Backprop, GradMethod::Checkpoint}) {
      check_against_fd(m, fixed_opts(name, 1.5, 3), method, 1e-6);
      if (tab.adaptive()) check_against_fd(m, frozen_adaptive(name, 1.5), method, 1e-6);
    }
  }
}

TEST_CASE("backprop through two blocks and per-sequence steps", "[grad][fd]") {
  Model<double> m = grad_model(2, 2);
  check_against_fd(m, fixed_opts("rk4", 1.0, 2), GradMethod::Backprop, 1e-6);
  check_against_fd(m, frozen_adaptive("dopri5", 1.0), GradMethod::Checkpoint, 1e-6);
}

TEST_CASE("backprop equals checkpoint to rounding on real adaptive solves", "[grad]") {
  Model<double> m = grad_model(3);
  const int B = 3, T = 5;
  Rng rng(5);
  auto h0 = randn(static_cast<size_t>(B) * T * 8, rng), w = randn(h0.size(), rng);
  for (const char* method : {"dopri5", "bosh3", "tsit5"})
    for (bool coupled : {false, true}) {
      SolveOptions o = adaptive_opts(method, 2.0, 1e-6, 1e-6);
      o.batch_coupled = coupled;
      const Grads a = ode_grad(m, h0, B, T, o, GradMethod::Backprop, w);
      const Grads c = ode_grad(m, h0, B, T, o, GradMethod::Checkpoint, w);
      INFO(method << (coupled ? " coupled" : " per-sequence") << ": forward nfe " << a.stats.nfe_forward);
      CHECK(a.stats.nfe_forward > 8);
      CHECK(rel_error(a.dh0, c.dh0) < 1e-12);
      CHECK(rel_error(a.dparams, c.dparams) < 1e-12);
      CHECK(c.stats.recompute_calls > 0);
      CHECK(a.stats.recompute_calls == 0);
    }
}

TEST_CASE("per-sequence gradients equal each sequence's own", "[grad]") {
  Model<double> m = grad_model(4);
  const int B = 3, T = 5;
  const size_t n = static_cast<size_t>(T) * 8;
  Rng rng(6);
  auto h0 = randn(B * n, rng), w = randn(B * n, rng);
  for (size_t i = n; i < 2 * n; ++i) h0[i] *= 3.0;  // sequence 1 is harder
  const SolveOptions o = adaptive_opts("dopri5", 2.0, 1e-7, 1e-7);
  const Grads all = ode_grad(m, h0, B, T, o, GradMethod::Backprop, w);
  std::vector<double> psum(m.field.num_params(), 0.0);
  for (int b = 0; b < B; ++b) {
    std::vector<double> hb(h0.begin() + static_cast<long>(b * n), h0.begin() + static_cast<long>((b + 1) * n));
    std::vector<double> wb(w.begin() + static_cast<long>(b * n), w.begin() + static_cast<long>((b + 1) * n));
    const Grads one = ode_grad(m, hb, 1, T, o, GradMethod::Backprop, wb);
    CHECK(rel_error(one.dh0, std::vector<double>(all.dh0.begin() + static_cast<long>(b * n),
                                                 all.dh0.begin() + static_cast<long>((b + 1) * n))) < 1e-10);
    for (size_t i = 0; i < psum.size(); ++i) psum[i] += one.dparams[i];
  }
  CHECK(rel_error(psum, all.dparams) < 1e-10);
}

TEST_CASE("the K-loop gradient equals Euler backprop with K steps", "[grad][loop]") {
  Model<double> m = grad_model(7);
  const int B = 2, T = 4, K = 3;
  TokenBatch tokens, targets;
  tokens.B = targets.B = B;
  tokens.T = targets.T = T;
  Rng rng(8);
  for (int i = 0; i < B * T; ++i) {
    tokens.data.push_back(static_cast<int32_t>(rng.next() % 13));
    targets.data.push_back(i == 3 ? -1 : static_cast<int32_t>(rng.next() % 13));
  }
  std::vector<double> g_loop(m.params.size(), 0.0), g_ode(m.params.size(), 0.0);
  LoopWork<double> w;
  const double l_loop = m.loop_loss_and_grad(tokens, targets, K, g_loop.data(), w);
  GradStats st;
  GradOptions go;
  go.method = GradMethod::Backprop;
  OdeWork<double> ow;
  const double l_ode = m.ode_loss_and_grad(tokens, targets, fixed_opts("euler", K, K), go, g_ode.data(), st, ow);
  REQUIRE(st.ok());
  CHECK(l_ode == l_loop);
  CHECK(rel_error(g_loop, g_ode) < 1e-12);
  CHECK(st.nfe_forward == K);
}

TEST_CASE("truncated backprop: the last k steps of each sequence, backprop equal to checkpoint", "[grad][truncate]") {
  Model<double> m = grad_model(11);
  const int B = 3, T = 5;
  const size_t n = static_cast<size_t>(T) * 8;
  Rng rng(12);
  auto h0 = randn(B * n, rng), w = randn(B * n, rng);
  for (size_t i = n; i < 2 * n; ++i) h0[i] *= 3.0;  // sequence 1 takes more steps
  GradOptions g;
  g.truncate = 2;
  SECTION("per-sequence adaptive steps: backprop equals checkpoint, and dL/dy(t0) is cut") {
    const SolveOptions o = adaptive_opts("dopri5", 2.0, 1e-6, 1e-6);
    const Grads a = ode_grad(m, h0, B, T, o, GradMethod::Backprop, w, g);
    const Grads c = ode_grad(m, h0, B, T, o, GradMethod::Checkpoint, w, g);
    const Grads full = ode_grad(m, h0, B, T, o, GradMethod::Backprop, w);
    CHECK(rel_error(a.dparams, c.dparams) < 1e-12);
    CHECK(rel_error(a.dparams, full.dparams) > 1e-6);  // the truncation changes the gradient
    for (int b = 0; b < B; ++b) {
      INFO("sequence " << b << ": " << a.stats.forward_stats.seq[b].accepted << " steps");
      REQUIRE(a.stats.forward_stats.seq[b].accepted > 2);
      for (size_t i = 0; i < n; ++i) {
        CHECK(a.dh0[b * n + i] == 0.0);
        CHECK(c.dh0[b * n + i] == 0.0);
      }
    }
  }
  SECTION("fixed steps: the gradient of the last k steps is the full gradient of a solve from the state they start at") {
    const double H = 0.4;
    const SolveOptions o = fixed_opts("rk4", 5 * H, 5);
    const Grads a = ode_grad(m, h0, B, T, o, GradMethod::Backprop, w, g);
    FieldSystem<double> sys(m.field, m.field_params(), B, T);
    Buffer<double> y3(h0.begin(), h0.end());
    REQUIRE(integrate(sys, y3.data(), fixed_opts("rk4", 3 * H, 3)).ok());
    SolveOptions tail = fixed_opts("rk4", 5 * H, 2);
    tail.t0 = 3 * H;
    const Grads t = ode_grad(m, std::vector<double>(y3.begin(), y3.end()), B, T, tail, GradMethod::Backprop, w);
    CHECK(a.loss == Approx(t.loss).epsilon(1e-13));
    CHECK(rel_error(a.dparams, t.dparams) < 1e-10);
  }
  SECTION("the adjoint has no steps to truncate") {
    GradOptions ga = g;
    ga.method = GradMethod::Adjoint;
    FieldSystem<double> sys(m.field, m.field_params(), B, T);
    CHECK_THROWS_WITH(OdeGradient<double>(sys, adaptive_opts("dopri5", 1.0, 1e-6, 1e-6), ga),
                      Catch::Contains("truncate"));
  }
}

TEST_CASE("cotangents at every step of a fixed-step solve match finite differences", "[grad][steps]") {
  // L = sum_k <w_k, y_k> over the states after steps 1..N: a loss that reads every state
  Model<double> m = grad_model(13);
  const int B = 2, T = 5, N = 4;
  const size_t n = static_cast<size_t>(T) * 8, G = static_cast<size_t>(B) * n;
  Rng rng(14);
  auto h0 = randn(G, rng), w = randn((N + 1) * G, rng);
  std::fill(w.begin(), w.begin() + static_cast<long>(G), 0.0);  // row 0 is never read
  SolveOptions o = fixed_opts("rk4", 1.6, N);
  o.save = SaveKind::Steps;
  auto loss = [&] {
    FieldSystem<double> sys(m.field, m.field_params(), B, T);
    Buffer<double> h(h0.begin(), h0.end());
    const auto r = integrate(sys, h.data(), o);
    REQUIRE(r.ok());
    double l = 0;
    for (int k = 1; k <= N; ++k)
      for (int b = 0; b < B; ++b)
        for (size_t i = 0; i < n; ++i)
          l += w[(static_cast<size_t>(k) * B + b) * n + i] * r.step_states[b][static_cast<size_t>(k) * n + i];
    return l;
  };
  std::map<GradMethod, std::pair<std::vector<double>, std::vector<double>>> got;
  for (GradMethod method : {GradMethod::Backprop, GradMethod::Checkpoint}) {
    FieldSystem<double> sys(m.field, m.field_params(), B, T);
    OdeGradient<double> og(sys, o, grad_opts(method));
    Buffer<double> h(h0.begin(), h0.end());
    REQUIRE(og.forward(h.data()).ok());
    std::vector<double> dh0(G, 0.0), dp(m.field.num_params(), 0.0);
    REQUIRE(og.backward(w.data() + N * G, dh0.data(), dp.data(), w.data()).ok());
    got[method] = {dh0, dp};
  }
  CHECK(rel_error(got[GradMethod::Backprop].first, got[GradMethod::Checkpoint].first) < 1e-12);
  CHECK(rel_error(got[GradMethod::Backprop].second, got[GradMethod::Checkpoint].second) < 1e-12);
  CHECK(rel_error(got[GradMethod::Backprop].first, fd_grad(loss, h0.data(), h0.size())) < 1e-6);
  const size_t f0 = m.layout.field_begin();
  for (const auto& t : m.layout.tensors()) {
    if (t.offset < f0 || t.offset >= m.layout.field_end()) continue;
    INFO(t.name);
    const std::vector<double>& dp = got[GradMethod::Backprop].second;
    std::vector<double> an(dp.begin() + static_cast<long>(t.offset - f0), dp.begin() + static_cast<long>(t.offset - f0 + t.numel));
    CHECK(rel_error(an, fd_grad(loss, m.params.data() + t.offset, t.numel)) < 1e-6);
  }
  // adaptive solves have no common steps to read
  FieldSystem<double> sys(m.field, m.field_params(), B, T);
  OdeGradient<double> og(sys, adaptive_opts("dopri5", 1.0, 1e-6, 1e-6), grad_opts(GradMethod::Backprop));
  Buffer<double> h(h0.begin(), h0.end());
  REQUIRE(og.forward(h.data()).ok());
  std::vector<double> dh0(G), dp(m.field.num_params());
  CHECK_THROWS_WITH(og.backward(w.data() + N * G, dh0.data(), dp.data(), w.data()), Catch::Contains("fixed-step"));
}

TEST_CASE("truncation and per-step cotangents: what they cannot apply to is refused by name", "[grad][truncate][steps]") {
  Model<double> m = grad_model(15);
  const int B = 2, T = 5;
  const size_t G = static_cast<size_t>(B) * T * 8;
  FieldSystem<double> sys(m.field, m.field_params(), B, T);
  GradOptions neg;
  neg.truncate = -1;
  CHECK_THROWS_WITH(OdeGradient<double>(sys, fixed_opts("rk4", 1.0, 2), neg), Catch::Contains("truncate must be >= 0"));
  Rng rng(16);
  auto h0 = randn(G, rng), w = randn(3 * G, rng);
  auto backward_with_steps = [&](const SolveOptions& o, const GradOptions& g) {
    OdeGradient<double> og(sys, o, g);
    Buffer<double> h(h0.begin(), h0.end());
    REQUIRE(og.forward(h.data()).ok());
    std::vector<double> dh0(G), dp(m.field.num_params());
    og.backward(w.data() + 2 * G, dh0.data(), dp.data(), w.data());
  };
  CHECK_THROWS_WITH(backward_with_steps(fixed_opts("rk4", 1.0, 2), grad_opts(GradMethod::Adjoint)),
                    Catch::Contains("not the adjoint"));
  GradOptions reg;
  reg.kinetic = 0.1;
  CHECK_THROWS_WITH(backward_with_steps(fixed_opts("rk4", 1.0, 2), reg), Catch::Contains("plain per-sequence solve"));
  SolveOptions coupled = adaptive_opts("dopri5", 1.0, 1e-6, 1e-6);
  coupled.batch_coupled = true;
  CHECK_THROWS_WITH(backward_with_steps(coupled, grad_opts(GradMethod::Backprop)), Catch::Contains("plain per-sequence solve"));
}

TEST_CASE("the adjoint converges to the discrete gradient as tolerances tighten", "[grad][adjoint]") {
  Model<double> m = grad_model(9);
  const int B = 2, T = 5;
  Rng rng(10);
  auto h0 = randn(static_cast<size_t>(B) * T * 8, rng), w = randn(h0.size(), rng);
  std::vector<double> errs;
  for (double tol : {1e-3, 1e-5, 1e-7, 1e-9}) {
    const SolveOptions o = adaptive_opts("dopri5", 2.0, tol, tol);
    const Grads bp = ode_grad(m, h0, B, T, o, GradMethod::Backprop, w);
    const Grads adj = ode_grad(m, h0, B, T, o, GradMethod::Adjoint, w);
    std::vector<double> a = adj.dh0, b = bp.dh0;
    a.insert(a.end(), adj.dparams.begin(), adj.dparams.end());
    b.insert(b.end(), bp.dparams.begin(), bp.dparams.end());
    errs.push_back(rel_error(a, b));
    INFO("tol " << tol << ": adjoint vs backprop " << errs.back() << ", backward nfe " << adj.stats.nfe_backward);
    CHECK(adj.stats.ok());
    CHECK(adj.stats.vjp_calls > 0);
  }
  for (size_t i = 1; i < errs.size(); ++i) CHECK(errs[i] < errs[i - 1]);
  CHECK(errs.back() < 1e-6);
  CHECK(errs.front() > 10 * errs.back());
  // fixed steps: the adjoint with RK4 is close to the discrete gradient too
  const Grads bp = ode_grad(m, h0, B, T, fixed_opts("rk4", 2.0, 40), GradMethod::Backprop, w);
  const Grads adj = ode_grad(m, h0, B, T, fixed_opts("rk4", 2.0, 40), GradMethod::Adjoint, w);
  CHECK(rel_error(adj.dh0, bp.dh0) < 1e-5);
  // seminorm: the parameter adjoint left out of the error control, no more steps
  GradOptions semi;
  semi.seminorm = true;
  const SolveOptions o = adaptive_opts("dopri5", 2.0, 1e-6, 1e-6);
  const Grads full = ode_grad(m, h0, B, T, o, GradMethod::Adjoint, w);
  const Grads sn = ode_grad(m, h0, B, T, o, GradMethod::Adjoint, w, semi);
  CHECK(sn.stats.nfe_backward <= full.stats.nfe_backward);
  CHECK(rel_error(sn.dh0, full.dh0) < 1e-4);
  // coupled adjoint (one shared parameter adjoint)
  SolveOptions oc = o;
  oc.batch_coupled = true;
  const Grads cp = ode_grad(m, h0, B, T, oc, GradMethod::Adjoint, w);
  CHECK(rel_error(cp.dparams, full.dparams) < 1e-4);
}

namespace {
// y' = theta * y (element-wise), with a vjp that turns NaN for t >= t_nan.
class NanLinear : public DiffSystem<double> {
 public:
  NanLinear(size_t n, double t_nan) : n_(n), t_nan_(t_nan), theta_(n, -0.5) {}
  int groups() const override { return 1; }
  size_t dim() const override { return n_; }
  size_t num_params() const override { return n_; }
  void eval(double* d, const double* y, const double*, const int*, int) override {
    for (size_t i = 0; i < n_; ++i) d[i] = theta_[i] * y[i];
  }
  void reserve_slots(int n) override { rec_.resize(static_cast<size_t>(n)); }
  void eval_record(double* d, const double* y, const double* t, const int* ids, int count, int slot) override {
    rec_[static_cast<size_t>(slot)] = {t[0], std::vector<double>(y, y + n_)};
    eval(d, y, t, ids, count);
  }
  void vjp(double* dy, double* dp, size_t, const double* g, int slot) override {
    const auto& r = rec_[static_cast<size_t>(slot)];
    for (size_t i = 0; i < n_; ++i) {
      dy[i] += r.t >= t_nan_ ? std::nan("") : theta_[i] * g[i];
      dp[i] += r.y[i] * g[i];
    }
  }

 private:
  struct Rec {
    double t = 0;
    std::vector<double> y;
  };
  size_t n_;
  double t_nan_;
  std::vector<double> theta_;
  std::vector<Rec> rec_;
};
}  // namespace

TEST_CASE("a NaN in the backward pass fails with a clear status", "[grad][errors]") {
  for (GradMethod method : {GradMethod::Backprop, GradMethod::Checkpoint, GradMethod::Adjoint}) {
    NanLinear sys(3, 0.5);
    OdeGradient<double> og(sys, adaptive_opts("dopri5", 1.0, 1e-6, 1e-6), grad_opts(method));
    std::vector<double> y = {1.0, 2.0, 3.0}, g1 = {1.0, 1.0, 1.0}, g0(3), gp(3, 0.0);
    REQUIRE(og.forward(y.data()).ok());
    const GradStats& st = og.backward(g1.data(), g0.data(), gp.data());
    INFO(grad_method_name(method) << ": " << st.message);
    CHECK(st.status == SolveStatus::NonFinite);
    CHECK_THAT(st.message, Catch::Contains("non-finite"));
    if (method != GradMethod::Adjoint) CHECK_THAT(st.message, Catch::Contains("backward pass at t = "));
  }
  // without NaN the same system's gradient is exact: y(1) = y0 e^{theta}
  NanLinear sys(3, 1e9);
  OdeGradient<double> og(sys, adaptive_opts("dopri5", 1.0, 1e-10, 1e-10), grad_opts(GradMethod::Backprop));
  std::vector<double> y = {1.0, 2.0, 3.0}, g1 = {1.0, 1.0, 1.0}, g0(3), gp(3, 0.0);
  og.forward(y.data());
  REQUIRE(og.backward(g1.data(), g0.data(), gp.data()).ok());
  for (int i = 0; i < 3; ++i) {
    CHECK(g0[i] == Approx(std::exp(-0.5)).epsilon(1e-8));
    CHECK(gp[i] == Approx((i + 1) * std::exp(-0.5)).epsilon(1e-8));  // d/dtheta y0 e^theta
  }
  CHECK_THROWS_WITH(grad_method("reverse"), Catch::Contains("unknown gradient method 'reverse'"));
}

TEST_CASE("memory: adjoint flat in the steps, checkpoint under backprop", "[grad][memory]") {
  Model<double> m = grad_model(11);
  const int B = 2, T = 6;
  Rng rng(12);
  auto h0 = randn(static_cast<size_t>(B) * T * 8, rng), w = randn(h0.size(), rng);
  std::map<std::string, std::vector<size_t>> peak;
  std::vector<int64_t> nfe;
  for (int steps : {4, 40}) {
    for (GradMethod method : {GradMethod::Backprop, GradMethod::Checkpoint, GradMethod::Adjoint}) {
      const Grads g = ode_grad(m, h0, B, T, fixed_opts("rk4", 2.0, steps), method, w);
      peak[grad_method_name(method)].push_back(g.stats.peak_bytes);
      if (method == GradMethod::Backprop) nfe.push_back(g.stats.nfe_forward);
    }
  }
  CHECK(nfe[1] >= 10 * nfe[0] - 10);
  const auto& a = peak["adjoint"];
  const auto& b = peak["backprop"];
  const auto& c = peak["checkpoint"];
  INFO("adjoint " << a[0] << " -> " << a[1] << ", checkpoint " << c[0] << " -> " << c[1] << ", backprop " << b[0] << " -> " << b[1]);
  CHECK(static_cast<double>(a[1]) <= 1.2 * static_cast<double>(a[0]));
  CHECK(c[1] > c[0]);
  CHECK(c[1] < b[1] / 2);
  CHECK(b[1] > 5 * b[0]);
}

TEST_CASE("flowloop grad writes the gradients under the checkpoint's names", "[grad][cli]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("flowloop_cli_grad_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string cli = FLOWLOOP_CLI, model = (dir / "m.safetensors").string(), tok = (dir / "t.json").string(),
                    out = (dir / "g.safetensors").string();
  int rc = 0;
  run_command(cli + " init --vocab 11 --context 6 --d-model 8 --n-head 2 --n-block 1 --depth 2 --seed 5 --dtype f64 -o " + model, &rc);
  REQUIRE(rc == 0);
  std::ofstream(tok) << R"({"tokens": [[1, 2, 3, 4], [5, 6, 7, 8]], "targets": [[2, 3, 4, -1], [6, 7, 8, 9]]})";
  for (const char* method : {"backprop", "checkpoint", "adjoint"}) {
    std::string o = run_command(cli + " grad -m " + model + " --tokens " + tok + " --solver dopri5 --rtol 1e-8 --atol 1e-8 --grad " +
                                    method + " --precision f64 -o " + out, &rc);
    REQUIRE(rc == 0);
    const auto j = nlohmann::json::parse(o);
    CHECK(j["status"] == "success");
    CHECK(j["nfe_forward"].get<int>() > 0);
    CHECK(j["nfe_backward"].get<int>() > 0);
    CHECK(j["peak_bytes"].get<int64_t>() > 0);
    // the file holds the library's gradient
    Model<double> m = load_model<double>(model);
    Model<double> g = load_model<double>(out);
    TokenBatch tb = read_token_file(tok, "tokens"), tg = read_token_file(tok, "targets");
    std::vector<double> ref(m.params.size(), 0.0);
    GradStats st;
    SolveOptions so;
    so.method = "dopri5";
    so.adaptive = true;
    so.rtol = so.atol = 1e-8;
    so.t1 = 2.0;
    OdeWork<double> ow;
    const double loss = m.ode_loss_and_grad(tb, tg, so, grad_opts(grad_method(method)), ref.data(), st, ow);
    CHECK(j["loss"].get<double>() == Approx(loss).epsilon(1e-12));
    CHECK(rel_error(std::vector<double>(g.params.begin(), g.params.end()), ref) < 1e-12);
  }
  std::string o = run_command(cli + " grad -m " + model + " --tokens " + tok + " --loops 2 -o " + out, &rc);
  REQUIRE(rc == 0);
  CHECK(nlohmann::json::parse(o)["nfe_forward"] == 2);
  std::ofstream(tok) << R"({"tokens": [[1, 2, 3, 4]]})";
  o = run_command(cli + " grad -m " + model + " --tokens " + tok + " -o " + out, &rc);
  CHECK(rc != 0);
  CHECK(o.find("has no \"targets\" field") != std::string::npos);
  fs::remove_all(dir);
}
