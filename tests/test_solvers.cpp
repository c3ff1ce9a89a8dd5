// Solvers: tableaus, convergence orders, the classical code's step counts, the
// odeint oracle, dense output, failure paths, per-sequence adaptivity, loop == Euler.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>
#include <unsupported/Eigen/MatrixFunctions>

#include "check.hpp"
#include "flowloop/flowloop.hpp"
#include "flowloop/ode/problems.hpp"
#include "flowloop/ode/solver.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace {

// y' = A y, a damped rotation coupled to a decaying mode: smooth, non-trivial.
Eigen::Matrix4d test_matrix() {
  Eigen::Matrix4d A;
  A << -0.1, 1.0, 0.2, 0.0,
       -1.0, -0.1, 0.0, 0.3,
        0.0, 0.2, -0.5, 0.4,
        0.1, 0.0, -0.4, -0.3;
  return A;
}

FunctionSystem linear_system(int groups = 1) {
  const Eigen::Matrix4d A = test_matrix();
  return FunctionSystem(
      [A](double, const double* y, double* d) {
        Eigen::Map<Eigen::Vector4d> out(d);
        out = A * Eigen::Map<const Eigen::Vector4d>(y);
      },
      4, groups);
}

const std::vector<double> kY0 = {1.0, 0.5, -0.3, 0.8};

Eigen::Vector4d exact(double t) { return (test_matrix() * t).exp() * Eigen::Map<const Eigen::Vector4d>(kY0.data()); }

double slope(const std::vector<double>& x, const std::vector<double>& y) {
  const double n = static_cast<double>(x.size());
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    sx += x[i];
    sy += y[i];
    sxx += x[i] * x[i];
    sxy += x[i] * y[i];
  }
  return (n * sxy - sx * sy) / (n * sxx - sx * sx);
}

ModelConfig field_config() { return make_config(17, 8, 16, 2, 0, 1); }

// A model with O(1) weights, so that the field is far from zero.
Model<double> field_model(uint64_t seed) {
  Model<double> m(field_config());
  Rng rng(seed);
  for (const auto& t : m.layout.tensors()) {
    const bool ln_w = t.name.find("ln_") != std::string::npos && t.name.find(".weight") != std::string::npos;
    for (size_t i = 0; i < t.numel; ++i) m.params[t.offset + i] = (ln_w ? 1.0 : 0.0) + 0.2 * rng.normal();
  }
  return m;
}

TokenBatch tokens_of(std::vector<std::vector<int>> rows) {
  TokenBatch tb;
  tb.B = static_cast<int>(rows.size());
  tb.T = static_cast<int>(rows[0].size());
  for (auto& r : rows)
    for (int v : r) tb.data.push_back(v);
  return tb;
}



}  // namespace

TEST_CASE("built-in tableaus are valid, broken ones are rejected", "[solvers][tableau]") {
  for (const auto& name : tableau_names()) {
    ButcherTableau t = tableau(name);
    CHECK_NOTHROW(t.validate());
  }
  CHECK(tableau("dopri5").fsal);
  CHECK(tableau("tsit5").fsal);
  CHECK(tableau("bosh3").fsal);
  CHECK_FALSE(tableau("rk4").fsal);
  CHECK(tableau("dopri5").stages() == 7);
  CHECK(tableau("dopri5").adaptive());
  CHECK_FALSE(tableau("rk38").adaptive());
  ButcherTableau bad = tableau("rk4");
  bad.a[1 * 4 + 0] = 0.4;  // row 1 sums to 0.4, c = 0.5
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("row 1 of a sums to"));
  bad = tableau("rk4");
  bad.b[0] = 0.2;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("weights b sum to"));
  bad = tableau("dopri5");
  bad.e[0] += 1e-3;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("error weights sum to"));
  bad = tableau("heun");
  bad.a[0 * 2 + 1] = 1.0;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("must be explicit"));
  CHECK_THROWS_WITH(tableau("rk45"), Catch::Contains("unknown solver 'rk45'") && Catch::Contains("dopri5"));
}

TEST_CASE("a tableau of more stages than the state algebra takes is refused when built", "[solvers][tableau]") {
  const int s = 33;
  ButcherTableau big;
  big.name = "big";
  big.order = 1;
  big.c.assign(s, 0.0);
  big.a.assign(static_cast<size_t>(s) * s, 0.0);
  big.b.assign(s, 1.0 / s);
  CHECK_THROWS_WITH(big.validate(), Catch::Contains("33 stages") && Catch::Contains("at most 32"));
  SolveOptions o = fixed_opts("euler", 1.0, 4);
  CHECK_THROWS_WITH(o.use_tableau(big), Catch::Contains("at most 32"));
}

