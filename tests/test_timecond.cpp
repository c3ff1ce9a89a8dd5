// The time-conditioned field (adaLN from a sinusoidal time embedding): its vjp
// against finite differences (h, t, every parameter tensor), zero modulation
// against the autonomous model bit for bit, per-sequence times through every
// solver path and gradient method, loop K == Euler K steps, checkpoints, bench
// and training config.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unistd.h>

#include "check.hpp"
#include "grad_check.hpp"
#include "train_check.hpp"
#include "flowloop/study/bench.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/flowloop.hpp"
#include "flowloop/ode/grad.hpp"
#include "flowloop/train/train.hpp"

using namespace flowloop;
using namespace flowloop::test;
namespace fs = std::filesystem;

namespace {

// A small time-conditioned config: V 11, Tmax 6, C 8, NH 2, F 12, E 8.
// time_scale 0 means the default 1000 / depth.
ModelConfig tc_config(int L, double time_scale, int depth = 3) {
  ModelConfig c;
  c.vocab_size = 11;
  c.context = 6;
  c.d_model = 8;
  c.n_head = 2;
  c.d_ff = 12;
  c.n_block = L;
  c.depth = depth;
  c.time_cond = true;
  c.time_freq = 8;
  c.time_scale = time_scale;
  c.finalize();
  return c;
}

// Every parameter at O(1) scale (LayerNorm weights around 1), ada and time_embed included.
template <class S>
void randomize(Model<S>& m, uint64_t seed, double scale = 0.3) {
  Rng rng(seed);
  for (const auto& t : m.layout.tensors()) {
    const bool ln_w = t.name.find("ln_") != std::string::npos && t.name.find(".weight") != std::string::npos;
    for (size_t i = 0; i < t.numel; ++i)
      m.params[t.offset + i] = static_cast<S>((ln_w ? 1.0 : 0.0) + scale * rng.normal());
  }
}

template <class S>
void randomize_ada(Model<S>& m, uint64_t seed, double scale) {
  Rng rng(seed);
  for (const auto& t : m.layout.tensors())
    if (t.name.find(".ada.") != std::string::npos)
      for (size_t i = 0; i < t.numel; ++i) m.params[t.offset + i] = static_cast<S>(scale * rng.normal());
}

bool is_time_tensor(const std::string& name) {
  return name.find(".ada.") != std::string::npos || name.rfind("time_embed.", 0) == 0;
}

std::vector<double> slice(const std::vector<double>& v, size_t off, size_t n) {
  return {v.begin() + static_cast<long>(off), v.begin() + static_cast<long>(off + n)};
}

double norm(const std::vector<double>& v) { return std::sqrt(dot(v, v)); }

template <class S>
bool same_bits(const Buffer<S>& a, const Buffer<S>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0;
}

// Copies every tensor of `from` that `to` has under the same name and shape.
template <class S>
void copy_by_name(Model<S>& to, const Model<S>& from) {
  for (const auto& t : from.layout.tensors()) {
    const TensorInfo& d = to.layout.at(t.name);
    REQUIRE(d.shape == t.shape);
    std::copy(from.params.begin() + static_cast<long>(t.offset),
              from.params.begin() + static_cast<long>(t.offset + t.numel), to.params.begin() + static_cast<long>(d.offset));
  }
}

}  // namespace

TEST_CASE("silu, modulation and gate: forward by definition, vjp by finite differences", "[timecond][layers][fd]") {
  Rng rng(1);
  // silu
  auto z = randn(300, rng, 3.0), gz = randn(300, rng);
  std::vector<double> sz(z.size());
  auto silu_loss = [&] {
    silu_forward(sz.data(), z.data(), static_cast<int64_t>(z.size()));
    return dot(sz, gz);
  };
  silu_loss();
  for (size_t i = 0; i < z.size(); ++i) CHECK(sz[i] == Approx(z[i] / (1.0 + std::exp(-z[i]))).epsilon(1e-14));
  std::vector<double> dz(z.size(), 0.0);
  silu_backward(dz.data(), gz.data(), z.data(), static_cast<int64_t>(z.size()));
  CHECK(rel_error(dz, fd_grad(silu_loss, z.data(), z.size())) < 1e-6);
  // modulate and gate, with C over one column job (64) and vectors strided in (B, ld) rows
  const int B = 2, T = 3, C = 70, ld = 3 * C;
  auto in = randn(B * T * C, rng), res = randn(in.size(), rng), g = randn(in.size(), rng);
  auto vec = randn(static_cast<size_t>(B) * ld, rng, 0.5);  // [shift, scale, gate] per sequence
  std::vector<double> out(in.size());
  auto mod_loss = [&] {
    modulate_forward(out.data(), in.data(), vec.data(), vec.data() + C, B, T, C, ld);
    return dot(out, g);
  };
  auto gate_loss = [&] {
    gate_forward(out.data(), res.data(), in.data(), vec.data() + 2 * C, B, T, C, ld);
    return dot(out, g);
  };
  mod_loss();
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < C; ++c) {
        const size_t k = (static_cast<size_t>(b) * T + t) * C + c, v = static_cast<size_t>(b) * ld + c;
        // within rounding of the terms' size (an FMA may round once where the sum rounds twice)
        const double a = in[k] * (1.0 + vec[v + C]), s = vec[v];
        CHECK(std::fabs(out[k] - (a + s)) <= 1e-14 * (std::fabs(a) + std::fabs(s)));
      }
  // din is written, not added to: what it held before does not show
  std::vector<double> din(in.size(), std::nan("")), dvec(vec.size(), 0.0);
  modulate_backward(din.data(), dvec.data(), dvec.data() + C, g.data(), in.data(), vec.data() + C, B, T, C, ld);
  CHECK(rel_error(din, fd_grad(mod_loss, in.data(), in.size())) < 1e-6);
  const auto fd_vec = fd_grad(mod_loss, vec.data(), vec.size());
  CHECK(rel_error(dvec, fd_vec) < 1e-6);  // the gate's third of each row stays 0
  gate_loss();
  for (size_t k = 0; k < in.size(); ++k) {
    const size_t v = (k / (static_cast<size_t>(T) * C)) * ld + k % C;
    const double a = (1.0 + vec[v + 2 * C]) * in[k];
    CHECK(std::fabs(out[k] - (res[k] + a)) <= 1e-14 * (std::fabs(res[k]) + std::fabs(a)));
  }
  std::fill(din.begin(), din.end(), 1e300);
  std::fill(dvec.begin(), dvec.end(), 0.0);
  gate_backward(din.data(), dvec.data() + 2 * C, g.data(), in.data(), vec.data() + 2 * C, B, T, C, ld);
  CHECK(rel_error(din, fd_grad(gate_loss, in.data(), in.size())) < 1e-6);
  CHECK(rel_error(dvec, fd_grad(gate_loss, vec.data(), vec.size())) < 1e-6);
  // zero modulation is exact
  std::vector<double> zeros(static_cast<size_t>(B) * ld, 0.0), o2(in.size());
  modulate_forward(o2.data(), in.data(), zeros.data(), zeros.data() + C, B, T, C, ld);
  CHECK(o2 == in);
  gate_forward(o2.data(), res.data(), in.data(), zeros.data(), B, T, C, ld);
  for (size_t k = 0; k < in.size(); ++k) CHECK(o2[k] == res[k] + in[k]);
}

