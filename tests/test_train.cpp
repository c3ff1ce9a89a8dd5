// Training: data generators against brute force, disjoint splits, AdamW and the
// schedule by hand, exact resume, bad configurations rejected before any work.
#include <catch2/catch.hpp>
#include <algorithm>
#include <map>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <unistd.h>

#include "check.hpp"
#include "train_check.hpp"
#include "flowloop/backend/backend.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/train/train.hpp"

using namespace flowloop;
using namespace flowloop::test;
namespace fs = std::filesystem;

namespace {

std::vector<int32_t> question_of(const Example& e) {
  std::vector<int32_t> q;
  for (size_t i = 0; i + 1 < e.seq.size() && !e.is_answer[i + 1]; ++i) q.push_back(e.seq[i]);
  return q;  // everything before the separator
}

std::vector<int32_t> answer_of(const Example& e) {
  std::vector<int32_t> a;
  for (size_t i = 0; i < e.seq.size(); ++i)
    if (e.is_answer[i]) a.push_back(e.seq[i]);
  return a;
}

// Independent brute-force answers.
int32_t parity_bf(const std::vector<int32_t>& q) {
  int32_t x = 0;
  for (int32_t b : q) x ^= b;
  return x;
}

int32_t phop_bf(const std::vector<int32_t>& q, int p) {
  size_t cur = q.size() - 1;
  for (int h = 0; h < p; ++h) {
    size_t best = SIZE_MAX;
    for (size_t j = 0; j < cur; ++j)
      if (q[j] == q[cur]) best = j;  // the last match before cur
    REQUIRE(best != SIZE_MAX);
    cur = best + 1;
  }
  return q[cur];
}

int32_t modarith_bf(const std::vector<int32_t>& q, int p) {
  std::vector<long> stack;  // prefix notation, evaluated right to left
  for (size_t i = q.size(); i-- > 0;) {
    if (q[i] < p) {
      stack.push_back(q[i]);
      continue;
    }
    const long a = stack.back();
    stack.pop_back();
    const long b = stack.back();
    stack.pop_back();
    long r = q[i] == p ? a + b : q[i] == p + 1 ? a - b : a * b;
    stack.push_back(((r % p) + p) % p);
  }
  REQUIRE(stack.size() == 1);
  return static_cast<int32_t>(stack[0]);
}

std::vector<int32_t> addition_bf(const std::vector<int32_t>& q, int d) {
  long a = 0, b = 0;
  for (int i = 0; i < d; ++i) a = a * 10 + q[static_cast<size_t>(i)];
  for (int i = 0; i < d; ++i) b = b * 10 + q[static_cast<size_t>(d + 1 + i)];
  long s = a + b;
  std::vector<int32_t> out(static_cast<size_t>(d + 1));
  for (int i = d; i >= 0; --i) {
    out[static_cast<size_t>(i)] = static_cast<int32_t>(s % 10);
    s /= 10;
  }
  return out;
}



}  // namespace

TEST_CASE("task generators agree with brute force, splits are disjoint and seeded", "[train][data]") {
  for (const std::string name : {"parity", "phop", "modarith", "addition"}) {
    TaskOptions o;
    o.name = name;
    o.seed = 11;
    const auto task = make_task(o);
    std::set<std::vector<int32_t>> train, test;
    for (uint64_t i = 0; i < 300; ++i) {
      const Example e = task->example(Split::Train, i);
      const Example f = task->example(Split::Test, i);
      REQUIRE(static_cast<int>(e.seq.size()) == task->seq_len() + 1);
      for (const Example* x : {&e, &f}) {
        const auto q = question_of(*x);
        const auto a = answer_of(*x);
        INFO(name);
        if (name == "parity") CHECK(a == std::vector<int32_t>{parity_bf(q)});
        if (name == "phop") CHECK(a == std::vector<int32_t>{phop_bf(q, 4)});
        if (name == "modarith") CHECK(a == std::vector<int32_t>{modarith_bf(q, 7)});
        if (name == "addition") CHECK(a == addition_bf(q, 3));
        for (int32_t v : x->seq) CHECK((v >= 0 && v < task->vocab_size()));
      }
      train.insert(e.seq);
      test.insert(f.seq);
    }
    for (const auto& s : test) CHECK(train.count(s) == 0);
    // the same seed gives the same stream; another seed another one
    const auto again = make_task(o);
    CHECK(again->example(Split::Train, 5).seq == task->example(Split::Train, 5).seq);
    o.seed = 12;
    const auto other = make_task(o);
    int same = 0;
    for (uint64_t i = 0; i < 20; ++i) same += other->example(Split::Train, i).seq == task->example(Split::Train, i).seq;
    CHECK(same < 20);
  }
  // phop: the answer is the last symbol 1 time in 4, not the shortcut it is in random sequences
  {
    TaskOptions po;
    po.name = "phop";
    po.n = 16;
    po.hops = 2;
    const auto ph = make_task(po);
    int last = 0;
    for (uint64_t i = 0; i < 2000; ++i) {
      const Example e = ph->example(Split::Train, i);
      last += e.seq.back() == e.seq[e.seq.size() - 3];
    }
    CHECK(last > 400);
    CHECK(last < 600);
  }
  // batches: targets only at answer positions, next-token aligned
  TaskOptions o;
  o.name = "addition";
  const auto task = make_task(o);
  TokenBatch tok, tgt;
  task->batch(Split::Train, 2, 4, tok, tgt);
  const Example e = task->example(Split::Train, 2 * 4 + 1);
  for (int t = 0; t < tok.T; ++t) {
    CHECK(tok.data[static_cast<size_t>(tok.T + t)] == e.seq[static_cast<size_t>(t)]);
    CHECK(tgt.data[static_cast<size_t>(tok.T + t)] == (e.is_answer[static_cast<size_t>(t) + 1] ? e.seq[static_cast<size_t>(t) + 1] : -1));
  }
  CHECK_THROWS_WITH(make_task({"sorting", 0, 0, 0, 0}), Catch::Contains("unknown task 'sorting'"));
  CHECK_THROWS_WITH(make_task({"modarith", 0, 2, 0, 9}), Catch::Contains("prime = 9"));
}

