// The field, the looped model and its gradient, float against double, the CLI.
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "check.hpp"
#include "grad_check.hpp"
#include "flowloop/flowloop.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace {
constexpr double kTol = 1e-6;

ModelConfig small_config(int n_block) { return make_config(11, 6, 8, 2, 12, n_block); }

// Parameters at O(1) scale, so that every path of the gradient matters.
void randomize(Model<double>& m, uint64_t seed) {
  Rng rng(seed);
  for (const auto& t : m.layout.tensors()) {
    const bool ln_w = t.name.find("ln_") != std::string::npos && t.name.find(".weight") != std::string::npos;
    for (size_t i = 0; i < t.numel; ++i)
      m.params[t.offset + i] = (ln_w ? 1.0 : 0.0) + 0.3 * rng.normal();
  }
}

std::vector<double> slice(const std::vector<double>& v, const TensorInfo& t) {
  return {v.begin() + static_cast<long>(t.offset), v.begin() + static_cast<long>(t.offset + t.numel)};
}

}  // namespace

TEST_CASE("field vjp matches finite differences for h and every parameter tensor", "[field][fd]") {
  for (int L : {1, 2}) {
    const ModelConfig cfg = small_config(L);
    Model<double> m(cfg);
    randomize(m, 10 + L);
    const int B = 2, T = 5;
    Rng rng(20);
    auto h = randn(B * T * cfg.d_model, rng), g = randn(h.size(), rng);
    std::vector<double> f(h.size());
    FieldCache<double> cache;
    cache.resize(cfg, B, T);
    auto loss = [&] {
      m.field.forward(f.data(), h.data(), nullptr, m.field_params(), B, T, cache);
      return dot(f, g);
    };
    loss();
    std::vector<double> dh(h.size(), 0.0), dp(m.params.size(), 0.0);
    FieldGradWork<double> work;
    m.field.vjp(dh.data(), dp.data() + m.layout.field_begin(), g.data(), m.field_params(), cache, work);
    INFO("L = " << L);
    CHECK(rel_error(dh, fd_grad(loss, h.data(), h.size())) < kTol);
    for (const auto& t : m.layout.tensors()) {
      INFO(t.name);
      auto an = slice(dp, t);
      if (t.offset < m.layout.field_begin() || t.offset >= m.layout.field_end()) {
        for (double x : an) CHECK(x == 0.0);  // the field touches only its own range
        continue;
      }
      CHECK(rel_error(an, fd_grad(loss, m.params.data() + t.offset, t.numel)) < kTol);
    }
  }
}

TEST_CASE("K-loop model loss gradient matches finite differences", "[model][fd]") {
  for (int K : {1, 3}) {
    const ModelConfig cfg = small_config(2);
    Model<double> m(cfg);
    randomize(m, 30 + K);
    const int B = 2, T = 5;
    const TokenBatch tokens = make_batch(B, T, cfg.vocab_size, 40);
    const TokenBatch targets = make_batch(B, T, cfg.vocab_size, 41, /*with_ignore=*/true);
    LoopWork<double> w;
    std::vector<double> grads(m.params.size(), 0.0);
    const double L0 = m.loop_loss_and_grad(tokens, targets, K, grads.data(), w);
    CHECK(std::isfinite(L0));
    auto loss = [&] {
      std::vector<double> dummy(m.params.size(), 0.0);
      LoopWork<double> w2;
      return m.loop_loss_and_grad(tokens, targets, K, dummy.data(), w2);
    };
    INFO("K = " << K);
    for (const auto& t : m.layout.tensors()) {
      INFO(t.name);
      CHECK(rel_error(slice(grads, t), fd_grad(loss, m.params.data() + t.offset, t.numel)) < kTol);
    }
    // with respect to h(0)
    std::vector<double> h0(w.h.begin(), w.h.begin() + B * T * cfg.d_model), dh0(h0.size());
    std::vector<double> scratch(m.params.size(), 0.0);
    m.loop_loss_and_grad_from(h0.data(), targets, K, scratch.data(), w, dh0.data());
    auto loss_h = [&] {
      std::vector<double> dummy(m.params.size(), 0.0);
      LoopWork<double> w2;
      return m.loop_loss_and_grad_from(h0.data(), targets, K, dummy.data(), w2, nullptr);
    };
    CHECK(rel_error(dh0, fd_grad(loss_h, h0.data(), h0.size())) < kTol);
  }
}

TEST_CASE("loop K applies h + f(h) K times", "[model]") {
  const ModelConfig cfg = small_config(1);
  Model<double> m(cfg);
  randomize(m, 50);
  const TokenBatch tokens = make_batch(2, 4, cfg.vocab_size, 51);
  LoopWork<double> w;
  CHECK(m.loop_forward(tokens, 3, w) == 3);
  const size_t NC = 2 * 4 * cfg.d_model;
  Buffer<double> h(w.h.begin(), w.h.begin() + NC), f(NC);
  FieldCache<double> cache;
  cache.resize(cfg, 2, 4);
  for (int k = 0; k < 3; ++k) {
    m.field.forward(f.data(), h.data(), nullptr, m.field_params(), 2, 4, cache);
    for (size_t i = 0; i < NC; ++i) h[i] += f[i];
  }
  for (size_t i = 0; i < NC; ++i) CHECK(h[i] == w.h[3 * NC + i]);
  // the field is S(h) - h: with every residual branch silenced, f = 0
  Model<double> z(cfg);
  std::vector<double> hz(NC, 0.5), fz(NC, 1.0);
  z.field.forward(fz.data(), hz.data(), nullptr, z.field_params(), 2, 4, cache);
  for (double x : fz) CHECK(x == 0.0);
}