TEST_CASE("few-row Linear (time embedding, modulation): the product, whatever the thread count",
          "[timecond][layers]") {
  // 5 rows, 37 inputs, 720 outputs: over the parallel threshold (2^17 products), odd sizes
  const int N = 5, IN = 37, OUT = 720;
  Rng rng(17);
  std::vector<float> x(static_cast<size_t>(N) * IN), W(static_cast<size_t>(OUT) * IN), b(OUT);
  for (auto* v : {&x, &W, &b})
    for (auto& e : *v) e = static_cast<float>(rng.normal());
  std::vector<float> few(static_cast<size_t>(N) * OUT), gen(few.size());
  const int threads = num_threads();
  set_num_threads(1);
  linear_forward_few(few.data(), x.data(), W.data(), b.data(), N, IN, OUT);
  set_num_threads(3);
  std::vector<float> few3(few.size());
  linear_forward_few(few3.data(), x.data(), W.data(), b.data(), N, IN, OUT);
  set_num_threads(threads);
  CHECK(few3 == few);
  linear_forward(gen.data(), x.data(), W.data(), b.data(), N, IN, OUT);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < OUT; ++o) {
      double ref = b[static_cast<size_t>(o)], mag = std::fabs(ref);
      for (int i = 0; i < IN; ++i) {
        const double p = static_cast<double>(x[static_cast<size_t>(n) * IN + i]) * W[static_cast<size_t>(o) * IN + i];
        ref += p;
        mag += std::fabs(p);
      }
      const size_t k = static_cast<size_t>(n) * OUT + o;
      CHECK(std::fabs(few[k] - ref) <= 1e-6 * mag);
      CHECK(std::fabs(gen[k] - ref) <= 1e-6 * mag);
    }
  // no bias
  linear_forward_few<float>(few.data(), x.data(), W.data(), nullptr, N, IN, OUT);
  CHECK(std::fabs(few[0] - (few3[0] - b[0])) <= 1e-5 * (1 + std::fabs(few3[0])));
}

TEST_CASE("few-row Linear backward: linear_backward's sums, whatever the thread count", "[timecond][layers]") {
  // odd sizes; 70 rows cross the 64-row accumulator band, 37 inputs a partial column band
  for (const int N : {1, 5, 70}) {
    const int IN = 37, OUT = 720;
    Rng rng(static_cast<uint64_t>(N));
    std::vector<double> x(static_cast<size_t>(N) * IN), W(static_cast<size_t>(OUT) * IN),
        dout(static_cast<size_t>(N) * OUT), din0(x.size()), dW0(W.size()), db0(OUT);
    for (auto* v : {&x, &W, &dout, &din0, &dW0, &db0})
      for (auto& e : *v) e = rng.normal();
    auto din = din0, dW = dW0, db = db0;
    linear_backward(din.data(), dW.data(), db.data(), dout.data(), x.data(), W.data(), N, IN, OUT);
    const int threads = num_threads();
    std::vector<double> fdin[2], fdW[2], fdb[2];
    for (int k = 0; k < 2; ++k) {
      set_num_threads(k == 0 ? 1 : 3);
      fdin[k] = din0;
      fdW[k] = dW0;
      fdb[k] = db0;
      linear_backward_few(fdin[k].data(), fdW[k].data(), fdb[k].data(), dout.data(), x.data(), W.data(), N, IN, OUT);
    }
    set_num_threads(threads);
    CHECK(fdin[0] == fdin[1]);
    CHECK(fdW[0] == fdW[1]);
    CHECK(fdb[0] == fdb[1]);
    CHECK(rel_error(fdin[0], din) < 1e-13);
    CHECK(rel_error(fdW[0], dW) < 1e-13);
    CHECK(rel_error(fdb[0], db) < 1e-13);
    // null din and db leave them alone and give the same dW
    auto dW2 = dW0;
    linear_backward_few<double>(nullptr, dW2.data(), nullptr, dout.data(), x.data(), W.data(), N, IN, OUT);
    CHECK(dW2 == fdW[0]);
  }
}

TEST_CASE("time_cond config: defaults, validation, JSON", "[timecond][config]") {
  ModelConfig c = tc_config(1, 0.0, 4);
  CHECK(c.time_scale == 250.0);  // 1000 / depth
  CHECK(c.time_freq == 8);
  ModelConfig d = make_config(11, 6, 8, 2, 12, 1);
  CHECK_FALSE(d.time_cond);
  CHECK(d.time_freq == 256);

  const ModelConfig back = ModelConfig::from_json(c.to_json(), "test");
  CHECK(back == c);
  CHECK(back.time_cond);
  CHECK(back.time_scale == 250.0);
  ModelConfig other = c;
  other.time_scale = 2.0;
  CHECK_FALSE(other == c);
  // an autonomous config writes no time keys and reads back autonomous
  CHECK(d.to_json().find("time") == std::string::npos);
  CHECK_FALSE(ModelConfig::from_json(d.to_json(), "test").time_cond);
  CHECK(ModelConfig::from_json(d.to_json(), "test") == d);
  // time_cond without time_scale: the default
  nlohmann::json j = nlohmann::json::parse(c.to_json());
  j.erase("time_scale");
  CHECK(ModelConfig::from_json(j.dump(), "test").time_scale == 250.0);

  ModelConfig bad = c;
  bad.time_freq = 7;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("time_freq must be positive and even, got 7"));
  bad.time_freq = 0;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("time_freq"));
  bad = c;
  bad.time_scale = -1.0;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("time_scale must be finite and positive"));
  bad.time_scale = 0.0;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("finalize() fills 1000 / depth"));
  j = nlohmann::json::parse(c.to_json());
  j["time_cond"] = 1;
  CHECK_THROWS_WITH(ModelConfig::from_json(j.dump(), "cfg.json"), Catch::Contains("cfg.json: config \"time_cond\" is not a boolean"));
  j = nlohmann::json::parse(c.to_json());
  j["time_scale"] = -3;
  CHECK_THROWS_WITH(ModelConfig::from_json(j.dump(), "cfg.json"), Catch::Contains("\"time_scale\" must be finite and positive"));
  j = nlohmann::json::parse(c.to_json());
  j["time_freq"] = 9;
  CHECK_THROWS_WITH(ModelConfig::from_json(j.dump(), "cfg.json"), Catch::Contains("time_freq must be positive and even"));
}