TEST_CASE("text batches are deterministic windows of the right split", "[train][data]") {
  TempDir dir("flowloop_train");
  const fs::path p = dir.path / "corpus.txt";
  std::string text;
  for (int i = 0; i < 400; ++i) text += "line " + std::to_string(i) + " of the corpus\n";
  std::ofstream(p) << text;
  const auto src = make_text_source(p.string(), 16, 1);
  TokenBatch a, b, ta, tb;
  src->batch(Split::Train, 3, 4, a, ta);
  src->batch(Split::Train, 3, 4, b, tb);
  CHECK(a.data == b.data);
  CHECK(src->vocab_size() == 256);
  for (int t = 0; t + 1 < 16; ++t) CHECK(ta.data[static_cast<size_t>(t)] == a.data[static_cast<size_t>(t) + 1]);
  src->batch(Split::Test, 0, 4, b, tb);
  // a test window lies in the last 10% of the bytes
  const std::string win(b.data.begin(), b.data.begin() + 16);
  CHECK(text.find(win) >= text.size() * 9 / 10 - 16);
  CHECK_THROWS_WITH(make_text_source((dir.path / "nope.txt").string(), 16, 1), Catch::Contains("nope.txt") && Catch::Contains("cannot open"));
}

TEST_CASE("AdamW, the schedule and accuracy by hand", "[train]") {
  TrainConfig c;
  c.lr = 0.1;
  c.min_lr = 0.01;
  c.warmup = 10;
  c.steps = 110;
  CHECK(learning_rate(c, 0) == Approx(0.01));
  CHECK(learning_rate(c, 9) == Approx(0.1));
  CHECK(learning_rate(c, 10) == Approx(0.1));
  CHECK(learning_rate(c, 60) == Approx(0.055));
  CHECK(learning_rate(c, 110) == Approx(0.01));
  // one AdamW step on a tiny model: p - lr (m_hat / (sqrt(v_hat) + eps) + wd p) for matrices
  const ModelConfig mc = make_config(3, 2, 2, 1, 2, 1, 1);
  ParamLayout layout(mc);
  c.weight_decay = 0.5;
  c.clip = 0;
  AdamW opt(layout, c.optim());
  Buffer<float> p(layout.size(), 1.0f), g(layout.size(), 0.5f);
  opt.step(p.data(), g.data(), 0.1);
  // first step: m_hat = g, v_hat = g^2 -> update = sign(g) (up to eps)
  const size_t w = layout.at("wte.weight").offset, b = layout.at("ln_f.bias").offset;
  CHECK(p[w] == Approx(1.0 - 0.1 * (1.0 + 0.5 * 1.0)).epsilon(1e-6));
  CHECK(p[b] == Approx(1.0 - 0.1 * 1.0).epsilon(1e-6));  // no decay on vectors
  // clipping by global norm
  c.clip = 1.0;
  AdamW clipped(layout, c.optim());
  Buffer<float> g2(layout.size(), 1.0f), p2(layout.size(), 0.0f);
  const double norm = clipped.step(p2.data(), g2.data(), 0.1);
  CHECK(norm == Approx(std::sqrt(static_cast<double>(layout.size()))));
  double after = 0;
  for (float x : g2) after += double(x) * x;
  CHECK(std::sqrt(after) == Approx(1.0).epsilon(1e-5));
  // exact-match accuracy: a row counts only if every answer position is right
  TokenBatch tgt;
  tgt.B = 2;
  tgt.T = 2;
  tgt.data = {-1, 1, 0, 2};
  const float logits[] = {0, 0, 0, /**/ 0, 5, 0, /**/ 5, 0, 0, /**/ 0, 5, 0};
  int64_t n = 0;
  CHECK(accuracy(logits, tgt, 3, true, &n) == 0.5);
  CHECK(n == 2);
  CHECK(accuracy(logits, tgt, 3, false, &n) == Approx(2.0 / 3));
}

