// The depth specification: one validation, one set of defaults, the same flags on
// every command; the random discretisation of ODE-depth training.
#include <catch2/catch.hpp>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <sys/wait.h>

#include "check.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/ode/depth.hpp"
#include "flowloop/train/train.hpp"

using namespace flowloop;
using test::TempDir;
using test::run_command;

namespace {
DepthSpec solver(const std::string& m) {
  DepthSpec d;
  d.solver = m;
  return d;
}
}  // namespace

TEST_CASE("depth spec: defaults resolve the same way everywhere", "[depth]") {
  DepthSpec loop;
  CHECK(loop.loop_count(3) == 3);
  loop.loops = 5;
  CHECK(loop.loop_count(3) == 5);
  CHECK(loop.describe(3) == "loop 5");

  // an adaptive method without tolerances: the documented defaults, adaptive, t1 = trained depth
  const SolveOptions a = solver("dopri5").solve_options(3);
  CHECK(a.adaptive);
  CHECK(a.rtol == DepthSpec::kDefaultRtol);
  CHECK(a.atol == DepthSpec::kDefaultAtol);
  CHECK(a.t1 == 3.0);
  CHECK(a.controller == Controller::PI);
  CHECK(a.initial_norm == InitialStepNorm::Sum);
  CHECK(a.max_steps == DepthSpec::kDefaultMaxSteps);
  // one tolerance given: the other keeps its default
  DepthSpec r = solver("bosh3");
  r.rtol = 1e-6;
  CHECK(r.solve_options(2).atol == DepthSpec::kDefaultAtol);
  CHECK(r.solve_options(2).rtol == 1e-6);
  // fixed-step: one step per unit of t1
  const SolveOptions f = solver("rk4").solve_options(3);
  CHECK_FALSE(f.adaptive);
  CHECK(f.steps == 3);
  DepthSpec e = solver("euler");
  e.t1 = 2.6;
  CHECK(e.solve_options(4).steps == 3);
  // an embedded method with a step count runs fixed steps
  DepthSpec ds = solver("dopri5");
  ds.steps = 7;
  CHECK_FALSE(ds.solve_options(3).adaptive);
  CHECK(ds.solve_options(3).steps == 7);
  // the adaptive options reach the solve
  DepthSpec full = solver("tsit5");
  full.controller = "i";
  full.initial_norm = "torchdiffeq";
  full.h0 = 0.01;
  full.max_steps = 50;
  full.coupled = true;
  full.exit_threshold = 1e-3;
  full.t1 = 1.5;
  const SolveOptions fo = full.solve_options(9);
  CHECK(fo.controller == Controller::I);
  CHECK(fo.initial_norm == InitialStepNorm::RMS);
  CHECK(fo.h0 == 0.01);
  CHECK(fo.max_steps == 50);
  CHECK(fo.batch_coupled);
  CHECK(fo.terminal_threshold == 1e-3);
  CHECK(fo.t1 == 1.5);
  const auto j = nlohmann::json::parse(full.to_json(9));
  CHECK(j["mode"] == "adaptive");
  CHECK(j["initial_norm"] == "torchdiffeq");
  CHECK(j["t1"] == 1.5);
}

