// Flow matching: exact OT against brute force, Sinkhorn's marginals and its limit,
// the time samplers against their CDFs, every conditional path against the time
// derivative of its own x_t (finite differences in double), the trajectory path
// through its states, the step's gradient against finite differences, and the
// recorder (shards, manifest, resume, the errors it names).

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <set>
#include <sstream>

#include "check.hpp"
#include "thread_ranks.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/train/flowmatch.hpp"
#include "flowloop/train/flowmatch_train.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/nn/model.hpp"
#include "flowloop/train/train.hpp"

using namespace flowloop;
using namespace flowloop::test;
using nlohmann::json;

namespace {
// The relative error between an analytic gradient of the field's parameters and finite
// differences of `loss`, on the first `per_tensor` entries of every field tensor.
double field_grad_error(Model<double>& model, const std::vector<double>& grad, const std::function<double()>& loss,
                        size_t per_tensor) {
  double* P = model.params.data() + model.layout.field_begin();
  std::vector<double> got, fd;
  for (const auto& t : model.layout.tensors()) {
    if (t.offset < model.layout.field_begin() || t.offset >= model.layout.field_end()) continue;
    const size_t lo = t.offset - model.layout.field_begin(), cnt = std::min<size_t>(t.numel, per_tensor);
    const auto g = fd_grad(loss, P + lo, cnt);
    got.insert(got.end(), grad.begin() + static_cast<long>(lo), grad.begin() + static_cast<long>(lo + cnt));
    fd.insert(fd.end(), g.begin(), g.end());
  }
  return rel_error(got, fd);
}

// A double model with every parameter N(0, 0.3^2), LayerNorm weights around 1.
Model<double> randomized_model(const ModelConfig& cfg, Rng& init) {
  Model<double> model(cfg);
  for (auto& p : model.params) p = 0.3 * init.normal();
  for (const auto& t : model.layout.tensors())
    if (t.name.find("ln_") != std::string::npos && t.name.find(".weight") != std::string::npos)
      for (size_t i = 0; i < t.numel; ++i) model.params[t.offset + i] += 1.0;
  return model;
}

double assignment_cost(const std::vector<double>& cost, const std::vector<int>& perm) {
  const size_t n = perm.size();
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += cost[i * n + static_cast<size_t>(perm[i])];
  return s;
}
}  // namespace

TEST_CASE("exact OT: the assignment is optimal against brute force", "[flowmatch][ot]") {
  Rng rng(5);
  for (int n = 1; n <= 7; ++n)
    for (int rep = 0; rep < 24; ++rep) {
      INFO("n " << n << " rep " << rep);
      std::vector<double> cost(static_cast<size_t>(n * n));
      // every third rep: integer costs with ties (few values, or many); the others continuous
      for (auto& c : cost)
        c = rep % 3 == 0 ? std::floor((rep % 2 ? 2 : 6) * rng.uniform()) : rng.normal();
      const std::vector<int> perm = optimal_assignment(cost, n);
      std::vector<int> sorted = perm;
      std::sort(sorted.begin(), sorted.end());
      std::vector<int> ident(static_cast<size_t>(n));
      std::iota(ident.begin(), ident.end(), 0);
      REQUIRE(sorted == ident);  // a permutation
      std::vector<int> q = ident;
      double best = INFINITY;
      do best = std::min(best, assignment_cost(cost, q));
      while (std::next_permutation(q.begin(), q.end()));
      CHECK(assignment_cost(cost, perm) <= best + 1e-12 * (1 + std::fabs(best)));
    }
  CHECK(optimal_assignment({}, 0).empty());
  CHECK_THROWS_WITH(optimal_assignment({1, 2, 3}, 2), Catch::Contains("not n^2"));
  CHECK_THROWS_WITH(optimal_assignment({1, NAN, 3, 4}, 2), Catch::Contains("(0, 1) is not finite"));
}

TEST_CASE("exact OT pairs a shuffled copy with its original", "[flowmatch][ot]") {
  const int n = 40;
  const size_t dim = 6;
  Rng rng(9);
  std::vector<double> a(static_cast<size_t>(n) * dim), b(a.size());
  for (auto& x : a) x = rng.normal();
  std::vector<int> shuffle(static_cast<size_t>(n));
  std::iota(shuffle.begin(), shuffle.end(), 0);
  for (int i = n - 1; i > 0; --i) std::swap(shuffle[static_cast<size_t>(i)], shuffle[rng.next() % static_cast<uint64_t>(i + 1)]);
  for (int i = 0; i < n; ++i)
    std::copy_n(a.data() + static_cast<size_t>(shuffle[static_cast<size_t>(i)]) * dim, dim, b.data() + static_cast<size_t>(i) * dim);
  const std::vector<double> cost = squared_distances(a.data(), n, b.data(), n, dim);
  const std::vector<int> perm = optimal_assignment(cost, n);
  // row i of a sits at the position of b that holds it
  for (int i = 0; i < n; ++i) CHECK(shuffle[static_cast<size_t>(perm[static_cast<size_t>(i)])] == i);
  // the distances against a direct sum, and the pairing's cost near 0 (rounding of
  // ||x||^2 + ||y||^2 - 2 x.y)
  double scale = 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double direct = 0;
      for (size_t k = 0; k < dim; ++k) {
        const double e = a[static_cast<size_t>(i) * dim + k] - b[static_cast<size_t>(j) * dim + k];
        direct += e * e;
      }
      CHECK(std::fabs(cost[static_cast<size_t>(i * n + j)] - direct) <= 1e-12 * (1 + direct));
      scale = std::max(scale, direct);
    }
  CHECK(assignment_cost(cost, perm) <= 1e-12 * scale * n);
}

TEST_CASE("Sinkhorn: uniform marginals, and the exact plan as reg goes to 0", "[flowmatch][ot]") {
  const int n = 6, m = 6;
  Rng rng(3);
  std::vector<double> cost(static_cast<size_t>(n * m));
  for (auto& c : cost) c = rng.uniform();
  for (const double reg : {1.0, 0.1}) {
    INFO("reg " << reg);
    const std::vector<double> P = sinkhorn_plan(cost, n, m, reg, 20000);
    double total = 0;
    for (int i = 0; i < n; ++i) {
      double r = 0;
      for (int j = 0; j < m; ++j) r += P[static_cast<size_t>(i * m + j)];
      CHECK(std::fabs(r - 1.0 / n) < 1e-8);
      total += r;
    }
    for (int j = 0; j < m; ++j) {
      double c = 0;
      for (int i = 0; i < n; ++i) c += P[static_cast<size_t>(i * m + j)];
      CHECK(std::fabs(c - 1.0 / m) < 1e-12);
    }
    CHECK(std::fabs(total - 1.0) < 1e-8);
  }
  // a large reg spreads the plan towards the product of the marginals
  const std::vector<double> flat = sinkhorn_plan(cost, n, m, 1e3);
  for (double p : flat) CHECK(std::fabs(p - 1.0 / (n * m)) < 1e-4);
  // a small one concentrates it on the optimal assignment
  const std::vector<int> perm = optimal_assignment(cost, n);
  const std::vector<double> sharp = sinkhorn_plan(cost, n, m, 1e-3, 20000);
  for (int i = 0; i < n; ++i) CHECK(sharp[static_cast<size_t>(i * m + perm[static_cast<size_t>(i)])] > 0.99 / n);
  CHECK_THROWS_WITH(sinkhorn_plan(cost, n, m, 0.0), Catch::Contains("reg must be positive"));
  CHECK_THROWS_WITH(sinkhorn_plan(cost, n, m + 1, 0.1), Catch::Contains("entries for"));
}

TEST_CASE("time samplers follow their CDFs inside (0, 1)", "[flowmatch][time]") {
  for (const auto* name : {"uniform", "logit-normal", "u-shaped"}) {
    INFO(name);
    const TimeSampler s = parse_time_sampler(name);
    CHECK(time_sampler_name(s) == name);
    Rng rng(21);
    const int n = 200000;
    std::vector<double> t(static_cast<size_t>(n));
    for (auto& x : t) {
      x = sample_time(s, rng);
      REQUIRE(x > 0.0);
      REQUIRE(x < 1.0);
    }
    std::sort(t.begin(), t.end());
    // Kolmogorov-Smirnov distance; 1.95 / sqrt(n) is the 0.1% critical value
    double ks = 0;
    for (int i = 0; i < n; ++i) {
      const double F = time_cdf(s, t[static_cast<size_t>(i)]);
      ks = std::max({ks, std::fabs(F - static_cast<double>(i) / n), std::fabs(F - static_cast<double>(i + 1) / n)});
    }
    CHECK(ks < 1.95 / std::sqrt(static_cast<double>(n)));
    CHECK(time_cdf(s, 0.5) == Approx(0.5));
  }
  // the shapes: logit-normal piles up in the middle, u-shaped at the ends
  CHECK(time_cdf(TimeSampler::LogitNormal, 0.1) < 0.1);
  CHECK(time_cdf(TimeSampler::UShaped, 0.1) > 0.1);
  CHECK_THROWS_WITH(parse_time_sampler("beta"), Catch::Contains("unknown time sampler 'beta'"));
  CHECK_THROWS_WITH(parse_matcher("cfm"), Catch::Contains("icfm, otcfm, sbcfm, vp, trajectory, generative"));
  CHECK_THROWS_WITH(parse_coupling("greedy"), Catch::Contains("identity, exact, sinkhorn"));
}