TEST_CASE("a resumed run has exactly the losses of an uninterrupted one", "[train][resume]") {
  TempDir dir("flowloop_train");
  std::ostringstream quiet;
  const TrainConfig full = tiny_config((dir.path / "full").string());
  Trainer(full).run(false, quiet);
  // killed after step 11 (its last checkpoint: step 8), then resumed
  const TrainConfig part = tiny_config((dir.path / "part").string());
  Trainer(part).run(false, quiet, 11);
  CHECK(read_metrics(dir.path / "part").size() == 11);
  Trainer t2(part);
  t2.run(true, quiet);
  const auto a = read_metrics(dir.path / "full"), b = read_metrics(dir.path / "part");
  REQUIRE(a.size() == 24);
  REQUIRE(b.size() == 24);
  for (size_t i = 0; i < a.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(a[i]["step"] == b[i]["step"]);
    CHECK(a[i]["loss"] == b[i]["loss"]);
    CHECK(a[i]["grad_norm"] == b[i]["grad_norm"]);
  }
  CHECK(a.back().contains("test_accuracy"));
  const Model<float> ma = load_model<float>((dir.path / "full" / "model.safetensors").string());
  CHECK(ma.params == t2.model().params);
  CHECK(a.front()["loss"] != a.back()["loss"]);
  // a time budget stops the run after the step that spends it, checkpointed; a resume
  // (with another budget) goes on with the same losses
  TrainConfig timed = tiny_config((dir.path / "timed").string());
  timed.max_seconds = 1e-9;
  Trainer(timed).run(false, quiet);
  const auto tm = read_metrics(dir.path / "timed");
  REQUIRE(tm.size() == 1);
  CHECK(tm[0]["stopped"] == "max_seconds");
  CHECK(tm[0].contains("test_accuracy"));
  timed.max_seconds = 0;
  Trainer(timed).run(true, quiet);
  const auto tr = read_metrics(dir.path / "timed");
  REQUIRE(tr.size() == a.size());
  for (size_t i = 0; i < a.size(); ++i) CHECK(tr[i]["loss"] == a[i]["loss"]);
  // a run directory moved elsewhere resumes there, with other reporting intervals
  // (directory, evaluation, checkpoints), and the same losses
  const TrainConfig cut = tiny_config((dir.path / "cut").string());
  Trainer(cut).run(false, quiet, 11);
  std::filesystem::copy(dir.path / "cut", dir.path / "moved");
  TrainConfig moved = tiny_config((dir.path / "moved").string());
  moved.eval_every = 5;
  moved.eval_batches = cut.eval_batches + 1;
  moved.checkpoint_every = 3;
  Trainer(moved).run(true, quiet);
  const auto mv = read_metrics(dir.path / "moved");
  REQUIRE(mv.size() == a.size());
  for (size_t i = 0; i < a.size(); ++i) CHECK(mv[i]["loss"] == a[i]["loss"]);
  // a checkpoint resumed with another configuration is refused
  TrainConfig other = part;
  other.lr = 0.5;
  CHECK_THROWS_WITH(Trainer(other).run(true, quiet), Catch::Contains("another configuration"));
  // ODE depth trains too
  TrainConfig ode = tiny_config((dir.path / "ode").string());
  ode.depth.loops = 0;
  ode.depth.solver = "rk4";
  ode.depth.steps = 2;
  ode.depth.t1 = 2;
  ode.steps = 4;
  Trainer(ode).run(false, quiet);
  const auto mo = read_metrics(dir.path / "ode");
  REQUIRE(mo.size() == 4);
  CHECK(mo[0]["nfe_forward"] == 8);
  // ODE depth with both regularisers (a Hutchinson draw per step) resumes exactly too
  TrainConfig reg = ode;
  reg.kinetic = 0.1;
  reg.jacobian = 0.05;
  reg.checkpoint_every = 2;
  reg.out = (dir.path / "reg_full").string();
  Trainer(reg).run(false, quiet);
  reg.out = (dir.path / "reg_part").string();
  Trainer(reg).run(false, quiet, 3);
  Trainer(reg).run(true, quiet);
  const auto ra = read_metrics(dir.path / "reg_full"), rb = read_metrics(dir.path / "reg_part");
  REQUIRE(ra.size() == 4);
  REQUIRE(rb.size() == 4);
  for (size_t i = 0; i < ra.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(ra[i]["loss"] == rb[i]["loss"]);
    CHECK(ra[i]["jacobian"] == rb[i]["jacobian"]);
    CHECK(ra[i]["kinetic"].get<double>() > 0);
    CHECK(ra[i]["nfe_forward"] == 16);  // the Jacobian term's second evaluation per stage
  }
  CHECK(ra[0]["jacobian"] != ra[1]["jacobian"]);  // a new draw each step
  CHECK(ra[0]["loss"] == mo[0]["loss"]);          // the regularisers leave the first loss alone
  CHECK(ra[1]["loss"] != mo[1]["loss"]);          // and change the update
}

TEST_CASE("a llama model (GQA, a prelude and a coda, an untied head) trains and resumes exactly", "[train][resume][llama]") {
  TempDir dir("flowloop_train_llama");
  std::ostringstream quiet;
  auto config = [&](const char* name) {
    TrainConfig c = tiny_config((dir.path / name).string());
    c.arch = "llama";
    c.n_kv_head = 1;
    c.n_prelude = c.n_coda = 1;
    c.tie_head = false;
    c.qkv_bias = true;
    c.rope_theta = 500.0;
    return c;
  };
  Trainer(config("full")).run(false, quiet);
  Trainer(config("part")).run(false, quiet, 11);
  Trainer t2(config("part"));
  t2.run(true, quiet);
  const auto a = read_metrics(dir.path / "full"), b = read_metrics(dir.path / "part");
  REQUIRE(a.size() == 24);
  REQUIRE(b.size() == 24);
  for (size_t i = 0; i < a.size(); ++i) CHECK(a[i]["loss"] == b[i]["loss"]);
  CHECK(a.front()["loss"].get<double>() > a.back()["loss"].get<double>());
  const Model<float> ma = load_model<float>((dir.path / "full" / "model.safetensors").string());
  CHECK(ma.params == t2.model().params);
  CHECK(ma.cfg.llama());
  CHECK(ma.cfg.kv_heads() == 1);
  CHECK(ma.layout.find("lm_head.weight") != nullptr);
  CHECK(ma.layout.find("prelude.h.0.attn.q_proj.bias") != nullptr);
  // a gpt2 configuration with llama options is refused by name
  TrainConfig bad = tiny_config((dir.path / "bad").string());
  bad.n_kv_head = 2;
  CHECK_THROWS_WITH(Trainer(bad), Catch::Contains("need arch llama"));
}