TEST_CASE("every method converges at its order", "[solvers][order]") {
  for (const auto& name : tableau_names()) {
    const ButcherTableau& tab = tableau(name);
    std::vector<double> lh, le;
    const std::vector<int> Ns = tab.order <= 2 ? std::vector<int>{16, 32, 64, 128} : std::vector<int>{8, 16, 32, 64};
    for (int N : Ns) {
      FunctionSystem sys = linear_system();
      std::vector<double> y = kY0;
      const auto r = integrate(sys, y.data(), fixed_opts(name, 2.0, N));
      REQUIRE(r.ok());
      CHECK(r.accepted == N);
      const double err = (Eigen::Map<Eigen::Vector4d>(y.data()) - exact(2.0)).norm();
      lh.push_back(std::log(2.0 / N));
      le.push_back(std::log(err));
    }
    const double p = slope(lh, le);
    INFO(name << ": fitted order " << p << ", theory " << tab.order);
    CHECK(std::fabs(p - tab.order) < 0.3);
  }
}

TEST_CASE("dopri5 takes the classical code's steps on the non-stiff problems", "[solvers][dopri5]") {
  // Hairer's dopri5.f (version of 2005), rtol = atol = tol, automatic initial step:
  // problem, tol, nfcn, nstep, naccpt, nrejct
  struct Ref {
    const char* problem;
    double tol;
    int64_t nfe, steps, accepted, rejected;
  };
  const Ref refs[] = {
      {"arenstorf", 1e-4, 494, 82, 64, 18},   {"arenstorf", 1e-7, 1442, 240, 216, 22},
      {"arenstorf", 1e-10, 5060, 843, 841, 0}, {"lorenz", 1e-4, 2204, 367, 320, 47},
      {"lorenz", 1e-7, 7292, 1215, 1199, 16},  {"lorenz", 1e-10, 28340, 4723, 4723, 0},
      {"vdp", 1e-4, 482, 80, 62, 18},          {"vdp", 1e-7, 1520, 253, 225, 28},
      {"vdp", 1e-10, 5288, 881, 874, 7},       {"brusselator", 1e-4, 416, 69, 55, 14},
      {"brusselator", 1e-7, 1220, 203, 182, 21}, {"brusselator", 1e-10, 4118, 686, 683, 3}};
  for (const auto& ref : refs) {
    const OdeProblem p = ode_problem(ref.problem);
    FunctionSystem sys(p.f, p.y0.size());
    std::vector<double> y = p.y0;
    SolveOptions o = adaptive_opts("dopri5", p.t1, ref.tol, ref.tol);
    const auto r = integrate(sys, y.data(), o);
    INFO(ref.problem << " tol " << ref.tol << ": nfe " << r.nfe << " steps " << r.steps << " accepted "
                     << r.accepted << " rejected " << r.rejected);
    REQUIRE(r.status == SolveStatus::Success);
    auto within = [](int64_t got, int64_t want, double slack) {
      return std::fabs(static_cast<double>(got - want)) <= std::max(slack, 0.02 * static_cast<double>(want));
    };
    CHECK(within(r.nfe, ref.nfe, 0));
    CHECK(within(r.steps, ref.steps, 0));
    CHECK(within(r.accepted, ref.accepted, 0));
    CHECK(within(r.rejected, ref.rejected, 1));
    CHECK(r.nfe == 6 * r.steps + 2);  // FSAL: 6 per attempt, plus f(t0) and the initial-step probe
  }
  // arenstorf returns to its start after one period: the solution is right, not only its cost
  const OdeProblem p = ode_problem("arenstorf");
  FunctionSystem sys(p.f, 4);
  std::vector<double> y = p.y0;
  integrate(sys, y.data(), adaptive_opts("dopri5", p.t1, 1e-10, 1e-10));
  CHECK(std::fabs(y[0] - p.y0[0]) < 1e-5);
  CHECK(std::fabs(y[3] - p.y0[3]) < 1e-4);
}