TEST_CASE("depth spec: every contradiction gets its own error", "[depth][errors]") {
  auto err = [](DepthSpec d, const std::string& what) {
    INFO(what);
    CHECK_THROWS_WITH(d.validate(), Catch::Contains(what));
  };
  DepthSpec d = solver("dopri5");
  d.loops = 3;
  err(d, "give --loops K (looping) or --solver (an ODE solve), not both");
  d = solver("dopri5");
  d.steps = 4;
  d.rtol = 1e-3;
  err(d, "give --solver-steps or --rtol/--atol, not both");
  d = solver("rk4");
  d.atol = 1e-3;
  err(d, "has no error estimate");
  d = solver("rk4");
  d.controller = "i";
  err(d, "apply to adaptive solves only");
  d = solver("euler");
  d.coupled = true;
  err(d, "apply to adaptive solves only");
  d = solver("dopri5");
  d.steps = 3;
  d.h0 = 0.1;
  err(d, "apply to adaptive solves only");
  d = solver("dopri5");
  d.t1 = 0;
  err(d, "--t1 must be finite and > 0");
  d.t1 = -1;
  err(d, "--t1 must be finite and > 0");
  d = solver("dopri6");
  err(d, "unknown solver 'dopri6'");
  d = solver("dopri5");
  d.rtol = 0;
  d.atol = 0;
  err(d, "cannot both be 0");
  d = solver("dopri5");
  d.rtol = std::numeric_limits<double>::infinity();
  err(d, "--rtol must be finite");
  d = solver("dopri5");
  d.controller = "p";
  err(d, "--controller must be pi");
  d = solver("dopri5");
  d.initial_norm = "max";
  err(d, "--initial-norm must be hairer");
  d = solver("dopri5");
  d.max_steps = -2;
  err(d, "--solver-max-steps must be positive");
  d = solver("rk4");
  d.steps = -1;
  err(d, "--solver-steps must be positive");
  DepthSpec l;
  l.loops = -1;
  err(l, "--loops must be positive");
  l.loops = 2;
  l.steps = 4;
  err(l, "--solver-steps needs --solver");
  l.steps = 0;
  l.rtol = 1e-3;
  err(l, "--rtol/--atol need an adaptive --solver");
  l.rtol = std::numeric_limits<double>::quiet_NaN();
  l.t1 = 3;
  err(l, "--t1 needs --solver");
  l.t1 = std::numeric_limits<double>::quiet_NaN();
  l.coupled = true;
  err(l, "need an adaptive --solver");
  l.coupled = false;
  l.exit_threshold = 0.1;
  err(l, "--exit-threshold needs --solver");
}

TEST_CASE("depth regimes in one token", "[depth]") {
  const auto v = DepthSpec::parse_list("loop,loop:6,dopri5:1e-3,rk4:8,dopri5,bosh3:2");
  REQUIRE(v.size() == 6);
  CHECK(v[0].loop_count(4) == 4);
  CHECK(v[1].loop_count(4) == 6);
  CHECK(v[2].rtol == 1e-3);
  CHECK(v[2].atol == Approx(1e-4).epsilon(1e-12));
  CHECK(v[3].steps == 8);
  CHECK(v[4].adaptive());
  CHECK(v[5].steps == 2);
  for (const auto& d : v) CHECK(DepthSpec::parse(d.token()).token() == d.token());
  CHECK_THROWS_WITH(DepthSpec::parse("rk4:1e-3"), Catch::Contains("takes a step count"));
  CHECK_THROWS_WITH(DepthSpec::parse("loop:2.5"), Catch::Contains("positive integer"));
  CHECK_THROWS_WITH(DepthSpec::parse("dopri5:-1"), Catch::Contains("not a positive number"));
  CHECK_THROWS_WITH(DepthSpec::parse("dopri5:"), Catch::Contains("nothing after"));
  CHECK_THROWS_WITH(DepthSpec::parse("rk5:4"), Catch::Contains("unknown solver 'rk5'"));
  CHECK_THROWS_WITH(DepthSpec::parse_list(","), Catch::Contains("is empty"));
}