TEST_CASE("float and double forward agree to float precision", "[model]") {
  const ModelConfig cfg = make_config(50, 16, 32, 4, 0, 2);
  Model<double> md(cfg);
  md.init(7);
  Model<float> mf(cfg);
  for (size_t i = 0; i < md.params.size(); ++i) mf.params[i] = static_cast<float>(md.params[i]);
  for (size_t i = 0; i < md.params.size(); ++i) md.params[i] = static_cast<double>(mf.params[i]);
  const TokenBatch tokens = make_batch(3, 16, cfg.vocab_size, 8);
  LoopWork<double> wd;
  LoopWork<float> wf;
  md.loop_forward(tokens, 4, wd);
  mf.loop_forward(tokens, 4, wf);
  double maxdiff = 0, maxabs = 0;
  for (size_t i = 0; i < wd.readout.logits.size(); ++i) {
    REQUIRE(std::isfinite(wf.readout.logits[i]));
    maxdiff = std::max(maxdiff, std::fabs(wd.readout.logits[i] - wf.readout.logits[i]));
    maxabs = std::max(maxabs, std::fabs(wd.readout.logits[i]));
  }
  INFO("max |diff| " << maxdiff << " max |logit| " << maxabs);
  CHECK(maxabs > 0.1);
  CHECK(maxdiff <= 1e-5 * maxabs);
}

TEST_CASE("bad inputs are rejected with a message naming the fault", "[model][errors]") {
  const ModelConfig cfg = small_config(1);
  Model<float> m(cfg);
  LoopWork<float> w;
  TokenBatch tb = make_batch(2, 4, cfg.vocab_size, 1);
  tb.data[5] = 11;
  CHECK_THROWS_WITH(m.loop_forward(tb, 2, w), Catch::Contains("value 11 at row 1, position 1 is out of range [0, 11)"));
  tb.data[5] = -1;
  CHECK_THROWS_WITH(m.loop_forward(tb, 2, w), Catch::Contains("out of range"));
  TokenBatch longer = make_batch(1, 7, cfg.vocab_size, 2);
  CHECK_THROWS_WITH(m.loop_forward(longer, 2, w), Catch::Contains("exceeds the model's context 6"));
  TokenBatch ok = make_batch(2, 4, cfg.vocab_size, 3), tg = make_batch(2, 3, cfg.vocab_size, 4);
  std::vector<float> grads(m.params.size());
  CHECK_THROWS_WITH(m.loop_loss_and_grad(ok, tg, 1, grads.data(), w), Catch::Contains("targets have shape (2, 3)"));
  CHECK_THROWS_WITH(m.loop_forward(ok, -1, w), Catch::Contains("K must be >= 0"));
  FieldCache<float> cache;
  cache.resize(cfg, 1, 4);
  std::vector<float> h(2 * 4 * 8), f(h.size());
  CHECK_THROWS_WITH(m.field.forward(f.data(), h.data(), nullptr, m.field_params(), 2, 4, cache), Catch::Contains("cache sized for (B=1"));
  ModelConfig bad = cfg;
  bad.n_head = 3;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("not divisible by n_head"));
}

