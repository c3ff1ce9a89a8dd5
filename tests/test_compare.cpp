// flowloop compare: regimes (parse, label, validation), one model under many
// regimes on the same examples, failed regimes as rows, the Pareto front against
// brute force, the files, bad input. flowloop trajectory: the lens at every depth
// (ending where eval ends), the solver's steps, PCA, the states, bad input.
// flowloop sweep (train x eval, resumable) and bench wp (work-precision).
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "check.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/study/compare.hpp"
#include "flowloop/study/sweep.hpp"
#include "flowloop/study/trajectory.hpp"
#include "flowloop/train/train.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace {
std::unique_ptr<DataSource> phop_source() {
  TrainConfig c;
  c.task = "phop";
  c.task_n = 8;
  c.task_hops = 2;
  return make_source(c);
}

// A small p-hop model trained by the CLI for a few steps at 3 loops (only the plumbing matters).
std::string tiny_phop_model(const TempDir& dir) {
  int rc = 0;
  const std::string out = run_command(std::string(FLOWLOOP_CLI) + " train --task phop --task-n 8 --hops 2 --loops 3 "
                                      "--d-model 16 --n-head 2 --steps 4 --batch 4 --eval-every 4 --eval-batches 1 "
                                      "--out " + dir.file("m") + " 2>&1", &rc);
  INFO(out);
  REQUIRE(rc == 0);
  return dir.file("m") + "/model.safetensors";
}

Model<float> phop_model(const DataSource& d, bool gate) {
  ModelConfig cfg = make_config(d.vocab_size(), d.seq_len(), 16, 2, 32, 1, 3);
  cfg.exit_gate = gate;
  cfg.finalize();
  Model<float> m(cfg);
  m.init(11);
  return m;
}
}  // namespace

