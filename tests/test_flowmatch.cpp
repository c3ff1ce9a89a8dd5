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
#include <memory>
#include <numeric>
#include <sstream>

#include "check.hpp"
#include "flowloop/checkpoint.hpp"
#include "flowloop/flowmatch.hpp"
#include "flowloop/io.hpp"
#include "flowloop/model.hpp"
#include "flowloop/train.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace {
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
    for (int rep = 0; rep < 6; ++rep) {
      INFO("n " << n << " rep " << rep);
      std::vector<double> cost(static_cast<size_t>(n * n));
      // rep 0: integer costs with ties; the others continuous
      for (auto& c : cost) c = rep == 0 ? std::floor(4 * rng.uniform()) : rng.normal();
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
  Model<double> model(cfg);
  Rng init(2);
  for (auto& p : model.params) p = 0.3 * init.normal();
  for (const auto& t : model.layout.tensors())
    if (t.name.find("ln_") != std::string::npos && t.name.find(".weight") != std::string::npos)
      for (size_t i = 0; i < t.numel; ++i) model.params[t.offset + i] += 1.0;
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
    std::vector<double> got, fd;
    for (const auto& t : model.layout.tensors()) {
      if (t.offset < model.layout.field_begin() || t.offset >= model.layout.field_end()) continue;
      const size_t lo = t.offset - model.layout.field_begin(), cnt = std::min<size_t>(t.numel, 3);
      const auto g = fd_grad(loss, P + lo, cnt);
      got.insert(got.end(), grad.begin() + static_cast<long>(lo), grad.begin() + static_cast<long>(lo + cnt));
      fd.insert(fd.end(), g.begin(), g.end());
    }
    CHECK(rel_error(got, fd) < 1e-6);
    if (o.coupling == Coupling::Exact) {
      std::vector<int> sorted = st.x1_row;
      std::sort(sorted.begin(), sorted.end());
      CHECK(sorted == std::vector<int>{0, 1, 2});
    }
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