TEST_CASE("flowloop init, forward and bench from the command line", "[cli]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("flowloop_cli_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string cli = FLOWLOOP_CLI;
  const std::string model = (dir / "m.safetensors").string();
  int rc = 0;
  std::string out = run_command(cli + " init --vocab 13 --context 8 --d-model 16 --n-head 2 --n-block 2 --seed 3 -o " + model, &rc);
  REQUIRE(rc == 0);
  CHECK(out.find("\"parameters\"") != std::string::npos);
  {
    std::ofstream(dir / "tok.json") << R"({"tokens": [[1, 2, 3, 4], [5, 6, 7, 12]]})";
    std::ofstream(dir / "bad.json") << R"({"tokens": [[1, 2, 3, 13]]})";
    std::ofstream(dir / "ragged.json") << R"({"tokens": [[1, 2, 3], [1, 2]]})";
  }
  const std::string outp = (dir / "out.json").string();
  out = run_command(cli + " forward -m " + model + " --tokens " + (dir / "tok.json").string() + " --loops 3 -o " + outp, &rc);
  REQUIRE(rc == 0);
  nlohmann::json j;
  std::ifstream(outp) >> j;
  CHECK(j["nfe"] == 3);
  REQUIRE(j["logits"].size() == 2);
  REQUIRE(j["logits"][0].size() == 4);
  REQUIRE(j["logits"][0][0].size() == 13);
  // the CLI's logits are the library's
  Model<float> m = load_model<float>(model);
  TokenBatch tb;
  tb.B = 2;
  tb.T = 4;
  tb.data = {1, 2, 3, 4, 5, 6, 7, 12};
  LoopWork<float> w;
  m.loop_forward(tb, 3, w);
  CHECK(j["logits"][1][3][12].get<float>() == w.readout.logits[(1 * 4 + 3) * 13 + 12]);
  CHECK(j["logits"][0][2][5].get<float>() == w.readout.logits[(0 * 4 + 2) * 13 + 5]);

  out = run_command(cli + " forward -m " + model + " --tokens " + (dir / "bad.json").string() + " --loops 3 -o " + outp, &rc);
  CHECK(rc != 0);
  CHECK(out.find("value 13 at row 0, position 3 is out of range [0, 13)") != std::string::npos);
  out = run_command(cli + " forward -m " + model + " --tokens " + (dir / "ragged.json").string() + " -o " + outp, &rc);
  CHECK(rc != 0);
  CHECK(out.find("row 1 has length 2 but row 0 has 3") != std::string::npos);
  out = run_command(cli + " forward -m " + model + " --tokens " + (dir / "tok.json").string() + " --bogus 1 -o " + outp, &rc);
  CHECK(rc != 0);
  CHECK(out.find("bogus") != std::string::npos);

  out = run_command(cli + " bench field --size S --reps 2 --seconds 0", &rc);
  REQUIRE(rc == 0);
  const auto b = nlohmann::json::parse(out);
  CHECK(b["size"] == "S");
  CHECK(b["ms_per_eval"].get<double>() > 0);
  CHECK(b["gflops"].get<double>() > 0);
  CHECK(b["gemm_gflops"].get<double>() > 0);
  CHECK(b["ratio"].get<double>() == Approx(b["gflops"].get<double>() / b["gemm_gflops"].get<double>()));
  fs::remove_all(dir);
}

TEST_CASE("same inputs give the same bits, whatever the thread count", "[model][determinism]") {
  const ModelConfig cfg = make_config(64, 64, 64, 4, 0, 2);
  Model<float> m(cfg);
  m.init(9);
  const TokenBatch tokens = make_batch(8, 64, cfg.vocab_size, 10);  // large enough to go parallel
  const TokenBatch targets = make_batch(8, 64, cfg.vocab_size, 11);
  std::vector<Buffer<float>> grads, logits;
  std::vector<float> losses;
  const int before = num_threads();
  for (int threads : {1, 2, 3, 1}) {
    set_num_threads(threads);
    LoopWork<float> w;
    Buffer<float> g(m.params.size(), 0.0f);
    losses.push_back(m.loop_loss_and_grad(tokens, targets, 3, g.data(), w));
    grads.push_back(g);
    logits.push_back(w.readout.logits);
  }
  set_num_threads(before);
  for (size_t i = 1; i < losses.size(); ++i) {
    CHECK(losses[i] == losses[0]);
    CHECK(logits[i] == logits[0]);
    CHECK(grads[i] == grads[0]);
  }
}

TEST_CASE("per-sequence parameter gradients of the field", "[field]") {
  const ModelConfig cfg = small_config(2);
  Model<double> m(cfg);
  randomize(m, 60);
  const int B = 3, T = 5;
  const size_t n = static_cast<size_t>(T) * cfg.d_model, P = m.field.num_params();
  Rng rng(61);
  auto h = randn(B * n, rng), g = randn(B * n, rng);
  std::vector<double> f(h.size()), dh_sum(h.size(), 0.0), dh_per(h.size(), 0.0);
  FieldCache<double> cache;
  cache.resize(cfg, B, T);
  FieldGradWork<double> work;
  m.field.forward(f.data(), h.data(), nullptr, m.field_params(), B, T, cache);
  std::vector<double> sum(P, 0.0), per(B * P, 0.0);
  m.field.vjp(dh_sum.data(), sum.data(), g.data(), m.field_params(), cache, work);
  m.field.vjp(dh_per.data(), per.data(), g.data(), m.field_params(), cache, work, P);
  CHECK(dh_per == dh_sum);
  for (int b = 0; b < B; ++b) {
    // sequence b alone
    FieldCache<double> c1;
    c1.resize(cfg, 1, T);
    std::vector<double> f1(n), dh1(n, 0.0), p1(P, 0.0);
    m.field.forward(f1.data(), h.data() + b * n, nullptr, m.field_params(), 1, T, c1);
    m.field.vjp(dh1.data(), p1.data(), g.data() + b * n, m.field_params(), c1, work);
    CHECK(rel_error(p1, std::vector<double>(per.begin() + b * P, per.begin() + (b + 1) * P)) < 1e-12);
  }
  std::vector<double> total(P, 0.0);
  for (int b = 0; b < B; ++b)
    for (size_t i = 0; i < P; ++i) total[i] += per[b * P + i];
  CHECK(rel_error(total, sum) < 1e-12);
}
