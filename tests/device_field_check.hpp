// The Field on a backend's ops against the Field on the cpu backend (the fused layers),
// shared by the reference
// backend's tests ([device]) and the CUDA backend's ([cuda]): the forward, the vjp's
// dh, parameter gradients (summed, and per sequence with a stride) and dt, on a cache
// sized for more sequences than the call uses, accumulating into non-zero gradients.
#pragma once

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "check.hpp"
#include "flowloop/backend/backend.hpp"
#include "flowloop/nn/field.hpp"
#include "flowloop/ode/grad.hpp"
#include "flowloop/nn/model.hpp"

namespace flowloop::test {

// The kinds of field: autonomous (L 2), time-conditioned (L 2), step-conditioned (L 1), and
// a llama block (L 2: grouped-query 3:1, heads of 4, every bias, half rotary).
inline ModelConfig device_check_config(const std::string& kind) {
  ModelConfig c;
  if (kind == "llama") {
    c.arch = "llama";
    c.n_kv_head = 1;
    c.d_head = 4;
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
    c.rope_theta = 50.0;
    c.rope_fraction = 0.5;
    c.tie_head = false;
  }
  c.vocab_size = 13;
  c.context = 7;
  c.d_model = 12;
  c.n_head = 3;
  c.d_ff = 20;
  c.n_block = kind == "step" ? 1 : 2;
  c.depth = 3;
  if (kind != "autonomous" && kind != "llama") {
    c.time_cond = true;
    c.time_freq = 10;
    c.time_scale = 50.0;
    c.step_cond = kind == "step";
  }
  c.finalize();
  return c;
}

template <class S>
std::vector<S> device_download(Backend<S>& be, const Array<S>& a) {
  std::vector<S> h(a.size());
  be.download(h.data(), a.data(), h.size());
  return h;
}

template <class S>
Array<S> device_upload(Backend<S>& be, const std::vector<S>& h) {
  Array<S> a(be, h.size());
  a.upload(h.data(), h.size());
  return a;
}

// Checks Field<S> on `be` against Field<S> for one configuration kind; tol is the
// norm-wise relative tolerance of every output.
template <class S>
void check_device_field(Backend<S>& be, const std::string& kind, double tol) {
  const ModelConfig cfg = device_check_config(kind);
  Model<S> m(cfg);
  Rng rng(17);
  for (const auto& t : m.layout.tensors()) {  // O(1) weights, LayerNorm weights around 1
    const bool ln_w = t.name.find("ln_") != std::string::npos && t.name.find(".weight") != std::string::npos;
    for (size_t i = 0; i < t.numel; ++i) m.params[t.offset + i] = static_cast<S>((ln_w ? 1.0 : 0.0) + 0.3 * rng.normal());
  }
  const int cap = 4, B = 3, T = 6;
  const size_t NC = static_cast<size_t>(B) * T * cfg.d_model, P = m.field.num_params();
  const std::vector<S> params(m.field_params(), m.field_params() + P);
  const auto h = random_values<S>(NC, rng), gf = random_values<S>(NC, rng), dh0 = random_values<S>(NC, rng);
  const auto dp0 = random_values<S>(P, rng), dps0 = random_values<S>(P * B, rng);
  std::vector<double> t(B), d(B), dt0(B);
  for (int b = 0; b < B; ++b) t[b] = 0.2 + 0.3 * b, d[b] = 0.125 * (b + 1), dt0[b] = 0.5 * b;
  const double* tp = cfg.time_cond ? t.data() : nullptr;
  const double* dp = cfg.step_cond ? d.data() : nullptr;

  // the CPU path
  FieldCache<S> cc;
  cc.resize(cfg, cap, T);
  FieldGradWork<S> cw;
  std::vector<S> f(NC), dh = dh0, dpar = dp0, dpar_s = dps0;
  std::vector<double> dt = dt0, dt_s = dt0;
  m.field.forward(f.data(), h.data(), tp, params.data(), B, T, cc, dp);
  m.field.vjp(dh.data(), dpar.data(), gf.data(), params.data(), cc, cw, 0, cfg.time_cond ? dt.data() : nullptr);
  std::vector<S> dh_s = dh0;
  m.field.vjp(dh_s.data(), dpar_s.data(), gf.data(), params.data(), cc, cw, P, cfg.time_cond ? dt_s.data() : nullptr);

  // the backend
  Field<S> df(be, cfg, m.layout);
  REQUIRE(df.num_params() == P);
  FieldCache<S> dc;
  dc.resize(be, cfg, cap, T);
  FieldGradWork<S> dw;
  auto dparams = device_upload(be, params), dhh = device_upload(be, h), dgf = device_upload(be, gf);
  auto ddh = device_upload(be, dh0), ddp = device_upload(be, dp0), ddps = device_upload(be, dps0),
       ddhs = device_upload(be, dh0);
  Array<S> df_out(be, NC);
  std::vector<double> ddt = dt0, ddt_s = dt0;
  df.forward(df_out.data(), dhh.data(), tp, dparams.data(), B, T, dc, dp);
  df.vjp(ddh.data(), ddp.data(), dgf.data(), dparams.data(), dc, dw, 0, cfg.time_cond ? ddt.data() : nullptr);
  df.vjp(ddhs.data(), ddps.data(), dgf.data(), dparams.data(), dc, dw, P, cfg.time_cond ? ddt_s.data() : nullptr);
  be.synchronize();

  INFO(kind << " on " << be.name());
  CHECK(rel_error_of(device_download(be, df_out), f) < tol);
  CHECK(rel_error_of(device_download(be, ddh), dh) < tol);
  CHECK(rel_error_of(device_download(be, ddp), dpar) < tol);
  CHECK(rel_error_of(device_download(be, ddhs), dh_s) < tol);
  CHECK(rel_error_of(device_download(be, ddps), dpar_s) < tol);
  // the gradient's own part (without the accumulated start) is checked too: dh - dh0
  auto own = [](std::vector<S> a, const std::vector<S>& a0) {
    for (size_t i = 0; i < a.size(); ++i) a[i] -= a0[i];
    return a;
  };
  CHECK(rel_error_of(own(device_download(be, ddp), dp0), own(dpar, dp0)) < 10 * tol);
  if (cfg.time_cond) {
    CHECK(rel_error(ddt, dt) < tol);
    CHECK(rel_error(ddt_s, dt_s) < tol);
    CHECK(rel_error(ddt, dt0) > 1e-3);  // dt was reached
  }
}

// Solves and gradients of a model whose field runs on `be` against the same model on
// the CPU: a per-sequence adaptive dopri5 solve (double: the same step counts for every
// sequence), and the loss and gradient by backprop and by the adjoint; loop 4's loss,
// logits and gradient.
// Fixed tokens and targets (B, T) for the model checks.
inline void check_tokens(const ModelConfig& cfg, int B, int T, TokenBatch& tok, TokenBatch& tgt) {
  tok.B = tgt.B = B;
  tok.T = tgt.T = T;
  tok.data.clear();
  tgt.data.clear();
  for (int i = 0; i < B * T; ++i) {
    tok.data.push_back((5 * i + 1) % cfg.vocab_size);
    tgt.data.push_back((3 * i + 2) % cfg.vocab_size);
  }
}

template <class S>
void check_device_solves(std::shared_ptr<Backend<S>> be, const std::string& kind, double tol) {
  const ModelConfig cfg = device_check_config(kind);
  Model<S> cpu(cfg);
  cpu.init(7);
  if (cfg.time_cond) {  // ada and time_embed away from their zero init
    Rng rng(3);
    for (const auto& t : cpu.layout.tensors())
      if (t.name.find(".ada.") != std::string::npos)
        for (size_t i = 0; i < t.numel; ++i) cpu.params[t.offset + i] = static_cast<S>(0.1 * rng.normal());
  }
  Model<S> dev = cpu;
  dev.set_backend(be);
  REQUIRE(dev.device_field() != nullptr);
  REQUIRE(cpu.device_field() == nullptr);
  TokenBatch tok, tgt;
  check_tokens(cfg, 3, 6, tok, tgt);
  SolveOptions opt;
  opt.method = "dopri5";
  opt.adaptive = true;
  opt.t1 = 3.0;
  opt.rtol = 1e-6;
  opt.atol = 1e-8;
  Buffer<S> hc, hd;
  ReadoutCache<S> rc, rd;
  const SolveResult<S> a = cpu.ode_forward(tok, opt, hc, rc), b = dev.ode_forward(tok, opt, hd, rd);
  INFO(kind << " on " << be->name());
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(rel_error_of(std::vector<S>(hd.begin(), hd.end()), std::vector<S>(hc.begin(), hc.end())) < 100 * tol);
  if (std::is_same_v<S, double>) {
    for (size_t i = 0; i < a.seq.size(); ++i) {
      CHECK(b.seq[i].steps == a.seq[i].steps);
      CHECK(b.seq[i].accepted == a.seq[i].accepted);
      CHECK(b.seq[i].nfe == a.seq[i].nfe);
    }
  }
  // the resident solve (states on the device) against the solve from host states that
  // crosses per evaluation: bit for bit on the reference backend, which runs the host
  // algebra; to rounding (and the same steps in double) on a GPU
  {
    const size_t NC = static_cast<size_t>(tok.B) * tok.T * cfg.d_model;
    Buffer<S> h0(NC), hr, hs;
    dev.embed(h0.data(), tok);
    FieldSystem<S> sys(dev.field, dev.field_params(), tok.B, tok.T, dev.device_field());
    hr = h0;
    hs = h0;
    SolveOptions so = opt;
    so.save = SaveKind::Times;
    so.save_times = {0.0, 1.0, 2.5};
    const SolveResult<S> res = sys.solve(hr.data(), so);
    CHECK_FALSE(sys.resident());
    const SolveResult<S> cross = integrate(sys, hs.data(), so);
    REQUIRE(res.ok());
    REQUIRE(cross.ok());
    const double rtol = be->device() == Device::cpu ? 0.0 : 100 * tol;
    CHECK(rel_error_of(std::vector<S>(hr.begin(), hr.end()), std::vector<S>(hs.begin(), hs.end())) <= rtol);
    CHECK(rel_error_of(std::vector<S>(res.saved.begin(), res.saved.end()),
                       std::vector<S>(cross.saved.begin(), cross.saved.end())) <= rtol);
    if (std::is_same_v<S, double>)
      for (size_t i = 0; i < cross.seq.size(); ++i) CHECK(res.seq[i].steps == cross.seq[i].steps);
    // every gradient method with the solve and its gradient on the device, against the same
    // method from host states (backprop per-sequence and batch-coupled, the adjoint with
    // and without its seminorm)
    const size_t P = dev.field.num_params();
    Rng rng(5);
    const std::vector<S> gy1 = random_values<S>(NC, rng);
    for (const char* method : {"backprop", "backprop-coupled", "checkpoint", "adjoint", "adjoint-seminorm"}) {
      INFO(method);
      const std::string name = method;
      SolveOptions bo = opt;
      bo.batch_coupled = name == "backprop-coupled";
      GradOptions bp;
      bp.method = grad_method(name.substr(0, name.find('-')));
      bp.seminorm = name == "adjoint-seminorm";
      Buffer<S> yh = h0, gy0(NC);
      std::vector<S> gph(P, S(0.5));
      OdeGradient<S> og(sys, bo, bp);
      REQUIRE(og.forward(yh.data()).ok());
      og.backward(gy1.data(), gy0.data(), gph.data());
      sys.set_resident(true);
      StateOps<S>& m = *sys.backend();
      Array<S> dy(m, NC), dg1(m, NC), dg0(m, NC), dgp(m, P);
      dy.upload(h0.data(), NC);
      dg1.upload(gy1.data(), NC);
      std::vector<S> gpd(P, S(0.5));
      dgp.upload(gpd.data(), P);  // accumulates, as on the host
      OdeGradient<S> od(sys, bo, bp);
      REQUIRE(od.forward(dy.data()).ok());
      const GradStats& sd = od.backward(dg1.data(), dg0.data(), dgp.data());
      sys.set_resident(false);
      REQUIRE(sd.ok());
      std::vector<S> yd(NC), g0d(NC);
      dy.download(yd.data(), NC);
      dg0.download(g0d.data(), NC);
      dgp.download(gpd.data(), P);
      CHECK(rel_error_of(yd, std::vector<S>(yh.begin(), yh.end())) <= rtol);
      CHECK(rel_error_of(g0d, std::vector<S>(gy0.begin(), gy0.end())) <= rtol);
      CHECK(rel_error_of(gpd, gph) <= rtol);
      CHECK(sd.vjp_calls == og.stats().vjp_calls);
      if (std::is_same_v<S, double>) CHECK(sd.nfe_backward == og.stats().nfe_backward);
    }
  }
  for (const char* method : {"backprop", "adjoint"}) {
    GradOptions g;
    g.method = grad_method(method);
    if (g.method == GradMethod::Adjoint) g.adjoint_rtol = 1e-8, g.adjoint_atol = 1e-10;
    std::vector<S> gc(cpu.params.size(), S(0)), gd(dev.params.size(), S(0));
    GradStats sc, sd;
    OdeWork<S> wc, wd;
    const S lc = cpu.ode_loss_and_grad(tok, tgt, opt, g, gc.data(), sc, wc);
    const S ld = dev.ode_loss_and_grad(tok, tgt, opt, g, gd.data(), sd, wd);
    INFO(method);
    REQUIRE(sc.ok());
    REQUIRE(sd.ok());
    CHECK(std::fabs(static_cast<double>(ld - lc)) < 100 * tol * std::fabs(static_cast<double>(lc)));
    CHECK(rel_error_of(gd, gc) < 100 * tol);
    if (std::is_same_v<S, double>) CHECK(sd.nfe_backward == sc.nfe_backward);
  }
  // loop K: the same weights looped on the device
  std::vector<S> gc(cpu.params.size(), S(0)), gd(dev.params.size(), S(0));
  LoopWork<S> lc, ld;
  const S loss_c = cpu.loop_loss_and_grad(tok, tgt, 4, gc.data(), lc);
  const S loss_d = dev.loop_loss_and_grad(tok, tgt, 4, gd.data(), ld);
  CHECK(std::fabs(static_cast<double>(loss_d - loss_c)) < 100 * tol * std::fabs(static_cast<double>(loss_c)));
  CHECK(rel_error_of(gd, gc) < 100 * tol);
  CHECK(rel_error_of(std::vector<S>(ld.readout.logits.begin(), ld.readout.logits.end()),
                     std::vector<S>(lc.readout.logits.begin(), lc.readout.logits.end())) < 100 * tol);
}

}  // namespace flowloop::test
