// flowloop compare: regimes (parse, label, validation), evaluation of one model
// under many regimes on the same examples, failed regimes as rows, the Pareto
// front against brute force, the files, and the command's bad input.
#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "check.hpp"
#include "flowloop/compare.hpp"
#include "flowloop/train.hpp"

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

TEST_CASE("compare: every regime on the same examples; loop K is euler K; a failing regime is a row",
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
  run_command(cli + " train --task phop --task-n 8 --hops 2 --loops 3 --d-model 16 --n-head 2 --steps 4 --batch 4 "
                    "--eval-every 4 --eval-batches 1 --out " + dir.file("m") + " 2>&1", &rc);
  REQUIRE(rc == 0);
  const std::string model = dir.file("m") + "/model.safetensors";
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