TEST_CASE("bad configurations are rejected before any work", "[train][errors]") {
  TempDir dir("flowloop_train");
  CHECK_THROWS_WITH(TrainConfig::from_json(R"({"task": "phop", "learning_rate": 0.1})", "cfg.json"),
                    Catch::Contains("cfg.json: unknown key \"learning_rate\""));
  CHECK_THROWS_WITH(TrainConfig::from_json(R"({"task": "phop", "steps": "many"})", "cfg.json"),
                    Catch::Contains("\"steps\" has the wrong type"));
  CHECK_THROWS_WITH(TrainConfig::from_json("{oops", "cfg.json"), Catch::Contains("not valid JSON"));
  TrainConfig c = tiny_config((dir.path / "x").string());
  c.task = "";
  c.text = (dir.path / "missing.txt").string();
  CHECK_THROWS_WITH(Trainer{c}, Catch::Contains("missing.txt") && Catch::Contains("cannot open"));
  c = tiny_config("/proc/flowloop-not-writable");
  CHECK_THROWS_WITH(Trainer{c}, Catch::Contains("is not writable"));
  c = tiny_config((dir.path / "y").string());
  c.depth.loops = 0;
  CHECK_THROWS_WITH(Trainer{c}, Catch::Contains("give loops > 0 or a solver"));
  c = tiny_config((dir.path / "y").string());
  c.depth.solver = "rk4";
  CHECK_THROWS_WITH(Trainer{c}, Catch::Contains("not both"));
  c = tiny_config((dir.path / "y").string());
  c.kinetic = 0.1;
  CHECK_THROWS_WITH(Trainer{c}, Catch::Contains("kinetic and jacobian regularise ODE depth"));
  c.depth.loops = 0;
  c.depth.solver = "rk4";
  c.depth.steps = 2;
  c.jacobian = -1;
  CHECK_THROWS_WITH(Trainer{c}, Catch::Contains("kinetic and jacobian must be finite and >= 0"));
  c.jacobian = 0;
  c.depth.max_steps = 100;
  CHECK_THROWS_WITH(Trainer{c}, Catch::Contains("apply to adaptive solves only"));
  c.depth.solver = "dopri5";
  c.depth.steps = 0;
  c.depth.max_steps = -1;
  CHECK_THROWS_WITH(Trainer{c}, Catch::Contains("--solver-max-steps must be positive"));
  c.depth.max_steps = 0;
  c.max_seconds = -5;
  CHECK_THROWS_WITH(Trainer{c}, Catch::Contains("max_seconds must be finite and >= 0"));
  // a runaway adaptive solve stops training with an error that names the step
  c = tiny_config((dir.path / "w").string());
  c.depth.loops = 0;
  c.depth.solver = "dopri5";
  c.depth.rtol = c.depth.atol = 1e-12;
  c.depth.max_steps = 3;
  std::ostringstream quiet;
  CHECK_THROWS_WITH(Trainer(c).run(false, quiet), Catch::Contains("step 0: ") && Catch::Contains("more than 3 steps at t = "));
  CHECK_FALSE(fs::exists(dir.path / "y"));  // nothing written
  // the command line: a config file with an unknown key, a missing config file
  std::ofstream(dir.path / "bad.json") << R"({"task": "phop", "loops": 2, "colour": "red"})";
  int rc = 0;
  std::string out = run_command(std::string(FLOWLOOP_CLI) + " train --config " + (dir.path / "bad.json").string() +
                                    " --out " + (dir.path / "z").string(), &rc);
  CHECK(rc != 0);
  CHECK(out.find("unknown key \"colour\"") != std::string::npos);
  out = run_command(std::string(FLOWLOOP_CLI) + " train --config " + (dir.path / "none.json").string() + " --out " +
                        (dir.path / "z").string(), &rc);
  CHECK(rc != 0);
  CHECK(out.find("cannot open") != std::string::npos);
}