TEST_CASE("random discretisation per batch is a function of seed and step", "[depth][train]") {
  TrainConfig c;
  c.task = "phop";
  c.task_n = 8;
  c.task_hops = 2;
  c.depth.solver = "rk4";
  c.depth.t1 = 3;
  c.random_steps_min = 2;
  c.random_steps_max = 6;
  c.random_solvers = "euler,midpoint,rk4";
  c.t1_jitter = 0.5;
  c.out = "unused";
  c.validate();
  std::set<int> steps;
  std::set<std::string> methods;
  double lo = 1e9, hi = -1e9;
  for (int64_t s = 0; s < 300; ++s) {
    const SolveOptions o = c.solve_options(s);
    const SolveOptions again = c.solve_options(s);
    CHECK(o.steps == again.steps);
    CHECK(o.method == again.method);
    CHECK(o.t1 == again.t1);
    CHECK_FALSE(o.adaptive);
    steps.insert(o.steps);
    methods.insert(o.method);
    lo = std::min(lo, o.t1);
    hi = std::max(hi, o.t1);
  }
  CHECK(steps == std::set<int>{2, 3, 4, 5, 6});
  CHECK(methods.size() == 3);
  CHECK(lo >= 2.5);
  CHECK(hi < 3.5);
  CHECK(hi - lo > 0.8);
  TrainConfig other = c;
  other.seed = 1;
  int same = 0;
  for (int64_t s = 0; s < 50; ++s) same += other.solve_options(s).steps == c.solve_options(s).steps;
  CHECK(same < 30);
  // adaptive methods in the mix keep their tolerances and take no random steps
  c.depth.solver = "dopri5";
  c.depth.rtol = 1e-4;
  c.random_solvers = "dopri5,rk4";
  c.validate();
  bool saw_adaptive = false;
  for (int64_t s = 0; s < 40; ++s) {
    const SolveOptions o = c.solve_options(s);
    if (o.adaptive) {
      saw_adaptive = true;
      CHECK(o.rtol == 1e-4);
    } else {
      CHECK(o.method == "rk4");
      CHECK(o.steps >= 2);
    }
  }
  CHECK(saw_adaptive);
  // bad settings
  c.random_solvers = "rk4,nope";
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("unknown solver 'nope'"));
  c.random_solvers.clear();
  c.depth.solver = "rk4";
  c.depth.rtol = std::numeric_limits<double>::quiet_NaN();
  c.random_steps_min = 5;
  c.random_steps_max = 4;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("random_steps_min <= random_steps_max"));
  c.random_steps_min = 1;
  c.t1_jitter = 3;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("t1_jitter must be in [0, t1)"));
  c.t1_jitter = 0;
  c.random_steps_max = 0;
  c.depth.solver.clear();
  c.depth.loops = 2;
  c.depth.t1 = std::numeric_limits<double>::quiet_NaN();
  c.random_steps_max = 4;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("randomise an ODE solve"));
}

TEST_CASE("the depth flags mean the same on every command", "[depth][cli]") {
  TempDir dir("flowloop_depth");
  const std::string cli = FLOWLOOP_CLI;
  int rc = 0;
  // a small looped model trained at 3 loops (a few steps: only the plumbing matters)
  std::string out = run_command(cli + " train --task phop --task-n 8 --hops 2 --loops 3 --d-model 16 --n-head 2 "
                                      "--steps 4 --batch 4 --eval-every 4 --eval-batches 1 --out " + dir.file("m") + " 2>&1", &rc);
  REQUIRE(rc == 0);
  const std::string model = dir.file("m") + "/model.safetensors";
  // eval with an adaptive method and no tolerances: an adaptive solve at the defaults on [0, 3]
  out = run_command(cli + " eval -m " + model + " --solver dopri5 --batches 1 --batch 4 --json", &rc);
  REQUIRE(rc == 0);
  auto j = nlohmann::json::parse(out);
  CHECK(j["depth"]["mode"] == "adaptive");
  CHECK(j["depth"]["t1"] == 3.0);
  CHECK(j["depth"]["rtol"] == 1e-3);
  CHECK(j["depth"]["atol"] == 1e-4);
  // no depth flags: the trained regime
  out = run_command(cli + " eval -m " + model + " --batches 1 --batch 4 --json", &rc);
  REQUIRE(rc == 0);
  j = nlohmann::json::parse(out);
  CHECK(j["depth"]["mode"] == "loop");
  CHECK(j["loops"] == 3);
  // loop 3 and euler with 3 steps on [0, 3] give the same bits
  std::ofstream(dir.file("tok.json")) << R"({"tokens": [[1, 2, 3, 0, 1], [3, 3, 2, 1, 0]]})";
  REQUIRE(run_command(cli + " forward -m " + model + " --tokens " + dir.file("tok.json") + " -o " + dir.file("loop.json"), &rc).size());
  REQUIRE(rc == 0);
  run_command(cli + " forward -m " + model + " --tokens " + dir.file("tok.json") + " --solver euler -o " + dir.file("euler.json"), &rc);
  REQUIRE(rc == 0);
  auto slurp = [](const std::string& p) {
    std::ifstream in(p);
    return nlohmann::json::parse(in);
  };
  CHECK(slurp(dir.file("loop.json"))["logits"] == slurp(dir.file("euler.json"))["logits"]);
  CHECK(slurp(dir.file("euler.json"))["fixed_steps"] == 3);
  // contradictions are refused before any work, with nothing written
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"--loops 3 --solver dopri5", "not both"},
      {"--solver rk4 --rtol 1e-3", "has no error estimate"},
      {"--solver dopri5 --solver-steps 4 --atol 1e-3", "give --solver-steps or --rtol/--atol, not both"},
      {"--solver rk4 --h0 0.1", "apply to adaptive solves only"},
      {"--solver dopri5 --t1 0", "--t1 must be finite and > 0"},
      {"--loops 3 --batch-coupled", "need an adaptive --solver"},
  };
  for (const auto& [flags, what] : bad) {
    for (const std::string cmd : {"forward", "grad", "eval"}) {
      INFO(cmd << " " << flags);
      std::string extra = cmd == "eval" ? " --batches 1" : " --tokens " + dir.file("tok.json") + " -o " + dir.file("bad.out");
      out = run_command(cli + " " + cmd + " -m " + model + extra + " " + flags + " 2>&1", &rc);
      CHECK(WEXITSTATUS(rc) == 1);
      CHECK_THAT(out, Catch::Contains(what));
      CHECK_FALSE(std::filesystem::exists(dir.file("bad.out")));
    }
  }
  out = run_command(cli + " forward -m " + model + " --tokens " + dir.file("tok.json") + " --time-cond -o " +
                        dir.file("bad.out") + " 2>&1", &rc);
  CHECK(WEXITSTATUS(rc) == 1);
  CHECK_THAT(out, Catch::Contains("has no time conditioning"));
  CHECK_FALSE(std::filesystem::exists(dir.file("bad.out")));
  // train takes the same flags: an ODE model with random steps trains and records its draws
  out = run_command(cli + " train --task phop --task-n 8 --hops 2 --solver rk4 --t1 2 --random-steps-min 1 "
                          "--random-steps-max 3 --d-model 16 --n-head 2 --steps 3 --batch 4 --eval-every 3 "
                          "--eval-batches 1 --out " + dir.file("ode") + " 2>&1", &rc);
  REQUIRE(rc == 0);
  std::ifstream m(dir.file("ode") + "/metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(m, line); ++lines) {
    const auto l = nlohmann::json::parse(line);
    CHECK(l["solver"] == "rk4");
    CHECK(l["solver_steps"].get<int>() >= 1);
    CHECK(l["solver_steps"].get<int>() <= 3);
    CHECK(l["nfe_forward"] == 4 * l["solver_steps"].get<int>());
  }
  CHECK(lines == 3);
}