TEST_CASE("time_cond layout: the spec's tensors inside the field's range, and init", "[timecond][config]") {
  for (int L : {1, 2}) {
    const ModelConfig c = tc_config(L, 0.0);
    const ModelConfig a = make_config(11, 6, 8, 2, 12, L);
    const ParamLayout lt(c), la(a);
    const int64_t C = 8, E = 8;
    std::vector<std::pair<std::string, std::vector<int64_t>>> expect = {
        {"time_embed.mlp.0.weight", {C, E}}, {"time_embed.mlp.0.bias", {C}},
        {"time_embed.mlp.2.weight", {C, C}}, {"time_embed.mlp.2.bias", {C}}};
    for (int i = 0; i < L; ++i) {
      expect.push_back({"field.h." + std::to_string(i) + ".ada.weight", {6 * C, C}});
      expect.push_back({"field.h." + std::to_string(i) + ".ada.bias", {6 * C}});
    }
    size_t extra = 0;
    for (const auto& [name, shape] : expect) {
      INFO(name);
      const TensorInfo* t = lt.find(name);
      REQUIRE(t);
      CHECK(t->shape == shape);
      CHECK(t->offset >= lt.field_begin());
      CHECK(t->offset + t->numel <= lt.field_end());
      CHECK(la.find(name) == nullptr);
      extra += t->numel;
    }
    CHECK(lt.size() == la.size() + extra);
    CHECK(lt.field_end() - lt.field_begin() == la.field_end() - la.field_begin() + extra);
    // FLOPs: + 2 B (E C + C C + L 6 C C)
    Model<float> mt(c), ma(a);
    CHECK(mt.field.flops(3, 5) - ma.field.flops(3, 5) == Approx(2.0 * 3 * static_cast<double>(E * C + C * C + L * 6 * C * C)));
    // init: ada zero, time_embed N(0, 0.02) (biases 0), every base tensor as without time conditioning
    mt.init(17);
    ma.init(17);
    for (const auto& t : lt.tensors()) {
      INFO(t.name);
      const float* p = mt.params.data() + t.offset;
      if (t.name.find(".ada.") != std::string::npos || t.name.find(".bias") != std::string::npos) {
        for (size_t i = 0; i < t.numel; ++i) CHECK(p[i] == 0.0f);
      } else if (t.name.rfind("time_embed.", 0) == 0) {
        double ss = 0;
        for (size_t i = 0; i < t.numel; ++i) ss += static_cast<double>(p[i]) * p[i];
        CHECK(std::sqrt(ss / static_cast<double>(t.numel)) == Approx(0.02).epsilon(0.35));
      } else {
        const TensorInfo& ta = la.at(t.name);
        CHECK(std::memcmp(p, ma.params.data() + ta.offset, t.numel * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("time-conditioned field vjp matches finite differences for h, t and every parameter", "[timecond][fd]") {
  for (int L : {1, 2})
    for (double scale : {3.0, 0.0}) {  // 0: the default 1000 / depth, fast phases
      const ModelConfig cfg = tc_config(L, scale);
      Model<double> m(cfg);
      randomize(m, 100 + L);
      const int B = 2, T = 5;
      Rng rng(20 + L);
      auto h = randn(static_cast<size_t>(B) * T * cfg.d_model, rng), g = randn(h.size(), rng);
      std::vector<double> t = {0.3, 1.7};  // each sequence its own time
      std::vector<double> f(h.size());
      FieldCache<double> cache;
      cache.resize(cfg, B, T);
      auto loss = [&] {
        m.field.forward(f.data(), h.data(), t.data(), m.field_params(), B, T, cache);
        return dot(f, g);
      };
      loss();
      std::vector<double> dh(h.size(), 0.0), dp(m.params.size(), 0.0), dt(B, 0.0);
      FieldGradWork<double> work;
      m.field.vjp(dh.data(), dp.data() + m.layout.field_begin(), g.data(), m.field_params(), cache, work, 0, dt.data());
      INFO("L = " << L << ", time_scale " << cfg.time_scale);
      CHECK(rel_error(dh, fd_grad(loss, h.data(), h.size())) < 1e-6);
      // d/dt per sequence; small steps: tau = t * time_scale turns fast
      const std::vector<double> fdt = fd_grad(loss, t.data(), t.size(), scale == 0.0 ? 1e-8 : 1e-6);
      INFO("dt " << dt[0] << ", " << dt[1] << " fd " << fdt[0] << ", " << fdt[1]);
      CHECK(rel_error(dt, fdt) < 1e-6);
      for (int b = 0; b < B; ++b) CHECK(std::fabs(dt[b] - fdt[b]) <= 1e-6 * std::max(1.0, std::fabs(fdt[b])));
      CHECK(std::fabs(dt[0]) > 1e-3);
      CHECK(std::fabs(dt[1]) > 1e-3);
      for (const auto& ti : m.layout.tensors()) {
        INFO(ti.name);
        const auto an = slice(dp, ti.offset, ti.numel);
        if (ti.offset < m.layout.field_begin() || ti.offset >= m.layout.field_end()) {
          for (double x : an) CHECK(x == 0.0);  // the field touches only its own range
          continue;
        }
        CHECK(norm(an) > 1e-6);  // every group matters
        CHECK(rel_error(an, fd_grad(loss, m.params.data() + ti.offset, ti.numel)) < 1e-6);
      }
    }
}

TEST_CASE("time-conditioned per-sequence parameter gradients and dt", "[timecond][field]") {
  const ModelConfig cfg = tc_config(2, 3.0);
  Model<double> m(cfg);
  randomize(m, 60);
  const int B = 3, T = 5;
  const size_t n = static_cast<size_t>(T) * cfg.d_model, P = m.field.num_params();
  Rng rng(61);
  auto h = randn(B * n, rng), g = randn(B * n, rng);
  const std::vector<double> t = {0.0, 0.8, 2.5};
  std::vector<double> f(h.size()), dh_sum(h.size(), 0.0), dh_per(h.size(), 0.0), dt_sum(B, 0.0), dt_per(B, 0.0);
  FieldCache<double> cache;
  cache.resize(cfg, B, T);
  FieldGradWork<double> work;
  m.field.forward(f.data(), h.data(), t.data(), m.field_params(), B, T, cache);
  std::vector<double> sum(P, 0.0), per(B * P, 0.0);
  m.field.vjp(dh_sum.data(), sum.data(), g.data(), m.field_params(), cache, work, 0, dt_sum.data());
  m.field.vjp(dh_per.data(), per.data(), g.data(), m.field_params(), cache, work, P, dt_per.data());
  CHECK(dh_per == dh_sum);
  CHECK(dt_per == dt_sum);
  std::vector<double> total(P, 0.0);
  for (int b = 0; b < B; ++b) {
    FieldCache<double> c1;
    c1.resize(cfg, 1, T);
    std::vector<double> f1(n), dh1(n, 0.0), p1(P, 0.0), dt1(1, 0.0);
    m.field.forward(f1.data(), h.data() + b * n, &t[b], m.field_params(), 1, T, c1);
    m.field.vjp(dh1.data(), p1.data(), g.data() + b * n, m.field_params(), c1, work, 0, dt1.data());
    CHECK(rel_error(f1, slice(f, b * n, n)) < 1e-13);
    CHECK(rel_error(p1, slice(per, b * P, P)) < 1e-12);
    CHECK(dt1[0] == Approx(dt_sum[b]).epsilon(1e-12));
    for (size_t i = 0; i < P; ++i) total[i] += per[b * P + i];
  }
  CHECK(rel_error(total, sum) < 1e-12);
  // dt ACCUMULATES
  std::vector<double> dt2 = {1.0, 2.0, 3.0}, dh2(h.size(), 0.0), p2(P, 0.0);
  m.field.vjp(dh2.data(), p2.data(), g.data(), m.field_params(), cache, work, 0, dt2.data());
  for (int b = 0; b < B; ++b) CHECK(dt2[b] == Approx(dt_sum[b] + b + 1.0).epsilon(1e-14));
  // a time-conditioned field needs t
  CHECK_THROWS_WITH(m.field.forward(f.data(), h.data(), nullptr, m.field_params(), B, T, cache),
                    Catch::Contains("needs the time of every sequence"));
  FieldCache<double> plain;
  plain.resize(make_config(11, 6, 8, 2, 12, 2), B, T);
  CHECK_THROWS_WITH(m.field.forward(f.data(), h.data(), t.data(), m.field_params(), B, T, plain),
                    Catch::Contains("cache sized for an autonomous field"));
}

TEST_CASE("zero modulation computes the autonomous model bit for bit", "[timecond][bits]") {
  const ModelConfig base = make_config(50, 16, 32, 4, 0, 2);
  ModelConfig tcc = base;
  tcc.time_cond = true;
  tcc.time_freq = 16;
  Model<float> a(base), b(tcc);
  a.init(7);
  b.init(7);  // time_embed random, ada zero, the base tensors as a's
  // nonzero biases and LayerNorm affines, so that every rounding of the block shows
  Rng rng(11);
  for (const auto& t : a.layout.tensors())
    if (t.name.find(".bias") != std::string::npos || t.name.find("ln_") != std::string::npos)
      for (size_t i = 0; i < t.numel; ++i) a.params[t.offset + i] += static_cast<float>(0.1 * rng.normal());
  copy_by_name(b, a);
  const TokenBatch tokens = make_batch(3, 16, base.vocab_size, 8);
  const TokenBatch targets = make_batch(3, 16, base.vocab_size, 9, true);
  SolveOptions dopri = adaptive_opts("dopri5", 4.0, 1e-4, 1e-4);
  for (int zero_embed : {0, 1}) {
    INFO((zero_embed ? "time_embed zero" : "time_embed as initialised"));
    if (zero_embed)
      for (const auto& t : b.layout.tensors())
        if (t.name.rfind("time_embed.", 0) == 0) std::fill_n(b.params.begin() + static_cast<long>(t.offset), t.numel, 0.0f);
    LoopWork<float> wa, wb;
    a.loop_forward(tokens, 4, wa);
    b.loop_forward(tokens, 4, wb);
    CHECK(same_bits(wa.readout.logits, wb.readout.logits));
    CHECK(same_bits(wa.h, wb.h));
    // a dopri5 solve, per-sequence adaptive steps
    Buffer<float> ha, hb;
    ReadoutCache<float> ra, rb;
    const SolveResult<float> sa = a.ode_forward(tokens, dopri, ha, ra);
    const SolveResult<float> sb = b.ode_forward(tokens, dopri, hb, rb);
    REQUIRE(sa.ok());
    REQUIRE(sb.ok());
    CHECK(sa.nfe == sb.nfe);
    CHECK(sa.nfe > 6);
    CHECK(same_bits(ra.logits, rb.logits));
    // and the gradient of every base tensor (at this size the time tensors shift the
    // base tensors by whole 64-byte lines, so even element-wise loops see the same alignment)
    Buffer<float> ga(a.params.size(), 0.0f), gb(b.params.size(), 0.0f);
    const float la = a.loop_loss_and_grad(tokens, targets, 3, ga.data(), wa);
    const float lb = b.loop_loss_and_grad(tokens, targets, 3, gb.data(), wb);
    CHECK(la == lb);
    for (const auto& t : a.layout.tensors()) {
      INFO(t.name);
      CHECK(std::memcmp(ga.data() + t.offset, gb.data() + b.layout.at(t.name).offset, t.numel * sizeof(float)) == 0);
    }
  }
  // nonzero modulation changes the result (the comparison above can fail)
  randomize_ada(b, 3, 0.05);
  LoopWork<float> wa, wb;
  a.loop_forward(tokens, 4, wa);
  b.loop_forward(tokens, 4, wb);
  CHECK_FALSE(same_bits(wa.readout.logits, wb.readout.logits));
}

TEST_CASE("every sequence is evaluated at its own time", "[timecond][per-sequence]") {
  const ModelConfig cfg = tc_config(2, 3.0);
  Model<double> m(cfg);
  randomize(m, 70);
  const int B = 2, T = 5;
  const size_t n = static_cast<size_t>(T) * cfg.d_model;
  Rng rng(71);
  auto h = randn(B * n, rng);
  FieldSystem<double> sys(m.field, m.field_params(), B, T);
  const double t[2] = {0.3, 1.7}, swapped[2] = {1.7, 0.3};
  const int ids[2] = {0, 1};
  std::vector<double> f(B * n), fs(B * n);
  sys.eval(f.data(), h.data(), t, ids, B);
  sys.eval(fs.data(), h.data(), swapped, ids, B);
  sys.reserve_slots(1);
  std::vector<double> fr(B * n);
  sys.eval_record(fr.data(), h.data(), t, ids, B, 0);
  CHECK(fr == f);
  for (int b = 0; b < B; ++b) {
    FieldSystem<double> one(m.field, m.field_params(), 1, T);
    std::vector<double> f1(n);
    const int id0 = 0;
    one.eval(f1.data(), h.data() + b * n, &t[b], &id0, 1);
    INFO("sequence " << b);
    CHECK(rel_error(f1, slice(f, b * n, n)) < 1e-13);
    CHECK(rel_error(f1, slice(fs, b * n, n)) > 1e-3);  // the time matters
  }
  // A per-sequence adaptive solve: the rows take different steps, so one call
  // evaluates them at different times; the batch equals each row solved alone.
  auto h0 = randn(B * n, rng);
  for (size_t i = n; i < 2 * n; ++i) h0[i] *= 3.0;
  for (const char* method : {"dopri5", "bosh3"}) {
    const SolveOptions o = adaptive_opts(method, 2.0, 1e-7, 1e-7);
    Buffer<double> hb(h0.begin(), h0.end());
    const SolveResult<double> r = integrate(sys, hb.data(), o);
    REQUIRE(r.ok());
    INFO(method << ": steps " << r.seq[0].steps << " and " << r.seq[1].steps);
    REQUIRE(r.seq[0].steps != r.seq[1].steps);
    for (int b = 0; b < B; ++b) {
      FieldSystem<double> one(m.field, m.field_params(), 1, T);
      Buffer<double> h1(h0.begin() + static_cast<long>(b * n), h0.begin() + static_cast<long>((b + 1) * n));
      const SolveResult<double> r1 = integrate(one, h1.data(), o);
      REQUIRE(r1.ok());
      CHECK(r1.seq[0].steps == r.seq[b].steps);
      CHECK(rel_error(std::vector<double>(h1.begin(), h1.end()),
                      std::vector<double>(hb.begin() + static_cast<long>(b * n), hb.begin() + static_cast<long>((b + 1) * n))) < 1e-12);
    }
  }
}

TEST_CASE("gradients through the solve of a time-conditioned model", "[timecond][grad]") {
  const ModelConfig cfg = tc_config(1, 3.0, 2);
  Model<double> m(cfg);
  randomize(m, 80);
  const int B = 2, T = 5;
  const size_t n = static_cast<size_t>(T) * cfg.d_model;
  Rng rng(81);
  auto h0 = randn(B * n, rng), w = randn(B * n, rng);
  for (size_t i = n; i < 2 * n; ++i) h0[i] *= 2.0;
  SECTION("backprop and checkpoint match finite differences") {
    for (const SolveOptions& o : {fixed_opts("rk4", 1.5, 3), frozen_adaptive("dopri5", 1.5), frozen_adaptive("bosh3", 1.5)})
      for (GradMethod method : {GradMethod::Backprop, GradMethod::Checkpoint}) {
        INFO(o.method << (o.adaptive ? " (adaptive)" : " (fixed)") << ", " << grad_method_name(method));
        const Grads g = ode_grad(m, h0, B, T, o, method, w);
        auto loss_h = [&] { return ode_loss(m, h0, B, T, o, w); };
        CHECK(rel_error(g.dh0, fd_grad(loss_h, h0.data(), h0.size())) < 1e-6);
        for (const auto& t : m.layout.tensors()) {
          if (t.offset < m.layout.field_begin() || t.offset >= m.layout.field_end()) continue;
          if (!is_time_tensor(t.name) && t.name.find("ln_1") == std::string::npos) continue;  // the base: test_grad
          INFO(t.name);
          const auto an = slice(g.dparams, t.offset - m.layout.field_begin(), t.numel);
          CHECK(norm(an) > 1e-6);
          CHECK(rel_error(an, fd_grad(loss_h, m.params.data() + t.offset, t.numel)) < 1e-6);
        }
      }
  }
  SECTION("backprop equals checkpoint to rounding on real adaptive solves") {
    for (const char* method : {"dopri5", "tsit5"})
      for (bool coupled : {false, true}) {
        SolveOptions o = adaptive_opts(method, 2.0, 1e-6, 1e-6);
        o.batch_coupled = coupled;
        const Grads a = ode_grad(m, h0, B, T, o, GradMethod::Backprop, w);
        const Grads c = ode_grad(m, h0, B, T, o, GradMethod::Checkpoint, w);
        INFO(method << (coupled ? " coupled" : " per-sequence") << ": nfe " << a.stats.nfe_forward);
        CHECK(a.stats.nfe_forward > 8);
        CHECK(rel_error(a.dh0, c.dh0) < 1e-12);
        CHECK(rel_error(a.dparams, c.dparams) < 1e-12);
      }
    // with the regularisers riding along. The Jacobian term's difference quotient
    // (f(y + d e) - f(y)) / d, d ~ 1.5e-8, magnifies the rounding of parameter sums
    // that the two methods batch differently (per forward call, per backward step).
    for (double jac : {0.0, 0.2}) {
      GradOptions reg;
      reg.kinetic = 0.3;
      reg.jacobian = jac;
      reg.noise_seed = 5;
      const SolveOptions o = adaptive_opts("dopri5", 2.0, 1e-6, 1e-6);
      const Grads a = ode_grad(m, h0, B, T, o, GradMethod::Backprop, w, reg);
      const Grads c = ode_grad(m, h0, B, T, o, GradMethod::Checkpoint, w, reg);
      INFO("jacobian " << jac << ": dh0 " << rel_error(a.dh0, c.dh0) << ", dparams " << rel_error(a.dparams, c.dparams));
      CHECK(a.stats.kinetic > 0);
      CHECK(rel_error(a.dh0, c.dh0) < 1e-12);
      CHECK(rel_error(a.dparams, c.dparams) < (jac == 0.0 ? 1e-12 : 1e-10));
    }
  }
  SECTION("the adjoint converges to the discrete gradient") {
    std::vector<double> errs;
    for (double tol : {1e-5, 1e-7, 1e-9})
      for (bool coupled : {false, true}) {
        SolveOptions o = adaptive_opts("dopri5", 2.0, tol, tol);
        o.batch_coupled = coupled;
        const Grads bp = ode_grad(m, h0, B, T, o, GradMethod::Backprop, w);
        const Grads adj = ode_grad(m, h0, B, T, o, GradMethod::Adjoint, w);
        std::vector<double> x = adj.dh0, y = bp.dh0;
        x.insert(x.end(), adj.dparams.begin(), adj.dparams.end());
        y.insert(y.end(), bp.dparams.begin(), bp.dparams.end());
        const double e = rel_error(x, y);
        INFO("tol " << tol << (coupled ? " coupled" : "") << ": adjoint vs backprop " << e);
        CHECK(adj.stats.vjp_calls > 0);
        if (!coupled) errs.push_back(e);
        if (tol == 1e-9) CHECK(e < 1e-6);
      }
    for (size_t i = 1; i < errs.size(); ++i) CHECK(errs[i] < errs[i - 1]);
  }
}

TEST_CASE("loop K is Euler with K steps for a time-conditioned model", "[timecond][loop]") {
  const int K = 3;
  SECTION("float logits, bit for bit") {
    ModelConfig cfg = make_config(50, 16, 32, 4, 0, 2, K);
    cfg.time_cond = true;
    cfg.time_freq = 16;
    cfg.time_scale = 0.0;
    cfg.finalize();
    Model<float> m(cfg);
    m.init(3);
    randomize_ada(m, 4, 0.05);
    const TokenBatch tokens = make_batch(3, 16, cfg.vocab_size, 5);
    LoopWork<float> w;
    m.loop_forward(tokens, K, w);
    Buffer<float> h;
    ReadoutCache<float> rc;
    REQUIRE(m.ode_forward(tokens, fixed_opts("euler", K, K), h, rc).ok());
    CHECK(same_bits(w.readout.logits, rc.logits));
    // the same steps shifted in time give another result: the times are read
    SolveOptions shifted = fixed_opts("euler", K + 1, K);
    shifted.t0 = 1.0;
    REQUIRE(m.ode_forward(tokens, shifted, h, rc).ok());
    CHECK_FALSE(same_bits(w.readout.logits, rc.logits));
  }
  SECTION("double: the loop's gradient is Euler backprop's and matches finite differences") {
    const ModelConfig cfg = tc_config(2, 3.0, K);
    Model<double> m(cfg);
    randomize(m, 90);
    const TokenBatch tokens = make_batch(2, 4, cfg.vocab_size, 91);
    const TokenBatch targets = make_batch(2, 4, cfg.vocab_size, 92, true);
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
    auto loss = [&] {
      std::vector<double> dummy(m.params.size(), 0.0);
      LoopWork<double> w2;
      return m.loop_loss_and_grad(tokens, targets, K, dummy.data(), w2);
    };
    for (const auto& t : m.layout.tensors()) {
      if (!is_time_tensor(t.name)) continue;
      INFO(t.name);
      const auto an = slice(g_loop, t.offset, t.numel);
      CHECK(norm(an) > 1e-8);
      CHECK(rel_error(an, fd_grad(loss, m.params.data() + t.offset, t.numel)) < 1e-6);
    }
  }
}

TEST_CASE("time-conditioned checkpoints round-trip, and missing or misshaped tensors are rejected", "[timecond][checkpoint]") {
  const fs::path dir = fs::temp_directory_path() / ("flowloop_tc_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const ModelConfig tcc = tc_config(2, 0.0, 4);
  Model<float> m(tcc);
  m.init(5);
  randomize_ada(m, 6, 0.1);
  const std::string good = (dir / "tc.safetensors").string();
  save_checkpoint(good, m.cfg, m.layout, m.params.data());
  const Model<float> back = load_model<float>(good);
  CHECK(back.cfg == m.cfg);
  CHECK(back.cfg.time_cond);
  CHECK(back.cfg.time_freq == 8);
  CHECK(back.cfg.time_scale == 250.0);
  CHECK(back.params == m.params);
  // a file whose config says time_cond but which lacks the tensors
  ModelConfig plain_cfg = tcc;
  plain_cfg.time_cond = false;
  const Model<float> plain(plain_cfg);
  const std::string missing = (dir / "missing.safetensors").string();
  save_checkpoint(missing, tcc, plain.layout, plain.params.data());
  CHECK_THROWS_WITH(load_model<float>(missing), Catch::Contains("checkpoint '" + missing + "'") &&
                                                    Catch::Contains("missing tensor 'field.h.0.ada.weight'"));
  // tensors written for time_freq 6 under a config that says 8
  ModelConfig e6 = tcc;
  e6.time_freq = 6;
  const Model<float> m6(e6);
  const std::string shaped = (dir / "shaped.safetensors").string();
  save_checkpoint(shaped, tcc, m6.layout, m6.params.data());
  CHECK_THROWS_WITH(load_model<float>(shaped), Catch::Contains("checkpoint '" + shaped + "'") &&
                                                   Catch::Contains("tensor 'time_embed.mlp.0.weight' has shape [8, 6] but the config implies [8, 8]"));
  // only one block's ada weight misshaped (written by hand)
  std::vector<TensorOut<float>> ts;
  std::vector<float> junk(6 * 8 * 9, 0.0f);
  for (const auto& t : m.layout.tensors()) {
    if (t.name == "field.h.1.ada.weight")
      ts.push_back({t.name, {48, 9}, junk.data()});
    else
      ts.push_back({t.name, t.shape, m.params.data() + t.offset});
  }
  const std::string ada_bad = (dir / "ada.safetensors").string();
  write_safetensors(ada_bad, ts, {{"format", "flowloop"}, {"config", tcc.to_json()}});
  CHECK_THROWS_WITH(load_model<float>(ada_bad), Catch::Contains("tensor 'field.h.1.ada.weight' has shape [48, 9] but the config implies [48, 8]"));
  // an autonomous file still loads as the autonomous model
  const std::string old = (dir / "old.safetensors").string();
  save_checkpoint(old, plain_cfg, plain.layout, plain.params.data());
  CHECK_FALSE(load_model<float>(old).cfg.time_cond);
  fs::remove_all(dir);
}

TEST_CASE("bench field times the time-conditioned field beside the autonomous one", "[timecond][bench]") {
  BenchOptions o;
  o.size = "S";
  o.min_reps = 2;
  o.min_seconds = 0.0;
  const auto plain = nlohmann::json::parse(bench_field(o));
  CHECK_FALSE(plain.contains("time_cond"));
  o.time_cond = true;
  const auto j = nlohmann::json::parse(bench_field(o));
  REQUIRE(j.contains("time_cond"));
  const auto& tc = j["time_cond"];
  CHECK(tc["ms_per_eval"].get<double>() > 0);
  CHECK(tc["vjp_ms"].get<double>() > 0);
  CHECK(tc["gflops"].get<double>() > 0);
  CHECK(tc["time_freq"] == 256);
  CHECK(tc["ms_ratio"].get<double>() == Approx(tc["ms_per_eval"].get<double>() / j["ms_per_eval"].get<double>()));
  CHECK(tc["vjp_ms_ratio"].get<double>() == Approx(tc["vjp_ms"].get<double>() / j["vjp_ms"].get<double>()));
}

TEST_CASE("the training config carries the time conditioning into the model", "[timecond][train]") {
  const fs::path dir = fs::temp_directory_path() / ("flowloop_tc_train_" + std::to_string(::getpid()));
  TrainConfig c = tiny_config(dir.string());
  c.steps = 4;
  c.batch = 4;
  c.warmup = 1;
  c.eval_every = 4;
  c.eval_batches = 1;
  c.checkpoint_every = 4;
  c.time_cond = true;
  c.time_freq = 16;
  const TrainConfig back = TrainConfig::from_json(c.to_json(), "test");
  CHECK(back.time_cond);
  CHECK(back.time_freq == 16);
  CHECK(back.time_scale == 0.0);
  CHECK_THROWS_WITH(TrainConfig::from_json(R"({"time_cond": "yes"})", "t.json"), Catch::Contains("\"time_cond\" has the wrong type"));
  TrainConfig bad = c;
  bad.time_freq = 5;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("time_freq must be positive and even"));
  {
    Trainer tr(c);
    const Model<float>& m = tr.model();
    CHECK(m.cfg.time_cond);
    CHECK(m.cfg.time_freq == 16);
    CHECK(m.cfg.time_scale == 500.0);  // 1000 / depth (the loop count, 2)
    REQUIRE(m.layout.find("field.h.0.ada.weight") != nullptr);
    std::ostringstream quiet;
    tr.run(false, quiet);
    // the modulation starts at zero and training moves it
    const TensorInfo& ada = m.layout.at("field.h.0.ada.weight");
    double ss = 0;
    for (size_t i = 0; i < ada.numel; ++i) ss += static_cast<double>(m.params[ada.offset + i]) * m.params[ada.offset + i];
    CHECK(ss > 0);
    const Model<float> saved = load_model<float>((dir / "model.safetensors").string());
    CHECK(saved.cfg == m.cfg);
    CHECK(saved.params == m.params);
  }
  fs::remove_all(dir);
}

// ---- step-size conditioning (shortcut models): c_b = TE(t_b) + SE(d_b) -------------

namespace {
ModelConfig sc_config(int L) {
  ModelConfig c = tc_config(L, 3.0);
  c.step_cond = true;
  c.finalize();
  return c;
}
}  // namespace

TEST_CASE("step_cond config and layout: step_embed beside time_embed, inside the field", "[timecond][step][config]") {
  ModelConfig bad = tc_config(1, 3.0);
  bad.time_cond = false;
  bad.step_cond = true;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("step_cond (step-size conditioning) needs time_cond"));
  const ModelConfig c = sc_config(2), t = tc_config(2, 3.0);
  const ModelConfig back = ModelConfig::from_json(c.to_json(), "test");
  CHECK(back.step_cond);
  CHECK(back == c);
  CHECK_FALSE(c == t);
  CHECK_FALSE(ModelConfig::from_json(t.to_json(), "test").step_cond);
  CHECK_THROWS_WITH(ModelConfig::from_json(R"({"vocab_size":11,"context":6,"d_model":8,"n_head":2,"d_ff":12,"n_block":1,"step_cond":true})", "cfg"),
                    Catch::Contains("needs time_cond"));
  CHECK_THROWS_WITH(ModelConfig::from_json(R"({"vocab_size":11,"context":6,"d_model":8,"n_head":2,"d_ff":12,"n_block":1,"time_cond":true,"step_cond":1})", "cfg"),
                    Catch::Contains("\"step_cond\" is not a boolean"));
  const ParamLayout ls(c), lt(t);
  const int64_t C = 8, E = 8;
  size_t extra = 0;
  for (const auto& [name, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
           {"step_embed.mlp.0.weight", {C, E}}, {"step_embed.mlp.0.bias", {C}},
           {"step_embed.mlp.2.weight", {C, C}}, {"step_embed.mlp.2.bias", {C}}}) {
    INFO(name);
    const TensorInfo* ti = ls.find(name);
    REQUIRE(ti);
    CHECK(ti->shape == shape);
    CHECK(ti->offset >= ls.field_begin());
    CHECK(ti->offset + ti->numel <= ls.field_end());
    CHECK(lt.find(name) == nullptr);
    extra += ti->numel;
  }
  CHECK(ls.size() == lt.size() + extra);
  Model<float> ms(c), mt(t);
  CHECK(ms.field.flops(3, 5) - mt.field.flops(3, 5) == Approx(2.0 * 3 * static_cast<double>(E * C + C * C)));
  // init: every tensor the time-conditioned model has is drawn as there; step_embed's
  // weights N(0, 0.02) from a stream of their own, its biases 0
  ms.init(9);
  mt.init(9);
  for (const auto& ti : ls.tensors()) {
    INFO(ti.name);
    const float* p = ms.params.data() + ti.offset;
    if (ti.name.rfind("step_embed.", 0) == 0) {
      double ss = 0;
      for (size_t i = 0; i < ti.numel; ++i) ss += static_cast<double>(p[i]) * p[i];
      if (ti.name.find(".bias") != std::string::npos)
        CHECK(ss == 0.0);
      else
        CHECK(std::sqrt(ss / static_cast<double>(ti.numel)) == Approx(0.02).epsilon(0.35));
    } else {
      CHECK(std::memcmp(p, mt.params.data() + lt.at(ti.name).offset, ti.numel * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("step-conditioned field vjp matches finite differences for h, t and every parameter", "[timecond][step][fd]") {
  for (int L : {1, 2}) {
    const ModelConfig cfg = sc_config(L);
    Model<double> m(cfg);
    randomize(m, 300 + L);
    const int B = 3, T = 4;
    Rng rng(40 + L);
    auto h = randn(static_cast<size_t>(B) * T * cfg.d_model, rng), g = randn(h.size(), rng);
    std::vector<double> t = {0.25, 0.5, 0.0}, d = {0.25, 0.125, 1.0};  // each sequence its own time and step
    std::vector<double> f(h.size());
    FieldCache<double> cache;
    cache.resize(cfg, B, T);
    auto loss = [&] {
      m.field.forward(f.data(), h.data(), t.data(), m.field_params(), B, T, cache, d.data());
      return dot(f, g);
    };
    loss();
    std::vector<double> dh(h.size(), 0.0), dp(m.params.size(), 0.0), dt(B, 0.0);
    FieldGradWork<double> work;
    m.field.vjp(dh.data(), dp.data() + m.layout.field_begin(), g.data(), m.field_params(), cache, work, 0, dt.data());
    INFO("L = " << L);
    CHECK(rel_error(dh, fd_grad(loss, h.data(), h.size())) < 1e-6);
    CHECK(rel_error(dt, fd_grad(loss, t.data(), t.size(), 1e-6)) < 1e-6);
    for (const auto& ti : m.layout.tensors()) {
      if (ti.offset < m.layout.field_begin() || ti.offset >= m.layout.field_end()) continue;
      INFO(ti.name);
      const auto an = slice(dp, ti.offset, ti.numel);
      CHECK(norm(an) > 1e-6);
      CHECK(rel_error(an, fd_grad(loss, m.params.data() + ti.offset, ti.numel)) < 1e-6);
    }
    // the step matters, and each sequence reads its own
    const std::vector<double> f0 = (loss(), f);
    d[1] = 0.5;
    loss();
    const size_t n = static_cast<size_t>(T) * cfg.d_model;
    CHECK(rel_error(slice(f, n, n), slice(f0, n, n)) > 1e-6);
    CHECK(slice(f, 0, n) == slice(f0, 0, n));
    CHECK(slice(f, 2 * n, n) == slice(f0, 2 * n, n));
    // per-sequence parameter gradients add up to the batch's
    const size_t P = m.field.num_params();
    std::vector<double> sum(P, 0.0), per(B * P, 0.0), dh2(h.size(), 0.0);
    m.field.vjp(dh2.data(), sum.data(), g.data(), m.field_params(), cache, work);
    m.field.vjp(dh2.data(), per.data(), g.data(), m.field_params(), cache, work, P);
    std::vector<double> total(P, 0.0);
    for (int b = 0; b < B; ++b)
      for (size_t i = 0; i < P; ++i) total[i] += per[b * P + i];
    CHECK(rel_error(total, sum) < 1e-12);
  }
}

TEST_CASE("zero step_embed computes the time-conditioned field bit for bit, whatever the step", "[timecond][step][bits]") {
  const ModelConfig sc = sc_config(2), tc = tc_config(2, 3.0);
  Model<float> ms(sc), mt(tc);
  mt.init(4);
  randomize_ada(mt, 5, 0.1);
  for (const auto& ti : mt.layout.tensors())
    std::copy_n(mt.params.data() + ti.offset, ti.numel, ms.params.data() + ms.layout.at(ti.name).offset);
  const int B = 2, T = 5;
  Rng rng(3);
  Buffer<float> h(static_cast<size_t>(B) * T * 8), fs_(h.size()), ft(h.size());
  for (auto& x : h) x = static_cast<float>(rng.normal());
  const std::vector<double> t = {0.3, 2.0}, d = {0.5, 0.0625};
  FieldCache<float> cs, ct;
  cs.resize(sc, B, T);
  ct.resize(tc, B, T);
  mt.field.forward(ft.data(), h.data(), t.data(), mt.field_params(), B, T, ct);
  ms.field.forward(fs_.data(), h.data(), t.data(), ms.field_params(), B, T, cs, d.data());
  CHECK(same_bits(fs_, ft));
  // nonzero step embedding: the step changes the field; a null d is d = 0
  ms.init(4);
  for (const auto& ti : mt.layout.tensors())
    std::copy_n(mt.params.data() + ti.offset, ti.numel, ms.params.data() + ms.layout.at(ti.name).offset);
  for (const auto& ti : ms.layout.tensors())
    if (ti.name.rfind("step_embed.", 0) == 0)
      for (size_t i = 0; i < ti.numel; ++i) ms.params[ti.offset + i] = static_cast<float>(0.5 * rng.normal());
  ms.field.forward(fs_.data(), h.data(), t.data(), ms.field_params(), B, T, cs, d.data());
  CHECK_FALSE(same_bits(fs_, ft));
  const std::vector<double> zeros(B, 0.0);
  Buffer<float> f0(h.size()), fnull(h.size());
  ms.field.forward(f0.data(), h.data(), t.data(), ms.field_params(), B, T, cs, zeros.data());
  ms.field.forward(fnull.data(), h.data(), t.data(), ms.field_params(), B, T, cs);
  CHECK(same_bits(f0, fnull));
  // a FieldSystem told a step evaluates at it
  FieldSystem<float> sys(ms.field, ms.field_params(), B, T);
  sys.set_step(0.5);
  const std::vector<double> half(B, 0.5);
  Buffer<float> fsys(h.size());
  sys.eval(fsys.data(), h.data(), t.data(), nullptr, B);
  ms.field.forward(f0.data(), h.data(), t.data(), ms.field_params(), B, T, cs, half.data());
  CHECK(same_bits(fsys, f0));
  // errors: a step for a field without step conditioning, a cache of the other kind
  CHECK_THROWS_WITH(mt.field.forward(ft.data(), h.data(), t.data(), mt.field_params(), B, T, ct, d.data()),
                    Catch::Contains("not step-conditioned"));
  CHECK_THROWS_WITH(ms.field.forward(fs_.data(), h.data(), t.data(), ms.field_params(), B, T, ct, d.data()),
                    Catch::Contains("cache sized for a field without step conditioning"));
  FieldSystem<float> plain(mt.field, mt.field_params(), B, T);
  CHECK_THROWS_WITH(plain.set_step(0.5), Catch::Contains("not step-conditioned"));
  CHECK_THROWS_WITH(sys.set_step(-1.0), Catch::Contains("0 or more"));
}

TEST_CASE("step-conditioned checkpoints round-trip; a missing step_embed tensor is named", "[timecond][step][checkpoint]") {
  const fs::path dir = fs::temp_directory_path() / ("flowloop_sc_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const ModelConfig sc = sc_config(1);
  Model<float> m(sc);
  m.init(8);
  const std::string good = (dir / "sc.safetensors").string();
  save_checkpoint(good, m.cfg, m.layout, m.params.data());
  const Model<float> back = load_model<float>(good);
  CHECK(back.cfg.step_cond);
  CHECK(back.params == m.params);
  const Model<float> tc(tc_config(1, 3.0));
  const std::string missing = (dir / "missing.safetensors").string();
  save_checkpoint(missing, sc, tc.layout, tc.params.data());
  CHECK_THROWS_WITH(load_model<float>(missing), Catch::Contains("missing tensor 'step_embed.mlp.0.weight'"));
  fs::remove_all(dir);
}

TEST_CASE("the float field's sinusoids agree with the double field's to float rounding", "[timecond][embed]") {
  ModelConfig c = tc_config(1, 0.0, 8);  // time_scale 125: phases up to 1000 radians
  c.time_freq = 64;
  c.finalize();
  Model<float> mf(c);
  Model<double> md(c);
  mf.init(3);
  for (size_t i = 0; i < mf.params.size(); ++i) md.params[i] = mf.params[i];
  const int B = 4, T = 2;
  const std::vector<double> t = {0.0, 0.3, 4.1, 7.99};
  FieldCache<float> cf;
  FieldCache<double> cd;
  cf.resize(c, B, T);
  cd.resize(c, B, T);
  Buffer<float> hf(static_cast<size_t>(B) * T * c.d_model, 0.5f), ff(hf.size());
  Buffer<double> hd(hf.size(), 0.5), fd(hf.size());
  mf.field.forward(ff.data(), hf.data(), t.data(), mf.field_params(), B, T, cf);
  md.field.forward(fd.data(), hd.data(), t.data(), md.field_params(), B, T, cd);
  double worst = 0;
  for (size_t i = 0; i < cd.e_host.size(); ++i) worst = std::max(worst, std::fabs(cf.e_host[i] - cd.e_host[i]));
  CHECK(worst <= 3e-7);  // 2.5 float ulps at 1
  CHECK(cf.e_host[0] == 1.0f);  // t = 0: cos 0
}
