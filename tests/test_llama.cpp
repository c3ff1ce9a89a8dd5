// The Llama-family block and the general model structure (prelude, recurrent core, coda,
// final RMSNorm, untied head): the field's vjp and the model's loss gradient against finite
// differences in double, the cpu backend against the reference one, the split into prelude,
// core and coda against the same layers in one stack, and checkpoints that keep it all.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <memory>
#include <vector>

#include "check.hpp"
#include "flowloop/flowloop.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace llama_test {  // named: the unity build puts several test files in one unit
constexpr double kTol = 1e-6;

// A small llama config: C 8, 4 query heads of 3 dims (d_head != C / NH), the variant's options.
ModelConfig llama_config(int n_kv, bool biases, double fraction, bool interleaved, int prelude = 0, int core = 1,
                         int coda = 0, bool tie = true, bool core_norm = false) {
  ModelConfig c;
  c.arch = "llama";
  c.vocab_size = 13;
  c.context = 8;
  c.d_model = 8;
  c.n_head = 4;
  c.n_kv_head = n_kv;
  c.d_head = 4;
  c.d_ff = 10;
  c.n_block = core;
  c.n_prelude = prelude;
  c.n_coda = coda;
  c.depth = 2;
  c.norm_eps = 1e-6;
  c.rope_theta = 50.0;  // turns that matter at positions 0..7
  c.rope_fraction = fraction;
  c.rope_interleaved = interleaved;
  c.qkv_bias = c.o_bias = c.mlp_bias = biases;
  c.tie_head = tie;
  c.core_norm = core_norm;
  c.finalize();
  return c;
}

template <class S>
void randomize(Model<S>& m, uint64_t seed) {
  Rng rng(seed);
  for (const auto& t : m.layout.tensors()) {
    const bool norm = t.name.find("norm") != std::string::npos || t.name.find("ln_") != std::string::npos;
    for (size_t i = 0; i < t.numel; ++i) m.params[t.offset + i] = static_cast<S>((norm ? 1.0 : 0.0) + 0.3 * rng.normal());
  }
}

std::vector<double> slice(const std::vector<double>& v, const TensorInfo& t) {
  return {v.begin() + static_cast<long>(t.offset), v.begin() + static_cast<long>(t.offset + t.numel)};
}

struct Variant {
  const char* name;
  ModelConfig cfg;
};
std::vector<Variant> variants() {
  return {{"multi-head, no bias, full rotary", llama_config(4, false, 1.0, false, 0, 2)},
          {"grouped 4:2, biases, half rotary", llama_config(2, true, 0.5, false)},
          {"grouped 4:1, interleaved rotary", llama_config(1, false, 1.0, true)},
          {"a norm ending every step (core_norm)", llama_config(2, false, 1.0, false, 0, 2, 0, true, true)}};
}
}  // namespace llama_test
using namespace llama_test;

TEST_CASE("llama field: the vjp against finite differences for h and every tensor, on the cpu and reference "
          "backends",
          "[llama][fd]") {
  std::unique_ptr<Backend<double>> ref = make_backend<double>(Device::cpu);
  for (const Variant& v : variants()) {
    for (NetOps<double>* ops : {static_cast<NetOps<double>*>(&cpu_backend<double>()), static_cast<NetOps<double>*>(ref.get())}) {
      INFO(v.name << " on " << ops->name());
      Model<double> m(v.cfg);
      randomize(m, 11);
      Field<double> field(*ops, v.cfg, m.layout);
      const int B = 2, T = 5;
      Rng rng(21);
      auto h = randn(static_cast<size_t>(B) * T * v.cfg.d_model, rng), g = randn(h.size(), rng);
      std::vector<double> f(h.size());
      FieldCache<double> cache;
      cache.resize(*ops, field.config(), B, T);
      auto loss = [&] {
        field.forward(f.data(), h.data(), nullptr, m.field_params(), B, T, cache);
        return dot(f, g);
      };
      loss();
      std::vector<double> dh(h.size(), 0.0), dp(m.params.size(), 0.0);
      FieldGradWork<double> work;
      field.vjp(dh.data(), dp.data() + m.layout.field_begin(), g.data(), m.field_params(), cache, work);
      CHECK(rel_error(dh, fd_grad(loss, h.data(), h.size())) < kTol);
      for (const auto& t : m.layout.tensors()) {
        INFO(t.name);
        auto an = slice(dp, t);
        if (t.offset < m.layout.field_begin() || t.offset >= m.layout.field_end()) {
          for (double x : an) CHECK(x == 0.0);
          continue;
        }
        CHECK(rel_error(an, fd_grad(loss, m.params.data() + t.offset, t.numel)) < kTol);
      }
      // per-sequence parameter gradients sum to the batch's
      std::vector<double> per(static_cast<size_t>(B) * field.num_params(), 0.0), dh2(h.size(), 0.0);
      loss();
      field.vjp(dh2.data(), per.data(), g.data(), m.field_params(), cache, work, field.num_params());
      std::vector<double> sum(field.num_params(), 0.0), batch(dp.begin() + static_cast<long>(m.layout.field_begin()),
                                                              dp.begin() + static_cast<long>(m.layout.field_end()));
      for (int b = 0; b < B; ++b)
        for (size_t i = 0; i < sum.size(); ++i) sum[i] += per[static_cast<size_t>(b) * field.num_params() + i];
      CHECK(rel_error(sum, batch) < 1e-12);
    }
  }
}