TEST_CASE("flowloop train and eval from the command line", "[train][cli]") {
  TempDir dir("flowloop_train");
  const std::string out = (dir.path / "run").string();
  int rc = 0;
  std::string o = run_command(std::string(FLOWLOOP_CLI) +
                                  " train --task modarith --task-n 2 --loops 2 --n-block 1 --d-model 16 --n-head 2 "
                                  "--steps 6 --batch 4 --eval-every 3 --eval-batches 1 --checkpoint-every 3 --out " + out, &rc);
  REQUIRE(rc == 0);
  CHECK(fs::exists(dir.path / "run" / "model.safetensors"));
  CHECK(fs::exists(dir.path / "run" / "config.json"));
  CHECK(read_metrics(dir.path / "run").size() == 6);
  // the saved config reproduces the run
  std::ifstream in(dir.path / "run" / "config.json");
  std::stringstream ss;
  ss << in.rdbuf();
  CHECK(TrainConfig::from_json(ss.str(), "config.json").task == "modarith");
  o = run_command(std::string(FLOWLOOP_CLI) + " eval -m " + out + "/model.safetensors --batches 2 --batch 8 --json", &rc);
  REQUIRE(rc == 0);
  const auto j = nlohmann::json::parse(o);
  CHECK(j["examples"] == 16);
  CHECK(j["nfe"] == 2.0);
  CHECK(j["accuracy"].get<double>() >= 0.0);
  o = run_command(std::string(FLOWLOOP_CLI) + " eval -m " + out + "/model.safetensors --loops 5 --json", &rc);
  REQUIRE(rc == 0);
  CHECK(nlohmann::json::parse(o)["nfe"] == 5.0);
  // with the exit gate: the expected exit depth is logged, and evaluation exits early
  const std::string gated = (dir.path / "gated").string();
  o = run_command(std::string(FLOWLOOP_CLI) +
                      " train --task modarith --task-n 2 --loops 3 --exit-gate --gate-beta 0.05 --d-model 16 --n-head 2 "
                      "--steps 4 --batch 4 --eval-every 2 --eval-batches 1 --out " + gated, &rc);
  REQUIRE(rc == 0);
  const auto lines = read_metrics(dir.path / "gated");
  REQUIRE(lines.size() == 4);
  CHECK(lines[0]["exit_depth"].get<double>() > 1.0);
  CHECK(lines[0]["exit_depth"].get<double>() < 3.0);
  double last = 0;
  for (const char* q : {"0.01", "0.5", "1.01"}) {
    o = run_command(std::string(FLOWLOOP_CLI) + " eval -m " + gated + "/model.safetensors --exit-q " + q + " --json", &rc);
    REQUIRE(rc == 0);
    const double d = nlohmann::json::parse(o)["exit_depth"].get<double>();
    CHECK(d >= last);
    last = d;
  }
  CHECK(last == 3.0);
  o = run_command(std::string(FLOWLOOP_CLI) + " eval -m " + out + "/model.safetensors --exit-q 0.5 --json", &rc);
  CHECK(rc != 0);
  CHECK(o.find("needs a model with an exit gate") != std::string::npos);
}

namespace {
Model<double> gate_model(uint64_t seed) {
  ModelConfig c = make_config(7, 5, 8, 2, 12, 1, 3);
  c.exit_gate = true;
  Model<double> m(c);
  Rng rng(seed);
  for (const auto& t : m.layout.tensors()) {
    const bool ln_w = t.name.find("ln_") != std::string::npos && t.name.find(".weight") != std::string::npos;
    for (size_t i = 0; i < t.numel; ++i) m.params[t.offset + i] = (ln_w ? 1.0 : 0.0) + 0.3 * rng.normal();
  }
  return m;
}
TokenBatch rows(int B, int T, int V, uint64_t seed, bool ignore) {
  TokenBatch tb;
  tb.B = B;
  tb.T = T;
  Rng rng(seed);
  for (int i = 0; i < B * T; ++i) tb.data.push_back(static_cast<int32_t>(rng.next() % static_cast<uint64_t>(V)));
  if (ignore) tb.data[2] = -1;
  return tb;
}
}  // namespace

TEST_CASE("exit gate: the loss against a hand-computed case and finite differences", "[train][gate]") {
  Model<double> m = gate_model(1);
  const TokenBatch tok = rows(2, 4, 7, 2, false), tgt = rows(2, 4, 7, 3, true);
  const int K = 3;
  const double beta = 0.1;
  // a constant gate: w = 0, b = 0 -> lambda = 1/2, p = (1/2, 1/4, 1/4)
  Model<double> h = m;
  for (int c = 0; c < 8; ++c) h.params[h.layout.gate_w() + c] = 0.0;
  h.params[h.layout.gate_b()] = 0.0;
  double Lt[K];
  for (int t = 1; t <= K; ++t) {
    LoopWork<double> w;
    std::vector<double> scratch(h.params.size(), 0.0);
    Lt[t - 1] = h.loop_loss_and_grad(tok, tgt, t, scratch.data(), w);
  }
  const double p[K] = {0.5, 0.25, 0.25};
  double expect = 0, H = 0;
  for (int t = 0; t < K; ++t) {
    expect += p[t] * Lt[t];
    H -= p[t] * std::log(p[t]);
  }
  expect -= beta * H;
  std::vector<double> g(h.params.size(), 0.0);
  LoopWork<double> w;
  double depth = 0;
  CHECK(h.loop_gate_loss_and_grad(tok, tgt, K, beta, g.data(), w, &depth) == Approx(expect).epsilon(1e-12));
  CHECK(depth == Approx(0.5 * 1 + 0.25 * 2 + 0.25 * 3));
  // the exact gradient, every parameter tensor, against central differences
  std::vector<double> grads(m.params.size(), 0.0);
  LoopWork<double> w2;
  m.loop_gate_loss_and_grad(tok, tgt, K, beta, grads.data(), w2);
  auto loss = [&] {
    std::vector<double> d(m.params.size(), 0.0);
    LoopWork<double> w3;
    return m.loop_gate_loss_and_grad(tok, tgt, K, beta, d.data(), w3);
  };
  for (const auto& t : m.layout.tensors()) {
    INFO(t.name);
    std::vector<double> an(grads.begin() + static_cast<long>(t.offset), grads.begin() + static_cast<long>(t.offset + t.numel));
    CHECK(rel_error(an, fd_grad(loss, m.params.data() + t.offset, t.numel)) < 1e-6);
  }
  // early exit: q = 1 waits for the last loop; a tiny q exits at the first
  Buffer<double> lg;
  std::vector<int> dep;
  LoopWork<double> w4;
  m.loop_exit(tok, K, "q", 1.0 + 1e-9, lg, dep, w4);
  for (int d : dep) CHECK(d == K);
  m.loop_exit(tok, K, "q", 1e-9, lg, dep, w4);
  for (int d : dep) CHECK(d == 1);
  m.loop_exit(tok, K, "delta", 1e9, lg, dep, w4);
  for (int d : dep) CHECK(d == 1);
  CHECK(lg[0] == w4.per_loop[0].logits[0]);
  CHECK_THROWS_WITH(m.loop_exit(tok, K, "kl", 0.1, lg, dep, w4), Catch::Contains("unknown exit rule 'kl'"));
  // a file without the gate still loads the base model; with it, the gate comes back
  TempDir dir("flowloop_train");
  const std::string path = (dir.path / "g.safetensors").string();
  save_checkpoint(path, m.cfg, m.layout, m.params.data());
  const Model<double> back = load_model<double>(path);
  CHECK(back.cfg.exit_gate);
  CHECK(back.params == m.params);
}