TEST_CASE("training configurations written before the depth spec still read", "[depth][train]") {
  // the old writer's encoding: 0 for "not given", the pi controller always
  const std::string old_loop = R"({"task": "phop", "task_n": 8, "task_hops": 2, "loops": 3, "solver": "",
      "solver_steps": 0, "rtol": 0, "atol": 0, "t1": 0, "controller": "pi", "solver_max_steps": 0,
      "batch_coupled": false, "out": "x"})";
  TrainConfig c = TrainConfig::from_json(old_loop, "old");
  CHECK_NOTHROW(c.validate());
  CHECK(c.depth.loops == 3);
  CHECK(c.trained_depth() == 3);
  const std::string old_ode = R"({"task": "phop", "task_n": 8, "task_hops": 2, "loops": 0, "solver": "dopri5",
      "solver_steps": 0, "rtol": 0.001, "atol": 0.0001, "t1": 0, "controller": "pi", "solver_max_steps": 0,
      "batch_coupled": false, "out": "x"})";
  c = TrainConfig::from_json(old_ode, "old");
  CHECK_NOTHROW(c.validate());
  const SolveOptions o = c.solve_options(0);
  CHECK(o.adaptive);
  CHECK(o.rtol == 1e-3);
  CHECK(o.t1 == TrainConfig::kDefaultTrainDepth);
  // the new writer round-trips, "not given" as null
  const TrainConfig back = TrainConfig::from_json(c.to_json(), "new");
  CHECK(back.to_json() == c.to_json());
  CHECK(nlohmann::json::parse(c.to_json())["t1"].is_null());
  // in the new encoding a t1 of 0 is an error, not a default
  auto j = nlohmann::json::parse(c.to_json());
  j["t1"] = 0;
  CHECK_THROWS_WITH(TrainConfig::from_json(j.dump(), "new").validate(), Catch::Contains("--t1 must be finite and > 0"));
}