TEST_CASE("regimes: parse, label round trip, and one error per mistake", "[compare]") {
  for (const char* t : {"loop:4", "rk4:8", "dopri5:0.001", "dopri5:0.001@coupled", "dopri5:0.01@terminal0.05",
                        "loop:8@delta1.5", "loop:4@q0.5", "tsit5:1e-06@coupled@terminal0.01"}) {
    const Regime r = Regime::parse(t);
    CHECK(r.label() == t);
    CHECK(Regime::parse(r.label()).label() == r.label());
  }
  const Regime c = Regime::parse("dopri5:1e-3@coupled");
  CHECK(c.depth.coupled);
  CHECK(c.depth.rtol == 1e-3);
  CHECK(c.depth.atol == Approx(1e-4));
  auto fails = [](const std::string& t, const std::string& what) {
    try {
      Regime::parse(t);
      FAIL("no error for " << t);
    } catch (const Error& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
  };
  fails("dopri6:1e-3", "dopri6");                 // unknown solver
  fails("dopri5:abc", "not a positive number");    // bad tolerance
  fails("dopri5:-1e-3", "not a positive number");
  fails("euler:1e-3", "takes a step count");       // a tolerance for a fixed-step method
  fails("dopri5:1e-3@q0.5", "apply to looping");   // an exit rule on a solve
  fails("loop:4@fast", "unknown modifier");
  fails("loop:4@q", "positive number");
  fails("rk4:8@coupled", "");                      // coupled is adaptive only (DepthSpec's error)
  CHECK_THROWS_AS(Regime::parse_list(" , "), Error);
  CHECK(Regime::parse_list("loop:2, rk4:4 ,dopri5:1e-2").size() == 3);
  // q needs a model with an exit gate, and q in (0, 1]
  const ModelConfig plain = make_config(5, 4, 8, 2, 16, 1, 3);
  CHECK_THROWS_WITH(Regime::parse("loop:3@q0.5").validate(plain), Catch::Contains("no exit gate"));
  ModelConfig gated = plain;
  gated.exit_gate = true;
  CHECK_NOTHROW(Regime::parse("loop:3@q0.5").validate(gated));
  CHECK_THROWS_WITH(Regime::parse("loop:3@q2").validate(gated), Catch::Contains("(0, 1]"));
}

TEST_CASE("default regimes: loops 1..2D, fixed steps, tolerances, coupled, exits", "[compare]") {
  ModelConfig cfg = make_config(5, 4, 8, 2, 16, 1, 4);
  const auto plain = default_regimes(cfg);
  cfg.exit_gate = true;
  const auto gated = default_regimes(cfg);
  CHECK(gated.size() == plain.size() + 5);
  std::vector<std::string> labels;
  for (const auto& r : gated) labels.push_back(r.label());
  auto has = [&](const std::string& s) { return std::find(labels.begin(), labels.end(), s) != labels.end(); };
  for (int k = 1; k <= 8; ++k) CHECK(has("loop:" + std::to_string(k)));
  CHECK_FALSE(has("loop:9"));
  for (const char* s : {"euler:1", "midpoint:16", "rk4:4", "bosh3:0.1", "dopri5:1e-06", "tsit5:0.001",
                        "dopri5:0.01@coupled", "dopri5:0.001@terminal0.03", "loop:8@delta1", "loop:4@q0.9"})
    CHECK(has(s));
  for (const auto& r : gated) CHECK_NOTHROW(r.validate(cfg));
}

TEST_CASE("compare: every regime on the same examples, loop K is euler K, a failing regime is a row",
          "[compare]") {
  const auto data = phop_source();
  const Model<float> m = phop_model(*data, true);
  std::vector<Regime> regimes = Regime::parse_list("loop:3,euler:3,rk4:2,dopri5:1e-3,dopri5:1e-3@coupled,loop:3@q0.5,"
                                                   "loop:6@delta0.5,dopri5:1e-6");
  regimes.back().depth.max_steps = 2;  // dopri5 at 1e-6 cannot finish in 2 steps
  std::vector<std::string> seen;
  const auto rows = compare_regimes(m, *data, regimes, 2, 8,
                                    [&](size_t i, size_t n, const std::string& l) {
                                      CHECK(n == regimes.size());
                                      if (i < n) seen.push_back(l);
                                    });
  REQUIRE(rows.size() == regimes.size());
  CHECK(seen.size() == regimes.size());
  for (const auto& r : rows) {
    CHECK(r.result.examples == 16);
    CHECK(r.result.sequences == 16);
    CHECK(std::isfinite(r.result.loss));
    CHECK(r.result.nfe_mean <= r.result.nfe_p90 + 1e-12);
    CHECK(r.result.nfe_p50 <= r.result.nfe_p90);
    CHECK(r.result.nfe_p90 <= r.result.nfe_max);
    CHECK(r.result.wall_s >= 0);
  }
  // loop 3 is euler with 3 steps on [0, 3]
  CHECK(rows[0].result.loss == Approx(rows[1].result.loss).epsilon(1e-5));
  CHECK(rows[0].result.accuracy == rows[1].result.accuracy);
  CHECK(rows[0].result.nfe_mean == 3);
  CHECK(rows[2].result.nfe_max == 8);  // rk4, 2 steps
  CHECK(rows[2].result.seq_evals == 16 * 8);
  // per sequence, the adaptive solve's evaluations differ by sequence; coupled share one count
  CHECK(rows[4].result.nfe_p50 == rows[4].result.nfe_max);
  CHECK(rows[3].result.status() == "ok");
  // exit rules: the mean exit loop is within 1..K
  CHECK(rows[5].result.exit_depth >= 1);
  CHECK(rows[5].result.exit_depth <= 3);
  CHECK(rows[6].result.exit_depth >= 1);
  CHECK(rows[6].result.exit_depth <= 6);
  // the failed regime is a row with its status and message; the others ran
  const auto& bad = rows.back().result;
  CHECK_FALSE(bad.ok());
  CHECK(bad.status() == "max_steps");
  CHECK(bad.status_counts[2] == 16);
  CHECK(bad.message.find("more than 2 steps") != std::string::npos);
  // files: CSV header + rows, JSON lines with the resolved depth, the front
  const auto front = pareto_front(rows);
  std::vector<size_t> all(rows.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  const std::string csv = compare_csv(rows, all);
  CHECK(static_cast<size_t>(std::count(csv.begin(), csv.end(), '\n')) == rows.size() + 1);
  CHECK(csv.rfind("regime,mode,solver,", 0) == 0);
  std::istringstream jl(compare_jsonl(rows, 3));
  size_t n = 0;
  for (std::string line; std::getline(jl, line); ++n) {
    const auto j = nlohmann::json::parse(line);
    CHECK(j["regime"] == rows[n].regime.label());
    if (j["mode"] == "solve") CHECK(j["depth"]["t1"] == 3.0);
    else CHECK(j["depth"]["loops"] == j["steps"]);
  }
  CHECK(n == rows.size());
  for (size_t i : front) CHECK(rows[i].result.ok());
}

TEST_CASE("pareto front: rows no other row beats in accuracy at no more evaluations", "[compare]") {
  Rng rng(3);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<CompareRow> rows(12);
    for (auto& r : rows) {
      r.result.nfe_mean = std::floor(rng.uniform() * 6);  // ties on purpose
      r.result.accuracy = std::floor(rng.uniform() * 5) / 4;
      r.result.status_counts[0] = 1;
    }
    rows[5].result.status_counts[4] = 1;  // a failed row never counts
    rows[5].result.accuracy = 2;
    const auto front = pareto_front(rows);
    std::vector<size_t> brute;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (!rows[i].result.ok()) continue;
      bool dominated = false, first_of_equals = true;
      for (size_t k = 0; k < rows.size(); ++k) {
        if (k == i || !rows[k].result.ok()) continue;
        const auto &a = rows[k].result, &b = rows[i].result;
        if (a.nfe_mean <= b.nfe_mean && a.accuracy >= b.accuracy &&
            (a.nfe_mean < b.nfe_mean || a.accuracy > b.accuracy))
          dominated = true;
        if (a.nfe_mean == b.nfe_mean && a.accuracy == b.accuracy && k < i) first_of_equals = false;
      }
      if (!dominated && first_of_equals) brute.push_back(i);
    }
    std::sort(brute.begin(), brute.end(), [&](size_t a, size_t b) { return rows[a].result.nfe_mean < rows[b].result.nfe_mean; });
    CHECK(front == brute);
  }
}

