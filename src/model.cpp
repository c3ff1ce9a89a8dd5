#include "flowloop/nn/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <nlohmann/json.hpp>

#include "flowloop/io/io.hpp"
#include "flowloop/nn/layers.hpp"
#include "flowloop/core/tensor.hpp"

namespace flowloop {

void TokenBatch::check(const ModelConfig& cfg, const std::string& what, bool allow_ignore) const {
  if (B <= 0 || T <= 0) throw Error(what + ": empty batch (B=" + std::to_string(B) + ", T=" + std::to_string(T) + ")");
  if (data.size() != static_cast<size_t>(B) * T)
    throw Error(what + ": holds " + std::to_string(data.size()) + " values, expected B*T = " +
                std::to_string(B) + "*" + std::to_string(T));
  if (T > cfg.context)
    throw Error(what + ": sequence length " + std::to_string(T) + " exceeds the model's context " +
                std::to_string(cfg.context));
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      const int32_t v = data[static_cast<size_t>(b) * T + t];
      if ((v < 0 && !(allow_ignore && v == -1)) || v >= cfg.vocab_size)
        throw Error(what + ": value " + std::to_string(v) + " at row " + std::to_string(b) +
                    ", position " + std::to_string(t) + " is out of range [0, " +
                    std::to_string(cfg.vocab_size) + ")" + (allow_ignore ? " (or -1)" : ""));
    }
}

namespace {
TokenBatch parse_rows(const nlohmann::json& j, const std::string& key, const std::string& path) {
  const std::string where = "'" + path + "' \"" + key + "\"";
  if (!j.is_object() || !j.contains(key)) throw Error("'" + path + "' has no \"" + key + "\" field");
  const nlohmann::json& rows = j[key];
  if (!rows.is_array() || rows.empty()) throw Error(where + " must be a non-empty list of rows");
  TokenBatch tb;
  tb.B = static_cast<int>(rows.size());
  for (size_t b = 0; b < rows.size(); ++b) {
    const nlohmann::json& r = rows[b];
    if (!r.is_array() || r.empty())
      throw Error(where + ": row " + std::to_string(b) + " is not a non-empty list");
    if (b == 0) tb.T = static_cast<int>(r.size());
    if (static_cast<int>(r.size()) != tb.T)
      throw Error(where + ": row " + std::to_string(b) + " has length " + std::to_string(r.size()) +
                  " but row 0 has " + std::to_string(tb.T) + " (rows must be equally long)");
    for (size_t t = 0; t < r.size(); ++t) {
      if (!r[t].is_number_integer())
        throw Error(where + ": row " + std::to_string(b) + ", position " + std::to_string(t) +
                    " is not an integer");
      // (an unsigned value above INT64_MAX would wrap to a negative one: out of range too)
      const bool huge = r[t].is_number_unsigned() && r[t].get<uint64_t>() > static_cast<uint64_t>(INT32_MAX);
      const auto v = huge ? int64_t{INT32_MAX} + 1 : r[t].get<int64_t>();
      if (v < INT32_MIN || v > INT32_MAX)
        throw Error(where + ": row " + std::to_string(b) + ", position " + std::to_string(t) +
                    " is out of range");
      tb.data.push_back(static_cast<int32_t>(v));
    }
  }
  return tb;
}

}  // namespace

TokenBatch read_token_file(const std::string& path, const std::string& key) {
  return parse_rows(read_json_file(path, "tokens file"), key, path);
}

TokenBatch parse_token_json(const std::string& text, const std::string& key, const std::string& where) {
  return parse_rows(parse_json(text, "tokens file '" + where + "'"), key, where);
}

template <class S>
void ReadoutCache<S>::resize(const ModelConfig& cfg, int N) {
  const size_t n = static_cast<size_t>(N), C = cfg.d_model, V = cfg.vocab_size;
  ln.resize(n * C);
  mean.resize(n);
  rstd.resize(n);
  logits.resize(n * V);
  dlogits.resize(n * V);
  dln.resize(n * C);
}

template <class S>
void LoopWork<S>::resize(const ModelConfig& cfg, int B_, int T_, int K_) {
  const size_t NC = static_cast<size_t>(B_) * T_ * cfg.d_model;
  h.resize(NC * (static_cast<size_t>(K_) + 1));
  dh.resize(NC);
  readout.resize(cfg, B_ * T_);
  B = B_;
  T = T_;
  K = K_;
}

template <class S>
Model<S>::Model(const ModelConfig& c)
    : cfg(c),
      layout(c),
      field(c, layout),
      prelude(c, layout, FieldPart::prelude),
      coda(c, layout, FieldPart::coda),
      params(layout.size(), S(0)) {}

template <class S>
void Model<S>::embed(S* h0, const TokenBatch& tokens) const {
  EmbedCache<S> cache;  // (untouched without a prelude)
  embed(h0, tokens, cache);
}