TEST_CASE("every conditional path's target is the time derivative of its x_t", "[flowmatch][path][fd]") {
  const size_t n = 7;
  Rng rng(4);
  const auto x0 = randn(n, rng), x1 = randn(n, rng), eps = randn(n, rng);
  for (const auto* name : {"icfm", "otcfm", "generative", "sbcfm", "vp"}) {
    const Matcher m = parse_matcher(name);
    CHECK(matcher_name(m) == name);
    for (const double sigma : {0.0, 0.3}) {
      if (m == Matcher::SBCFM && sigma == 0.0) continue;
      for (const double t : {0.1, 0.37, 0.5, 0.9}) {
        INFO(name << " sigma " << sigma << " t " << t);
        std::vector<double> xt(n), ut(n), xp(n), xm(n), scratch(n);
        conditional_path(m, xt.data(), ut.data(), x0.data(), x1.data(), eps.data(), sigma, t, n);
        const double h = 1e-6;
        conditional_path(m, xp.data(), scratch.data(), x0.data(), x1.data(), eps.data(), sigma, t + h, n);
        conditional_path(m, xm.data(), scratch.data(), x0.data(), x1.data(), eps.data(), sigma, t - h, n);
        std::vector<double> fd(n);
        for (size_t k = 0; k < n; ++k) fd[k] = (xp[k] - xm[k]) / (2 * h);
        CHECK(rel_error(ut, fd) < 1e-8);
      }
    }
  }
  // the ends: x_0 = x0 and x_1 = x1 without noise (icfm), and vp's quarter circle
  std::vector<double> xt(n), ut(n);
  conditional_path(Matcher::ICFM, xt.data(), ut.data(), x0.data(), x1.data(), static_cast<const double*>(nullptr), 0.0,
                   0.0, n);
  CHECK(xt == x0);
  conditional_path(Matcher::VP, xt.data(), ut.data(), x0.data(), x1.data(), static_cast<const double*>(nullptr), 0.0,
                   1.0, n);
  CHECK(rel_error(xt, x1) < 1e-15);
  CHECK_THROWS_WITH(conditional_path(Matcher::ICFM, xt.data(), ut.data(), x0.data(), x1.data(),
                                     static_cast<const double*>(nullptr), 0.1, 0.5, n),
                    Catch::Contains("needs noise"));
}

TEST_CASE("the trajectory path passes through every state with K times the difference as target", "[flowmatch][path]") {
  const size_t n = 5;
  const int K = 4;
  Rng rng(8);
  const auto states = randn(static_cast<size_t>(K + 1) * n, rng);
  std::vector<double> xt(n), ut(n), xp(n), xm(n), scratch(n);
  for (int k = 0; k <= K; ++k) {
    trajectory_path(xt.data(), ut.data(), states.data(), K, static_cast<double>(k) / K, n);
    const std::vector<double> want(states.begin() + static_cast<long>(k * n), states.begin() + static_cast<long>((k + 1) * n));
    CHECK(rel_error(xt, want) < 1e-15);
  }
  for (const double t : {0.1, 0.3, 0.6, 0.95}) {
    INFO("t " << t);
    trajectory_path(xt.data(), ut.data(), states.data(), K, t, n);
    const double h = 1e-7;
    trajectory_path(xp.data(), scratch.data(), states.data(), K, t + h, n);
    trajectory_path(xm.data(), scratch.data(), states.data(), K, t - h, n);
    std::vector<double> fd(n);
    for (size_t i = 0; i < n; ++i) fd[i] = (xp[i] - xm[i]) / (2 * h);
    CHECK(rel_error(ut, fd) < 1e-7);
    const int k = static_cast<int>(t * K);
    for (size_t i = 0; i < n; ++i)
      CHECK(ut[i] == Approx(K * (states[static_cast<size_t>(k + 1) * n + i] - states[static_cast<size_t>(k) * n + i])));
  }
}

TEST_CASE("options: bad sigma, reg and couplings are refused", "[flowmatch][options]") {
  FlowMatchOptions o;
  o.validate();
  o.sigma = -0.1;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("sigma must be 0 or more"));
  o.sigma = NAN;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("sigma must be 0 or more"));
  o = FlowMatchOptions();
  o.matcher = Matcher::SBCFM;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("sbcfm needs sigma > 0"));
  o = FlowMatchOptions();
  o.matcher = Matcher::Trajectory;
  o.coupling = Coupling::Exact;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("coupling 'exact' would mix recordings"));
  o = FlowMatchOptions();
  o.sinkhorn_reg = 0;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("Sinkhorn reg must be positive"));
}

TEST_CASE("a flow-matching step: its gradient against finite differences, for every matcher", "[flowmatch][fd]") {
  ModelConfig cfg = make_config(11, 5, 8, 2, 12, 1, 1);
  cfg.time_cond = true;
  cfg.time_freq = 8;
  cfg.finalize();
  Rng init(2);
  Model<double> model = randomized_model(cfg, init);
  const int B = 3, K = 3, T = 4;
  const size_t n = static_cast<size_t>(T) * cfg.d_model;
  Rng data(6);
  const auto states = randn(static_cast<size_t>(B) * (K + 1) * n, data);
  struct Case {
    const char* matcher;
    const char* coupling;
    const char* sampler;
    double sigma;
  };
  for (const Case c : {Case{"icfm", "identity", "uniform", 0.0}, Case{"otcfm", "exact", "logit-normal", 0.1},
                       Case{"otcfm", "sinkhorn", "u-shaped", 0.0}, Case{"sbcfm", "identity", "uniform", 0.2},
                       Case{"vp", "identity", "uniform", 0.0}, Case{"trajectory", "identity", "u-shaped", 0.0},
                       Case{"generative", "exact", "uniform", 0.0}}) {
    INFO(c.matcher << " " << c.coupling << " " << c.sampler << " sigma " << c.sigma);
    FlowMatchOptions o;
    o.matcher = parse_matcher(c.matcher);
    o.coupling = parse_coupling(c.coupling);
    o.time_sampler = parse_time_sampler(c.sampler);
    o.sigma = c.sigma;
    FlowMatchWork<double> w;
    double* P = model.params.data() + model.layout.field_begin();
    const size_t np = model.field.num_params();
    std::vector<double> grad(np, 0.0);
    Rng r1(77);
    const FlowMatchStep st = flow_match_step(model.field, P, states.data(), B, K, T, o, r1, grad.data(), w);
    REQUIRE(std::isfinite(st.loss));
    CHECK(st.loss > 0);
    REQUIRE(st.t.size() == static_cast<size_t>(B));
    for (double t : st.t) CHECK((t > 0 && t < 1));
    // the same draws again: the same loss, bit for bit
    Rng r2(77);
    CHECK(flow_match_step<double>(model.field, P, states.data(), B, K, T, o, r2, nullptr, w).loss == st.loss);
    auto loss = [&] {
      Rng r(77);
      return flow_match_step<double>(model.field, P, states.data(), B, K, T, o, r, nullptr, w).loss;
    };
    // every tensor's first entries (the time embedding and the modulation included)
    CHECK(field_grad_error(model, grad, loss, 3) < 1e-6);
    if (o.coupling == Coupling::Exact) {
      std::vector<int> sorted = st.x1_row;
      std::sort(sorted.begin(), sorted.end());
      CHECK(sorted == std::vector<int>{0, 1, 2});
    }
  }
  // an endpoint loss on x1_hat = x_t + (1 - t) v joins the gradient (linear paths)
  {
    const auto c = randn(static_cast<size_t>(B) * n, data);
    EndpointLoss<double> e = [&](const double* x, const FlowMatchStep&, double* g) {
      double l = 0;
      for (size_t k = 0; k < c.size(); ++k) {
        l += c[k] * std::sin(x[k]);
        g[k] = c[k] * std::cos(x[k]);
      }
      return l;
    };
    for (const char* m : {"icfm", "sbcfm", "generative"}) {
      INFO(m << " with an endpoint loss");
      FlowMatchOptions o;
      o.matcher = parse_matcher(m);
      o.sigma = o.matcher == Matcher::SBCFM ? 0.2 : 0.0;
      FlowMatchWork<double> w;
      double* P = model.params.data() + model.layout.field_begin();
      std::vector<double> grad(model.field.num_params(), 0.0);
      Rng r1(78);
      const FlowMatchStep st = flow_match_step(model.field, P, states.data(), B, K, T, o, r1, grad.data(), w, &e);
      CHECK(st.endpoint_loss != 0);
      auto loss = [&] {
        Rng r(78);
        const FlowMatchStep s2 = flow_match_step<double>(model.field, P, states.data(), B, K, T, o, r, nullptr, w, &e);
        return s2.loss + s2.endpoint_loss;
      };
      CHECK(field_grad_error(model, grad, loss, 2) < 1e-6);
    }
    FlowMatchOptions vp;
    vp.matcher = Matcher::VP;
    FlowMatchWork<double> w;
    Rng r(1);
    CHECK_THROWS_WITH(flow_match_step<double>(model.field, model.params.data() + model.layout.field_begin(), states.data(),
                                              B, K, T, vp, r, nullptr, w, &e),
                      Catch::Contains("needs a linear path"));
  }
  // a non-finite loss is an error, not a step
  {
    Model<double> nan_model = model;
    nan_model.params[nan_model.layout.field_begin()] = NAN;
    FlowMatchWork<double> wn;
    Rng rn(1);
    CHECK_THROWS_WITH(flow_match_step<double>(nan_model.field, nan_model.params.data() + nan_model.layout.field_begin(),
                                              states.data(), B, K, T, FlowMatchOptions(), rn, nullptr, wn),
                      Catch::Contains("the loss is not finite"));
  }
  // an autonomous field, and K of 0, are refused
  Model<double> plain(make_config(11, 5, 8, 2, 12, 1, 1));
  FlowMatchWork<double> w;
  Rng r(1);
  CHECK_THROWS_WITH(flow_match_step<double>(plain.field, plain.params.data(), states.data(), B, K, T, FlowMatchOptions(),
                                            r, nullptr, w),
                    Catch::Contains("needs a time-conditioned field"));
  CHECK_THROWS_WITH(flow_match_step<double>(model.field, model.params.data() + model.layout.field_begin(), states.data(),
                                            B, 0, T, FlowMatchOptions(), r, nullptr, w),
                    Catch::Contains("K must be at least 1"));
}