TEST_CASE("llama field: the cpu backend against the reference backend in float", "[llama]") {
  std::unique_ptr<Backend<float>> ref = make_backend<float>(Device::cpu);
  for (const Variant& v : variants()) {
    INFO(v.name);
    Model<float> m(v.cfg);
    randomize(m, 12);
    Field<float> rfield(*ref, v.cfg, m.layout);
    const int B = 3, T = 7;
    Rng rng(22);
    auto h = random_values<float>(static_cast<size_t>(B) * T * v.cfg.d_model, rng), g = random_values<float>(h.size(), rng);
    std::vector<float> f1(h.size()), f2(h.size()), dh1(h.size(), 0.f), dh2(h.size(), 0.f);
    std::vector<float> dp1(m.field.num_params(), 0.f), dp2(dp1.size(), 0.f);
    FieldCache<float> c1, c2;
    c1.resize(m.field.config(), B, T);
    c2.resize(*ref, rfield.config(), B, T);
    FieldGradWork<float> w1, w2;
    m.field.forward(f1.data(), h.data(), nullptr, m.field_params(), B, T, c1);
    rfield.forward(f2.data(), h.data(), nullptr, m.field_params(), B, T, c2);
    m.field.vjp(dh1.data(), dp1.data(), g.data(), m.field_params(), c1, w1);
    rfield.vjp(dh2.data(), dp2.data(), g.data(), m.field_params(), c2, w2);
    CHECK(rel_error_of(f1, f2) < 1e-5);
    CHECK(rel_error_of(dh1, dh2) < 1e-5);
    CHECK(rel_error_of(dp1, dp2) < 1e-5);
  }
}

TEST_CASE("llama model: prelude, core, coda and an untied head, the loss gradient against finite differences",
          "[llama][model][fd]") {
  const ModelConfig cfg =
      llama_config(2, true, 0.5, false, /*prelude=*/1, /*core=*/1, /*coda=*/1, /*tie=*/false, /*core_norm=*/true);
  Model<double> m(cfg);
  randomize(m, 31);
  REQUIRE(m.layout.find("field.norm.weight") != nullptr);
  const int B = 2, T = 4;
  Rng rng(32);
  TokenBatch tokens{B, T, {}}, targets{B, T, {}};
  for (int i = 0; i < B * T; ++i) {
    tokens.data.push_back(static_cast<int32_t>(rng.uniform() * cfg.vocab_size) % cfg.vocab_size);
    targets.data.push_back(i % 5 == 3 ? -1 : static_cast<int32_t>(rng.uniform() * cfg.vocab_size) % cfg.vocab_size);
  }
  for (const char* how : {"loop 2", "rk4 on [0, 1.5]"}) {
    INFO(how);
    const bool loop = std::string(how) == "loop 2";
    auto run = [&](double* grads) {
      if (loop) {
        LoopWork<double> w;
        return m.loop_loss_and_grad(tokens, targets, 2, grads, w);
      }
      OdeWork<double> w;
      GradStats st;
      return m.ode_loss_and_grad(tokens, targets, fixed_opts("rk4", 1.5, 3), GradOptions{}, grads, st, w);
    };
    std::vector<double> grads(m.params.size(), 0.0);
    CHECK(std::isfinite(run(grads.data())));
    auto loss = [&] {
      std::vector<double> dummy(m.params.size(), 0.0);
      return run(dummy.data());
    };
    int seen = 0;
    for (const auto& t : m.layout.tensors()) {
      INFO(t.name);
      CHECK(rel_error(slice(grads, t), fd_grad(loss, m.params.data() + t.offset, t.numel)) < kTol);
      seen += t.name.rfind("prelude.", 0) == 0 || t.name.rfind("coda.", 0) == 0 || t.name == "lm_head.weight";
    }
    CHECK(seen == 2 * 16 + 1);  // every prelude and coda tensor (16 a block with biases), and the head
  }
}