TEST_CASE("flowloop compare: files, and bad input before any work", "[compare][cli]") {
  TempDir dir("flowloop_compare");
  const std::string cli = FLOWLOOP_CLI;
  int rc = 0;
  const std::string model = tiny_phop_model(dir);
  std::string out = run_command(cli + " compare -m " + model + " --regimes loop:2,rk4:2,dopri5:1e-2 --batches 1 "
                                      "--batch 4 --out " + dir.file("c") + " 2>&1", &rc);
  INFO(out);
  REQUIRE(rc == 0);
  for (const char* f : {"compare.csv", "compare.jsonl", "pareto.csv", "compare_meta.json"})
    CHECK(std::ifstream(dir.file("c") + "/" + f).good());
  const auto meta = nlohmann::json::parse(std::ifstream(dir.file("c") + "/compare_meta.json"));
  CHECK(meta["regimes"] == 3);
  CHECK(meta["trained_depth"] == 3);
  // the default list
  out = run_command(cli + " compare -m " + model + " --list", &rc);
  CHECK(rc == 0);
  CHECK(out.find("loop:6\n") != std::string::npos);
  CHECK(out.find("loop:7\n") == std::string::npos);
  // bad input: another task, a bad regime, --times, an unwritable directory; nothing written
  auto refused = [&](const std::string& args, const std::string& what) {
    const std::string o = run_command(cli + " compare -m " + model + " " + args + " 2>&1", &rc);
    INFO(o);
    CHECK(rc != 0);
    CHECK(o.find(what) != std::string::npos);
  };
  refused("--task modarith --out " + dir.file("x"), "trained on task 'phop'");
  refused("--regimes loop:2,dopri9:1e-3 --out " + dir.file("x"), "dopri9");
  refused("--regimes dopri5:0 --out " + dir.file("x"), "not a positive number");
  refused("--regimes loop:2@q0.5 --out " + dir.file("x"), "no exit gate");
  CHECK_FALSE(std::ifstream(dir.file("x") + "/compare.csv").good());
  std::ofstream(dir.file("file")) << "x";
  refused("--regimes loop:2 --out " + dir.file("file") + "/sub", "cannot be created");
}

