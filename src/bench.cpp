#include "flowloop/study/bench.hpp"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "flowloop/backend/backend.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/nn/field.hpp"
#include "flowloop/train/flowmatch_train.hpp"
#include "flowloop/nn/model.hpp"
#include "flowloop/train/train.hpp"
#include "flowloop/core/tensor.hpp"

namespace flowloop {

ModelConfig bench_config(const BenchSize& bs) {
  ModelConfig cfg;
  cfg.vocab_size = bs.V;
  cfg.context = bs.T;
  cfg.d_model = bs.C;
  cfg.n_head = bs.NH;
  cfg.n_block = bs.L;
  cfg.finalize();
  return cfg;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

namespace {
// The fields every bench field line starts with: what ran where, at which size.
nlohmann::ordered_json field_bench_header(const char* device, const std::string& size, const BenchSize& bs, int F) {
  nlohmann::ordered_json j;
  j["bench"] = "field";
  j["device"] = device;
  j["size"] = size;
  j["B"] = bs.B;
  j["T"] = bs.T;
  j["C"] = bs.C;
  j["NH"] = bs.NH;
  j["F"] = F;
  j["L"] = bs.L;
  return j;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

std::string bench_field_on(Backend<float>& be, const BenchOptions& opt) {
  const BenchSize bs = bench_size(opt.size);
  set_num_threads(opt.threads);
  ModelConfig cfg = bench_config(bs);
  const int B = bs.B, T = bs.T, C = bs.C, F = cfg.d_ff, M = B * T;
  const size_t NC = static_cast<size_t>(B) * T * C;
  Rng rng(42);
  struct Run {  // one field (autonomous or time-conditioned) on the backend
    Model<float> model;
    Field<float> field;
    FieldCache<float> cache;
    FieldGradWork<float> work;
    Array<float> params, dparams;
    std::vector<double> t, dt;
    std::vector<double> f_ms, v_ms;
    Run(Backend<float>& be_, const ModelConfig& c) : model(c), field(be_, c, model.layout) {}
  };
  auto make_run = [&](bool tc) {
    ModelConfig c = cfg;
    c.time_cond = tc;
    auto r = std::make_unique<Run>(be, c);
    r->model.init(1234);
    if (tc)
      for (const auto& t : r->model.layout.tensors())
        if (t.name.find(".ada.") != std::string::npos)
          for (size_t i = 0; i < t.numel; ++i) r->model.params[t.offset + i] = static_cast<float>(0.02 * rng.normal());
    const size_t P = r->field.num_params();
    r->params = Array<float>(be, P);
    r->params.upload(r->model.field_params(), P);
    r->dparams = Array<float>(be, P);
    r->dparams.zero();
    r->cache.resize(be, c, B, T);
    r->work.resize(be, c, B, T);
    for (int b = 0; b < B; ++b) r->t.push_back((b + 0.5) * c.depth / B);
    r->dt.assign(static_cast<size_t>(B), 0.0);
    return r;
  };
  auto runs = std::vector<std::unique_ptr<Run>>();
  runs.push_back(make_run(false));
  if (opt.time_cond) runs.push_back(make_run(true));
  // h: the embedding of random tokens; gf: N(0, 1)
  TokenBatch tokens;
  tokens.B = B;
  tokens.T = T;
  for (int i = 0; i < M; ++i) tokens.data.push_back(static_cast<int32_t>(rng.next() % bs.V));
  Buffer<float> hh(NC), gh(NC);
  runs[0]->model.embed(hh.data(), tokens);
  for (auto& g : gh) g = static_cast<float>(rng.normal());
  Array<float> h(be, NC), f(be, NC), dh(be, NC), gf(be, NC);
  h.upload(hh.data(), NC);
  gf.upload(gh.data(), NC);
  dh.zero();
  Buffer<float> ah(static_cast<size_t>(M) * C), wh(static_cast<size_t>(F) * C);
  for (auto& x : ah) x = static_cast<float>(rng.normal());
  for (auto& x : wh) x = static_cast<float>(0.02 * rng.normal());
  Array<float> A(be, ah.size()), W(be, wh.size()), Out(be, static_cast<size_t>(M) * F);
  A.upload(ah.data(), ah.size());
  W.upload(wh.data(), wh.size());
  auto field_fwd = [&](Run& r) {
    r.field.forward(f.data(), h.data(), r.field.config().time_cond ? r.t.data() : nullptr, r.params.data(), B, T,
                    r.cache);
  };
  auto field_vjp = [&](Run& r) {
    r.field.vjp(dh.data(), r.dparams.data(), gf.data(), r.params.data(), r.cache, r.work, 0,
                r.field.config().time_cond ? r.dt.data() : nullptr);
  };
  auto gemm_run = [&] {
    be.gemm(false, true, M, F, C, 1.0f, A.data(), C, 0, W.data(), C, 0, 0.0f, Out.data(), F, 0, 1);
  };
  auto timed = [&](const auto& fn) {
    be.synchronize();
    const double t0 = now_ms();
    fn();
    be.synchronize();
    return now_ms() - t0;
  };
  for (int i = 0; i < 3; ++i)
    for (auto& r : runs) {
      field_fwd(*r);
      field_vjp(*r);
      gemm_run();
    }
  std::vector<double> tg;
  const double start = now_ms();
  while (static_cast<int>(tg.size()) < opt.min_reps || now_ms() - start < 1000.0 * opt.min_seconds) {
    for (size_t k = 0; k < runs.size(); ++k) {  // alternate which field goes first
      Run& r = *runs[(k + tg.size()) % runs.size()];
      r.f_ms.push_back(timed([&] { field_fwd(r); }));
      r.v_ms.push_back(timed([&] { field_vjp(r); }));
    }
    tg.push_back(timed(gemm_run));
    if (tg.size() > 100000) break;
  }
  const double gfl = 2.0 * M * F * C, gms = median(tg);
  nlohmann::ordered_json j = field_bench_header(device_name(be.device()), opt.size, bs, F);
  j["backend"] = be.name();
  j["reps"] = tg.size();
  j["gemm_shape"] = {M, F, C};
  j["gemm_ms"] = gms;
  j["gemm_gflops"] = gfl / (gms * 1e6);
  for (auto& rp : runs) {
    Run& r = *rp;
    const double fl = r.model.field.flops(B, T), ms = median(r.f_ms), vms = median(r.v_ms);
    nlohmann::ordered_json o;
    o["ms_per_eval"] = ms;
    o["gflops"] = fl / (ms * 1e6);
    o["ratio"] = (fl / ms) / (gfl / gms);
    o["vjp_ms"] = vms;
    o["vjp_gflops"] = 2.0 * fl / (vms * 1e6);
    o["vjp_ratio"] = (2.0 * fl / vms) / (gfl / gms);
    o["cache_bytes"] = r.cache.bytes();
    if (r.field.config().time_cond) {
      o["ms_ratio"] = ms / median(runs[0]->f_ms);
      o["vjp_ms_ratio"] = vms / median(runs[0]->v_ms);
      j["time_cond"] = o;
    } else {
      for (auto it = o.begin(); it != o.end(); ++it) j[it.key()] = it.value();
    }
  }
  return j.dump();
}

std::string bench_field(const BenchOptions& opt) {
  if (resolve_device(opt.device) == Device::cuda) {
    auto be = make_backend<float>(Device::cuda);
    return bench_field_on(*be, opt);
  }
  const BenchSize bs = bench_size(opt.size);
  set_num_threads(opt.threads);
  const ModelConfig cfg = bench_config(bs);
  Model<float> model(cfg);
  model.init(1234);

  const int B = bs.B, T = bs.T, C = bs.C, F = cfg.d_ff;
  const size_t NC = static_cast<size_t>(B) * T * C;
  TokenBatch tokens;
  tokens.B = B;
  tokens.T = T;
  Rng rng(42);
  for (int i = 0; i < B * T; ++i) tokens.data.push_back(static_cast<int32_t>(rng.next() % bs.V));
  Buffer<float> h(NC), f(NC), dh(NC), gf(NC), dparams(model.params.size());
  model.embed(h.data(), tokens);
  for (auto& g : gf) g = static_cast<float>(rng.normal());
  FieldCache<float> cache;
  cache.resize(cfg, B, T);
  FieldGradWork<float> work;
  work.resize(cfg, B, T);

  const int M = B * T;
  Buffer<float> A(static_cast<size_t>(M) * C), W(static_cast<size_t>(F) * C),
      Out(static_cast<size_t>(M) * F);
  for (auto& x : A) x = static_cast<float>(rng.normal());
  for (auto& x : W) x = static_cast<float>(0.02 * rng.normal());

  auto run_field = [&] { model.field.forward(f.data(), h.data(), nullptr, model.field_params(), B, T, cache); };
  auto run_vjp = [&] { model.field.vjp(dh.data(), dparams.data(), gf.data(), model.field_params(), cache, work); };
  auto run_gemm = [&] { gemm<float>(false, true, M, F, C, 1.0f, A.data(), C, W.data(), C, 0.0f, Out.data(), F); };

  // The time-conditioned field of the same size: modulation switched on (ada nonzero),
  // each sequence at its own time, d/dt asked for as an adjoint solve would.
  ModelConfig tcfg = cfg;
  tcfg.time_cond = true;
  std::unique_ptr<Model<float>> tm = opt.time_cond ? std::make_unique<Model<float>>(tcfg) : nullptr;
  Model<float>& tmodel = opt.time_cond ? *tm : model;
  FieldCache<float> tcache;
  FieldGradWork<float> twork;
  Buffer<float> tdparams;
  std::vector<double> times(static_cast<size_t>(B)), dtimes(static_cast<size_t>(B));
  if (opt.time_cond) {
    tmodel.init(1234);
    for (const auto& t : tmodel.layout.tensors())
      if (t.name.find(".ada.") != std::string::npos)
        for (size_t i = 0; i < t.numel; ++i) tmodel.params[t.offset + i] = static_cast<float>(0.02 * rng.normal());
    tcache.resize(tcfg, B, T);
    twork.resize(tcfg, B, T);
    tdparams.assign(tmodel.params.size(), 0.0f);
    for (int b = 0; b < B; ++b) times[static_cast<size_t>(b)] = (b + 0.5) * tcfg.depth / B;
  }
  auto run_tfield = [&] { tmodel.field.forward(f.data(), h.data(), times.data(), tmodel.field_params(), B, T, tcache); };
  auto run_tvjp = [&] {
    tmodel.field.vjp(dh.data(), tdparams.data(), gf.data(), tmodel.field_params(), tcache, twork, 0, dtimes.data());
  };

  for (int i = 0; i < 3; ++i) {
    run_field();
    run_vjp();
    run_gemm();
    if (opt.time_cond) {
      run_tfield();
      run_tvjp();
    }
  }
  std::vector<double> tf, tv, tg, ttf, ttv;
  const double start = now_ms();
  // One rep times the field and its vjp, then the product; the time-conditioned pair
  // goes first in every other rep, so that neither field always follows the other.
  auto timed = [](const auto& field, const auto& vjp, std::vector<double>& f_ms, std::vector<double>& v_ms) {
    const double t0 = now_ms();
    field();
    const double t1 = now_ms();
    vjp();
    const double t2 = now_ms();
    f_ms.push_back(t1 - t0);
    v_ms.push_back(t2 - t1);
  };
  while (static_cast<int>(tf.size()) < opt.min_reps || now_ms() - start < 1000.0 * opt.min_seconds) {
    const bool tc_first = opt.time_cond && tf.size() % 2 == 1;
    if (tc_first) timed(run_tfield, run_tvjp, ttf, ttv);
    timed(run_field, run_vjp, tf, tv);
    if (opt.time_cond && !tc_first) timed(run_tfield, run_tvjp, ttf, ttv);
    const double t0 = now_ms();
    run_gemm();
    tg.push_back(now_ms() - t0);
    if (tf.size() > 100000) break;
  }
  const double fl = model.field.flops(B, T);
  const double gfl = 2.0 * M * F * C;
  const double ms = median(tf), vms = median(tv), gms = median(tg);
  nlohmann::ordered_json j = field_bench_header("cpu", opt.size, bs, F);
  j["threads"] = num_threads();
  j["reps"] = tf.size();
  j["ms_per_eval"] = ms;
  j["gflops"] = fl / (ms * 1e6);
  j["gemm_shape"] = {M, F, C};
  j["gemm_ms"] = gms;
  j["gemm_gflops"] = gfl / (gms * 1e6);
  j["ratio"] = (fl / ms) / (gfl / gms);
  j["vjp_ms"] = vms;
  j["vjp_gflops"] = 2.0 * fl / (vms * 1e6);
  if (opt.time_cond) {
    const double tfl = tmodel.field.flops(B, T), tms = median(ttf), tvms = median(ttv);
    nlohmann::ordered_json tj;
    tj["time_freq"] = tcfg.time_freq;
    tj["time_scale"] = tcfg.time_scale;
    tj["ms_per_eval"] = tms;
    tj["gflops"] = tfl / (tms * 1e6);
    tj["vjp_ms"] = tvms;
    tj["vjp_gflops"] = 2.0 * tfl / (tvms * 1e6);
    tj["ms_ratio"] = tms / ms;
    tj["vjp_ms_ratio"] = tvms / vms;
    j["time_cond"] = tj;
  }
  return j.dump();
}

namespace {
// Adds the wall time of every evaluation to a counter. Over device states it waits
// for each evaluation to finish (so it times the device's work, and serialises it).
template <class S>
class TimedSystem : public OdeSystem<S> {
 public:
  TimedSystem(OdeSystem<S>& inner, double& ms) : inner_(inner), ms_(ms) {}
  int groups() const override { return inner_.groups(); }
  size_t dim() const override { return inner_.dim(); }
  StateOps<S>* backend() override { return inner_.backend(); }
  void eval(S* dydt, const S* y, const double* t, const int* ids, int count) override {
    const double t0 = now_ms();
    inner_.eval(dydt, y, t, ids, count);
    if (StateOps<S>* be = inner_.backend()) be->synchronize();
    ms_ += now_ms() - t0;
  }

 private:
  OdeSystem<S>& inner_;
  double& ms_;
};
}  // namespace

namespace {
// The fields every solve and train benchmark line starts with.
void describe_solve(nlohmann::ordered_json& j, const BenchSolveOptions& opt) {
  const auto d = nlohmann::ordered_json::parse(opt.depth.to_json(BenchSolveOptions::kBenchDepth));
  for (auto it = d.begin(); it != d.end(); ++it) j[it.key()] = it.value();
}

Model<float> bench_model(const BenchSolveOptions& opt, const ModelConfig& cfg) {
  Model<float> m = opt.model_path.empty() ? Model<float>(cfg) : load_model<float>(opt.model_path);
  if (opt.model_path.empty()) m.init(1234);
  m.set_device(resolve_device(opt.device));
  return m;
}

// Tokens (or targets: the next token, the last position ignored) of the benchmark.
TokenBatch bench_tokens(const BenchSolveOptions& opt, const BenchSize& bs, const ModelConfig& cfg,
                        const std::string& key) {
  TokenBatch tb;
  if (!opt.tokens_path.empty()) {
    tb = read_token_file(opt.tokens_path, key);
  } else {
    TokenBatch tok;
    tok.B = bs.B;
    tok.T = bs.T;
    Rng rng(42);
    for (int i = 0; i < bs.B * bs.T; ++i) tok.data.push_back(static_cast<int32_t>(rng.next() % cfg.vocab_size));
    tb = tok;
    if (key == "targets")
      for (int b = 0; b < tok.B; ++b)
        for (int t = 0; t < tok.T; ++t)
          tb.data[static_cast<size_t>(b) * tok.T + t] = t + 1 < tok.T ? tok.data[static_cast<size_t>(b) * tok.T + t + 1] : -1;
  }
  tb.check(cfg, key, key == "targets");
  return tb;
}

SolveOptions bench_solve_options(const BenchSolveOptions& opt) {
  if (!opt.depth.ode()) throw Error("bench solve: give --solver (and --solver-steps or tolerances)");
  return opt.depth.solve_options(BenchSolveOptions::kBenchDepth);
}
}  // namespace

std::string bench_solve(const BenchSolveOptions& opt) {
  const BenchSize bs = bench_size(opt.size);
  set_num_threads(opt.threads);
  const ModelConfig cfg = bench_config(bs);
  Model<float> model = bench_model(opt, cfg);
  const TokenBatch tokens = bench_tokens(opt, bs, model.cfg, "tokens");
  const SolveOptions so = bench_solve_options(opt);
  const size_t NC = static_cast<size_t>(tokens.B) * tokens.T * model.cfg.d_model;
  Buffer<float> h0(NC), h(NC);
  model.embed(h0.data(), tokens);
  FieldSystem<float> fs(model.field, model.field_params(), tokens.B, tokens.T, model.device_field());
  double field_ms = 0.0;
  TimedSystem<float> sys(fs, field_ms);
  SolveResult<float> r;
  std::vector<double> total, inside, over;
  // On the CPU one timed solve gives both the total and the field's share. On a device
  // the solve is resident (FieldSystem::solve) and untimed; the field's share comes from
  // a second solve whose evaluations are waited for one by one.
  const bool device = model.device() != Device::cpu;
  auto once = [&] {
    h = h0;
    field_ms = 0.0;
    double t0 = now_ms();
    r = device ? fs.solve(h.data(), so) : integrate(sys, h.data(), so);
    double t = now_ms() - t0;
    total.push_back(t);
    if (device) {
      h = h0;
      t0 = now_ms();
      fs.solve(h.data(), so, &sys);
      t = now_ms() - t0;
    }
    inside.push_back(field_ms);
    over.push_back((t - field_ms) / t);
  };
  once();  // warm-up
  total.clear();
  inside.clear();
  over.clear();
  const double start = now_ms();
  while (static_cast<int>(total.size()) < opt.min_reps || now_ms() - start < 1000.0 * opt.min_seconds) {
    once();
    if (total.size() >= 1000) break;
  }
  const double ms = median(total);
  nlohmann::ordered_json j;
  j["bench"] = "solve";
  j["device"] = device_name(model.device());
  j["size"] = opt.size;
  j["B"] = tokens.B;
  j["T"] = tokens.T;
  describe_solve(j, opt);
  j["threads"] = num_threads();
  j["reps"] = total.size();
  j["status"] = status_name(r.status);
  j["nfe"] = r.nfe;
  j["calls"] = r.calls;
  j["seq_evals"] = r.seq_evals;
  j["steps"] = r.steps;
  j["accepted"] = r.accepted;
  j["rejected"] = r.rejected;
  j["ms"] = ms;
  j["field_ms"] = median(inside);
  j["overhead"] = median(over);
  j["gflops"] = model.field.flops(tokens.B, tokens.T) * static_cast<double>(r.seq_evals) / tokens.B / (ms * 1e6);
  double norm = 0;
  for (float x : h) norm += static_cast<double>(x) * x;
  j["h_norm"] = std::sqrt(norm);
  return j.dump();
}

std::vector<std::string> bench_wp(const BenchWpOptions& opt) {
  const BenchSize bs = bench_size(opt.size);
  set_num_threads(opt.threads);
  const ModelConfig cfg = bench_config(bs);
  Model<float> model = bench_model(opt, cfg);
  const TokenBatch tokens = bench_tokens(opt, bs, model.cfg, "tokens");
  if (opt.solvers.empty() || opt.rtols.empty()) throw Error("bench wp: no solver or no tolerance");
  for (const auto& m : opt.solvers)
    if (!method_is_adaptive(m)) throw Error("bench wp: '" + m + "' has no error estimate (an adaptive method is needed)");
  for (double r : opt.rtols)
    if (!(r > 0) || !std::isfinite(r)) throw Error("bench wp: tolerance " + std::to_string(r) + " is not positive");
  const int B = tokens.B;
  const size_t NC = static_cast<size_t>(B) * tokens.T * model.cfg.d_model, n = NC / static_cast<size_t>(B);
  // the reference: the same weights in double, dopri5 at reference_rtol
  Model<double> md(model.cfg);
  std::copy(model.params.begin(), model.params.end(), md.params.begin());
  Buffer<double> ref(NC);
  md.embed(ref.data(), tokens);
  DepthSpec rd = opt.depth;
  rd.solver = "dopri5";
  rd.steps = 0;
  rd.rtol = opt.reference_rtol;
  rd.atol = opt.reference_rtol / 100;
  rd.coupled = false;
  SolveOptions rso = rd.solve_options(BenchSolveOptions::kBenchDepth);
  rso.max_steps = std::max<int64_t>(rso.max_steps, 1000000);
  FieldSystem<double> rsys(md.field, md.field_params(), B, tokens.T);
  const double r0 = now_ms();
  const SolveResult<double> rr = integrate(rsys, ref.data(), rso);
  const double ref_ms = now_ms() - r0;
  if (!rr.ok()) throw Error("bench wp: the reference solve failed: " + rr.message);
  if (!opt.reference_out.empty())
    write_safetensors<double>(opt.reference_out,
                              {{"h_t1", {B, tokens.T, static_cast<int64_t>(model.cfg.d_model)}, ref.data()}},
                              {{"format", "flowloop-wp-reference"}, {"rtol", std::to_string(rd.rtol)},
                               {"t1", std::to_string(rso.t1)}});
  std::vector<std::string> out;
  nlohmann::ordered_json head;
  head["bench"] = "wp";
  head["size"] = opt.size;
  head["B"] = B;
  head["T"] = tokens.T;
  head["threads"] = num_threads();
  head["solver"] = "reference";
  head["rtol"] = rd.rtol;
  head["atol"] = rd.atol;
  head["t1"] = rso.t1;
  head["nfe"] = rr.nfe;
  head["ms"] = ref_ms;
  head["precision"] = "double";
  out.push_back(head.dump());
  double ref_norm = 0;
  for (double v : ref) ref_norm += v * v;
  ref_norm = std::sqrt(ref_norm);

  Buffer<float> h0(NC), h(NC);
  model.embed(h0.data(), tokens);
  FieldSystem<float> sys(model.field, model.field_params(), B, tokens.T, model.device_field());
  for (const auto& method : opt.solvers)
    for (double rtol : opt.rtols) {
      DepthSpec d = opt.depth;
      d.solver = method;
      d.steps = 0;
      d.rtol = rtol;
      d.atol = rtol / 10;
      const SolveOptions so = d.solve_options(BenchSolveOptions::kBenchDepth);
      SolveResult<float> r;
      std::vector<double> ms;
      const double start = now_ms();
      while (static_cast<int>(ms.size()) < opt.min_reps || now_ms() - start < 1000.0 * opt.min_seconds) {
        h = h0;
        const double t0 = now_ms();
        r = sys.solve(h.data(), so);
        ms.push_back(now_ms() - t0);
        if (!r.ok() || ms.size() >= 1000) break;
      }
      double err = 0, err_max = 0;
      for (int b = 0; b < B; ++b) {
        double e = 0, nr = 0;
        for (size_t i = static_cast<size_t>(b) * n; i < static_cast<size_t>(b + 1) * n; ++i) {
          const double dlt = static_cast<double>(h[i]) - ref[i];
          e += dlt * dlt;
          nr += ref[i] * ref[i];
        }
        err += e;
        err_max = std::max(err_max, std::sqrt(e / std::max(nr, 1e-300)));
      }
      nlohmann::ordered_json j;
      j["bench"] = "wp";
      j["device"] = device_name(model.device());
      j["size"] = opt.size;
      j["solver"] = method;
      j["rtol"] = rtol;
      j["atol"] = d.atol;
      j["controller"] = d.controller.empty() ? "pi" : d.controller;
      j["coupled"] = d.coupled;
      j["status"] = status_name(r.status);
      j["error"] = std::sqrt(err) / ref_norm;
      j["error_max"] = err_max;
      j["nfe"] = r.nfe;
      j["seq_evals"] = r.seq_evals;
      j["steps"] = r.steps;
      j["rejected"] = r.rejected;
      j["reps"] = ms.size();
      j["ms"] = median(ms);
      out.push_back(j.dump());
    }
  return out;
}

std::string bench_train(const BenchTrainOptions& opt) {
  const BenchSize bs = bench_size(opt.size);
  set_num_threads(opt.threads);
  Model<float> model = bench_model(opt, bench_config(bs));
  const TokenBatch tokens = bench_tokens(opt, bs, model.cfg, "tokens");
  const TokenBatch targets = bench_tokens(opt, bs, model.cfg, "targets");
  opt.depth.validate();
  const int loops = opt.depth.ode() ? 0 : opt.depth.loop_count(static_cast<int>(BenchSolveOptions::kBenchDepth));
  SolveOptions so;
  GradOptions go;
  if (loops <= 0) {
    so = bench_solve_options(opt);
    go.method = grad_method(opt.grad);
    go.seminorm = opt.seminorm;
  }
  Buffer<float> grads(model.params.size());
  const OptimConfig tc;  // AdamW's defaults
  AdamW adamw(model.layout, tc);
  adamw.set_backend(model.backend());  // on a device, the update runs there (as the trainer's)
  GradStats st;
  float loss = 0;
  size_t peak = 0;
  std::vector<double> times;
  LoopWork<float> lw;  // sized once, reused by every step (as the trainer does)
  OdeWork<float> ow;
  size_t ws_bytes = 0;   // what the warm-up step left allocated in the workspaces
  bool warm = false;
  auto once = [&] {
    std::fill(grads.begin(), grads.end(), 0.0f);
    const double t0 = now_ms();
    // Peak memory as if the workspaces were allocated by this step.
    const size_t base = MemoryStats::current() - ws_bytes;
    MemoryStats::reset_peak();
    if (loops > 0) {
      loss = model.loop_loss_and_grad(tokens, targets, loops, grads.data(), lw);
      st.nfe_forward = st.nfe_backward = loops;
    } else {
      loss = model.ode_loss_and_grad(tokens, targets, so, go, grads.data(), st, ow);
      if (!st.ok()) throw Error("bench train: " + st.message);
    }
    peak = std::max(peak, MemoryStats::peak() - base);
    if (!warm) ws_bytes = MemoryStats::current() - base;
    warm = true;
    if (opt.adamw) adamw.step(model.params.data(), grads.data(), 1e-6);
    times.push_back(now_ms() - t0);
  };
  once();  // warm-up
  times.clear();
  const double start = now_ms();
  while (static_cast<int>(times.size()) < opt.min_reps || now_ms() - start < 1000.0 * opt.min_seconds) {
    once();
    if (times.size() >= 1000) break;
  }
  nlohmann::ordered_json j;
  j["bench"] = "train";
  j["device"] = device_name(model.device());
  j["size"] = opt.size;
  j["B"] = tokens.B;
  j["T"] = tokens.T;
  describe_solve(j, opt);
  if (loops <= 0) {
    j["grad"] = opt.grad;
  }
  j["threads"] = num_threads();
  j["adamw"] = opt.adamw;
  j["reps"] = times.size();
  j["ms"] = median(times);
  j["tokens_per_s"] = static_cast<double>(tokens.B) * tokens.T / (median(times) / 1000.0);
  j["loss"] = loss;
  j["nfe_forward"] = st.nfe_forward;
  j["nfe_backward"] = st.nfe_backward;
  j["vjp_calls"] = loops > 0 ? loops : st.vjp_calls;
  j["peak_bytes"] = peak;
  return j.dump();
}

std::string bench_flow_match(const BenchFlowMatchOptions& opt) {
  const BenchSize bs = bench_size(opt.size);
  set_num_threads(opt.threads);
  const ModelConfig cfg = bench_config(bs);
  Model<float> model(cfg);
  model.init(1234);
  const Model<float> student = make_student(model, 256, 1000.0, 1234);
  Model<float> smodel = student;
  const int B = bs.B, T = bs.T, C = bs.C;
  const size_t n = static_cast<size_t>(T) * C;
  Rng rng(42);
  TokenBatch tokens, targets;
  tokens.B = targets.B = B;
  tokens.T = targets.T = T;
  for (int i = 0; i < B * T; ++i) {
    tokens.data.push_back(static_cast<int32_t>(rng.next() % bs.V));
    targets.data.push_back(static_cast<int32_t>(rng.next() % bs.V));
  }
  // recordings h_0 (the embedding) and h_1 (one loop) per sequence
  LoopWork<float> lw;
  model.loop_forward(tokens, 1, lw);
  std::vector<float> states(static_cast<size_t>(B) * 2 * n);
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < 2; ++k)
      std::copy_n(lw.h.data() + (static_cast<size_t>(k) * B + b) * n, n, states.data() + (static_cast<size_t>(b) * 2 + k) * n);
  const OptimConfig tc;  // AdamW's defaults
  AdamW loop_opt(model.layout, tc);
  AdamW fm_opt(smodel.layout, tc, smodel.layout.field_begin(), smodel.layout.field_end());
  Buffer<float> grads(model.params.size()), sgrads(smodel.params.size());
  FlowMatchWork<float> fw;
  FlowMatchOptions fo;
  int64_t step = 0;
  auto run_loop = [&] {
    std::fill(grads.begin(), grads.end(), 0.0f);
    model.loop_loss_and_grad(tokens, targets, 1, grads.data(), lw);
    loop_opt.step(model.params.data(), grads.data(), 1e-6);
  };
  auto run_fm = [&] {
    const size_t fb = smodel.layout.field_begin(), fe = smodel.layout.field_end();
    std::fill(sgrads.begin() + static_cast<long>(fb), sgrads.begin() + static_cast<long>(fe), 0.0f);
    Rng r(static_cast<uint64_t>(++step));
    flow_match_step(smodel.field, smodel.field_params(), states.data(), B, 1, T, fo, r, sgrads.data() + fb, fw);
    fm_opt.step(smodel.params.data(), sgrads.data(), 1e-6);
  };
  // the exact coupling of ot_batch recordings
  const int nb = opt.ot_batch;
  std::vector<float> xa(static_cast<size_t>(nb) * n), xb(xa.size());
  for (auto& x : xa) x = static_cast<float>(rng.normal());
  for (auto& x : xb) x = static_cast<float>(rng.normal());
  std::vector<double> cost;
  auto run_cost = [&] { cost = squared_distances(xa.data(), nb, xb.data(), nb, n); };
  run_cost();
  volatile int sink = 0;
  auto run_assign = [&] { sink = sink + optimal_assignment(cost, nb)[0]; };
  auto run_sinkhorn = [&] { sink = sink + static_cast<int>(sinkhorn_plan(cost, nb, nb, 0.05)[0] > 0); };
  std::vector<std::function<void()>> jobs = {run_loop, run_fm, run_cost, run_assign, run_sinkhorn};
  std::vector<std::vector<double>> times(jobs.size());
  for (auto& j : jobs) j();  // warm-up
  const double start = now_ms();
  while (static_cast<int>(times[0].size()) < opt.min_reps || now_ms() - start < 1000.0 * opt.min_seconds) {
    for (size_t k = 0; k < jobs.size(); ++k) {
      const double t0 = now_ms();
      jobs[k]();
      times[k].push_back(now_ms() - t0);
    }
    if (times[0].size() >= 1000) break;
  }
  nlohmann::ordered_json j;
  j["bench"] = "flow-match";
  j["size"] = opt.size;
  j["B"] = B;
  j["T"] = T;
  j["C"] = C;
  j["threads"] = num_threads();
  j["reps"] = times[0].size();
  j["loop1_ms"] = median(times[0]);
  j["fm_ms"] = median(times[1]);
  j["ratio"] = median(times[1]) / median(times[0]);
  j["ot_batch"] = nb;
  j["ot_dim"] = n;
  j["ot_cost_ms"] = median(times[2]);
  j["ot_assign_ms"] = median(times[3]);
  j["sinkhorn_ms"] = median(times[4]);
  return j.dump();
}

}  // namespace flowloop