TEST_CASE("a flow-matching step split by rows: the parts sum to the whole batch's (double)", "[flowmatch][dist]") {
  ModelConfig cfg = make_config(11, 5, 8, 2, 12, 1, 1);
  cfg.time_cond = true;
  cfg.step_cond = true;
  cfg.time_freq = 8;
  cfg.finalize();
  Rng init(3);
  Model<double> model = randomized_model(cfg, init);
  const int B = 5, K = 3, T = 4;
  const EndpointLoss<double>* const kNoEndpoint = nullptr;
  const double* const kNoTarget = nullptr;
  const size_t n = static_cast<size_t>(T) * cfg.d_model;
  Rng data(7);
  const auto states = randn(static_cast<size_t>(B) * (K + 1) * n, data);
  FlowMatchOptions o;
  o.matcher = parse_matcher("otcfm");
  o.coupling = parse_coupling("exact");
  o.shortcut = true;  // slots 0..2 (of 5): split across the ranges below
  o.shortcut_fraction = 0.5;
  o.shortcut_steps = 4;
  const double* P = model.params.data() + model.layout.field_begin();
  const size_t np = model.field.num_params();
  std::vector<double> whole_g(np, 0.0), parts_g(np, 0.0);
  FlowMatchWork<double> w;
  Rng r0(5);
  const FlowMatchStep whole = flow_match_step(model.field, P, states.data(), B, K, T, o, r0, whole_g.data(), w);
  double loss = 0, sloss = 0;
  for (const auto& [a, b] : {std::pair<int, int>{0, 2}, {2, 4}, {4, 5}}) {
    Rng r(5);  // every part draws the whole batch's draws
    FlowMatchWork<double> wp;
    const FlowMatchStep st = flow_match_step(model.field, P, states.data(), B, K, T, o, r, parts_g.data(), wp, kNoEndpoint, kNoTarget, a, b);
    CHECK(st.t == whole.t);
    CHECK(st.x1_row == whole.x1_row);
    loss += st.loss;
    sloss += st.shortcut_loss;
  }
  CHECK(loss == Approx(whole.loss).epsilon(1e-12));
  CHECK(sloss == Approx(whole.shortcut_loss).epsilon(1e-12));
  CHECK(rel_error(parts_g, whole_g) < 1e-12);
  // ranges outside the batch, and an endpoint loss on part of it, are refused by name
  for (const auto& [a, b] : {std::pair<int, int>{-1, 2}, {3, 3}, {2, 6}}) {
    Rng r(5);
    CHECK_THROWS_WITH(flow_match_step(model.field, P, states.data(), B, K, T, o, r, parts_g.data(), w, kNoEndpoint, kNoTarget, a, b),
                      Catch::Contains("not a range of the batch of 5"));
  }
  FlowMatchOptions lin;
  const EndpointLoss<double> endpoint = [](const double*, const FlowMatchStep&, double*) { return 0.0; };
  ModelConfig c2 = cfg;
  c2.step_cond = false;
  c2.finalize();
  Model<double> plain = randomized_model(c2, init);
  Rng r(5);
  CHECK_THROWS_WITH(flow_match_step(plain.field, plain.params.data() + plain.layout.field_begin(), states.data(), B, K, T,
                                    lin, r, static_cast<double*>(nullptr), w, &endpoint, kNoTarget, 0, 2),
                    Catch::Contains("endpoint loss reads the whole batch"));
}

TEST_CASE("shortcut models: the draws, the self-consistency target, and the gradient", "[flowmatch][shortcut][fd]") {
  ModelConfig cfg = make_config(11, 5, 8, 2, 12, 1, 1);
  cfg.time_cond = true;
  cfg.step_cond = true;
  cfg.time_freq = 8;
  cfg.time_scale = 3.0;
  cfg.finalize();
  Rng init(12);
  Model<double> model = randomized_model(cfg, init);
  // the target weights: another point near the trained ones (an EMA)
  Model<double> target = model;
  for (auto& p : target.params) p += 0.05 * init.normal();
  const int B = 8, K = 2, T = 3;
  const size_t n = static_cast<size_t>(T) * cfg.d_model;
  Rng data(16);
  const auto states = randn(static_cast<size_t>(B) * (K + 1) * n, data);
  double* P = model.params.data() + model.layout.field_begin();
  const double* TP = target.params.data() + target.layout.field_begin();
  for (const char* matcher : {"icfm", "trajectory"}) {
    INFO(matcher);
    FlowMatchOptions o;
    o.matcher = parse_matcher(matcher);
    o.shortcut = true;
    o.shortcut_fraction = 0.5;
    o.shortcut_steps = 8;  // steps d in {1, 1/2, 1/4}; the finest half step 1/8 is d = 0
    FlowMatchWork<double> w;
    std::vector<double> grad(model.field.num_params(), 0.0);
    Rng r1(5);
    const FlowMatchStep st = flow_match_step<double>(model.field, P, states.data(), B, K, T, o, r1, grad.data(), w, nullptr, TP);
    REQUIRE(st.shortcut_rows == 4);
    REQUIRE(st.d.size() == static_cast<size_t>(B));
    std::set<double> levels;
    for (int b = 0; b < B; ++b) {
      const double d = st.d[static_cast<size_t>(b)], t = st.t[static_cast<size_t>(b)];
      if (b >= st.shortcut_rows) {
        CHECK(d == 0.0);
        continue;
      }
      CHECK((d == 1.0 || d == 0.5 || d == 0.25));
      levels.insert(d);
      const double j = t / d;
      CHECK(j == std::floor(j));  // on the grid of d
      CHECK(t + d <= 1.0);
    }
    CHECK(levels.size() >= 2);
    // the target by hand: two half steps of the target weights, the finest as d = 0
    {
      const int m = st.shortcut_rows;
      std::vector<double> x(w.xt.begin(), w.xt.begin() + static_cast<long>(m * n)), v1(x.size()), v2(x.size()), x2(x.size());
      std::vector<double> t(st.t.begin(), st.t.begin() + m), half(static_cast<size_t>(m)), t2(static_cast<size_t>(m));
      for (int b = 0; b < m; ++b) {
        const double d = st.d[static_cast<size_t>(b)];
        half[static_cast<size_t>(b)] = d == 0.25 ? 0.0 : d / 2;
        t2[static_cast<size_t>(b)] = t[static_cast<size_t>(b)] + d / 2;
      }
      FieldCache<double> c;
      c.resize(cfg, m, T);
      target.field.forward(v1.data(), x.data(), t.data(), TP, m, T, c, half.data());
      for (int b = 0; b < m; ++b)
        for (size_t k = b * n; k < (b + 1) * n; ++k) x2[k] = x[k] + st.d[static_cast<size_t>(b)] / 2 * v1[k];
      target.field.forward(v2.data(), x2.data(), t2.data(), TP, m, T, c, half.data());
      std::vector<double> v(x.size());
      model.field.forward(v.data(), x.data(), t.data(), P, m, T, c, st.d.data());
      double sl = 0;
      for (size_t k = 0; k < v.size(); ++k) {
        const double e = v[k] - (v1[k] + v2[k]) / 2;
        sl += e * e;
      }
      CHECK(st.shortcut_loss == Approx(sl / static_cast<double>(v.size())).epsilon(1e-12));
    }
    // the gradient: of the trained weights only (the target is held fixed)
    auto loss = [&] {
      Rng r(5);
      return flow_match_step<double>(model.field, P, states.data(), B, K, T, o, r, nullptr, w, nullptr, TP).loss;
    };
    CHECK(field_grad_error(model, grad, loss, 3) < 1e-6);
    // without target weights, the trained ones make the target
    Rng r2(5);
    const FlowMatchStep self = flow_match_step<double>(model.field, P, states.data(), B, K, T, o, r2, nullptr, w);
    CHECK(self.t == st.t);
    CHECK(self.loss != st.loss);
  }
  // bad settings are named
  FlowMatchWork<double> w;
  Rng r(1);
  auto refuse = [&](FlowMatchOptions o, const Model<double>& mm, const std::string& what) {
    CHECK_THROWS_WITH(flow_match_step<double>(mm.field, mm.params.data() + mm.layout.field_begin(), states.data(), B, K,
                                              T, o, r, nullptr, w),
                      Catch::Contains(what));
  };
  FlowMatchOptions o;
  o.shortcut = true;
  o.shortcut_fraction = 1.0;
  refuse(o, model, "shortcut fraction must be in (0, 1)");
  o.shortcut_fraction = 0.25;
  o.shortcut_steps = 12;
  refuse(o, model, "power of two of at least 4");
  o.shortcut_steps = 2;
  refuse(o, model, "power of two of at least 4");
  o.shortcut_steps = 16;
  o.matcher = Matcher::SBCFM;
  o.sigma = 0.1;
  refuse(o, model, "not sbcfm");
  o.matcher = Matcher::ICFM;
  o.sigma = 0.0;
  ModelConfig tcfg = cfg;
  tcfg.step_cond = false;
  const Model<double> tc(tcfg);
  refuse(o, tc, "needs a step-conditioned field");
  EndpointLoss<double> e = [](const double*, const FlowMatchStep&, double*) { return 0.0; };
  CHECK_THROWS_WITH(flow_match_step<double>(model.field, P, states.data(), B, K, T, o, r, nullptr, w, &e),
                    Catch::Contains("do not combine"));
}