template <class S>
void Model<S>::embed(S* h0, const TokenBatch& tokens, EmbedCache<S>& cache) const {
  tokens.check(cfg, "tokens");
  const int B = tokens.B, T = tokens.T;
  const size_t NC = static_cast<size_t>(B) * T * cfg.d_model;
  S* e = h0;
  if (cfg.n_prelude > 0) {
    cache.e.resize(NC);
    e = cache.e.data();
  }
  embedding_forward(e, tokens.data.data(), params.data() + layout.wte(),
                    layout.has_wpe() ? params.data() + layout.wpe() : nullptr, B, T, cfg.d_model);
  if (cfg.n_prelude == 0) return;
  // h0 = e + f_prelude(e): the prelude's layers once
  cache.prelude.resize(prelude.config(), B, T);
  prelude.forward(h0, e, nullptr, params.data() + layout.part_begin(FieldPart::prelude), B, T, cache.prelude);
  for (size_t i = 0; i < NC; ++i) h0[i] += e[i];
}

template <class S>
void Model<S>::embed_backward(S* dparams, const S* dh0, const TokenBatch& tokens, EmbedCache<S>& cache) const {
  const int B = tokens.B, T = tokens.T;
  const size_t NC = static_cast<size_t>(B) * T * cfg.d_model;
  const S* de = dh0;
  if (cfg.n_prelude > 0) {  // de = J_prelude^T dh0: the vjp of f = prelude(e) - e adds J^T dh0 - dh0
    if (cache.prelude.B != B || cache.prelude.T != T)
      throw Error("Model::embed_backward: the prelude's cache holds another batch (embed with the cache first)");
    cache.de.assign(dh0, dh0 + NC);
    prelude.vjp(cache.de.data(), dparams + layout.part_begin(FieldPart::prelude), dh0,
                params.data() + layout.part_begin(FieldPart::prelude), cache.prelude, cache.work);
    de = cache.de.data();
  }
  embedding_backward(dparams + layout.wte(), layout.has_wpe() ? dparams + layout.wpe() : nullptr, de,
                     tokens.data.data(), B, T, cfg.d_model);
}

template <class S>
void Model<S>::readout(const S* h, int N, ReadoutCache<S>& rc) const {
  if (cfg.n_coda > 0)
    throw Error("Model::readout: a model with a coda reads out whole sequences (give B and T)");
  readout(h, 1, N, rc);
}

template <class S>
void Model<S>::readout(const S* h, int B, int T, ReadoutCache<S>& rc) const {
  const S* P = params.data();
  const int N = B * T, C = cfg.d_model;
  if (cfg.n_coda > 0) {  // hc = h + f_coda(h): the coda's layers once
    const size_t NC = static_cast<size_t>(N) * C;
    rc.hc.resize(NC);
    rc.coda.resize(coda.config(), B, T);
    coda.forward(rc.hc.data(), h, nullptr, P + layout.part_begin(FieldPart::coda), B, T, rc.coda);
    for (size_t i = 0; i < NC; ++i) rc.hc[i] += h[i];
    h = rc.hc.data();
  }
  if (cfg.llama())
    cpu_backend<S>().rmsnorm_forward(rc.ln.data(), rc.rstd.data(), h, P + layout.lnf_w(), N, C, cfg.norm_eps);
  else
    layernorm_forward(rc.ln.data(), rc.mean.data(), rc.rstd.data(), h, P + layout.lnf_w(), P + layout.lnf_b(), N, C);
  linear_forward<S>(rc.logits.data(), rc.ln.data(), P + layout.head(), nullptr, N, C, cfg.vocab_size);
}

template <class S>
void Model<S>::head_backward(S* dparams, int N, ReadoutCache<S>& rc) const {
  std::fill(rc.dln.begin(), rc.dln.begin() + static_cast<size_t>(N) * cfg.d_model, S(0));
  linear_backward<S>(rc.dln.data(), dparams + layout.head(), nullptr, rc.dlogits.data(), rc.ln.data(),
                     params.data() + layout.head(), N, cfg.d_model, cfg.vocab_size);
}

template <class S>
void Model<S>::norm_backward(S* dh, S* dparams, const S* h, int B, int T, ReadoutCache<S>& rc) const {
  const S* P = params.data();
  const int N = B * T, C = cfg.d_model;
  const size_t NC = static_cast<size_t>(N) * C;
  S* dnorm = dh;  // dL/d(the final norm's input): dh itself, or the coda's output gradient
  if (cfg.n_coda > 0) {
    rc.dhc.assign(NC, S(0));
    dnorm = rc.dhc.data();
  }
  const S* hn = cfg.n_coda > 0 ? rc.hc.data() : h;
  if (cfg.llama())
    cpu_backend<S>().rmsnorm_backward(dnorm, dparams + layout.lnf_w(), rc.dln.data(), hn, P + layout.lnf_w(),
                                      rc.rstd.data(), N, C);
  else
    layernorm_backward(dnorm, dparams + layout.lnf_w(), dparams + layout.lnf_b(), rc.dln.data(), hn,
                       P + layout.lnf_w(), rc.mean.data(), rc.rstd.data(), N, C);
  if (cfg.n_coda == 0) return;
  // dh += J_coda^T dhc: the vjp of f = coda(h) - h adds J^T dhc - dhc
  for (size_t i = 0; i < NC; ++i) dh[i] += rc.dhc[i];
  coda.vjp(dh, dparams + layout.part_begin(FieldPart::coda), rc.dhc.data(), P + layout.part_begin(FieldPart::coda),
           rc.coda, rc.coda_work);
}