TEST_CASE("rk4 equals Boost.Odeint's runge_kutta4 on the same steps", "[solvers][odeint]") {
  const OdeProblem p = ode_problem("vdp");
  FunctionSystem sys(p.f, 2);
  std::vector<double> a = p.y0, b = p.y0;
  const auto ra = integrate(sys, a.data(), fixed_opts("rk4", 5.0, 200));
  const auto rb = integrate(sys, b.data(), fixed_opts("odeint-rk4", 5.0, 200));
  REQUIRE(ra.ok());
  REQUIRE(rb.ok());
  CHECK(ra.nfe == rb.nfe);
  for (int i = 0; i < 2; ++i) CHECK(std::fabs(a[i] - b[i]) <= 1e-12 * std::max(1.0, std::fabs(b[i])));
  // the transformer field in double, batch of 2
  Model<double> m = field_model(3);
  const TokenBatch tb = tokens_of({{1, 2, 3, 4, 5, 6}, {7, 8, 9, 10, 11, 12}});
  Buffer<double> h1(2 * 6 * 16), h2(h1.size());
  m.embed(h1.data(), tb);
  h2 = h1;
  FieldSystem<double> fs(m.field, m.field_params(), 2, 6);
  integrate(fs, h1.data(), fixed_opts("rk4", 2.0, 8));
  integrate(fs, h2.data(), fixed_opts("odeint-rk4", 2.0, 8));
  CHECK(rel_error(std::vector<double>(h1.begin(), h1.end()), std::vector<double>(h2.begin(), h2.end())) < 1e-12);
  // odeint's dopri5 agrees with ours to the tolerance
  std::vector<double> c = p.y0, d = p.y0;
  integrate(sys, c.data(), adaptive_opts("dopri5", 5.0, 1e-9, 1e-9));
  integrate(sys, d.data(), adaptive_opts("odeint-dopri5", 5.0, 1e-9, 1e-9));
  for (int i = 0; i < 2; ++i) CHECK(std::fabs(c[i] - d[i]) < 1e-6);
}

TEST_CASE("dense output is accurate between steps", "[solvers][dense]") {
  std::vector<double> times;
  for (int i = 0; i <= 40; ++i) times.push_back(0.05 * i);
  for (const char* method : {"dopri5", "tsit5", "bosh3"}) {
    FunctionSystem sys = linear_system();
    std::vector<double> y = kY0;
    SolveOptions o = adaptive_opts(method, 2.0, 1e-8, 1e-8);
    o.save = SaveKind::Times;
    o.save_times = times;
    const auto r = integrate(sys, y.data(), o);
    REQUIRE(r.ok());
    REQUIRE(r.saved.size() == times.size() * 4);
    if (std::string(method) != "bosh3") CHECK(r.accepted < 40);  // save times fall inside steps
    double worst = 0;
    for (size_t i = 0; i < times.size(); ++i) {
      const Eigen::Vector4d ex = exact(times[i]);
      for (int j = 0; j < 4; ++j) worst = std::max(worst, std::fabs(r.saved[i * 4 + j] - ex[j]));
    }
    INFO(method << ": worst dense error " << worst);
    CHECK(worst < (std::string(method) == "bosh3" ? 1e-5 : 1e-6));
    CHECK(r.saved[0] == kY0[0]);
    CHECK(r.saved[(times.size() - 1) * 4] == y[0]);  // t1 is the final state exactly
  }
  // Hermite for a fixed-step method: fourth order between the steps
  std::vector<double> errs, hs;
  for (int N : {10, 20, 40}) {
    FunctionSystem sys = linear_system();
    std::vector<double> y = kY0;
    SolveOptions o = fixed_opts("rk4", 2.0, N);
    o.save = SaveKind::Times;
    o.save_times = {0.37, 1.01, 1.73};
    const auto r = integrate(sys, y.data(), o);
    double worst = 0;
    for (size_t i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j) worst = std::max(worst, std::fabs(r.saved[i * 4 + j] - exact(o.save_times[i])[j]));
    errs.push_back(std::log(worst));
    hs.push_back(std::log(2.0 / N));
  }
  CHECK(slope(hs, errs) > 3.5);
  // every step saved: times and states
  FunctionSystem sys = linear_system();
  std::vector<double> y = kY0;
  SolveOptions o = fixed_opts("midpoint", 1.0, 5);
  o.save = SaveKind::Steps;
  const auto r = integrate(sys, y.data(), o);
  REQUIRE(r.step_times[0].size() == 6);
  CHECK(r.step_times[0][5] == 1.0);
  CHECK(r.step_states[0].size() == 6 * 4);
  CHECK(r.step_states[0][5 * 4 + 2] == y[2]);
}