// ---- recording ---------------------------------------------------------------------

namespace {
// A small looped teacher on p-hop (8 symbols, 2 hops), written as a checkpoint.
std::string write_teacher(const TempDir& dir, const std::string& name, uint64_t seed, std::unique_ptr<DataSource>& data) {
  TrainConfig c;
  c.task = "phop";
  c.task_n = 8;
  c.task_hops = 2;
  c.d_model = 16;
  c.n_head = 2;
  c.depth.loops = 3;
  c.seed = seed;
  data = make_source(c);
  const ModelConfig mc = c.model_config(*data);
  Model<float> m(mc);
  m.init(seed);
  const std::string path = dir.file(name);
  save_checkpoint(path, m.cfg, m.layout, m.params.data(), {{"train_config", c.to_json()}});
  return path;
}
}  // namespace

TEST_CASE("record: the teacher's loop states in shards, resumable, checked on reading", "[flowmatch][record]") {
  TempDir dir("flowloop_fm_record");
  std::unique_ptr<DataSource> data;
  const std::string teacher = write_teacher(dir, "teacher.safetensors", 3, data);
  const Model<float> model = load_model<float>(teacher);
  RecordOptions o;
  o.depth.loops = 3;
  o.batch = 4;
  o.shard_size = 8;
  o.train_examples = 10;  // 3 batches: 12 examples, shards of 8 and 4
  o.test_examples = 4;
  std::ostringstream quiet;
  const std::string out = (dir.path / "data").string();
  TrajectoryManifest m = record_trajectories(teacher, *data, o, out, quiet);
  CHECK(m.K == 3);
  CHECK(m.times == std::vector<double>{0, 1, 2, 3});
  REQUIRE(m.train.size() == 2);
  CHECK(m.train[0].examples == 8);
  CHECK(m.train[1].examples == 4);
  CHECK(m.train[1].first == 8);
  CHECK(m.examples("test") == 4);
  CHECK(m.teacher_hash == file_hash(teacher));
  CHECK(file_hash((dir.path / "data" / "teacher.safetensors").string()) == m.teacher_hash);
  // the second train shard holds batch 2: the loop's states of exactly those sequences
  const TrajectoryManifest back = TrajectoryManifest::read(out);
  CHECK(back.to_json() == m.to_json());
  const TrajectoryShardData s = read_trajectory_shard(back, out, back.train[1]);
  TokenBatch tok, tgt;
  data->batch(Split::Train, 2, 4, tok, tgt);
  LoopWork<float> lw;
  model.loop_forward(tok, 3, lw);
  const size_t n = static_cast<size_t>(m.T) * m.C;
  CHECK(s.tokens == tok.data);
  CHECK(s.targets == tgt.data);
  for (size_t b = 0; b < 4; ++b)
    for (size_t k = 0; k < 4; ++k)
      CHECK(std::memcmp(s.states.data() + (b * 4 + k) * n, lw.h.data() + (k * 4 + b) * n, n * sizeof(float)) == 0);
  // a rerun asking for more goes on after the last shard and keeps the others
  const auto before = std::filesystem::last_write_time(dir.path / "data" / "train-00000.safetensors");
  o.train_examples = 20;
  m = record_trajectories(teacher, *data, o, out, quiet);
  REQUIRE(m.train.size() == 3);  // batches 3 and 4 in one more shard
  CHECK(m.train[2].first == 12);
  CHECK(m.train[2].examples == 8);
  CHECK(m.examples("train") == 20);
  CHECK(std::filesystem::last_write_time(dir.path / "data" / "train-00000.safetensors") == before);
  // another teacher into the same directory is refused
  std::unique_ptr<DataSource> data2;
  const std::string other = write_teacher(dir, "other.safetensors", 4, data2);
  CHECK_THROWS_WITH(record_trajectories(other, *data2, o, out, quiet), Catch::Contains("another teacher"));
  // another regime too
  RecordOptions o2 = o;
  o2.depth.loops = 2;
  CHECK_THROWS_WITH(record_trajectories(teacher, *data, o2, out, quiet), Catch::Contains("another depth regime"));
  // a solve records K + 1 states of the dense output; K of 0 (one state) and bad sizes
  // are refused
  RecordOptions os;
  os.depth.solver = "rk4";
  os.depth.steps = 6;
  os.states = 4;
  os.batch = 4;
  os.shard_size = 4;
  os.train_examples = 4;
  os.test_examples = 0;
  const TrajectoryManifest ms = record_trajectories(teacher, *data, os, (dir.path / "solve").string(), quiet);
  CHECK(ms.K == 3);
  CHECK(ms.times.back() == 3.0);
  RecordOptions bad = o;
  bad.shard_size = 6;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("multiple of --batch"));
  bad = os;
  bad.states = 1;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("--states must be at least 2"));
  bad = o;
  bad.states = 4;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("--states is for solves"));
  // a resume with another batch size would not continue where the recording stopped
  RecordOptions other_batch = o;
  other_batch.batch = 8;
  other_batch.shard_size = 8;
  other_batch.train_examples = 40;
  std::filesystem::copy(dir.path / "data", dir.path / "batch8", std::filesystem::copy_options::recursive);
  const std::string b8 = (dir.path / "batch8").string();
  CHECK_THROWS_WITH(record_trajectories(teacher, *data, other_batch, b8, quiet), Catch::Contains("another --batch"));
  // a missing shard, a truncated shard and a shape that disagrees are named
  std::filesystem::copy(dir.path / "data", dir.path / "broken", std::filesystem::copy_options::recursive);
  const std::string broken = (dir.path / "broken").string();
  std::filesystem::remove(dir.path / "broken" / "test-00000.safetensors");
  CHECK_THROWS_WITH(TrajectoryManifest::read(broken), Catch::Contains("'test-00000.safetensors', which is missing"));
  std::filesystem::remove(dir.path / "batch8" / "teacher.safetensors");
  CHECK_THROWS_WITH(TrajectoryManifest::read(b8), Catch::Contains("names the teacher 'teacher.safetensors', which is missing"));
  {
    nlohmann::json j = read_json_file((dir.path / "data" / "manifest.json").string(), "manifest");
    j["format"] = "something-else";
    std::filesystem::create_directories(dir.path / "format");
    write_file_atomic((dir.path / "format" / "manifest.json").string(), j.dump());
    CHECK_THROWS_WITH(TrajectoryManifest::read((dir.path / "format").string()),
                      Catch::Contains("format is 'something-else', not flowloop-trajectories"));
    j["format"] = "flowloop-trajectories";
    j["K"] = "three";
    write_file_atomic((dir.path / "format" / "manifest.json").string(), j.dump());
    CHECK_THROWS_WITH(TrajectoryManifest::read((dir.path / "format").string()), Catch::Contains("manifest.json"));
    // the files a manifest names stay inside its directory
    j = read_json_file((dir.path / "data" / "manifest.json").string(), "manifest");
    for (const char* file : {"../data/train-00000.safetensors", "/etc/passwd", "..", ""}) {
      INFO(file);
      nlohmann::json k = j;
      k["splits"]["train"][0]["file"] = file;
      CHECK_THROWS_WITH(TrajectoryManifest::parse(k, "m.json"), Catch::Contains("a file name inside the data directory"));
      k = j;
      k["teacher"] = file;
      CHECK_THROWS_WITH(TrajectoryManifest::parse(k, "m.json"), Catch::Contains("names the teacher"));
    }
    j["splits"]["test"][0]["examples"] = 0;
    CHECK_THROWS_WITH(TrajectoryManifest::parse(j, "m.json"), Catch::Contains("has 0 examples"));
  }
  const std::string shard = (dir.path / "broken" / "train-00001.safetensors").string();
  std::filesystem::resize_file(shard, std::filesystem::file_size(shard) - 7);
  TrajectoryShard ts = m.train[1];
  CHECK_THROWS_WITH(read_trajectory_shard(m, broken, ts), Catch::Contains("train-00001.safetensors"));
  ts = m.train[0];
  ts.examples = 7;
  CHECK_THROWS_WITH(read_trajectory_shard(m, out, ts), Catch::Contains("states"));
}