template <class S>
void Model<S>::readout_backward(S* dh, S* dparams, const S* h, int B, int T, ReadoutCache<S>& rc) const {
  head_backward(dparams, B * T, rc);
  norm_backward(dh, dparams, h, B, T, rc);
}

template <class S>
void Model<S>::readout_backward(S* dh, S* dparams, const S* h, int N, ReadoutCache<S>& rc) const {
  if (cfg.n_coda > 0)
    throw Error("Model::readout_backward: a model with a coda reads out whole sequences (give B and T)");
  readout_backward(dh, dparams, h, 1, N, rc);
}

template <class S>
void OdeWork<S>::use_backend(const std::shared_ptr<Backend<S>>& be) {
  if (backend == be) return;
  grad.reset();
  sys.reset();
  for (Array<S>* a : {&dev_h, &dev_gy1, &dev_gy0, &dev_grad, &dev_steps}) *a = Array<S>();
  backend = be;
}

template <class S>
SolveOptions Model<S>::loop_options(int K, bool save_states) {
  SolveOptions o;
  o.method = "euler";
  o.t0 = 0.0;
  o.t1 = static_cast<double>(K);
  o.steps = K;
  o.save = save_states ? SaveKind::Steps : SaveKind::Final;
  return o;
}

namespace {
// The saved states of a loop's solve into h (K+1, B, n): state k of sequence b. A sequence
// whose solve failed keeps NaN after its last accepted state (its logits and loss are NaN).
template <class S>
void gather_loop_states(S* h, const SolveResult<S>& r, int B, int K, size_t n) {
  for (int b = 0; b < B; ++b) {
    const Buffer<S>& st = r.step_states[static_cast<size_t>(b)];
    const size_t have = st.size() / n;
    for (int k = 1; k <= K; ++k) {
      S* dst = h + (static_cast<size_t>(k) * B + b) * n;
      if (static_cast<size_t>(k) < have)
        std::memcpy(dst, st.data() + static_cast<size_t>(k) * n, n * sizeof(S));
      else
        std::fill(dst, dst + n, std::numeric_limits<S>::quiet_NaN());
    }
  }
}
}  // namespace

template <class S>
int Model<S>::loop_forward(const TokenBatch& tokens, int K, LoopWork<S>& w) const {
  tokens.check(cfg, "tokens");
  w.resize(cfg, tokens.B, tokens.T, K < 0 ? 0 : K);
  embed(w.h.data(), tokens);
  return loop_forward_from(w.h.data(), tokens.B, tokens.T, K, w);
}

template <class S>
int Model<S>::loop_forward_from(const S* h0, int B, int T, int K, LoopWork<S>& w) const {
  if (K < 0) throw Error("loop count K must be >= 0, got " + std::to_string(K));
  if (T > cfg.context)
    throw Error("sequence length " + std::to_string(T) + " exceeds the model's context " +
                std::to_string(cfg.context));
  w.resize(cfg, B, T, K);
  const size_t NC = static_cast<size_t>(B) * T * cfg.d_model;
  if (h0 != w.h.data()) std::memcpy(w.h.data(), h0, NC * sizeof(S));
  if (K > 0) {  // Euler through the one driver, every state saved (on a device: a resident solve)
    w.ode.use_backend(backend_);
    FieldSystem<S>& sys = w.ode.system(field, field_params(), B, T, device_field(), train_params_);
    w.ode.h.assign(w.h.data(), w.h.data() + NC);
    const SolveResult<S> r = sys.solve(w.ode.h.data(), loop_options(K, true));
    gather_loop_states(w.h.data(), r, B, K, static_cast<size_t>(T) * cfg.d_model);
  }
  readout(w.h.data() + NC * K, B, T, w.readout);
  return K;
}

template <class S>
S Model<S>::loop_loss_and_grad(const TokenBatch& tokens, const TokenBatch& targets, int K,
                               S* grads, LoopWork<S>& w, S* dh0, int truncate) const {
  tokens.check(cfg, "tokens");
  if (targets.B != tokens.B || targets.T != tokens.T)
    throw Error("targets have shape (" + std::to_string(targets.B) + ", " +
                std::to_string(targets.T) + ") but tokens have (" + std::to_string(tokens.B) +
                ", " + std::to_string(tokens.T) + ")");
  w.resize(cfg, tokens.B, tokens.T, K < 0 ? 0 : K);
  embed(w.h.data(), tokens, w.ode.embed);
  const S loss = loop_loss_and_grad_from(w.h.data(), targets, K, grads, w, dh0, truncate);
  if (loss == loss) embed_backward(grads, w.dh.data(), tokens, w.ode.embed);
  return loss;
}