// ---------------------------------------------------------------- trajectory

TEST_CASE("trajectory: the lens at every depth ending where eval ends, the steps, PCA, the states", "[trajectory]") {
  const auto data = phop_source();
  const Model<float> m = phop_model(*data, false);
  SECTION("a loop: depths 0..K") {
    TrajectoryOptions o;
    o.depth = DepthSpec::parse("loop:3");
    o.batches = 2;
    o.batch_size = 8;
    o.pca_tokens = 10;
    const auto r = trace(m, *data, o);
    REQUIRE(r.times == std::vector<double>{0, 1, 2, 3});
    REQUIRE(r.lens.size() == 4);
    CHECK(r.source == "loop");
    CHECK(r.steps.empty());
    CHECK(std::isnan(r.lens[0].cos_prev_f));
    CHECK(r.lens.back().kl_to_final == 0);
    CHECK(r.lens.back().dist_to_final == 0);
    const EvalResult e = evaluate(m, *data, o.depth, 2, 8);
    CHECK(r.lens.back().loss == Approx(e.loss).epsilon(1e-6));
    CHECK(r.lens.back().accuracy == e.accuracy);
    // h(0) is the embedding; h_{k+1} - h_k = f(h_k): ||h_1 - h_0|| is the mean ||f|| at 0
    CHECK(r.lens[0].dist_to_final > r.lens[2].dist_to_final);
    for (const auto& p : r.lens) {
      CHECK(std::isfinite(p.loss));
      CHECK(p.kl_to_final >= 0);
      if (&p != &r.lens[0]) CHECK(std::fabs(p.cos_prev_f) <= 1 + 1e-12);
    }
    CHECK(r.states.size() == 4u * 8 * static_cast<size_t>(r.T) * m.cfg.d_model);
    CHECK(r.pca.size() == 10u * 4);
    CHECK(r.pca_explained[0] >= r.pca_explained[1]);
    CHECK(r.pca_explained[1] >= 0);
    CHECK(r.pca_explained[0] + r.pca_explained[1] <= 1 + 1e-12);
    // the projections' spread follows the explained variance
    double v1 = 0, v2 = 0;
    for (const auto& p : r.pca) {
      v1 += p.pc1 * p.pc1;
      v2 += p.pc2 * p.pc2;
    }
    CHECK(v1 >= v2);
  }
  SECTION("a fixed-step solve: its steps, and t1's state is the solve's") {
    TrajectoryOptions o;
    o.depth = DepthSpec::parse("rk4:8");
    o.times = 5;
    o.batch_size = 6;
    const auto r = trace(m, *data, o);
    REQUIRE(r.times == std::vector<double>{0, 0.75, 1.5, 2.25, 3});
    CHECK(r.nfe == 32);
    REQUIRE(r.steps.size() == 6u * 8);
    for (const auto& s : r.steps) CHECK(s.h == Approx(3.0 / 8));
    CHECK(r.steps.back().t == Approx(3.0));
    const EvalResult e = evaluate(m, *data, o.depth, 1, 6);
    CHECK(r.lens.back().loss == Approx(e.loss).epsilon(1e-6));
  }
  SECTION("bad options") {
    TrajectoryOptions o;
    o.depth = DepthSpec::parse("dopri5:1e-3");
    o.times = 1;
    CHECK_THROWS_WITH(trace(m, *data, o), Catch::Contains("--times must be at least 2"));
    o.times = 3;
    o.batches = 0;
    CHECK_THROWS_WITH(trace(m, *data, o), Catch::Contains("--batches"));
  }
}