TEST_CASE("random depth: Poisson-lognormal loops and truncated backprop", "[train][depth]") {
  double sum = 0;
  int lo = 1000, hi = 0;
  for (int64_t s = 0; s < 4000; ++s) {
    const int k = random_depth(4.0, 7, s);
    sum += k;
    lo = std::min(lo, k);
    hi = std::max(hi, k);
  }
  CHECK(sum / 4000 == Approx(5.0).epsilon(0.05));  // E[K] = mean + 1
  CHECK(lo == 1);
  CHECK(hi > 10);
  CHECK(random_depth(4.0, 7, 3) == random_depth(4.0, 7, 3));
  // truncated backprop: the gradient of the last k loops only, equal to the full
  // gradient of a model that starts from h_{K-k} without a gradient path behind it
  Model<double> m = gate_model(5);
  const TokenBatch tok = rows(2, 4, 7, 6, false), tgt = rows(2, 4, 7, 8, true);
  const int K = 5, k = 2;
  std::vector<double> gt(m.params.size(), 0.0);
  LoopWork<double> w;
  const double lt = m.loop_loss_and_grad(tok, tgt, K, gt.data(), w, nullptr, k);
  const size_t NC = 2 * 4 * 8;
  LoopWork<double> ws;  // the states of the same loops (a loss keeps h_0 and h_K only)
  m.loop_forward(tok, K, ws);
  CHECK(std::equal(ws.h.begin() + static_cast<long>(NC * K), ws.h.end(), w.h.begin() + static_cast<long>(NC * K)));
  std::vector<double> hmid(ws.h.begin() + static_cast<long>(NC * (K - k)), ws.h.begin() + static_cast<long>(NC * (K - k + 1)));
  std::vector<double> gf(m.params.size(), 0.0), dh0(NC);
  LoopWork<double> w2;
  const double lf = m.loop_loss_and_grad_from(hmid.data(), tgt, k, gf.data(), w2, dh0.data());
  CHECK(lt == lf);
  CHECK(rel_error(gt, gf) < 1e-12);
  std::vector<double> full(m.params.size(), 0.0);
  LoopWork<double> w3;
  m.loop_loss_and_grad(tok, tgt, K, full.data(), w3);
  CHECK(rel_error(full, gt) > 1e-6);  // the truncation changes the gradient
}

TEST_CASE("a loop whose states turn non-finite gives NaN logits and loss, and no gradient", "[train][depth][errors]") {
  Model<double> m = gate_model(9);
  const TensorInfo& w = m.layout.at("field.h.0.mlp.c_proj.weight");
  m.params[w.offset] = std::numeric_limits<double>::infinity();  // the field's output is not finite
  const TokenBatch tok = rows(2, 4, 7, 6, false), tgt = rows(2, 4, 7, 8, true);
  const int K = 3, N = 2 * 4, V = 7;
  auto all_nan = [](const Buffer<double>& x) {
    return !x.empty() && std::all_of(x.begin(), x.end(), [](double v) { return std::isnan(v); });
  };
  std::vector<double> g(m.params.size(), 0.0);
  LoopWork<double> lw;
  CHECK(std::isnan(m.loop_loss_and_grad(tok, tgt, K, g.data(), lw)));
  CHECK(lw.readout.logits.size() == static_cast<size_t>(N) * V);
  CHECK(all_nan(lw.readout.logits));
  LoopWork<double> gw;
  CHECK(std::isnan(m.loop_gate_loss_and_grad(tok, tgt, K, 0.1, g.data(), gw)));
  REQUIRE(gw.per_loop.size() == static_cast<size_t>(K));
  CHECK(all_nan(gw.per_loop.back().logits));
  CHECK(std::all_of(g.begin(), g.end(), [](double v) { return v == 0.0; }));  // no gradient was added
}