template <class S>
S Model<S>::loop_loss_and_grad_from(const S* h0, const TokenBatch& targets, int K, S* grads,
                                    LoopWork<S>& w, S* dh0, int truncate) const {
  targets.check(cfg, "targets", /*allow_ignore=*/true);
  if (K < 0) throw Error("loop count K must be >= 0, got " + std::to_string(K));
  const int B = targets.B, T = targets.T, N = B * T;
  const size_t NC = static_cast<size_t>(N) * cfg.d_model;
  w.resize(cfg, B, T, K);
  if (h0 != w.h.data()) std::memcpy(w.h.data(), h0, NC * sizeof(S));
  // backprop through the K Euler steps of the one driver (the last `truncate` only when > 0)
  GradOptions gopt;
  gopt.truncate = std::max(0, truncate);
  GradStats stats;
  const S loss = ode_loss_and_grad_from(w.h.data(), targets, loop_options(K, false), gopt, grads, stats, w.ode, nullptr);
  std::memcpy(w.h.data() + NC * K, w.ode.h.data(), NC * sizeof(S));
  std::swap(w.readout, w.ode.readout);
  if (!stats.ok()) {  // a non-finite state: NaN logits and loss, no gradient
    w.readout.resize(cfg, N);
    std::fill(w.readout.logits.begin(), w.readout.logits.end(), std::numeric_limits<S>::quiet_NaN());
    std::fill(w.dh.begin(), w.dh.end(), S(0));
    if (dh0) std::fill(dh0, dh0 + NC, S(0));
    return std::numeric_limits<S>::quiet_NaN();
  }
  std::memcpy(w.dh.data(), w.ode.gy0.data(), NC * sizeof(S));
  if (dh0) std::memcpy(dh0, w.dh.data(), NC * sizeof(S));
  return loss;
}

namespace {
// Gate probabilities of one token from its lambdas (K-1 used): p (K).
template <class L>
void exit_distribution(const L* lam, int K, double* p) {
  double surv = 1.0;
  for (int t = 0; t < K - 1; ++t) {
    p[t] = static_cast<double>(lam[t]) * surv;
    surv *= 1.0 - static_cast<double>(lam[t]);
  }
  p[K - 1] = surv;
}
}  // namespace