TEST_CASE("flowloop flow-match record on the command line", "[flowmatch][record][cli]") {
  TempDir dir("flowloop_fm_cli");
  std::unique_ptr<DataSource> data;
  const std::string teacher = write_teacher(dir, "teacher.safetensors", 5, data);
  int rc = 0;
  const std::string out = (dir.path / "data").string();
  const std::string o = run_command(std::string(FLOWLOOP_CLI) + " flow-match record -m " + teacher +
                                        " --examples 8 --test-examples 4 --batch 4 --shard-size 4 --out " + out + " 2>/dev/null",
                                    &rc);
  REQUIRE(rc == 0);
  CHECK(o.find("recorded K = 3") != std::string::npos);
  CHECK(TrajectoryManifest::read(out).train.size() == 2);
  const std::string e = run_command(std::string(FLOWLOOP_CLI) + " flow-match record -m " + teacher +
                                        " --task modarith --out " + out + " 2>&1", &rc);
  CHECK(rc != 0);
  CHECK(e.find("not on task 'modarith'") != std::string::npos);
}

// ---- training and evaluating a student --------------------------------------------

namespace {
// A teacher (p-hop, loop 3) and its recording: 24 training examples in shards of 8, 8 test.
struct Recorded {
  TempDir dir{"flowloop_fm_train"};
  std::unique_ptr<DataSource> data;
  std::string teacher, out;
  Recorded() {
    teacher = write_teacher(dir, "teacher.safetensors", 7, data);
    RecordOptions o;
    o.depth.loops = 3;
    o.batch = 4;
    o.shard_size = 8;
    o.train_examples = 24;
    o.test_examples = 8;
    out = (dir.path / "data").string();
    std::ostringstream quiet;
    record_trajectories(teacher, *data, o, out, quiet);
  }
};

FlowMatchConfig small_config(const std::string& data, const std::string& out) {
  FlowMatchConfig c;
  c.data = data;
  c.out = out;
  c.steps = 6;
  c.batch = 4;
  c.warmup = 2;
  c.eval_every = 3;
  c.eval_batches = 1;
  c.checkpoint_every = 100;
  c.time_freq = 8;
  return c;
}

// Every row of a batch, as its first token and the bits of its first state value.
std::vector<std::pair<int32_t, float>> rows_of(const TrajectoryBatch& b) {
  std::vector<std::pair<int32_t, float>> r;
  for (int i = 0; i < b.B; ++i)
    r.push_back({b.tokens.data[static_cast<size_t>(i) * b.T], b.state(i, 1)[0]});
  return r;
}
}  // namespace

TEST_CASE("decode loss: the KL of the decoded ends, its gradient against finite differences", "[flowmatch][fd]") {
  ModelConfig cfg = make_config(7, 4, 8, 2, 12, 1, 1);
  Model<double> model(cfg);
  Rng init(3);
  for (auto& p : model.params) p = 0.5 * init.normal();
  const int B = 3, T = 4;
  const size_t n = static_cast<size_t>(T) * cfg.d_model;
  Rng rng(4);
  const auto ends = randn(static_cast<size_t>(B) * n, rng);
  auto x = randn(static_cast<size_t>(B) * n, rng);
  TokenBatch targets;
  targets.B = B;
  targets.T = T;
  targets.data = {1, -1, 2, 3, -1, -1, 0, 6, 5, 4, -1, 1};
  DecodeLoss<double> dl(model, 0.7);
  dl.set_batch(ends.data(), targets);
  FlowMatchStep st;
  st.x1_row = {2, 0, 1};  // a coupling: slot b ends as recording x1_row[b]
  std::vector<double> g(x.size());
  const double l = dl(x.data(), st, g.data());
  CHECK(l > 0);
  auto loss = [&] {
    std::vector<double> scratch(x.size());
    return dl(x.data(), st, scratch.data());
  };
  std::vector<double> got, fd;
  for (size_t k : {size_t{0}, size_t{5}, n + 3, 2 * n + 7, 2 * n + n - 1}) {
    got.push_back(g[k]);
    fd.push_back(fd_grad(loss, x.data() + k, 1)[0]);
  }
  CHECK(rel_error(got, fd) < 1e-6);
  // the ends themselves, each in its own slot: no loss, no gradient
  std::vector<double> perm(x.size());
  for (int b = 0; b < B; ++b)
    std::copy_n(ends.data() + static_cast<size_t>(st.x1_row[static_cast<size_t>(b)]) * n, n, perm.data() + static_cast<size_t>(b) * n);
  CHECK(std::fabs(dl(perm.data(), st, g.data())) < 1e-12);
  for (double e : g) CHECK(std::fabs(e) < 1e-12);
}

TEST_CASE("trajectory loader: a (seed, index) order that visits every example once per epoch", "[flowmatch][loader]") {
  Recorded R;
  TrajectoryLoader a(R.out, "train", 3), b(R.out, "train", 3), c(R.out, "train", 4);
  REQUIRE(a.examples() == 24);
  // the epoch's 6 batches of 4 hold the 24 recordings, each once
  TrajectoryBatch x, y, all;
  a.range(0, 24, all);
  std::vector<std::pair<int32_t, float>> want = rows_of(all), got;
  for (int i = 0; i < 6; ++i) {
    a.batch(i, 4, x);
    const auto r = rows_of(x);
    got.insert(got.end(), r.begin(), r.end());
  }
  std::sort(want.begin(), want.end());
  std::vector<std::pair<int32_t, float>> sorted = got;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == want);
  // and in another order than recorded
  CHECK(got != rows_of(all));
  // batch i does not depend on what was read before it, nor on the loader
  b.batch(7, 4, y);
  a.batch(7, 4, x);
  CHECK(x.states == y.states);
  CHECK(x.tokens.data == y.tokens.data);
  CHECK(x.targets.data == y.targets.data);
  b.batch(2, 4, y);
  a.batch(2, 4, x);
  CHECK(x.states == y.states);
  // the next epoch is another order; another seed another order
  a.batch(6, 4, x);
  a.batch(0, 4, y);
  CHECK(x.states != y.states);
  c.batch(0, 4, x);
  CHECK(x.states != y.states);
  // the recorded states are the teacher's loop states
  // (examples 4..7: one batch of the recorder, so that the products are the same)
  const Model<float> teacher = load_model<float>(R.teacher);
  a.range(4, 4, x);
  LoopWork<float> w;
  teacher.loop_forward(x.tokens, 3, w);
  const size_t n = static_cast<size_t>(x.T) * x.C;
  for (int r = 0; r < 4; ++r)
    for (int k = 0; k <= 3; ++k)
      CHECK(std::equal(x.state(r, k), x.state(r, k) + n, w.h.data() + (static_cast<size_t>(k) * 4 + r) * n));
  CHECK_THROWS_WITH(a.range(20, 5, x), Catch::Contains("which has 24"));
  // every third state of K = 3: h_0 and h_3
  TrajectoryBatch sub = x;
  sub.subsample(3);
  CHECK(sub.K == 1);
  CHECK(sub.states.size() == x.states.size() / 2);
  for (int r = 0; r < 4; ++r) {
    CHECK(std::equal(sub.state(r, 0), sub.state(r, 0) + n, x.state(r, 0)));
    CHECK(std::equal(sub.state(r, 1), sub.state(r, 1) + n, x.state(r, 3)));
  }
  CHECK_THROWS_WITH(x.subsample(2), Catch::Contains("does not divide K = 3"));
  CHECK_THROWS_WITH(x.subsample(0), Catch::Contains("at least 1"));
}