TEST_CASE("flowloop study trains every arm at the same budget and writes the table", "[train][cli][study]") {
  TempDir dir("flowloop_train");
  const std::string out = (dir.path / "study").string();
  int rc = 0;
  const std::string o = run_command(std::string(FLOWLOOP_CLI) +
                                        " study --task modarith --task-n 2 --depth 2 --d-model 16 --n-head 2 --steps 3 "
                                        "--batch 4 --warmup 1 --eval-batches 1 --out " + out + " 2>/dev/null", &rc);
  REQUIRE(rc == 0);
  CHECK(o.find("| 1 block looped 2x |") != std::string::npos);
  CHECK(o.find("| 2 blocks once |") != std::string::npos);
  CHECK(o.find("dopri5") != std::string::npos);
  std::ifstream in(dir.path / "study" / "results.json");
  nlohmann::json j;
  in >> j;
  REQUIRE(j["results"].size() == 4);
  CHECK(j["results"][0]["parameters"] == j["results"][2]["parameters"]);        // looped and shallow share weights' size
  CHECK(j["results"][1]["parameters"].get<int>() > j["results"][0]["parameters"].get<int>());
  CHECK(j["results"][0]["nfe"] == 2.0);
  CHECK(j["results"][3]["nfe"].get<double>() > 2.0);
  CHECK(fs::exists(dir.path / "study" / "deep" / "model.safetensors"));
  // learning curves: steps 3 with 8 points evaluates every step; FLOPs grow with the
  // steps, and the deep arm's step costs what the looped one's does (same nfe x blocks)
  std::ifstream cin_(dir.path / "study" / "curves.csv");
  std::string header, line;
  std::getline(cin_, header);
  CHECK(header == "arm,seed,step,train_flops,train_seconds,test_accuracy,test_loss");
  std::map<std::string, std::vector<double>> flops;
  while (std::getline(cin_, line)) {
    std::stringstream ls(line);
    std::string arm, cell;
    std::getline(ls, arm, ',');
    std::vector<double> v;
    while (std::getline(ls, cell, ',')) v.push_back(std::stod(cell));
    REQUIRE(v.size() == 6);
    CHECK(v[4] >= 0);
    CHECK(v[4] <= 1);
    flops[arm].push_back(v[2]);
  }
  REQUIRE(flops["looped"].size() == 3);
  CHECK(flops["looped"][2] == Approx(3 * flops["looped"][0]));
  CHECK(flops["deep"][0] == Approx(flops["looped"][0]));
  CHECK(flops["shallow"][0] < flops["looped"][0]);
  CHECK(flops["ode"][0] > flops["looped"][0]);
  // a rerun into the same directory trains nothing again: the same results, the
  // metrics untouched
  const auto metrics_before = read_metrics(dir.path / "study" / "looped");
  const std::string again = run_command(std::string(FLOWLOOP_CLI) +
                                            " study --task modarith --task-n 2 --depth 2 --d-model 16 --n-head 2 --steps 3 "
                                            "--batch 4 --warmup 1 --eval-batches 1 --out " + out + " 2>/dev/null", &rc);
  REQUIRE(rc == 0);
  std::ifstream in_again(dir.path / "study" / "results.json");
  nlohmann::json j_again;
  in_again >> j_again;
  REQUIRE(j_again["results"].size() == 4);
  for (size_t i = 0; i < 4; ++i) {
    CHECK(j_again["results"][i]["test_accuracy"] == j["results"][i]["test_accuracy"]);
    CHECK(j_again["results"][i]["test_loss"] == j["results"][i]["test_loss"]);
    CHECK(j_again["results"][i]["train_seconds"] == j["results"][i]["train_seconds"]);
  }
  CHECK(read_metrics(dir.path / "study" / "looped") == metrics_before);
  // one arm alone, the regularised ODE arm; an unknown arm is refused
  const std::string o2 = run_command(std::string(FLOWLOOP_CLI) +
                                         " study --task modarith --task-n 2 --depth 2 --d-model 16 --n-head 2 --steps 3 "
                                         "--batch 4 --warmup 1 --eval-batches 1 --arms ode --kinetic 0.1 --out " + out + "2 2>/dev/null", &rc);
  REQUIRE(rc == 0);
  CHECK(o2.find("kinetic 0.1") != std::string::npos);
  CHECK(o2.find("looped") == std::string::npos);
  std::ifstream in2(dir.path / "study2" / "results.json");
  nlohmann::json j2;
  in2 >> j2;
  REQUIRE(j2["results"].size() == 1);
  CHECK(j2["results"][0]["kinetic"] == 0.1);
  const std::string o3 = run_command(std::string(FLOWLOOP_CLI) + " study --arms looped,wide --out " + out + "3 2>&1", &rc);
  CHECK(rc != 0);
  CHECK(o3.find("unknown arm 'wide'") != std::string::npos);
  const std::string o4 = run_command(std::string(FLOWLOOP_CLI) + " study --arms , --out " + out + "4 2>&1", &rc);
  CHECK(rc != 0);
  CHECK(o4.find("no arm left to train") != std::string::npos);
}