template <class S>
S Model<S>::loop_gate_loss_and_grad(const TokenBatch& tokens, const TokenBatch& targets, int K, double beta,
                                    S* grads, LoopWork<S>& w, double* mean_depth) const {
  if (!cfg.exit_gate) throw Error("loop_gate_loss_and_grad: the model has no exit gate (config exit_gate)");
  if (K < 1) throw Error("the exit gate needs K >= 1 loops");
  if (targets.B != tokens.B || targets.T != tokens.T) throw Error("targets and tokens differ in shape");
  targets.check(cfg, "targets", true);
  tokens.check(cfg, "tokens");
  const int N = tokens.B * tokens.T, C = cfg.d_model, V = cfg.vocab_size;
  const size_t NC = static_cast<size_t>(N) * C;
  // the K loops through the one driver, every state saved, differentiable by backprop
  w.resize(cfg, tokens.B, tokens.T, K);
  w.ode.h.resize(NC);
  embed(w.ode.h.data(), tokens, w.ode.embed);
  std::memcpy(w.h.data(), w.ode.h.data(), NC * sizeof(S));
  const SolveResult<S>& fr = grad_forward(tokens.B, tokens.T, loop_options(K, true), GradOptions{}, w.ode);
  gather_loop_states(w.h.data(), fr, tokens.B, K, static_cast<size_t>(tokens.T) * C);
  readout(w.h.data() + NC * K, tokens.B, tokens.T, w.readout);
  w.per_loop.resize(static_cast<size_t>(K));
  if (!fr.ok()) {  // a non-finite state: NaN logits at every loop and loss, no gradient
    w.ode.sys->set_resident(false);
    for (auto& rc : w.per_loop) {
      rc.resize(cfg, N);
      std::fill(rc.logits.begin(), rc.logits.end(), std::numeric_limits<S>::quiet_NaN());
    }
    return std::numeric_limits<S>::quiet_NaN();
  }
  const S* P = params.data();
  w.gate.assign(static_cast<size_t>(K) * N, S(0));  // lambda_t, later dz_t
  // readout and gate at every loop t = 1..K
  for (int t = 1; t <= K; ++t) {
    ReadoutCache<S>& rc = w.per_loop[static_cast<size_t>(t - 1)];
    rc.resize(cfg, N);
    readout(w.h.data() + NC * t, tokens.B, tokens.T, rc);
    for (int n = 0; n < N; ++n) {
      double z = P[layout.gate_b()];
      const S* u = rc.ln.data() + static_cast<size_t>(n) * C;
      for (int c = 0; c < C; ++c) z += static_cast<double>(u[c]) * P[layout.gate_w() + c];
      w.gate[static_cast<size_t>(t - 1) * N + n] = static_cast<S>(1.0 / (1.0 + std::exp(-z)));
    }
  }
  int count = 0;
  for (int32_t v : targets.data) count += v >= 0;
  std::vector<double> p(static_cast<size_t>(K)), L(static_cast<size_t>(K)), g(static_cast<size_t>(K)), lam(static_cast<size_t>(K));
  Buffer<S> dz(static_cast<size_t>(K) * N, S(0));
  double total = 0, depth = 0;
  for (auto& rc : w.per_loop) std::fill(rc.dlogits.begin(), rc.dlogits.end(), S(0));
  for (int n = 0; n < N && count > 0; ++n) {
    const int32_t tgt = targets.data[static_cast<size_t>(n)];
    if (tgt < 0) continue;
    for (int t = 0; t < K; ++t) lam[t] = w.gate[static_cast<size_t>(t) * N + n];
    exit_distribution(lam.data(), K, p.data());
    for (int t = 0; t < K; ++t) {
      const S* x = w.per_loop[static_cast<size_t>(t)].logits.data() + static_cast<size_t>(n) * V;
      double mx = x[0];
      for (int v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(x[v]));
      double se = 0;
      for (int v = 0; v < V; ++v) se += std::exp(static_cast<double>(x[v]) - mx);
      const double lse = mx + std::log(se);
      L[t] = lse - x[tgt];
      // dL/dlogits at loop t, weighted by p(t)
      S* d = w.per_loop[static_cast<size_t>(t)].dlogits.data() + static_cast<size_t>(n) * V;
      const double coef = p[t] / count;
      for (int v = 0; v < V; ++v) d[v] = static_cast<S>(coef * std::exp(static_cast<double>(x[v]) - lse));
      d[tgt] -= static_cast<S>(coef);
    }
    double ent = 0;
    for (int t = 0; t < K; ++t) {
      const double lp = std::log(std::max(p[t], 1e-30));
      total += p[t] * L[t];
      ent -= p[t] * lp;
      g[t] = (L[t] + beta * (lp + 1.0)) / count;
      depth += (t + 1) * p[t];
    }
    total -= beta * ent;
    // dloss/dlambda_j = sum_t g_t dp(t)/dlambda_j, products without division
    for (int j = 0; j < K - 1; ++j) {
      double dl = 0;
      for (int t = j; t < K; ++t) {
        double prod = t < K - 1 ? (t == j ? 1.0 : lam[t]) : 1.0;
        for (int i = 0; i < t; ++i)
          if (i != j) prod *= 1.0 - lam[i];
        dl += g[t] * (t == j ? prod : -prod);
      }
      dz[static_cast<size_t>(j) * N + n] = static_cast<S>(dl * lam[j] * (1.0 - lam[j]));
    }
  }
  // the readout and gate gradients at every loop, into D (K+1, N, C)
  Buffer<S> D((static_cast<size_t>(K) + 1) * NC, S(0));
  for (int t = 1; t <= K; ++t) {
    ReadoutCache<S>& rc = w.per_loop[static_cast<size_t>(t - 1)];
    head_backward(grads, N, rc);
    for (int n = 0; n < N; ++n) {
      const S dzn = dz[static_cast<size_t>(t - 1) * N + n];
      if (dzn == S(0)) continue;
      const S* u = rc.ln.data() + static_cast<size_t>(n) * C;
      S* du = rc.dln.data() + static_cast<size_t>(n) * C;
      for (int c = 0; c < C; ++c) {
        grads[layout.gate_w() + c] += dzn * u[c];
        du[c] += dzn * P[layout.gate_w() + c];
      }
      grads[layout.gate_b()] += dzn;
    }
    norm_backward(D.data() + NC * t, grads, w.h.data() + NC * t, tokens.B, tokens.T, rc);
  }
  // back through the loops by backprop: dh_k = dh_{k+1} + J^T dh_{k+1} (+ the readout and
  // gate terms at h_k, D's row k, which the reverse pass adds as it reaches h_k)
  w.ode.gy1.assign(D.data() + NC * K, D.data() + NC * (static_cast<size_t>(K) + 1));
  if (!grad_backward(w.ode, D.data(), grads + layout.field_begin()).ok()) return std::numeric_limits<S>::quiet_NaN();
  std::memcpy(w.dh.data(), w.ode.gy0.data(), NC * sizeof(S));
  embed_backward(grads, w.dh.data(), tokens, w.ode.embed);
  if (mean_depth) *mean_depth = count ? depth / count : 0.0;
  return static_cast<S>(count ? total / count : 0.0);
}

template <class S>
void Model<S>::loop_exit(const TokenBatch& tokens, int K, const std::string& rule, double threshold,
                         Buffer<S>& logits, std::vector<int>& depth, LoopWork<S>& w) const {
  if (K < 1) throw Error("early exit needs K >= 1 loops");
  if (rule == "q" && !cfg.exit_gate) throw Error("exit rule q needs a model with an exit gate");
  if (rule != "q" && rule != "delta") throw Error("unknown exit rule '" + rule + "' (q or delta)");
  loop_forward(tokens, K, w);
  const int N = tokens.B * tokens.T, C = cfg.d_model, V = cfg.vocab_size;
  const size_t NC = static_cast<size_t>(N) * C;
  const S* P = params.data();
  w.per_loop.resize(static_cast<size_t>(K));
  for (int t = 1; t <= K; ++t) {
    w.per_loop[static_cast<size_t>(t - 1)].resize(cfg, N);
    readout(w.h.data() + NC * t, tokens.B, tokens.T, w.per_loop[static_cast<size_t>(t - 1)]);
  }
  logits.resize(static_cast<size_t>(N) * V);
  depth.assign(static_cast<size_t>(N), K);
  std::vector<S> lam(static_cast<size_t>(K));
  std::vector<double> p(static_cast<size_t>(K));
  for (int n = 0; n < N; ++n) {
    int exit_at = K;
    if (rule == "q") {
      for (int t = 0; t < K; ++t) {
        double z = P[layout.gate_b()];
        const S* u = w.per_loop[static_cast<size_t>(t)].ln.data() + static_cast<size_t>(n) * C;
        for (int c = 0; c < C; ++c) z += static_cast<double>(u[c]) * P[layout.gate_w() + c];
        lam[t] = static_cast<S>(1.0 / (1.0 + std::exp(-z)));
      }
      exit_distribution(lam.data(), K, p.data());
      double cdf = 0;
      for (int t = 0; t < K; ++t) {
        cdf += p[t];
        if (cdf >= threshold) {
          exit_at = t + 1;
          break;
        }
      }
    } else {
      for (int t = 1; t <= K; ++t) {
        const S* a = w.h.data() + NC * t + static_cast<size_t>(n) * C;
        const S* b = w.h.data() + NC * (t - 1) + static_cast<size_t>(n) * C;
        double d = 0;
        for (int c = 0; c < C; ++c) d += static_cast<double>(a[c] - b[c]) * (a[c] - b[c]);
        if (std::sqrt(d) < threshold) {
          exit_at = t;
          break;
        }
      }
    }
    depth[static_cast<size_t>(n)] = exit_at;
    std::memcpy(logits.data() + static_cast<size_t>(n) * V,
                w.per_loop[static_cast<size_t>(exit_at - 1)].logits.data() + static_cast<size_t>(n) * V, V * sizeof(S));
  }
}