TEST_CASE("trajectory loader: another teacher, K of 0 and missing files are named", "[flowmatch][loader]") {
  Recorded R;
  namespace fs = std::filesystem;
  // the teacher file replaced by another one
  const std::string moved = (R.dir.path / "moved").string();
  fs::copy(R.out, moved);
  std::unique_ptr<DataSource> d2;
  fs::copy_file(write_teacher(R.dir, "other.safetensors", 8, d2), moved + "/teacher.safetensors",
                fs::copy_options::overwrite_existing);
  CHECK_THROWS_WITH(TrajectoryLoader(moved, "train", 0), Catch::Contains("another teacher"));
  fs::remove(moved + "/teacher.safetensors");
  CHECK_THROWS_WITH(TrajectoryLoader(moved, "train", 0), Catch::Contains("which is missing"));
  // K of 0
  json j = read_json_file(R.out + "/manifest.json", "");
  j["K"] = 0;
  const std::string k0 = (R.dir.path / "k0").string();
  fs::copy(R.out, k0);
  write_file_atomic(k0 + "/manifest.json", j.dump());
  CHECK_THROWS_WITH(TrajectoryLoader(k0, "train", 0), Catch::Contains("K must be at least 1"));
  // a teacher whose training data cannot be rebuilt (how its answers are scored is unknown)
  {
    const std::string unscored = (R.dir.path / "unscored").string();
    fs::copy(R.out, unscored);
    const Model<float> t = load_model<float>(R.teacher);
    const SafetensorsFile f = SafetensorsFile::read(R.teacher);
    json tc = json::parse(f.metadata().at("train_config"));
    tc["task"] = "no-such-task";
    save_checkpoint(unscored + "/teacher.safetensors", t.cfg, t.layout, t.params.data(), {{"train_config", tc.dump()}});
    json mj = read_json_file(unscored + "/manifest.json", "");
    mj["teacher_hash"] = file_hash(unscored + "/teacher.safetensors");
    write_file_atomic(unscored + "/manifest.json", mj.dump());
    CHECK_THROWS_WITH(TrajectoryLoader(unscored, "train", 0),
                      Catch::Contains("cannot tell how the teacher's data is scored") && Catch::Contains("no-such-task"));
  }
  // a shard that is gone
  fs::remove(R.out + "/train-00001.safetensors");
  CHECK_THROWS_WITH(TrajectoryLoader(R.out, "train", 0), Catch::Contains("train-00001.safetensors"));
}

TEST_CASE("flow-match config: unknown keys, matchers and bad values are named", "[flowmatch][train]") {
  CHECK_THROWS_WITH(FlowMatchConfig::from_json("{\"matchr\": \"icfm\"}", "x"), Catch::Contains("unknown key \"matchr\""));
  CHECK_THROWS_WITH(FlowMatchConfig::from_json("{\"sigma\": \"big\"}", "x"), Catch::Contains("\"sigma\" has the wrong type"));
  FlowMatchConfig c = small_config("d", "o");
  c.validate();
  CHECK(FlowMatchConfig::from_json(c.to_json(), "x").to_json() == c.to_json());
  auto bad = [&](auto edit, const char* what) {
    FlowMatchConfig b = c;
    edit(b);
    CHECK_THROWS_WITH(b.validate(), Catch::Contains(what));
  };
  bad([](FlowMatchConfig& b) { b.matcher = "cfm"; }, "cfm");
  bad([](FlowMatchConfig& b) { b.coupling = "greedy"; }, "greedy");
  bad([](FlowMatchConfig& b) { b.time_sampler = "beta"; }, "beta");
  bad([](FlowMatchConfig& b) { b.sigma = -0.1; }, "sigma must be 0 or more");
  bad([](FlowMatchConfig& b) { b.ema = 1.0; }, "ema");
  bad([](FlowMatchConfig& b) { b.data.clear(); }, "no recording");
  bad([](FlowMatchConfig& b) { b.decode_weight = -1; }, "decode_weight");
  bad([](FlowMatchConfig& b) {
        b.matcher = "vp";
        b.decode_weight = 1;
      }, "needs a linear path");
  bad([](FlowMatchConfig& b) {
        b.matcher = "trajectory";
        b.reflow = 1;
      }, "reflow");
  bad([](FlowMatchConfig& b) {
        b.reflow = 1;
        b.reflow_sampler = "loop:2";
      }, "reflow_sampler");
  bad([](FlowMatchConfig& b) {
        b.shortcut = true;
        b.decode_weight = 1;
      }, "shortcut and decode_weight do not combine");
  bad([](FlowMatchConfig& b) {
        b.shortcut = true;
        b.shortcut_fraction = 0;
      }, "shortcut fraction must be in (0, 1)");
}

TEST_CASE("the student starts as the teacher's field: Euler 1 on [0, 1] is the teacher's loop 1", "[flowmatch][eval]") {
  Recorded R;
  const Model<float> teacher = load_model<float>(R.teacher);
  const Model<float> s = make_student(teacher, 8, 100.0, 1);
  CHECK(s.cfg.time_cond);
  CHECK(s.cfg.depth == 1);
  const int B = 2, T = teacher.cfg.context, C = teacher.cfg.d_model;
  const size_t N = static_cast<size_t>(B) * T * C;
  Rng rng(2);
  Buffer<float> h(N), f1(N), f2(N);
  for (auto& e : h) e = static_cast<float>(rng.normal());
  FieldCache<float> c1, c2;
  c1.resize(teacher.cfg, B, T);
  c2.resize(s.cfg, B, T);
  const std::vector<double> t0 = {0.0, 1.0}, t1 = {0.25, 0.75};
  teacher.field.forward(f1.data(), h.data(), t0.data(), teacher.field_params(), B, T, c1);
  s.field.forward(f2.data(), h.data(), t1.data(), s.field_params(), B, T, c2);
  CHECK(f1 == f2);
  // a time-conditioned teacher's modulation does not come along: the student's starts at zero
  {
    ModelConfig tcfg = teacher.cfg;
    tcfg.time_cond = true;
    tcfg.finalize();
    Model<float> tt(tcfg);
    tt.init(4);
    for (const auto& t : tt.layout.tensors())
      if (t.name.find(".ada.") != std::string::npos) std::fill_n(tt.params.data() + t.offset, t.numel, 0.5f);
    const Model<float> s2 = make_student(tt, 8, 100.0, 1);
    const TensorInfo* ada = s2.layout.find("field.h.0.ada.bias");
    REQUIRE(ada);
    CHECK(std::all_of(s2.params.begin() + static_cast<long>(ada->offset),
                      s2.params.begin() + static_cast<long>(ada->offset + ada->numel), [](float x) { return x == 0; }));
  }
  TrajectoryLoader test(R.out, "test", 0);
  FlowEvalOptions o;
  o.samplers = DepthSpec::parse_list("euler:1,euler:3");
  o.batch = 3;  // 8 examples: batches of 3, 3 and 2
  const auto rows = flow_match_evaluate(s, teacher, test, o);
  // rows: the two samplers, then teacher-loop 1..3 and teacher-euler 1, 2
  REQUIRE(rows.size() == 7);
  CHECK(rows[0].sampler == "euler:1");
  CHECK(rows[1].nfe == 3);
  CHECK(rows[0].examples == 8);
  CHECK(rows[2].sampler == "teacher-loop");
  CHECK(rows[2].nfe == 1);
  CHECK(rows[0].rel_l2 == Approx(rows[2].rel_l2).epsilon(1e-6));
  CHECK(rows[0].kl == Approx(rows[2].kl).epsilon(1e-5));
  CHECK(rows[0].accuracy == rows[2].accuracy);
  CHECK(rows[0].rel_l2 > 0.01);  // loop 1 is far from the end
  // teacher-loop 3 is the recorded end: its accuracy is the teacher's on these examples
  CHECK(rows[4].sampler == "teacher-loop");
  CHECK(rows[4].nfe == 3);
  CHECK(rows[4].rel_l2 < 1e-6);
  CHECK(rows[4].kl < 1e-9);
  TrajectoryBatch all;
  test.range(0, 8, all);
  LoopWork<float> w;
  teacher.loop_forward(all.tokens, 3, w);
  int64_t cnt = 0;
  CHECK(rows[4].accuracy == Approx(accuracy(w.readout.logits.data(), all.targets, teacher.cfg.vocab_size,
                                            test.exact_match(), &cnt)));
  // N Euler steps over [0, 3]: one step of 3, two of 1.5
  CHECK(rows[5].sampler == "teacher-euler");
  CHECK(rows[5].nfe == 1);
  CHECK(rows[6].nfe == 2);
  CHECK(rows[2].rel_l2 != rows[5].rel_l2);
  CHECK(rows[2].straightness < 1e-10);  // one segment is straight
  CHECK(rows[5].straightness < 1e-10);
  CHECK(rows[3].straightness > 0);
  // Euler 1's path is one segment too: v(x_t, t) = x1 - x0 only where the field is constant
  CHECK(rows[0].straightness > 0);
  CHECK(rows[4].frechet < 1e-6 * (1 + rows[2].frechet));  // the teacher's own ends
  CHECK(rows[2].frechet > 0);
  // the odeint samplers report no steps, which straightness needs: refused before any work
  FlowEvalOptions bad = o;
  bad.samplers = DepthSpec::parse_list("odeint-rk4:2");
  CHECK_THROWS_WITH(flow_match_evaluate(s, teacher, test, bad), Catch::Contains("odeint"));
  // as a generative student (from noise): distributions only
  FlowEvalOptions g = o;
  g.generative = true;
  const auto grows = flow_match_evaluate(s, teacher, test, g);
  REQUIRE(grows.size() == rows.size());
  CHECK(std::isnan(grows[0].accuracy));
  CHECK(std::isnan(grows[0].rel_l2));
  CHECK(std::isfinite(grows[0].kl));
  CHECK(grows[0].kl >= 0);
  CHECK(grows[0].frechet > 0);
  CHECK(grows[0].frechet != rows[0].frechet);  // another start
  CHECK(grows[4].accuracy == rows[4].accuracy);  // the teacher rows start from h_0 still
  for (const auto& r : rows) {
    CHECK(std::isfinite(r.rel_l2));
    CHECK(std::isfinite(r.straightness));
    CHECK(r.kl >= -1e-9);
    CHECK(r.status == "ok");
  }
}