TEST_CASE("training with the optimiser on a backend: the host's bits, the CPU's losses, an exact resume",
          "[train][device]") {
  // AdamW on the reference backend against the host's: the same update (kernels.hpp's
  // body), the gradient norm to rounding (the backend's blocked sum, the host's in-order
  // one: so the clipped steps agree to a few ulps); the moments come back for a
  // checkpoint, and a state set from outside is taken again
  const ModelConfig mc = make_config(3, 2, 2, 1, 2, 1, 1);
  ParamLayout layout(mc);
  TrainConfig c;
  c.weight_decay = 0.1;
  c.clip = 0.5;
  AdamW host(layout, c.optim()), dev(layout, c.optim());
  std::shared_ptr<Backend<float>> ref(make_backend<float>(Device::cpu));
  dev.set_backend(ref);
  Rng rng(4);
  Buffer<float> ph(layout.size()), pd;
  for (auto& x : ph) x = static_cast<float>(rng.normal());
  pd = ph;
  auto steps = [&](int n) {
    for (int s = 0; s < n; ++s) {
      Buffer<float> gh(layout.size()), gd;
      for (auto& x : gh) x = static_cast<float>(rng.normal());
      gd = gh;
      const double nd = dev.step(pd.data(), gd.data(), 0.01), nh = host.step(ph.data(), gh.data(), 0.01);
      CHECK(nd == Approx(nh).epsilon(1e-14));
      CHECK(nh > c.clip);  // clipped
      CHECK(rel_error_of(std::vector<float>(pd.begin(), pd.end()), std::vector<float>(ph.begin(), ph.end())) < 1e-6);
      CHECK(rel_error_of(std::vector<float>(gd.begin(), gd.end()), std::vector<float>(gh.begin(), gh.end())) < 1e-6);
    }
  };
  auto same_moments = [&] {
    CHECK(rel_error_of(std::vector<float>(dev.m.begin(), dev.m.end()), std::vector<float>(host.m.begin(), host.m.end())) <
          1e-5);
    CHECK(rel_error_of(std::vector<float>(dev.v.begin(), dev.v.end()), std::vector<float>(host.v.begin(), host.v.end())) <
          1e-5);
  };
  steps(3);
  CHECK(std::all_of(dev.m.begin(), dev.m.end(), [](float x) { return x == 0.0f; }));  // still on the device
  dev.sync_host();
  same_moments();
  std::fill(dev.m.begin(), dev.m.end(), 0.0f);
  std::fill(host.m.begin(), host.m.end(), 0.0f);
  dev.t = host.t = 1;
  dev.state_changed();
  dev.sync_host();  // the host's zeros are the current moments: nothing comes down over them
  CHECK(dev.m == host.m);
  steps(2);
  dev.sync_host();
  same_moments();
  // moving between backends (the last owner of the old one is the optimiser) and back to
  // the host keeps the state, and frees the old arrays through their own backend
  dev.set_backend(std::shared_ptr<Backend<float>>(make_backend<float>(Device::cpu)));
  steps(1);
  dev.set_backend(std::shared_ptr<Backend<float>>(make_backend<float>(Device::cpu)));
  steps(1);
  dev.set_backend(nullptr);
  CHECK(dev.device_params() == nullptr);
  steps(1);
  same_moments();
  // without clipping the update is the host's, bit for bit
  c.clip = 0;
  AdamW h2(layout, c.optim()), d2(layout, c.optim());
  d2.set_backend(ref);
  Buffer<float> p2 = ph, q2 = ph, g3(layout.size());
  for (auto& x : g3) x = static_cast<float>(rng.normal());
  Buffer<float> g4 = g3;
  CHECK(d2.step(q2.data(), g4.data(), 0.01) == Approx(h2.step(p2.data(), g3.data(), 0.01)).epsilon(1e-14));
  CHECK(q2 == p2);

  // a Trainer on the reference backend: the CPU's losses (loop and ODE depth), and a run
  // killed and resumed on the device has exactly the losses of an uninterrupted one
  TempDir dir("flowloop_train_device");
  std::ostringstream quiet;
  for (const bool ode : {false, true}) {
    INFO((ode ? "ODE depth" : "loop depth"));
    auto config = [&](const std::string& name) {
      TrainConfig t = tiny_config((dir.path / ((ode ? "ode_" : "loop_") + name)).string());
      t.steps = 6;
      t.eval_every = 3;
      t.checkpoint_every = 2;
      if (ode) {
        t.depth.loops = 0;
        t.depth.solver = "rk4";
        t.depth.steps = 2;
        t.depth.t1 = 2;
      }
      return t;
    };
    Trainer(config("cpu")).run(false, quiet);
    {
      Trainer t(config("dev"));
      t.set_backend(std::shared_ptr<Backend<float>>(make_backend<float>(Device::cpu)));
      t.run(false, quiet);
    }
    {
      Trainer t(config("part"));
      t.set_backend(std::shared_ptr<Backend<float>>(make_backend<float>(Device::cpu)));
      t.run(false, quiet, 3);
    }
    Trainer resumed(config("part"));
    resumed.set_backend(std::shared_ptr<Backend<float>>(make_backend<float>(Device::cpu)));
    resumed.run(true, quiet);
    const auto a = read_metrics(dir.path / ((ode ? "ode_" : "loop_") + std::string("cpu")));
    const auto b = read_metrics(dir.path / ((ode ? "ode_" : "loop_") + std::string("dev")));
    const auto r = read_metrics(dir.path / ((ode ? "ode_" : "loop_") + std::string("part")));
    REQUIRE(a.size() == 6);
    REQUIRE(b.size() == 6);
    REQUIRE(r.size() == 6);
    for (size_t i = 0; i < a.size(); ++i) {
      INFO("step " << i + 1);
      CHECK(b[i]["loss"].get<double>() == Approx(a[i]["loss"].get<double>()).epsilon(1e-4));
      CHECK(r[i]["loss"] == b[i]["loss"]);
      CHECK(r[i]["grad_norm"] == b[i]["grad_norm"]);
    }
    const Model<float> mb = load_model<float>((dir.path / ((ode ? "ode_" : "loop_") + std::string("dev")) /
                                               "model.safetensors").string());
    CHECK(mb.params == resumed.model().params);
    // a finished run resumed on the device (no step left) evaluates the weights it loaded
    Trainer done(config("part"));
    done.set_backend(std::shared_ptr<Backend<float>>(make_backend<float>(Device::cpu)));
    done.run(true, quiet);
    CHECK(done.step() == 6);
    const auto data = make_source(config("part"));
    const EvalResult on_device = evaluate(done.model(), *data, config("part").depth, 2, 4);
    const EvalResult on_cpu = evaluate(mb, *data, config("part").depth, 2, 4);
    CHECK(on_device.loss == Approx(on_cpu.loss).epsilon(1e-5));
    CHECK(on_device.accuracy == on_cpu.accuracy);
  }
}