TEST_CASE("flowloop trajectory: files, states readable, bad input", "[trajectory][cli]") {
  TempDir dir("flowloop_trajectory");
  const std::string cli = FLOWLOOP_CLI;
  int rc = 0;
  const std::string model = tiny_phop_model(dir);
  const std::string out = run_command(cli + " trajectory -m " + model + " --solver dopri5 --times 7 --batch 4 --out " +
                                      dir.file("t") + " 2>&1", &rc);
  INFO(out);
  REQUIRE(rc == 0);
  const SafetensorsFile f = SafetensorsFile::read(dir.file("t") + "/states.safetensors");
  REQUIRE(f.tensors().count("states"));
  const auto& shape = f.tensors().at("states").shape;
  REQUIRE(shape.size() == 4);
  CHECK(shape[0] == 7);
  CHECK(shape[1] == 4);
  CHECK(shape[3] == 16);
  const auto meta = nlohmann::json::parse(std::ifstream(dir.file("t") + "/trajectory_meta.json"));
  CHECK(meta["times"].size() == 7);
  CHECK(meta["times"].back() == 3.0);
  for (const char* name : {"lens.csv", "steps.csv", "pca.csv"}) CHECK(std::ifstream(dir.file("t") + "/" + name).good());
  // the trained regime by default: loop 3 gives depths 0..3
  run_command(cli + " trajectory -m " + model + " --batch 4 --out " + dir.file("l"), &rc);
  CHECK(rc == 0);
  CHECK(nlohmann::json::parse(std::ifstream(dir.file("l") + "/trajectory_meta.json"))["times"].size() == 4);
  auto refused = [&](const std::string& args, const std::string& what) {
    const std::string o = run_command(cli + " trajectory -m " + model + " " + args + " 2>&1", &rc);
    INFO(o);
    CHECK(rc != 0);
    CHECK(o.find(what) != std::string::npos);
  };
  refused("--solver dopri5 --times 1 --out " + dir.file("x"), "--times must be at least 2");
  refused("--task parity --out " + dir.file("x"), "trained on task 'phop'");
  refused("--solver rk4 --rtol 1e-3 --out " + dir.file("x"), "rtol");
  CHECK_FALSE(std::ifstream(dir.file("x") + "/lens.csv").good());
}

// ---------------------------------------------------------------- sweep

TEST_CASE("flowloop sweep: one model per training regime, each under every regime, resumable", "[sweep][cli]") {
  TempDir dir("flowloop_sweep");
  const std::string cli = FLOWLOOP_CLI;
  const std::string args = " sweep --task phop --task-n 8 --hops 2 --d-model 16 --n-head 2 --steps 6 --batch 4 "
                           "--warmup 1 --eval-every 6 --eval-batches 1 --train-depths loop:3,rk4:2,dopri5:1e-2 "
                           "--regimes loop:3,rk4:4,dopri5:1e-3 --compare-batches 1 --compare-batch 4 --out " +
                           dir.file("s");
  int rc = 0;
  std::string out = run_command(cli + args + " 2>&1", &rc);
  INFO(out);
  REQUIRE(rc == 0);
  auto lines = [](const std::string& path) {
    std::ifstream in(path);
    std::vector<std::string> v;
    for (std::string l; std::getline(in, l);) v.push_back(l);
    return v;
  };
  const auto sweep = lines(dir.file("s") + "/sweep.csv");
  REQUIRE(sweep.size() == 1 + 3 * 3);
  CHECK(sweep[0] == "train_regime,eval_regime,accuracy,loss,nfe_mean,nfe_p90,nfe_max,wall_s,status");
  CHECK(sweep[1].rfind("loop:3,loop:3,", 0) == 0);
  CHECK(sweep[9].rfind("dopri5:0.01,dopri5:0.001,", 0) == 0);
  const auto train = lines(dir.file("s") + "/sweep_train.csv");
  REQUIRE(train.size() == 4);
  CHECK(train[2].find(",6,") != std::string::npos);  // rk4:2 trained its 6 steps
  for (const char* m : {"train-loop_3", "train-rk4_2", "train-dopri5_0.01"})
    CHECK(std::ifstream(dir.file("s") + "/" + m + "/compare.csv").good());
  // run again: every model is complete, nothing retrains, the same accuracies
  const auto metrics = lines(dir.file("s") + "/train-rk4_2/metrics.jsonl");
  out = run_command(cli + args + " 2>&1", &rc);
  REQUIRE(rc == 0);
  CHECK(lines(dir.file("s") + "/train-rk4_2/metrics.jsonl") == metrics);
  const auto again = lines(dir.file("s") + "/sweep.csv");
  REQUIRE(again.size() == sweep.size());
  for (size_t i = 0; i < sweep.size(); ++i)  // all but the wall clock and status columns
    CHECK(again[i].substr(0, again[i].rfind(',', again[i].rfind(',') - 1)) ==
          sweep[i].substr(0, sweep[i].rfind(',', sweep[i].rfind(',') - 1)));
  // bad input, before any training
  auto refused = [&](const std::string& a, const std::string& what) {
    const std::string o = run_command(cli + " sweep --task phop --task-n 8 --hops 2 --steps 2 " + a + " 2>&1", &rc);
    INFO(o);
    CHECK(rc != 0);
    CHECK(o.find(what) != std::string::npos);
  };
  refused("--train-depths loop:3,loop:3 --out " + dir.file("x"), "listed twice");
  refused("--train-depths loop:3,euler:1e-3 --out " + dir.file("x"), "takes a step count");
  refused("--train-depths loop:3 --regimes loop:3@q0.5 --out " + dir.file("x"), "no exit gate");
  refused("--train-depths dopri7 --out " + dir.file("x"), "dopri7");
  CHECK_FALSE(std::filesystem::exists(dir.file("x")));
}