TEST_CASE("Frechet distance: zero between equals, the closed form for diagonal covariances", "[flowmatch][eval]") {
  const int C = 3;
  const std::vector<double> mu1 = {0.5, -1, 2}, mu2 = {0.5, 1, 2};
  std::vector<double> a(9, 0.0), b(9, 0.0);
  const double s1[3] = {1, 4, 0.25}, s2[3] = {9, 1, 0.25};  // variances
  for (int i = 0; i < C; ++i) {
    a[static_cast<size_t>(i * C + i)] = s1[i];
    b[static_cast<size_t>(i * C + i)] = s2[i];
  }
  CHECK(frechet_distance(mu1, a, mu1, a, C) == Approx(0).margin(1e-12));
  // ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2 = 4 + (1 - 3)^2 + (2 - 1)^2 + 0
  CHECK(frechet_distance(mu1, a, mu2, b, C) == Approx(9.0).epsilon(1e-12));
  // rotating both covariances by the same orthogonal matrix changes nothing
  const double c = std::cos(0.3), sn = std::sin(0.3);
  const double R[9] = {c, -sn, 0, sn, c, 0, 0, 0, 1};
  auto rot = [&](const std::vector<double>& m) {
    std::vector<double> out(9, 0.0);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        for (int k = 0; k < 3; ++k)
          for (int l = 0; l < 3; ++l) out[static_cast<size_t>(i * 3 + j)] += R[i * 3 + k] * m[static_cast<size_t>(k * 3 + l)] * R[j * 3 + l];
    return out;
  };
  CHECK(frechet_distance(mu1, rot(a), mu2, rot(b), C) == Approx(9.0).epsilon(1e-9));
  CHECK_THROWS_WITH(frechet_distance(mu1, a, mu2, b, 2), Catch::Contains("C = 2"));
}

TEST_CASE("flow-match train: a run stopped and resumed is the uninterrupted run", "[flowmatch][train]") {
  Recorded R;
  for (const char* matcher : {"icfm", "trajectory"}) {
    FlowMatchConfig c = small_config(R.out, (R.dir.path / (std::string("a-") + matcher)).string());
    c.matcher = matcher;
    c.checkpoint_every = 3;  // a stop after step 4 loses step 4
    if (c.matcher == "icfm") {
      c.reflow = 1;  // a second round on the first round's flow
      c.decode_weight = 0.5;
    } else {
      c.shortcut = true;  // a step-conditioned student, its targets from the EMA weights
      c.shortcut_fraction = 0.5;
      c.shortcut_steps = 4;
    }
    std::ostringstream quiet;
    FlowMatchTrainer whole(c);
    whole.run(false, quiet);
    CHECK(whole.step() == (c.reflow + 1) * c.steps);
    FlowMatchConfig cb = c;
    cb.out = (R.dir.path / (std::string("b-") + matcher)).string();
    {
      FlowMatchTrainer first(cb);
      first.run(false, quiet, c.reflow ? 8 : 4);  // icfm: stopped inside the second round
    }
    FlowMatchTrainer rest(cb);
    rest.run(true, quiet);
    CHECK(rest.step() == whole.step());
    CHECK(rest.model().params == whole.model().params);
    const Model<float> a = load_model<float>(c.out + "/model.safetensors");
    CHECK(a.params == whole.model().params);
    // the metrics of both runs agree on every loss
    auto losses = [](const std::string& dir) {
      std::vector<double> l;
      std::ifstream in(dir + "/metrics.jsonl");
      for (std::string line; std::getline(in, line);) l.push_back(json::parse(line).at("loss").get<double>());
      return l;
    };
    CHECK(losses(c.out) == losses(cb.out));
    CHECK(losses(c.out).size() == static_cast<size_t>(whole.step()));
    // only the field trained: the embedding and readout are the teacher's
    const Model<float> teacher = load_model<float>(R.teacher);
    const TensorInfo* wte = a.layout.find("wte.weight");
    const TensorInfo* twte = teacher.layout.find("wte.weight");
    CHECK(std::equal(a.params.begin() + static_cast<long>(wte->offset),
                     a.params.begin() + static_cast<long>(wte->offset + wte->numel),
                     teacher.params.begin() + static_cast<long>(twte->offset)));
    if (c.reflow) CHECK(std::filesystem::exists(c.out + "/model-round-0.safetensors"));
    CHECK(a.cfg.step_cond == c.shortcut);
    if (c.shortcut) {  // the step embedding trained, and the metrics report the shortcut loss
      std::ifstream in(c.out + "/metrics.jsonl");
      std::string line;
      std::getline(in, line);
      const json j = json::parse(line);
      CHECK(j.at("shortcut_loss").get<double>() > 0);
      CHECK(j.at("nfe_forward").get<double>() == 2.0);  // half the batch: two target evaluations each
      const Model<float> s0 = make_student(load_model<float>(R.teacher), c.time_freq, c.time_scale, c.seed, true);
      const TensorInfo& se = a.layout.at("step_embed.mlp.2.weight");
      CHECK_FALSE(std::equal(a.params.begin() + static_cast<long>(se.offset),
                             a.params.begin() + static_cast<long>(se.offset + se.numel),
                             s0.params.begin() + static_cast<long>(se.offset)));
    }
    // resuming a finished run changes nothing
    {
      FlowMatchTrainer again(cb);
      again.run(true, quiet);
      CHECK(again.step() == whole.step());
      CHECK(again.model().params == whole.model().params);
    }
    // a resume under another configuration is refused
    FlowMatchConfig other = cb;
    other.lr = 5e-4;
    FlowMatchTrainer t(other);
    CHECK_THROWS_WITH(t.run(true, quiet), Catch::Contains("another configuration"));
  }
}

TEST_CASE("flow-match train on thread ranks: 2 ranks train as one process", "[flowmatch][train][dist]") {
  Recorded R;
  for (const char* matcher : {"otcfm", "trajectory"}) {
    INFO(matcher);
    FlowMatchConfig c = small_config(R.out, (R.dir.path / (std::string("one-") + matcher)).string());
    c.matcher = matcher;
    c.batch = 5;  // ranks of 3 and 2 rows
    c.checkpoint_every = 3;
    if (c.matcher == "otcfm") {
      c.reflow = 1;  // a second round: every rank re-targets the whole batch by the first round's flow
    } else {
      c.shortcut = true;  // shortcut slots 0..2: rank 0 holds all of them, rank 1 none
      c.shortcut_fraction = 0.5;
      c.shortcut_steps = 4;
    }
    std::ostringstream quiet;
    FlowMatchTrainer whole(c);
    whole.run(false, quiet);
    FlowMatchConfig c2 = c;
    c2.out = (R.dir.path / (std::string("two-") + matcher)).string();
    std::vector<Buffer<float>> params(2);
    const auto errors = on_thread_ranks(2, [&](int r, std::shared_ptr<ThreadRank> comm) {
      FlowMatchTrainer t(c2, comm);
      std::ostringstream q;
      t.run(false, q);
      params[static_cast<size_t>(r)] = t.model().params;
    });
    for (const auto& e : errors) REQUIRE(e.empty());
    CHECK(params[0] == params[1]);  // every rank holds the same weights, bit for bit
    CHECK(rel_error(std::vector<double>(params[0].begin(), params[0].end()),
                    std::vector<double>(whole.model().params.begin(), whole.model().params.end())) < 1e-4);
    auto metrics = [](const std::string& dir) {
      std::vector<json> l;
      std::ifstream in(dir + "/metrics.jsonl");
      for (std::string line; std::getline(in, line);) l.push_back(json::parse(line));
      return l;
    };
    const auto a = metrics(c.out), b = metrics(c2.out);
    REQUIRE(a.size() == static_cast<size_t>((c.reflow + 1) * c.steps));
    REQUIRE(b.size() == a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      INFO("step " << i + 1);
      CHECK(b[i].at("ranks") == 2);
      for (const char* k : {"loss", "grad_norm", "coupling_cost"}) {
        const double x = a[i].at(k).get<double>(), y = b[i].at(k).get<double>();
        CHECK(std::fabs(x - y) <= 1e-5 * std::max(std::fabs(x), std::fabs(y)));
      }
      if (c.shortcut) CHECK(b[i].at("shortcut_loss").get<double>() == Approx(a[i].at("shortcut_loss").get<double>()).epsilon(1e-5));
    }
  }
  // the decode loss reads the whole batch: not split over ranks
  FlowMatchConfig d = small_config(R.out, (R.dir.path / "decode").string());
  d.decode_weight = 0.5;
  const auto errors = on_thread_ranks(2, [&](int, std::shared_ptr<ThreadRank> comm) { FlowMatchTrainer t(d, comm); });
  for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("decode loss") && Catch::Contains("2 ranks"));
}