template <class S>
FieldSystem<S>::FieldSystem(const Field<S>& field, const S* params, int B, int T, const Field<S>* device)
    : field_(field), params_(params), B_(B), T_(T), dev_(device) {
  if (!dev_) {
    cache_.resize(field.backend(), field.config(), B, T);
    return;
  }
  NetOps<S>& be = dev_->backend();
  const size_t n = static_cast<size_t>(B) * dim();
  dparams_ = Array<S>(be, field.num_params());
  dy_ = Array<S>(be, n);
  dx_ = Array<S>(be, n);
  dcache_.resize(be, field.config(), B, T);
  set_params(params);
}

template <class S>
void FieldSystem<S>::set_params(const S* params) {
  params_ = params;
  dparams_ext_ = nullptr;
  if (dev_) dparams_.upload(params, field_.num_params());
}

template <class S>
void FieldSystem<S>::set_device_params(const S* params) {
  if (!dev_) throw Error("FieldSystem: device parameters for a field on the CPU");
  dparams_ext_ = params;
}

template <class S>
void FieldSystem<S>::set_step(double d) {
  if (!field_.config().step_cond)
    throw Error("a step was given but the field is not step-conditioned (config step_cond)");
  if (!std::isfinite(d) || d < 0) throw Error("the step told to the field must be 0 or more, not " + std::to_string(d));
  step_.assign(static_cast<size_t>(B_), d);
}

template <class S>
void FieldSystem<S>::set_resident(bool on) {
  if (on && !dev_) throw Error("FieldSystem: only a field on a device can hold its states there (set_resident)");
  resident_ = on;
}

template <class S>
SolveResult<S> FieldSystem<S>::solve(S* y, const SolveOptions& opt, OdeSystem<S>* through) {
  OdeSystem<S>& sys = through ? *through : *this;
  if (!dev_ || opt.method.rfind("odeint-", 0) == 0) return integrate(sys, y, opt);
  const size_t n = static_cast<size_t>(B_) * dim();
  dstate_.resize(dev_->backend(), n);
  dstate_.upload(y, n);
  SolveResult<S> r;
  {
    Resident resident(*this);
    r = integrate(sys, dstate_.data(), opt);
  }
  dstate_.download(y, n);
  return r;
}

template <class S>
void FieldSystem<S>::device_forward(S* dydt, const S* y, const double* t, int count, FieldCache<S>& cache) {
  const double* step = step_.empty() ? nullptr : step_.data();
  if (resident_) return dev_->forward(dydt, y, t, device_params(), count, T_, cache, step);
  const size_t n = static_cast<size_t>(count) * dim();
  dy_.upload(y, n);
  dev_->forward(dx_.data(), dy_.data(), t, device_params(), count, T_, cache, step);
  dx_.download(dydt, n);
}

template <class S>
void FieldSystem<S>::eval(S* dydt, const S* y, const double* t, const int*, int count) {
  if (dev_) return device_forward(dydt, y, t, count, dcache_);
  field_.forward(dydt, y, t, params_, count, T_, cache_, step_.empty() ? nullptr : step_.data());
}

template <class S>
void FieldSystem<S>::reserve_slots(int n) {
  if (dev_) {
    const size_t before = dslots_.size();
    if (static_cast<size_t>(n) <= before) return;
    dslots_.resize(static_cast<size_t>(n));
    for (size_t i = before; i < dslots_.size(); ++i) dslots_[i].resize(dev_->backend(), field_.config(), B_, T_);
    return;
  }
  const size_t before = slots_.size();
  if (static_cast<size_t>(n) <= before) return;
  slots_.resize(static_cast<size_t>(n));
  for (size_t i = before; i < slots_.size(); ++i) slots_[i].resize(field_.backend(), field_.config(), B_, T_);
}