// ---------------------------------------------------------------- bench wp

// (a freshly initialised field is gentle: on [0, 40] the errors stay above float rounding)
TEST_CASE("bench wp: the error against the double reference falls with the tolerance", "[wp][cli]") {
  TempDir dir("flowloop_wp");
  const std::string cli = FLOWLOOP_CLI;
  int rc = 0;
  run_command(cli + " init --vocab 11 --context 8 --d-model 16 --n-head 2 --n-block 1 --depth 4 --seed 3 -o " +
                  dir.file("m.safetensors"),
              &rc);
  REQUIRE(rc == 0);
  std::ofstream(dir.file("tok.json")) << R"({"tokens": [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 1]]})";
  const std::string out = run_command(cli + " bench wp -m " + dir.file("m.safetensors") + " --tokens " + dir.file("tok.json") +
                                          " --solvers bosh3,dopri5 --rtols 1e-2,1e-4,1e-6 --t1 40 --reps 1 --seconds 0 2>&1",
                                      &rc);
  INFO(out);
  REQUIRE(rc == 0);
  std::istringstream in(out);
  std::vector<nlohmann::json> rows;
  for (std::string l; std::getline(in, l);) rows.push_back(nlohmann::json::parse(l));
  REQUIRE(rows.size() == 1 + 2 * 3);
  CHECK(rows[0]["solver"] == "reference");
  CHECK(rows[0]["rtol"] == 1e-10);
  for (size_t s = 0; s < 2; ++s) {
    const auto &a = rows[1 + 3 * s], &b = rows[2 + 3 * s], &c = rows[3 + 3 * s];
    CHECK(a["solver"] == (s == 0 ? "bosh3" : "dopri5"));
    CHECK(a["status"] == "success");
    CHECK(a["error"].get<double>() > b["error"].get<double>());
    CHECK(b["error"].get<double>() > c["error"].get<double>());
    CHECK(a["nfe"].get<int>() <= b["nfe"].get<int>());
    CHECK(b["nfe"].get<int>() <= c["nfe"].get<int>());
    CHECK(c["error"].get<double>() < 1e-3);
    CHECK(a["error_max"].get<double>() >= a["error"].get<double>() * 0.5);
  }
  run_command(cli + " bench wp -m " + dir.file("m.safetensors") + " --tokens " + dir.file("tok.json") + " --solvers rk4 2>&1", &rc);
  CHECK(rc != 0);
  const std::string bad = run_command(cli + " bench wp -m " + dir.file("m.safetensors") + " --tokens " + dir.file("tok.json") +
                                          " --rtols 1e-3,x 2>&1",
                                      &rc);
  CHECK(rc != 0);
  CHECK(bad.find("'x' is not a number") != std::string::npos);
}