TEST_CASE("llama model: a prelude, core and coda of one layer each, looped once, equal the three layers in one "
          "stack",
          "[llama][model]") {
  const ModelConfig split = llama_config(2, true, 1.0, false, 1, 1, 1, false);
  ModelConfig whole = split;
  whole.n_prelude = whole.n_coda = 0;
  whole.n_block = 3;
  Model<double> a(split), b(whole);
  randomize(a, 41);
  for (const auto& t : a.layout.tensors()) {
    std::string name = t.name;
    if (name.rfind("prelude.h.0.", 0) == 0) name = "field.h.0." + name.substr(12);
    else if (name.rfind("field.h.0.", 0) == 0) name = "field.h.1." + name.substr(10);
    else if (name.rfind("coda.h.0.", 0) == 0) name = "field.h.2." + name.substr(9);
    const TensorInfo& u = b.layout.at(name);
    REQUIRE(u.numel == t.numel);
    std::copy_n(a.params.data() + t.offset, t.numel, b.params.data() + u.offset);
  }
  TokenBatch tokens{2, 6, {}};
  for (int i = 0; i < 12; ++i) tokens.data.push_back((i * 5 + 3) % split.vocab_size);
  LoopWork<double> wa, wb;
  a.loop_forward(tokens, 1, wa);
  b.loop_forward(tokens, 1, wb);
  CHECK(rel_error(std::vector<double>(wa.readout.logits.begin(), wa.readout.logits.end()),
                  std::vector<double>(wb.readout.logits.begin(), wb.readout.logits.end())) < 1e-13);
}

TEST_CASE("llama model: a core norm is applied after every loop", "[llama][model]") {
  const ModelConfig cfg = llama_config(2, false, 1.0, false, 0, 1, 0, true, true);
  Model<double> m(cfg);
  randomize(m, 43);
  TokenBatch tokens{1, 5, {1, 2, 3, 4, 5}};
  LoopWork<double> w;
  m.loop_forward(tokens, 3, w);
  // by hand: h_{k+1} = h_k + f(h_k), and each state is RMS-normalised with field.norm.weight
  const size_t NC = static_cast<size_t>(5) * cfg.d_model;
  const double* g = m.params.data() + m.layout.at("field.norm.weight").offset;
  for (int k = 1; k <= 3; ++k)
    for (int t = 0; t < 5; ++t) {
      const double* x = w.h.data() + NC * k + static_cast<size_t>(t) * cfg.d_model;
      // x = g * y / rms(y): x / g has a mean square of 1 (up to eps)
      double ms = 0;
      for (int c = 0; c < cfg.d_model; ++c) ms += (x[c] / g[c]) * (x[c] / g[c]);
      CHECK(ms / cfg.d_model == Approx(1.0).epsilon(1e-5));
    }
  ModelConfig gpt = make_config(11, 6, 8, 2, 12, 1);
  gpt.core_norm = true;
  CHECK_THROWS_WITH(gpt.validate(), Catch::Contains("core norm need arch llama"));
}