template <class S>
void FieldSystem<S>::eval_record(S* dydt, const S* y, const double* t, const int*, int count, int slot) {
  if (dev_) return device_forward(dydt, y, t, count, dslots_.at(static_cast<size_t>(slot)));
  field_.forward(dydt, y, t, params_, count, T_, slots_.at(static_cast<size_t>(slot)),
                 step_.empty() ? nullptr : step_.data());
}

template <class S>
void FieldSystem<S>::vjp(S* dy, S* dparams, size_t param_stride, const S* g, int slot) {
  if (!dev_) {
    field_.vjp(dy, dparams, g, params_, slots_.at(static_cast<size_t>(slot)), work_, param_stride);
    return;
  }
  const FieldCache<S>& cache = dslots_.at(static_cast<size_t>(slot));
  if (resident_) return dev_->vjp(dy, dparams, g, device_params(), cache, dwork_, param_stride);
  const size_t n = static_cast<size_t>(cache.B) * dim();
  const size_t np = param_stride ? static_cast<size_t>(cache.B) * param_stride : field_.num_params();
  NetOps<S>& be = dev_->backend();
  dgrad_.resize(be, std::max(np, dgrad_.size()));
  dx_.upload(g, n);
  dy_.zero();
  be.fill(dgrad_.data(), S(0), np);
  dev_->vjp(dy_.data(), dgrad_.data(), dx_.data(), device_params(), cache, dwork_, param_stride);
  host_.resize(std::max(n, np));
  dy_.download(host_.data(), n);
  for (size_t i = 0; i < n; ++i) dy[i] += host_[i];
  be.download(host_.data(), dgrad_.data(), np);
  if (param_stride == 0) {
    for (size_t i = 0; i < np; ++i) dparams[i] += host_[i];
    return;
  }
  // sequence b's gradient: P values at b * stride (what lies between is not the gradient's)
  const size_t P = field_.num_params();
  for (size_t b = 0; b < static_cast<size_t>(cache.B); ++b)
    for (size_t i = 0; i < P; ++i) dparams[b * param_stride + i] += host_[b * param_stride + i];
}

template <class S>
SolveResult<S> Model<S>::ode_forward(const TokenBatch& tokens, const SolveOptions& opt, Buffer<S>& h,
                                     ReadoutCache<S>& rc) const {
  tokens.check(cfg, "tokens");
  const int B = tokens.B, T = tokens.T;
  h.resize(static_cast<size_t>(B) * T * cfg.d_model);
  embed(h.data(), tokens);
  FieldSystem<S> sys(field, field_params(), B, T, device_field());
  SolveResult<S> r = sys.solve(h.data(), opt);
  rc.resize(cfg, B * T);
  readout(h.data(), B, T, rc);
  return r;
}

template <class S>
FieldSystem<S>& OdeWork<S>::system(const Field<S>& field, const S* params, int B, int T,
                                   const Field<S>* device, const S* device_params) {
  if (!sys || sys->groups() != B || sys->T() != T || &sys->field() != &field || sys->device_field() != device) {
    grad.reset();  // it refers to the system
    sys = std::make_unique<FieldSystem<S>>(field, params, B, T, device);
  }
  if (device_params)
    sys->set_device_params(device_params);
  else
    sys->set_params(params);
  return *sys;
}

template <class S>
const SolveResult<S>& Model<S>::grad_forward(int B, int T, const SolveOptions& opt, const GradOptions& gopt,
                                             OdeWork<S>& w) const {
  const size_t NC = static_cast<size_t>(B) * T * cfg.d_model;
  w.use_backend(backend_);
  FieldSystem<S>& sys = w.system(field, field_params(), B, T, device_field(), train_params_);
  // On a device, the solve and its gradient (backprop's tape, checkpoint's recomputed
  // steps, the adjoint's backsolve) stay there: the states cross once each way. The
  // regularisers evaluate there from host states.
  const bool resident = device_field() && !gopt.regularized();
  w.grad.reset();
  sys.set_resident(resident);  // until grad_backward, or a failure here
  try {
    w.grad = std::make_unique<OdeGradient<S>>(sys, opt, gopt);
    if (!resident) return w.grad->forward(w.h.data());
    StateOps<S>& be = device_field()->backend();
    w.dev_h.resize(be, NC);
    w.dev_h.upload(w.h.data(), NC);
    const SolveResult<S>& r = w.grad->forward(w.dev_h.data());
    w.dev_h.download(w.h.data(), NC);
    return r;
  } catch (...) {
    sys.set_resident(false);
    throw;
  }
}