TEST_CASE("failures are reported with where they happened", "[solvers][errors]") {
  // a field that turns NaN past t = 0.5
  FunctionSystem nan_sys(
      [](double t, const double* y, double* d) {
        for (int i = 0; i < 2; ++i) d[i] = t > 0.5 ? std::nan("") : -y[i];
      },
      2);
  std::vector<double> y = {1.0, 2.0};
  auto r = integrate(nan_sys, y.data(), adaptive_opts("dopri5", 1.0, 1e-6, 1e-6));
  CHECK(r.status == SolveStatus::NonFinite);
  CHECK_THAT(r.message, Catch::Contains("non-finite") && Catch::Contains("at t = 0.5") && Catch::Contains("step "));
  CHECK(r.seq[0].t <= 0.5);
  CHECK(r.seq[0].t > 0.5 - 1e-9);
  CHECK(std::isfinite(y[0]));  // the last accepted state is kept
  CHECK(y[0] == Approx(std::exp(-r.seq[0].t)).epsilon(1e-5));
  // NaN everywhere: rejected max_nonfinite times, then a failure at t0
  FunctionSystem all_nan([](double, const double*, double* d) { d[0] = std::nan(""); }, 1);
  std::vector<double> yn = {1.0};
  r = integrate(all_nan, yn.data(), adaptive_opts("dopri5", 1.0, 1e-6, 1e-6));
  CHECK(r.status == SolveStatus::NonFinite);
  CHECK(r.seq[0].t == 0.0);
  CHECK_THAT(r.message, Catch::Contains("in 11 consecutive attempts") && Catch::Contains("at t = 0 "));
  CHECK(yn[0] == 1.0);
  y = {1.0, 2.0};
  r = integrate(nan_sys, y.data(), fixed_opts("rk4", 1.0, 10));
  CHECK(r.status == SolveStatus::NonFinite);
  CHECK_THAT(r.message, Catch::Contains("at t = 0.5"));
  // the step limit
  const OdeProblem p = ode_problem("arenstorf");
  FunctionSystem sys(p.f, 4);
  std::vector<double> ya = p.y0;
  SolveOptions o = adaptive_opts("dopri5", p.t1, 1e-10, 1e-10);
  o.max_steps = 100;
  r = integrate(sys, ya.data(), o);
  CHECK(r.status == SolveStatus::MaxSteps);
  CHECK(r.steps == 100);
  CHECK_THAT(r.message, Catch::Contains("more than 100 steps"));
  // y' = y^2 blows up at t = 1: the step size collapses there
  FunctionSystem blow([](double, const double* v, double* d) { d[0] = v[0] * v[0]; }, 1);
  std::vector<double> yb = {1.0};
  r = integrate(blow, yb.data(), adaptive_opts("dopri5", 2.0, 1e-6, 1e-6));
  CHECK((r.status == SolveStatus::StepTooSmall || r.status == SolveStatus::NonFinite));
  CHECK(r.seq[0].t == Approx(1.0).epsilon(1e-3));
  // bad options
  std::vector<double> yo = kY0;
  FunctionSystem lin = linear_system();
  SolveOptions bad = adaptive_opts("dopri5", 1.0, 1e-3, 1e-3);
  bad.rtol = std::nan("");
  CHECK_THROWS_WITH(integrate(lin, yo.data(), bad), Catch::Contains("need finite rtol"));
  CHECK_THROWS_WITH(integrate(lin, yo.data(), adaptive_opts("rk4", 1.0, 1e-3, 1e-3)), Catch::Contains("has no error estimate"));
  CHECK_THROWS_WITH(integrate(lin, yo.data(), fixed_opts("rk4", 1.0, 0)), Catch::Contains("need steps > 0 or dt > 0"));
  SolveOptions st = fixed_opts("rk4", 1.0, 4);
  st.save = SaveKind::Times;
  st.save_times = {0.5, 0.2};
  CHECK_THROWS_WITH(integrate(lin, yo.data(), st), Catch::Contains("ordered"));
}

TEST_CASE("integration runs backward in time", "[solvers]") {
  FunctionSystem sys = linear_system();
  std::vector<double> y = kY0;
  integrate(sys, y.data(), adaptive_opts("dopri5", 1.5, 1e-10, 1e-10));
  SolveOptions back = adaptive_opts("dopri5", 0.0, 1e-10, 1e-10);
  back.t0 = 1.5;
  const auto r = integrate(sys, y.data(), back);
  REQUIRE(r.ok());
  for (int i = 0; i < 4; ++i) CHECK(std::fabs(y[i] - kY0[i]) < 1e-8);
}

TEST_CASE("per-sequence adaptivity equals solving each sequence alone", "[solvers][batch]") {
  const Model<double> m = field_model(5);
  const std::vector<std::vector<int>> rows = {{1, 2, 3, 4, 5, 6}, {16, 16, 16, 16, 16, 16}, {0, 9, 3, 12, 7, 2}};
  const TokenBatch batch = tokens_of(rows);
  const size_t n = 6 * 16;
  for (const char* method : {"dopri5", "bosh3"}) {
    SolveOptions o = adaptive_opts(method, 3.0, 1e-7, 1e-7);
    Buffer<double> hb;
    ReadoutCache<double> rc;
    const auto rb = m.ode_forward(batch, o, hb, rc);
    REQUIRE(rb.ok());
    int64_t alone_evals = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      Buffer<double> h1;
      ReadoutCache<double> rc1;
      const auto r1 = m.ode_forward(tokens_of({rows[i]}), o, h1, rc1);
      REQUIRE(r1.ok());
      INFO(method << " sequence " << i);
      CHECK(rb.seq[i].steps == r1.steps);
      CHECK(rb.seq[i].accepted == r1.accepted);
      CHECK(rb.seq[i].rejected == r1.rejected);
      CHECK(rb.seq[i].nfe == r1.nfe);
      alone_evals += r1.nfe;
      std::vector<double> a(hb.begin() + static_cast<long>(i * n), hb.begin() + static_cast<long>((i + 1) * n));
      CHECK(rel_error(a, std::vector<double>(h1.begin(), h1.end())) < 1e-10);
    }
    CHECK(rb.seq_evals == alone_evals);
    // the sequences need different step counts: per-sequence steps save work against one shared step
    o.batch_coupled = true;
    Buffer<double> hc;
    const auto rcpl = m.ode_forward(batch, o, hc, rc);
    REQUIRE(rcpl.ok());
    for (const auto& q : rcpl.seq) CHECK(q.steps == rcpl.seq[0].steps);
    CHECK(rcpl.seq_evals == 3 * rcpl.nfe);
    CHECK(rb.seq_evals <= rcpl.seq_evals);
    CHECK(rel_error(std::vector<double>(hb.begin(), hb.end()), std::vector<double>(hc.begin(), hc.end())) < 1e-5);
  }
}