TEST_CASE("flow-match train: a resume on a recording of another teacher is refused", "[flowmatch][train]") {
  Recorded R;
  FlowMatchConfig c = small_config(R.out, (R.dir.path / "run").string());
  c.checkpoint_every = 3;
  std::ostringstream quiet;
  {
    FlowMatchTrainer first(c);
    first.run(false, quiet, 3);
  }
  // the recording's path now holds another teacher's paths
  std::unique_ptr<DataSource> d2;
  const std::string other = write_teacher(R.dir, "other.safetensors", 9, d2);
  std::filesystem::remove_all(R.out);
  RecordOptions o;
  o.depth.loops = 3;
  o.batch = 4;
  o.shard_size = 8;
  o.train_examples = 24;
  o.test_examples = 8;
  record_trajectories(other, *d2, o, R.out, quiet);
  FlowMatchTrainer again(c);
  CHECK_THROWS_WITH(again.run(true, quiet), Catch::Contains("learned from teacher") && Catch::Contains("is of teacher"));
}

TEST_CASE("flowloop flow-match train and eval on the command line", "[flowmatch][train][cli]") {
  Recorded R;
  const std::string cli = FLOWLOOP_CLI, out = (R.dir.path / "student").string();
  int rc = 0;
  run_command(cli + " flow-match train --data " + R.out + " --matcher otcfm --coupling exact --steps 4 --batch 4" +
                  " --eval-every 2 --eval-batches 1 --time-freq 8 --out " + out + " 2>/dev/null",
              &rc);
  REQUIRE(rc == 0);
  const std::string o = run_command(cli + " flow-match eval -m " + out + "/model.safetensors --data " + R.out +
                                        " --samplers euler:1,euler:2,rk4:1,dopri5:1e-3 --json --csv " + out +
                                        "/eval.csv 2>/dev/null",
                                    &rc);
  REQUIRE(rc == 0);
  std::istringstream lines(o);
  int students = 0, teachers = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] != '{') continue;  // progress on stderr
    const json j = json::parse(line);
    for (const char* k : {"sampler", "nfe", "rel_l2", "kl", "accuracy", "straightness"}) CHECK(j.contains(k));
    const std::string s = j.at("sampler").get<std::string>();
    if (s.rfind("teacher-", 0) == 0) ++teachers;
    else ++students;
    if (s == "rk4:1") CHECK(j.at("nfe").get<double>() == 4);
  }
  CHECK(students == 4);
  CHECK(teachers == 5);  // loop 1..3, Euler 1 and 2 over [0, 3]
  CHECK(std::filesystem::exists(out + "/eval.csv"));
  // a shortcut student: shortcut:N rows by default (N Euler steps told their step)
  run_command(cli + " flow-match train --data " + R.out + " --matcher icfm --shortcut --shortcut-steps 4 " +
                  "--shortcut-fraction 0.5 --steps 2 --batch 4 --eval-every 2 --eval-batches 1 --time-freq 8 --out " +
                  out + "-sc 2>/dev/null",
              &rc);
  REQUIRE(rc == 0);
  {
    const std::string so = run_command(cli + " flow-match eval -m " + out + "-sc/model.safetensors --data " + R.out +
                                           " --no-teacher --json 2>/dev/null",
                                       &rc);
    REQUIRE(rc == 0);
    std::set<std::string> names;
    std::istringstream sl(so);
    for (std::string line; std::getline(sl, line);)
      if (!line.empty() && line[0] == '{') {
        const json j = json::parse(line);
        names.insert(j.at("sampler").get<std::string>());
        if (j.at("sampler") == "shortcut:2") CHECK(j.at("nfe").get<double>() == 2);
      }
    for (const char* s : {"shortcut:1", "shortcut:2", "shortcut:4", "shortcut:8", "shortcut:3", "euler:1", "rk4:2"})
      CHECK(names.count(s) == 1);
    const std::string only = run_command(cli + " flow-match eval -m " + out + "-sc/model.safetensors --data " + R.out +
                                             " --samplers shortcut:1,rk4:1 --no-teacher --json 2>/dev/null",
                                         &rc);
    REQUIRE(rc == 0);
    CHECK(std::count(only.begin(), only.end(), '{') == 2);  // those two rows only
  }
  std::string se = run_command(cli + " flow-match eval -m " + out + "/model.safetensors --data " + R.out +
                                   " --samplers shortcut:2 2>&1",
                               &rc);
  CHECK(rc != 0);
  CHECK(se.find("need a step-conditioned student") != std::string::npos);
  se = run_command(cli + " flow-match eval -m " + out + "-sc/model.safetensors --data " + R.out + " --samplers shortcut:x 2>&1",
                   &rc);
  CHECK(rc != 0);
  CHECK(se.find("'shortcut:x' is not shortcut:N") != std::string::npos);
  se = run_command(cli + " flow-match eval -m " + out + "-sc/model.safetensors --data " + R.out + " --samplers shortcut:0 2>&1",
                   &rc);
  CHECK(rc != 0);
  CHECK(se.find("a shortcut sampler needs at least 1 step, not 0") != std::string::npos);
  se = run_command(cli + " flow-match train --data " + R.out + " --shortcut --shortcut-steps 6 --out " + out + "x 2>&1", &rc);
  CHECK(rc != 0);
  CHECK(se.find("power of two") != std::string::npos);
  // a generative student: its rows compare distributions (accuracy and rel_l2 null)
  run_command(cli + " flow-match train --data " + R.out + " --matcher generative --steps 2 --batch 4 --eval-every 2" +
                  " --eval-batches 1 --time-freq 8 --out " + out + "-gen 2>/dev/null",
              &rc);
  REQUIRE(rc == 0);
  const std::string g = run_command(cli + " flow-match eval -m " + out + "-gen/model.safetensors --data " + R.out +
                                        " --samplers euler:2 --no-teacher --json 2>/dev/null",
                                    &rc);
  REQUIRE(rc == 0);
  const json gj = json::parse(g.substr(g.find('{')));
  CHECK(gj.at("accuracy").is_null());
  CHECK(gj.at("frechet").get<double>() > 0);
  // errors named before any work
  std::string e = run_command(cli + " flow-match train --data " + R.out + " --matcher cfm --out " + out + "x 2>&1", &rc);
  CHECK(rc != 0);
  CHECK(e.find("'cfm'") != std::string::npos);
  e = run_command(cli + " flow-match train --data " + R.out + " --sigma -1 --out " + out + "x 2>&1", &rc);
  CHECK(rc != 0);
  CHECK(e.find("sigma") != std::string::npos);
  e = run_command(cli + " flow-match eval -m " + R.teacher + " --data " + R.out + " 2>&1", &rc);
  CHECK(rc != 0);
  CHECK(e.find("not a flow-match model") != std::string::npos);
  // a recording of another teacher
  std::unique_ptr<DataSource> d2;
  const std::string other = write_teacher(R.dir, "other.safetensors", 9, d2);
  run_command(cli + " flow-match record -m " + other + " --examples 4 --test-examples 4 --batch 4 --shard-size 4 --out " +
                  R.dir.file("other-data") + " 2>/dev/null",
              &rc);
  REQUIRE(rc == 0);
  e = run_command(cli + " flow-match eval -m " + out + "/model.safetensors --data " + R.dir.file("other-data") + " 2>&1",
                  &rc);
  CHECK(rc != 0);
  CHECK(e.find("is of teacher") != std::string::npos);
}