template <class S>
const GradStats& Model<S>::grad_backward(OdeWork<S>& w, const S* steps, S* field_grads) const {
  if (!w.grad || !w.sys) throw Error("Model::grad_backward: no solve to differentiate (grad_forward first)");
  const size_t NC = w.gy1.size();
  w.gy0.resize(NC);
  if (!w.sys->resident()) return w.grad->backward(w.gy1.data(), w.gy0.data(), field_grads, steps);
  // resident since grad_forward: the system leaves device memory when the backward ends, a throw included
  typename FieldSystem<S>::Resident scope(*w.sys);
  // the field's gradient into the trainer's device array, or down to the host's
  StateOps<S>& be = device_field()->backend();
  const size_t P = field.num_params();
  w.dev_gy1.resize(be, NC);
  w.dev_gy0.resize(be, NC);
  w.dev_gy1.upload(w.gy1.data(), NC);
  const S* dev_steps = nullptr;
  if (steps) {
    const size_t all = static_cast<size_t>(w.grad->stats().forward_stats.accepted + 1) * NC;
    w.dev_steps.resize(be, all);
    w.dev_steps.upload(steps, all);
    dev_steps = w.dev_steps.data();
  }
  if (!train_grads_) {
    w.dev_grad.resize(be, P);
    w.dev_grad.zero();
  }
  const GradStats& st =
      w.grad->backward(w.dev_gy1.data(), w.dev_gy0.data(), train_grads_ ? train_grads_ : w.dev_grad.data(), dev_steps);
  w.dev_gy0.download(w.gy0.data(), NC);
  if (!train_grads_) {
    w.grad_host.resize(P);
    w.dev_grad.download(w.grad_host.data(), P);
    for (size_t i = 0; i < P; ++i) field_grads[i] += w.grad_host[i];
  }
  return st;
}

template <class S>
S Model<S>::ode_loss_and_grad_from(const S* h0, const TokenBatch& targets, const SolveOptions& opt,
                                   const GradOptions& gopt, S* grads, GradStats& stats, OdeWork<S>& w,
                                   S* dh0) const {
  targets.check(cfg, "targets", /*allow_ignore=*/true);
  const int B = targets.B, T = targets.T, N = B * T;
  const size_t NC = static_cast<size_t>(N) * cfg.d_model;
  if (w.h.data() != h0) w.h.assign(h0, h0 + NC);
  const SolveResult<S>& fr = grad_forward(B, T, opt, gopt, w);
  if (!fr.ok()) {
    stats = w.grad->stats();
    w.sys->set_resident(false);
    return std::numeric_limits<S>::quiet_NaN();
  }
  ReadoutCache<S>& rc = w.readout;
  rc.resize(cfg, N);
  readout(w.h.data(), B, T, rc);
  std::fill(rc.dlogits.begin(), rc.dlogits.end(), S(0));
  const S loss = crossentropy_forward_backward(rc.dlogits.data(), rc.logits.data(), targets.data.data(), N,
                                               cfg.vocab_size);
  w.gy1.assign(NC, S(0));
  readout_backward(w.gy1.data(), grads, w.h.data(), B, T, rc);
  stats = grad_backward(w, nullptr, grads + layout.field_begin());
  if (dh0) std::memcpy(dh0, w.gy0.data(), NC * sizeof(S));
  return stats.ok() ? loss : std::numeric_limits<S>::quiet_NaN();
}

template <class S>
S Model<S>::ode_loss_and_grad(const TokenBatch& tokens, const TokenBatch& targets, const SolveOptions& opt,
                              const GradOptions& gopt, S* grads, GradStats& stats, OdeWork<S>& w,
                              S* dh0) const {
  tokens.check(cfg, "tokens");
  if (targets.B != tokens.B || targets.T != tokens.T)
    throw Error("targets have shape (" + std::to_string(targets.B) + ", " + std::to_string(targets.T) +
                ") but tokens have (" + std::to_string(tokens.B) + ", " + std::to_string(tokens.T) + ")");
  const size_t NC = static_cast<size_t>(tokens.B) * tokens.T * cfg.d_model;
  w.h.resize(NC);
  embed(w.h.data(), tokens, w.embed);
  const S loss = ode_loss_and_grad_from(w.h.data(), targets, opt, gopt, grads, stats, w, nullptr);
  if (!stats.ok()) return loss;
  embed_backward(grads, w.gy0.data(), tokens, w.embed);
  if (dh0) std::memcpy(dh0, w.gy0.data(), NC * sizeof(S));
  return loss;
}

template struct OdeWork<float>;
template struct OdeWork<double>;
template <class S>
void Model<S>::set_device_training(const S* device_params, S* device_grads) {
  if ((device_params || device_grads) && !device_field())
    throw Error("Model::set_device_training: the model's field is on the CPU (set_device first)");
  train_params_ = device_params;
  train_grads_ = device_grads;
}

template <class S>
void Model<S>::set_device(Device d) {
  train_params_ = nullptr;
  train_grads_ = nullptr;
  if (d == Device::cpu) {
    device_ = d;
    backend_.reset();
    device_field_.reset();
    return;
  }
  set_backend(std::shared_ptr<Backend<S>>(make_backend<S>(d)));
}

template <class S>
void Model<S>::set_backend(std::shared_ptr<Backend<S>> backend) {
  train_params_ = nullptr;
  train_grads_ = nullptr;
  device_field_ = std::make_shared<Field<S>>(*backend, cfg, layout);
  backend_ = std::move(backend);
  device_ = backend_->device();
}

template class FieldSystem<float>;
template class FieldSystem<double>;
template class Model<float>;
template class Model<double>;
template struct ReadoutCache<float>;
template struct EmbedCache<float>;
template struct EmbedCache<double>;
template struct ReadoutCache<double>;
template struct LoopWork<float>;
template struct LoopWork<double>;

}  // namespace flowloop