TEST_CASE("loop K and Euler with K steps on [0, K] are bit-identical", "[solvers][loop]") {
  ModelConfig cfg = make_config(50, 16, 32, 4, 0, 2, 4);
  Model<float> m(cfg);
  m.init(21);
  Rng rng(22);
  TokenBatch tb;
  tb.B = 3;
  tb.T = 16;
  for (int i = 0; i < 48; ++i) tb.data.push_back(static_cast<int32_t>(rng.next() % 50));
  for (int K : {1, 4, 7}) {
    LoopWork<float> w;
    m.loop_forward(tb, K, w);
    Buffer<float> h;
    ReadoutCache<float> rc;
    const auto r = m.ode_forward(tb, fixed_opts("euler", K, K), h, rc);
    REQUIRE(r.ok());
    CHECK(r.nfe == K);
    const size_t NC = h.size();
    CHECK(std::memcmp(h.data(), w.h.data() + NC * K, NC * sizeof(float)) == 0);
    CHECK(std::memcmp(rc.logits.data(), w.readout.logits.data(), rc.logits.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("the terminal condition stops each sequence where its latent settles", "[solvers][terminal]") {
  // y' = c - y settles at c; ||f|| / ||y|| = ||c - y|| / ||y|| falls like e^{-t}
  const double c[2] = {1.0, 1.0};
  FunctionSystem sys(
      [c](double, const double* y, double* d) {
        d[0] = c[0] - y[0];
        d[1] = c[1] - y[1];
      },
      2, 2);
  std::vector<double> y = {2.0, 2.0, 1.1, 1.1};  // sequence 1 starts closer to rest
  SolveOptions o = adaptive_opts("dopri5", 20.0, 1e-8, 1e-8);
  o.terminal_threshold = 1e-3;
  const auto r = integrate(sys, y.data(), o);
  REQUIRE(r.ok());
  REQUIRE(r.seq[0].status == SolveStatus::Terminal);
  REQUIRE(r.seq[1].status == SolveStatus::Terminal);
  // exact stop: (y0 - 1) e^{-t} / (1 + (y0 - 1) e^{-t}) = 1e-3
  const double t0_exact = std::log((2.0 - 1.0) * (1 - 1e-3) / 1e-3);
  const double t1_exact = std::log((1.1 - 1.0) * (1 - 1e-3) / 1e-3);
  CHECK(r.seq[0].t >= t0_exact);
  CHECK(r.seq[1].t >= t1_exact);
  CHECK(r.seq[0].t < t0_exact + 1.5);
  CHECK(r.seq[1].t < r.seq[0].t);
  CHECK(std::fabs(y[0] - 1.0) < 1.01e-3 * y[0]);
}

namespace {
std::string run_cli(const std::string& args, int* rc) { return run_command(std::string(FLOWLOOP_CLI) + " " + args, rc); }
}  // namespace

TEST_CASE("solver options on the command line", "[solvers][cli]") {
  int rc = 0;
  std::string out = run_cli("ode-bench --problem arenstorf --rtol 1e-7 --atol 1e-7 --json", &rc);
  REQUIRE(rc == 0);
  auto j = nlohmann::json::parse(out);
  CHECK(j["nfe"] == 1442);
  CHECK(j["accepted"] == 216);
  CHECK(j["rejected"] == 22);
  CHECK(j["status"] == "success");
  CHECK(j["y_end"].size() == 4);
  out = run_cli("ode-bench --problem vdp", &rc);
  CHECK(rc != 0);
  CHECK(out.find("give --rtol and --atol") != std::string::npos);

  const std::string dir = (std::filesystem::temp_directory_path() / ("flowloop_cli_solver_" + std::to_string(::getpid()))).string();
  std::filesystem::create_directories(dir);
  const std::string model = dir + "/m.safetensors", tok = dir + "/t.json", o = dir + "/o.json";
  run_cli("init --vocab 13 --context 8 --d-model 16 --n-head 2 --n-block 1 --depth 3 --seed 4 -o " + model, &rc);
  REQUIRE(rc == 0);
  std::ofstream(tok) << R"({"tokens": [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]})";
  out = run_cli("forward -m " + model + " --tokens " + tok + " --solver dopri5 --rtol 1e-6 --atol 1e-6 -o " + o, &rc);
  REQUIRE(rc == 0);
  std::ifstream(o) >> j;
  CHECK(j["status"] == "success");
  CHECK(j["t1"] == 3.0);  // the model's depth
  CHECK(j["per_sequence"].size() == 3);
  CHECK(j["nfe"].get<int>() == 6 * j["steps"].get<int>() + 2);
  CHECK(j["logits"].size() == 3);
  CHECK(j.contains("accepted"));
  CHECK(j.contains("rejected"));
  // fixed steps default to t1 steps; euler with 3 steps is loop 3, bit for bit
  out = run_cli("forward -m " + model + " --tokens " + tok + " --solver euler -o " + o, &rc);
  REQUIRE(rc == 0);
  nlohmann::json e;
  std::ifstream(o) >> e;
  CHECK(e["fixed_steps"] == 3);
  CHECK(e["nfe"] == 3);
  out = run_cli("forward -m " + model + " --tokens " + tok + " --loops 3 -o " + o, &rc);
  REQUIRE(rc == 0);
  nlohmann::json l;
  std::ifstream(o) >> l;
  CHECK(l["logits"] == e["logits"]);
  out = run_cli("forward -m " + model + " --tokens " + tok + " --solver rk4 --rtol 1e-3 -o " + o, &rc);
  CHECK(rc != 0);
  CHECK(out.find("has no error estimate") != std::string::npos);
  out = run_cli("forward -m " + model + " --tokens " + tok + " --solver rk99 -o " + o, &rc);
  CHECK(rc != 0);
  CHECK(out.find("unknown solver 'rk99'") != std::string::npos);
  out = run_cli("forward -m " + model + " --tokens " + tok + " --solver dopri5 --solver-max-steps 1 --rtol 1e-9 --atol 1e-9 -o " + o, &rc);
  CHECK(rc != 0);
  CHECK(out.find("more than 1 steps") != std::string::npos);
  out = run_cli("bench solve --size S --solver rk4 --solver-steps 2 --reps 1 --seconds 0", &rc);
  REQUIRE(rc == 0);
  j = nlohmann::json::parse(out);
  CHECK(j["nfe"] == 8);
  CHECK(j["ms"].get<double>() > 0);
  CHECK(j["solver"] == "rk4");
  std::filesystem::remove_all(dir);
}

// ---------------------------------------------------------------- the open solver API

namespace {
// The built-in I controller (torchdiffeq's), written as a user's controller would be.
struct UserIController : StepSizeController {
  double safety, fac_min, fac_max;
  int starts = 0, calls = 0;
  UserIController(double s, double lo, double hi) : safety(s), fac_min(lo), fac_max(hi) {}
  void start(int) override { ++starts; }
  bool decide(int, double err, double h, int q, double& h_next) override {
    ++calls;
    if (err == 0.0) {
      h_next = h * fac_max;
    } else {
      const double dfactor = err < 1.0 ? 1.0 : fac_min;
      h_next = h * std::min(fac_max, std::max(safety * std::pow(err, -1.0 / (q + 1)), dfactor));
    }
    return err <= 1.0;
  }
};
}  // namespace

TEST_CASE("a user's tableau and controller run through integrate() as the built-ins do", "[solvers][open]") {
  const OdeProblem p = ode_problem("vdp");
  SECTION("a user's copy of bosh3 takes bosh3's steps and bits") {
    ButcherTableau mine = tableau("bosh3");
    mine.name = "my-bosh3";
    mine.fsal = false;  // derived again by validation
    SolveOptions o = adaptive_opts("bosh3", p.t1, 1e-6, 1e-6);
    FunctionSystem s1(p.f, p.y0.size()), s2(p.f, p.y0.size());
    std::vector<double> y1 = p.y0, y2 = p.y0;
    const auto r1 = integrate(s1, y1.data(), o);
    o.use_tableau(mine);
    CHECK(o.method == "my-bosh3");
    CHECK(o.method_tableau().fsal);
    const auto r2 = integrate(s2, y2.data(), o);
    REQUIRE(r1.ok());
    REQUIRE(r2.ok());
    CHECK(r2.nfe == r1.nfe);
    CHECK(r2.accepted == r1.accepted);
    CHECK(r2.rejected == r1.rejected);
    CHECK(y1 == y2);
  }
  SECTION("a user's controller equal to the I controller takes its steps, and is started once a solve") {
    SolveOptions o = adaptive_opts("dopri5", p.t1, 1e-6, 1e-6);
    o.controller = Controller::I;
    FunctionSystem s1(p.f, p.y0.size(), 3), s2(p.f, p.y0.size(), 3);
    std::vector<double> y1, y2;
    for (int g = 0; g < 3; ++g)
      for (double v : p.y0) y1.push_back(v * (1.0 + 0.1 * g));
    y2 = y1;
    const auto r1 = integrate(s1, y1.data(), o);
    auto mine = std::make_shared<UserIController>(o.safety, o.fac_min, o.fac_max);
    o.use_controller(mine);
    const auto r2 = integrate(s2, y2.data(), o);
    REQUIRE(r1.ok());
    REQUIRE(r2.ok());
    CHECK(r2.steps_total == r1.steps_total);
    CHECK(r2.seq_evals == r1.seq_evals);
    CHECK(y1 == y2);
    CHECK(mine->starts == 1);
    CHECK(mine->calls == r2.steps_total);  // every attempt of every sequence (all finite here)
    // and it differs from the PI controller's choice: the hook is what ran
    SolveOptions pi = adaptive_opts("dopri5", p.t1, 1e-6, 1e-6);
    FunctionSystem s3(p.f, p.y0.size(), 3);
    std::vector<double> y3 = y1;
    CHECK(integrate(s3, y3.data(), pi).steps_total != r2.steps_total);
  }
  SECTION("a user's Heun-Euler 2(1) converges at order 2 with fixed steps and adapts with tolerances") {
    ButcherTableau he{"heun-euler", 2, 1, {0, 1}, {0, 0, 1, 0}, {0.5, 0.5}, {-0.5, 0.5}, {}, false, "Heun 2(1)"};
    std::vector<double> lh, le;
    for (int N : {32, 64, 128, 256}) {
      FunctionSystem sys = linear_system();
      std::vector<double> y = kY0;
      SolveOptions o = fixed_opts("euler", 2.0, N);
      o.use_tableau(he);
      REQUIRE(integrate(sys, y.data(), o).ok());
      lh.push_back(std::log(2.0 / N));
      le.push_back(std::log((Eigen::Map<Eigen::Vector4d>(y.data()) - exact(2.0)).norm()));
    }
    CHECK(std::fabs(slope(lh, le) - 2.0) < 0.2);
    FunctionSystem sys = linear_system();
    std::vector<double> y = kY0;
    SolveOptions o = adaptive_opts("dopri5", 2.0, 1e-8, 1e-8);
    o.use_tableau(he);
    const auto r = integrate(sys, y.data(), o);
    REQUIRE(r.ok());
    CHECK((Eigen::Map<Eigen::Vector4d>(y.data()) - exact(2.0)).norm() < 1e-5);
    CHECK(r.accepted > 100);  // a second-order method at 1e-8 takes many steps
  }
  SECTION("a broken tableau and a controller's bad step are errors that say what is wrong") {
    ButcherTableau bad{"bad", 2, 1, {0, 1}, {0, 0, 0.5, 0}, {0.5, 0.5}, {-0.5, 0.5}, {}, false, ""};
    SolveOptions o = adaptive_opts("dopri5", 1.0, 1e-6, 1e-6);
    CHECK_THROWS_WITH(o.use_tableau(bad), Catch::Contains("bad"));
    CHECK_THROWS_WITH(o.use_controller(nullptr), Catch::Contains("null"));
    struct Backwards : StepSizeController {
      bool decide(int, double, double h, int, double& next) override {
        next = -h;
        return true;
      }
    };
    o.use_controller(std::make_shared<Backwards>());
    FunctionSystem sys(p.f, p.y0.size());
    std::vector<double> y = p.y0;
    const auto r = integrate(sys, y.data(), o);
    CHECK_FALSE(r.ok());
    CHECK_THAT(r.message, Catch::Contains("step-size controller"));
  }
  SECTION("a user's tableau is differentiated by backprop as a built-in one is") {
    ButcherTableau mine = tableau("rk4");
    mine.name = "my-rk4";
    Model<double> m = field_model(5);
    const TokenBatch tok = tokens_of({{1, 2, 3, 4}, {5, 6, 7, 8}});
    const TokenBatch tgt = tokens_of({{2, 3, 4, 5}, {6, 7, 8, 9}});
    SolveOptions o = fixed_opts("rk4", 2.0, 3);
    GradOptions g;
    std::vector<double> ga(m.params.size(), 0.0), gb(m.params.size(), 0.0);
    GradStats sa, sb;
    OdeWork<double> wa, wb;
    const double la = m.ode_loss_and_grad(tok, tgt, o, g, ga.data(), sa, wa);
    o.use_tableau(mine);
    const double lb = m.ode_loss_and_grad(tok, tgt, o, g, gb.data(), sb, wb);
    CHECK(la == lb);
    CHECK(ga == gb);
  }
}

namespace {
// A backend of a user's own with memory and the state algebra only (no network op, no
// optimiser): every call forwards to the host's and is counted.
class CountingStateOps final : public StateOps<double> {
 public:
  int calls = 0;
  Device device() const override { return Device::cpu; }
  std::string name() const override { return "counting (host)"; }
  void* alloc_bytes(size_t bytes) override { return (++calls, h().alloc_bytes(bytes)); }
  void free_bytes(void* p) noexcept override { h().free_bytes(p); }
  void upload_bytes(void* d, const void* s, size_t b) override { ++calls, h().upload_bytes(d, s, b); }
  void download_bytes(void* d, const void* s, size_t b) override { ++calls, h().download_bytes(d, s, b); }
  void copy(double* d, const double* s, size_t n) override { ++calls, h().copy(d, s, n); }
  void fill(double* x, double v, size_t n) override { ++calls, h().fill(x, v, n); }
  void synchronize() override { h().synchronize(); }
  void axpy(double* y, double a, const double* x, size_t n) override { ++calls, h().axpy(y, a, x, n); }
  void rk_combine_rows(double* out, const double* y, const double* hh, const double* c, const double* const* k, int m,
                       const int* rows, int nrows, size_t n) override {
    ++calls, h().rk_combine_rows(out, y, hh, c, k, m, rows, nrows, n);
  }
  void error_sum_squares_rows(double* out, const double* hh, const double* e, const double* const* k, int m,
                              const double* y0, const double* y1, double rtol, double atol, size_t period, size_t dims,
                              const int* rows, int nrows, size_t n) override {
    ++calls, h().error_sum_squares_rows(out, hh, e, k, m, y0, y1, rtol, atol, period, dims, rows, nrows, n);
  }
  void sum_squares_rows(double* out, const double* x, const int* rows, int nrows, size_t n) override {
    ++calls, h().sum_squares_rows(out, x, rows, nrows, n);
  }
  void scaled_sum_squares_rows(double* out, const double* a, const double* b, const double* y, double rtol,
                               double atol, int nrows, size_t n) override {
    ++calls, h().scaled_sum_squares_rows(out, a, b, y, rtol, atol, nrows, n);
  }
  void scaled_sum_rows(double* out, const double* hh, const double* c, const double* const* k, int m, const int* rows,
                       int nrows, size_t n) override {
    ++calls, h().scaled_sum_rows(out, hh, c, k, m, rows, nrows, n);
  }
  void accumulate_rows(double* y, const double* const* k, int m, const int* rows, int nrows, size_t n) override {
    ++calls, h().accumulate_rows(y, k, m, rows, nrows, n);
  }
  void move_rows(double* dst, const int* dr, const double* src, const int* sr, int nrows, size_t n) override {
    ++calls, h().move_rows(dst, dr, src, sr, nrows, n);
  }
  void strided_copy(double* dst, size_t ldd, const double* src, size_t lds, size_t rows, size_t n,
                    double alpha) override {
    ++calls, h().strided_copy(dst, ldd, src, lds, rows, n, alpha);
  }

 private:
  static StateOps<double>& h() { return host_state_ops<double>(); }
};

// A FunctionSystem whose states live in a backend's memory.
class SystemOn final : public OdeSystem<double> {
 public:
  SystemOn(FunctionSystem& f, StateOps<double>& be) : f_(f), be_(be) {}
  int groups() const override { return f_.groups(); }
  size_t dim() const override { return f_.dim(); }
  void eval(double* dydt, const double* y, const double* t, const int* ids, int count) override {
    f_.eval(dydt, y, t, ids, count);
  }
  StateOps<double>* backend() override { return &be_; }

 private:
  FunctionSystem& f_;
  StateOps<double>& be_;
};
}  // namespace

TEST_CASE("a user's system on a backend of its own with the state algebra alone", "[solvers][open]") {
  const OdeProblem p = ode_problem("lorenz");
  FunctionSystem plain(p.f, p.y0.size(), 2), inner(p.f, p.y0.size(), 2);
  CountingStateOps be;
  SystemOn on(inner, be);
  std::vector<double> y1 = p.y0, y2;
  y1.insert(y1.end(), p.y0.begin(), p.y0.end());
  y1[3] += 0.5;  // the second sequence starts elsewhere
  y2 = y1;
  const SolveOptions o = adaptive_opts("dopri5", 1.0, 1e-8, 1e-8);
  const auto r1 = integrate(plain, y1.data(), o);
  const auto r2 = integrate(on, y2.data(), o);
  REQUIRE(r1.ok());
  REQUIRE(r2.ok());
  CHECK(y1 == y2);  // the same driver, the same algebra: the same bits
  CHECK(r2.steps_total == r1.steps_total);
  CHECK(be.calls > r2.steps_total);  // every round's state arithmetic ran on the user's backend
}