TEST_CASE("llama model: config and checkpoint round trips, and the config's refusals", "[llama][checkpoint]") {
  const ModelConfig cfg = llama_config(2, true, 0.5, true, 1, 2, 1, false, true);
  CHECK(ModelConfig::from_json(cfg.to_json(), "here") == cfg);
  Model<float> m(cfg);
  m.init(5);
  TempDir dir("flowloop_llama");
  const std::string path = dir.file("m.safetensors");
  save_checkpoint(path, m.cfg, m.layout, m.params.data());
  Model<float> back = load_model<float>(path);
  CHECK(back.cfg == cfg);
  CHECK(std::vector<float>(back.params.begin(), back.params.end()) == std::vector<float>(m.params.begin(), m.params.end()));
  // init: norms 1, biases 0, lm_head drawn
  CHECK(m.params[m.layout.at("ln_f.weight").offset] == 1.0f);
  CHECK(m.params[m.layout.at("prelude.h.0.attn_norm.weight").offset] == 1.0f);
  CHECK(m.params[m.layout.at("field.h.1.attn.q_proj.bias").offset] == 0.0f);
  CHECK(m.params[m.layout.at("lm_head.weight").offset] != 0.0f);
  CHECK(m.layout.find("wpe.weight") == nullptr);
  CHECK(m.layout.find("ln_f.bias") == nullptr);

  ModelConfig bad = cfg;
  bad.n_kv_head = 3;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("n_kv_head (3) must divide n_head (4)"));
  bad = cfg;
  bad.arch = "mamba";
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("unknown arch 'mamba'"));
  bad = cfg;
  bad.rope_fraction = 0.0;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("rope_fraction must be in (0, 1]"));
  ModelConfig gpt = make_config(11, 6, 8, 2, 12, 1);
  gpt.n_kv_head = 1;
  CHECK_THROWS_WITH(gpt.validate(), Catch::Contains("need arch llama"));
}

TEST_CASE("Hugging Face loading and export: bad --core-layers and what transformers cannot express are refused by name",
          "[llama][hf][errors]") {
  const std::string cfg = R"({"model_type": "llama", "vocab_size": 50, "hidden_size": 8, "intermediate_size": 12,
                              "num_hidden_layers": 4, "num_attention_heads": 2})";
  const ModelConfig all = hf_config(cfg, "c");
  CHECK(all.n_block == 4);
  CHECK(all.depth == 1);
  const ModelConfig split = hf_config(cfg, "c", LoadOptions{"1:3"});
  CHECK((split.n_prelude == 1 && split.n_block == 2 && split.n_coda == 1));
  CHECK(hf_tensor_name(split, "prelude.h.0.attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight");
  CHECK(hf_tensor_name(split, "field.h.1.mlp_norm.weight") == "model.layers.2.post_attention_layernorm.weight");
  CHECK(hf_tensor_name(split, "coda.h.0.mlp.down_proj.weight") == "model.layers.3.mlp.down_proj.weight");
  for (const char* bad : {"3:2", "0:5", "2", "a:b", "1:2x", "-1:2"}) {
    INFO(bad);
    CHECK_THROWS_WITH(hf_config(cfg, "c", LoadOptions{bad}),
                      Catch::Contains("--core-layers '" + std::string(bad) + "'") &&
                          Catch::Contains("num_hidden_layers"));
  }
  TempDir dir("flowloop_hf_errors");
  Model<float> gpt(make_config(11, 6, 8, 2, 12, 1));
  const std::string ckpt = dir.file("g.safetensors");
  save_checkpoint(ckpt, gpt.cfg, gpt.layout, gpt.params.data());
  CHECK_THROWS_WITH(load_any<float>(ckpt, LoadOptions{"0:1"}), Catch::Contains("applies to a Hugging Face directory"));
  CHECK_THROWS_WITH(export_hf(gpt, dir.file("out")), Catch::Contains("its block is gpt2's"));
  ModelConfig c = llama_config(2, false, 1.0, true);
  CHECK_THROWS_WITH(export_hf(Model<float>(c), dir.file("out")), Catch::Contains("interleaved"));
  c = llama_config(2, false, 1.0, false);
  c.o_bias = true;
  CHECK_THROWS_WITH(export_hf(Model<float>(c), dir.file("out")), Catch::Contains("o_proj bias without q/k/v biases"));
  c = llama_config(2, false, 1.0, false, 0, 1, 0, true, true);
  CHECK_THROWS_WITH(export_hf(Model<float>(c), dir.file("out")), Catch::Contains("core_norm"));
  CHECK_FALSE(std::filesystem::exists(dir.file("out") + "/model.safetensors"));
}
