#include "flowloop/train/train.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "flowloop/ode/algebra.hpp"
#include "flowloop/backend/backend.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/nn/layers.hpp"

namespace flowloop {

using nlohmann::json;

// ---------------------------------------------------------------- config

namespace {
// The spec `base` with its method replaced by `method`: a fixed-step method drops
// the options that only an adaptive solve takes.
DepthSpec with_method(const DepthSpec& base, const std::string& method) {
  DepthSpec d = base;
  d.solver = method;
  if (!method_is_adaptive(method) || base.steps > 0) {
    d.rtol = d.atol = std::numeric_limits<double>::quiet_NaN();
    d.controller.clear();
    d.initial_norm.clear();
    d.h0 = 0;
    d.max_steps = 0;
    d.coupled = false;
  }
  return d;
}

}  // namespace

#define FLOWLOOP_TRAIN_FIELDS(X)                                                                      \
  X(task) X(task_n) X(task_hops) X(task_prime) X(text) X(context) X(d_model) X(n_head) X(n_block) X(d_ff) X(time_cond) X(time_freq) \
  X(time_scale)                                                                                        \
  X(exit_gate) X(gate_beta) X(random_depth_mean) X(backprop_loops) X(random_steps_min) X(random_steps_max)   \
  X(random_solvers) X(t1_jitter) X(init_from) X(grad) X(kinetic) X(jacobian) X(steps)                        \
  X(batch) X(warmup) X(lr) X(min_lr) X(weight_decay) X(beta1) X(beta2) X(eps) X(clip) X(eval_every)       \
  X(eval_batches) X(checkpoint_every) X(max_seconds) X(seed) X(out)

// The depth spec's JSON keys and members.
#define FLOWLOOP_DEPTH_FIELDS(X)                                                                      \
  X(loops, depth.loops) X(solver, depth.solver) X(solver_steps, depth.steps) X(rtol, depth.rtol)       \
  X(atol, depth.atol) X(t1, depth.t1) X(controller, depth.controller) X(initial_norm, depth.initial_norm) \
  X(h0, depth.h0) X(solver_max_steps, depth.max_steps) X(batch_coupled, depth.coupled)                 \
  X(exit_threshold, depth.exit_threshold)

TrainConfig TrainConfig::from_json(const std::string& text, const std::string& where) {
  static const std::vector<std::string> known = {
#define X(name) #name,
      FLOWLOOP_TRAIN_FIELDS(X)
#undef X
#define X(key, member) #key,
      FLOWLOOP_DEPTH_FIELDS(X)
#undef X
  };
  const json j = parse_json_object(text, where, known);
  TrainConfig c;
#define X(name) json_field(j, #name, c.name, where);
  FLOWLOOP_TRAIN_FIELDS(X)
#undef X
#define X(key, member) json_field(j, #key, c.member, where);
  FLOWLOOP_DEPTH_FIELDS(X)
#undef X
  // Configurations written before the depth spec (every key but initial_norm) said
  // "not given" with 0 and always wrote the pi controller: read them as they meant it.
  if (j.contains("solver_max_steps") && j.contains("controller") && !j.contains("initial_norm")) {
    DepthSpec& d = c.depth;
    if (d.rtol == 0 && d.atol == 0) d.rtol = d.atol = std::numeric_limits<double>::quiet_NaN();
    if (d.t1 == 0) d.t1 = std::numeric_limits<double>::quiet_NaN();
    if (d.controller == "pi") d.controller.clear();
  }
  return c;
}

std::string TrainConfig::to_json() const {
  nlohmann::ordered_json j;
#define X(name) j[#name] = name;
  FLOWLOOP_TRAIN_FIELDS(X)
#undef X
#define X(key, member) j[#key] = member;
  FLOWLOOP_DEPTH_FIELDS(X)
#undef X
  return j.dump(2);
}

void TrainConfig::validate() const {
  auto fail = [](const std::string& m) { return Error("train config: " + m); };
  if (task.empty() == text.empty()) throw fail("give exactly one of task and text");
  if (!task.empty()) make_task({task, seed, task_n, task_hops, task_prime});
  depth.validate();
  const bool ode = depth.ode();
  if (!ode && depth.loops <= 0) throw fail("give loops > 0 or a solver");
  if (exit_gate && ode) throw fail("exit_gate needs loops > 0");
  if (!(gate_beta >= 0)) throw fail("gate_beta must be >= 0");
  if (!(random_depth_mean >= 0) || random_depth_mean > 64) throw fail("random_depth_mean must be in [0, 64]");
  if (random_depth_mean > 0 && (ode || exit_gate)) throw fail("random depth needs loops (for evaluation) and no exit gate");
  if (backprop_loops <= 0) throw fail("backprop_loops must be positive");
  if (random_steps_max > 0 || !random_solvers.empty() || t1_jitter != 0) {
    if (!ode) throw fail("random_steps, random_solvers and t1_jitter randomise an ODE solve: give a solver");
  }
  if (random_steps_max != 0 && (random_steps_min < 1 || random_steps_max < random_steps_min))
    throw fail("random steps need 1 <= random_steps_min <= random_steps_max");
  if (random_steps_max > 0 && (depth.adaptive() && random_solvers.empty()))
    throw fail("random steps need a fixed-step solver (or random_solvers), not tolerances");
  if (random_steps_max > 0 && depth.steps > 0) throw fail("give solver_steps or random steps, not both");
  for (const auto& m : split_list(random_solvers)) with_method(depth, m).validate();  // names an unknown method
  if (!(t1_jitter >= 0 && t1_jitter < depth.end_time(kDefaultTrainDepth)))
    throw fail("t1_jitter must be in [0, t1)");
  if (ode) {
    solve_options(0).validate();
    grad_method(grad);
  }
  if (!(kinetic >= 0) || !(jacobian >= 0) || !std::isfinite(kinetic) || !std::isfinite(jacobian))
    throw fail("kinetic and jacobian must be finite and >= 0");
  if ((kinetic > 0 || jacobian > 0) && !ode) throw fail("kinetic and jacobian regularise ODE depth: give a solver");
  if (d_model <= 0 || n_head <= 0 || n_block <= 0 || d_model % n_head) throw fail("d_model must be a positive multiple of n_head");
  if (steps <= 0 || batch <= 0) throw fail("steps and batch must be positive");
  if (warmup < 0 || !(lr > 0) || !(min_lr >= 0) || min_lr > lr) throw fail("need lr > 0, 0 <= min_lr <= lr, warmup >= 0");
  if (!(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1 && eps > 0 && weight_decay >= 0 && clip >= 0))
    throw fail("AdamW settings out of range");
  if (!(max_seconds >= 0) || !std::isfinite(max_seconds)) throw fail("max_seconds must be finite and >= 0");
  if (eval_every <= 0 || eval_batches <= 0 || checkpoint_every <= 0) throw fail("eval_every, eval_batches and checkpoint_every must be positive");
  if (out.empty()) throw fail("no output directory (out)");
  if (time_freq <= 0 || time_freq % 2 != 0) throw fail("time_freq must be positive and even");
  if (!(time_scale >= 0) || !std::isfinite(time_scale)) throw fail("time_scale must be finite and >= 0 (0: 1000 / depth)");
}

GradOptions TrainConfig::grad_options(int64_t step) const {
  GradOptions g;
  g.method = grad_method(grad);
  g.kinetic = kinetic;
  g.jacobian = jacobian;
  g.noise_seed = seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(step) + 1;
  return g;
}

int TrainConfig::trained_depth() const {
  return depth.ode() ? static_cast<int>(std::lround(depth.end_time(kDefaultTrainDepth))) : depth.loops;
}

SolveOptions TrainConfig::solve_options(int64_t step) const {
  if (!randomized()) return depth.solve_options(kDefaultTrainDepth);
  // the step's discretisation: a function of (seed, step) alone
  Rng rng(seed * 0xbf58476d1ce4e5b9ULL + static_cast<uint64_t>(step) * 0x94d049bb133111ebULL + 0x6f6465);
  const auto methods = split_list(random_solvers);
  DepthSpec d = methods.empty()
                    ? depth
                    : with_method(depth, methods[static_cast<size_t>(rng.uniform() * static_cast<double>(methods.size()))]);
  if (random_steps_max > 0 && !d.adaptive())
    d.steps = random_steps_min + static_cast<int>(rng.uniform() * (random_steps_max - random_steps_min + 1));
  const double T1 = depth.end_time(kDefaultTrainDepth);
  d.t1 = t1_jitter > 0 ? T1 + t1_jitter * (2.0 * rng.uniform() - 1.0) : T1;
  return d.solve_options(kDefaultTrainDepth);
}

int random_depth(double mean, uint64_t seed, int64_t step) {
  Rng rng(seed * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(step) * 0xd1b54a32d192ed03ULL + 0x68756769);
  const double s = 0.5;
  const double tau = std::exp(std::log(mean) - 0.5 * s * s + s * rng.normal());
  // Poisson(tau) by Knuth's product of uniforms (tau is small)
  const double limit = std::exp(-tau);
  int k = 0;
  double prod = rng.uniform();
  while (prod > limit && k < 1000) {
    ++k;
    prod *= rng.uniform();
  }
  return k + 1;
}

double learning_rate(const TrainConfig& c, int64_t step) {
  if (step < c.warmup) return c.lr * static_cast<double>(step + 1) / c.warmup;
  const double span = static_cast<double>(std::max(1, c.steps - c.warmup));
  const double prog = std::min(1.0, static_cast<double>(step - c.warmup) / span);
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + std::cos(M_PI * prog));
}

// ---------------------------------------------------------------- AdamW

AdamW::AdamW(const ParamLayout& layout, const TrainConfig& c, size_t begin, size_t end)
    : begin_(begin), b1_(c.beta1), b2_(c.beta2), eps_(c.eps), clip_(c.clip) {
  end = std::min(end, layout.size());
  if (begin >= end) throw Error("AdamW: an empty parameter range");
  m.assign(end - begin, 0.0f);
  v.assign(end - begin, 0.0f);
  wd_.assign(end - begin, 0.0f);
  for (const auto& ti : layout.tensors()) {
    if (ti.shape.size() != 2) continue;
    const size_t lo = std::max(begin, ti.offset), hi = std::min(end, ti.offset + ti.numel);
    if (lo < hi)
      std::fill(wd_.begin() + static_cast<long>(lo - begin), wd_.begin() + static_cast<long>(hi - begin),
                static_cast<float>(c.weight_decay));
  }
}

kernels::AdamWStep AdamW::constants(double lr) const {
  // p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p), with the bias corrections folded into constants
  const double c1 = 1 - std::pow(b1_, static_cast<double>(t)), c2 = 1 - std::pow(b2_, static_cast<double>(t));
  kernels::AdamWStep s{};
  s.b1 = static_cast<float>(b1_);
  s.b2 = static_cast<float>(b2_);
  s.ob1 = 1 - s.b1;
  s.ob2 = 1 - s.b2;
  s.ic1 = static_cast<float>(1 / c1);
  s.isc2 = static_cast<float>(1 / std::sqrt(c2));
  s.lr = static_cast<float>(lr);
  s.eps = static_cast<float>(eps_);
  return s;
}

double AdamW::step(float* params, float* grads, double lr) {
  const size_t n = m.size();
  float* p = params + begin_;
  float* g = grads + begin_;
  if (be_) {  // on the device: the gradients go up, the parameters come down
    prepare(params);
    if (!reduced_) gather(g);
    reduced_ = false;
    double ss = 0;
    be_->sum_squares_rows(norm_.data(), gd_.data(), nullptr, 1, n);
    norm_.download(&ss, 1);
    const double norm = std::sqrt(ss);
    if (clip_ > 0 && norm > clip_) {
      const float sc = static_cast<float>(clip_ / norm);
      be_->strided_copy(gd_.data(), n, gd_.data(), n, 1, n, sc);
      for (size_t i = 0; i < n; ++i) g[i] *= sc;  // the caller's gradients are clipped too
    }
    ++t;
    be_->adamw(pd_.data(), md_.data(), vd_.data(), gd_.data(), wdd_.data(), n, constants(lr));
    pd_.download(p, n);
    host_stale_ = true;
    return norm;
  }
  double ss = 0;  // in order (the CPU's bits as before the device path)
  for (size_t i = 0; i < n; ++i) ss += static_cast<double>(g[i]) * g[i];
  const double norm = std::sqrt(ss);
  if (clip_ > 0 && norm > clip_) {
    const float sc = static_cast<float>(clip_ / norm);
    for (size_t i = 0; i < n; ++i) g[i] *= sc;
  }
  ++t;
  const kernels::AdamWStep st = constants(lr);
  float* mm = m.data();
  float* vv = v.data();
  const float* wd = wd_.data();
#pragma omp parallel for schedule(static) if (n >= static_cast<size_t>(kParallelMin) * 4)
  for (size_t i = 0; i < n; ++i) kernels::adamw_update(p[i], mm[i], vv[i], g[i], wd[i], st);
  return norm;
}

void AdamW::gather(const float* g) {
  const size_t n = m.size();
  gd_.upload(g, n);
  be_->axpy(gd_.data(), 1.0f, acc_.data(), n);  // what stayed on the device (1 x: the same bits)
  acc_.zero();
}

void AdamW::reduce(float* grads, float scale, Communicator& comm) {
  const size_t n = m.size();
  float* g = grads + begin_;
  if (!be_) {
    if (scale != 1.0f)
      for (size_t i = 0; i < n; ++i) g[i] *= scale;
    comm.sum(g, n);
    return;
  }
  gather(g);
  if (scale != 1.0f) be_->strided_copy(gd_.data(), n, gd_.data(), n, 1, n, scale);
  comm.sum_device(*be_, gd_.data(), n);
  reduced_ = true;
}

void AdamW::set_backend(std::shared_ptr<Backend<float>> be) {
  sync_host();
  for (Array<float>* a : {&pd_, &md_, &vd_, &wdd_, &gd_, &acc_}) *a = Array<float>();  // freed by their backend,
  norm_ = Array<float, double>();                                                   // still alive here
  be_ = std::move(be);
  dev_fresh_ = false;
  reduced_ = false;
  if (!be_) return;
  const size_t n = m.size();
  for (Array<float>* a : {&pd_, &md_, &vd_, &wdd_, &gd_, &acc_}) a->resize(*be_, n);
  acc_.zero();
  norm_.resize(*be_, 1);
}

void AdamW::prepare(const float* params) {
  if (!be_ || dev_fresh_) return;
  const size_t n = m.size();
  pd_.upload(params + begin_, n);
  md_.upload(m.data(), n);
  vd_.upload(v.data(), n);
  wdd_.upload(wd_.data(), n);
  dev_fresh_ = true;
}

void AdamW::sync_host() {
  if (!be_ || !host_stale_) return;
  md_.download(m.data(), m.size());
  vd_.download(v.data(), v.size());
  host_stale_ = false;
}

// ---------------------------------------------------------------- data, evaluation

std::unique_ptr<DataSource> make_source(const TrainConfig& c) {
  if (!c.task.empty()) return make_task({c.task, c.seed, c.task_n, c.task_hops, c.task_prime});
  return make_text_source(c.text, c.context, c.seed);
}

void require_fits(const ModelConfig& model, const DataSource& data, const std::string& what) {
  if (model.vocab_size != data.vocab_size() || model.context < data.seq_len())
    throw Error(what + " does not fit the model (data: vocabulary " + std::to_string(data.vocab_size()) + ", length " +
                std::to_string(data.seq_len()) + "; model: vocabulary " + std::to_string(model.vocab_size) +
                ", context " + std::to_string(model.context) + ")");
}

double accuracy(const float* logits, const TokenBatch& targets, int V, bool exact_match, int64_t* count) {
  int64_t right = 0, total = 0;
  for (int b = 0; b < targets.B; ++b) {
    bool row_ok = true, any = false;
    for (int t = 0; t < targets.T; ++t) {
      const int32_t tgt = targets.data[static_cast<size_t>(b) * targets.T + t];
      if (tgt < 0) continue;
      const float* l = logits + (static_cast<size_t>(b) * targets.T + t) * V;
      const bool ok = std::max_element(l, l + V) - l == tgt;
      any = true;
      row_ok = row_ok && ok;
      if (!exact_match) {
        right += ok;
        ++total;
      }
    }
    if (exact_match && any) {
      right += row_ok;
      ++total;
    }
  }
  if (count) *count = total;
  return total ? static_cast<double>(right) / static_cast<double>(total) : 0.0;
}

double train_step_flops(const Model<float>& model, int B, int T, double nfe_forward, double nfe_backward) {
  const double readout = 2.0 * B * T * model.cfg.d_model * model.cfg.vocab_size;
  return model.field.flops(B, T) * (nfe_forward + 2.0 * nfe_backward) + 3.0 * readout;
}

std::string EvalResult::status() const {
  for (int k = 4; k >= 2; --k)
    if (status_counts[static_cast<size_t>(k)] > 0) return status_name(static_cast<SolveStatus>(k));
  return "ok";
}

void EvalResult::require_ok() const {
  if (!ok()) throw Error("evaluation solve failed: " + message);
}

EvalResult evaluate(const Model<float>& model, const DataSource& data, const DepthSpec& spec, int batches,
                    int batch_size, const std::string& exit_rule, double exit_threshold) {
  spec.validate();
  const bool ode = spec.ode();
  const int K = spec.loop_count(model.cfg.depth);
  if (!exit_rule.empty() && ode) throw Error("evaluate: the exit rules '" + exit_rule + "' apply to looping, not to a solve");
  const SolveOptions so = ode ? spec.solve_options(model.cfg.depth) : SolveOptions{};
  const auto start = std::chrono::steady_clock::now();
  EvalResult r;
  double loss = 0, right = 0;
  TokenBatch tok, tgt;
  // workspaces sized by the first batch and reused by the others
  LoopWork<float> w;
  Buffer<float> h, exit_logits;
  ReadoutCache<float> rc;
  std::vector<int> depth;
  std::vector<int64_t> seq_nfe;  // every test sequence's evaluations
  for (int i = 0; i < batches; ++i) {
    data.batch(Split::Test, static_cast<uint64_t>(i), batch_size, tok, tgt);
    const Buffer<float>* logits;
    if (!ode && !exit_rule.empty()) {
      model.loop_exit(tok, K, exit_rule, exit_threshold, exit_logits, depth, w);
      r.nfe += K;
      double sum = 0;
      for (int d : depth) sum += d;
      r.exit_depth += sum / static_cast<double>(depth.size());
      logits = &exit_logits;
      seq_nfe.insert(seq_nfe.end(), static_cast<size_t>(tok.B), K);
      r.status_counts[0] += tok.B;
    } else if (!ode) {
      const int n = model.loop_forward(tok, K, w);
      r.nfe += n;
      logits = &w.readout.logits;
      seq_nfe.insert(seq_nfe.end(), static_cast<size_t>(tok.B), n);
      r.status_counts[0] += tok.B;
    } else {
      const auto sr = model.ode_forward(tok, so, h, rc);
      if (!sr.ok() && r.message.empty()) r.message = sr.message;
      r.nfe += static_cast<double>(sr.nfe);
      logits = &rc.logits;
      if (sr.seq.size() == static_cast<size_t>(tok.B)) {
        for (const auto& q : sr.seq) {
          seq_nfe.push_back(q.nfe);
          ++r.status_counts[static_cast<size_t>(q.status)];
        }
      } else {  // one shared solve
        seq_nfe.insert(seq_nfe.end(), static_cast<size_t>(tok.B), sr.nfe);
        r.status_counts[static_cast<size_t>(sr.status)] += tok.B;
      }
    }
    loss += crossentropy_forward_backward<float>(nullptr, logits->data(), tgt.data.data(), tok.B * tok.T,
                                                 model.cfg.vocab_size);
    int64_t n = 0;
    const double acc = accuracy(logits->data(), tgt, model.cfg.vocab_size, data.exact_match(), &n);
    right += acc * static_cast<double>(n);
    r.examples += n;
  }
  r.loss = loss / batches;
  r.accuracy = r.examples ? right / static_cast<double>(r.examples) : 0.0;
  r.nfe /= batches;
  r.exit_depth /= batches;
  r.sequences = static_cast<int64_t>(seq_nfe.size());
  if (!seq_nfe.empty()) {
    std::sort(seq_nfe.begin(), seq_nfe.end());
    double sum = 0;
    for (int64_t v : seq_nfe) sum += static_cast<double>(v);
    r.seq_evals = static_cast<int64_t>(sum);
    r.nfe_mean = sum / static_cast<double>(seq_nfe.size());
    // nearest-rank percentiles
    auto pct = [&](double p) {
      const size_t k = static_cast<size_t>(std::ceil(p * static_cast<double>(seq_nfe.size())));
      return static_cast<double>(seq_nfe[std::min(seq_nfe.size(), std::max<size_t>(k, 1)) - 1]);
    };
    r.nfe_p50 = pct(0.5);
    r.nfe_p90 = pct(0.9);
    r.nfe_max = static_cast<double>(seq_nfe.back());
  }
  r.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

// ---------------------------------------------------------------- trainer

void require_writable(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error("output directory '" + dir + "' is not writable (it cannot be created: " + ec.message() + ")");
  const std::string probe = (fs::path(dir) / ".flowloop-probe").string();
  try {
    write_file_atomic(probe, std::string("probe"));
  } catch (const Error& e) {
    throw Error("output directory '" + dir + "' is not writable: " + e.what());
  }
  fs::remove(probe, ec);
}

void start_metrics(const std::string& metrics_file, bool resume, int64_t step) {
  std::string kept;
  if (resume) {
    std::ifstream in(metrics_file);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      const auto j = json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.value("step", int64_t{0}) <= step) kept += line + "\n";
    }
  }
  write_file_atomic(metrics_file, kept);
}

std::string progress_line(int64_t step, int64_t total, int64_t first, double wall, double loss, double acc) {
  const double per = step > first ? wall / static_cast<double>(step - first) : 0.0;
  const double eta = per * static_cast<double>(total - step);
  const int width = 30, done = total > 0 ? static_cast<int>(width * step / total) : width;
  char buf[256];
  int k = std::snprintf(buf, sizeof buf, "\r[%.*s%.*s] %lld/%lld loss %.4g", done, "##############################",
                        width - done, "..............................", static_cast<long long>(step),
                        static_cast<long long>(total), loss);
  if (acc >= 0) k += std::snprintf(buf + k, sizeof buf - static_cast<size_t>(k), " acc %.3f", acc);
  std::snprintf(buf + k, sizeof buf - static_cast<size_t>(k), " ETA %dm%02ds ", static_cast<int>(eta) / 60,
                static_cast<int>(eta) % 60);
  return buf;
}

struct Trainer::Impl {
  TrainConfig c;
  std::shared_ptr<Communicator> comm;  // the ranks training together (one: a single process)
  std::unique_ptr<DataSource> data;
  std::unique_ptr<Model<float>> model;
  std::unique_ptr<AdamW> opt;
  int64_t step = 0;
  std::filesystem::path dir;

  std::string ckpt() const { return (dir / "checkpoint.safetensors").string(); }
  std::string final_model() const { return (dir / "model.safetensors").string(); }
  std::string metrics() const { return (dir / "metrics.jsonl").string(); }

  std::map<std::string, std::string> meta() const {
    return {{"train_config", c.to_json()}, {"data", data->describe()}, {"step", std::to_string(step)}};
  }

  void save_checkpoint_file() {
    opt->sync_host();
    std::vector<TensorOut<float>> ts;
    for (const auto& t : model->layout.tensors()) {
      ts.push_back({t.name, t.shape, model->params.data() + t.offset});
      ts.push_back({"optim.m." + t.name, t.shape, opt->m.data() + t.offset});
      ts.push_back({"optim.v." + t.name, t.shape, opt->v.data() + t.offset});
    }
    auto md = meta();
    md["format"] = "flowloop";
    md["config"] = model->cfg.to_json();
    md["adam_t"] = std::to_string(opt->t);
    write_safetensors(ckpt(), ts, md);
    save_checkpoint(final_model(), model->cfg, model->layout, model->params.data(), meta());
  }

  // The optimiser on the model's backend, and the model's field reading its parameters
  // there and adding its gradient there (nothing of the field crosses per step).
  void use_device() {
    opt->set_backend(model->backend());
    if (!model->backend()) return;
    // the optimiser's range holds the whole model from parameter 0 (AdamW's default)
    const size_t fb = model->layout.field_begin() - opt->begin();
    opt->prepare(model->params.data());  // the device's parameters are current before anything reads them
    model->set_device_training(opt->device_params() + fb, opt->device_grads() + fb);
  }

  void load_checkpoint_file() {
    const SafetensorsFile f = SafetensorsFile::read(ckpt());
    auto get = [&](const std::string& k) { return f.metadata_value(k, "checkpoint"); };
    require_resumable(TrainConfig::from_json(get("train_config"), ckpt()), c, ckpt());
    for (const auto& t : model->layout.tensors()) {
      f.copy_to(t.name, t.shape, model->params.data() + t.offset);
      f.copy_to("optim.m." + t.name, t.shape, opt->m.data() + t.offset);
      f.copy_to("optim.v." + t.name, t.shape, opt->v.data() + t.offset);
    }
    step = std::stoll(get("step"));
    opt->t = std::stoll(get("adam_t"));
    opt->state_changed();
    opt->prepare(model->params.data());  // an evaluation before the next step reads the loaded state
  }
};

TrainConfig trained_config(const std::string& model, const std::string& task, const std::string& text) {
  const SafetensorsFile f = SafetensorsFile::read(model);
  auto it = f.metadata().find("train_config");
  if (it == f.metadata().end()) throw Error("'" + model + "' has no train_config: was it written by flowloop train?");
  TrainConfig tc = TrainConfig::from_json(it->second, model);
  const std::string on = tc.task.empty() ? "text '" + tc.text + "'" : "task '" + tc.task + "'";
  if (!task.empty() && task != tc.task) throw Error("'" + model + "' was trained on " + on + ", not on task '" + task + "'");
  if (!text.empty() && text != tc.text) throw Error("'" + model + "' was trained on " + on + ", not on text '" + text + "'");
  return tc;
}

ModelConfig TrainConfig::model_config(const DataSource& data) const {
  ModelConfig mc;
  mc.vocab_size = data.vocab_size();
  mc.context = data.seq_len();
  mc.d_model = d_model;
  mc.n_head = n_head;
  mc.d_ff = d_ff;
  mc.n_block = n_block;
  mc.depth = trained_depth();
  mc.exit_gate = exit_gate;
  mc.time_cond = time_cond;
  mc.time_freq = time_freq;
  mc.time_scale = time_scale;
  mc.finalize();
  return mc;
}

namespace {

// What data parallelism cannot shard (each rank solves and differentiates its own rows).
void require_data_parallel(const TrainConfig& c, int ranks) {
  shard_rows(c.batch, 0, ranks);  // every rank gets a row
  if (c.depth.coupled)
    throw Error("a batch-coupled solve shares one step over the whole batch; data-parallel training over " +
                std::to_string(ranks) + " ranks solves each rank's rows apart: drop batch_coupled");
  if (c.jacobian != 0)
    throw Error("the Jacobian regulariser's Hutchinson noise is drawn over the whole batch; data-parallel training over " +
                std::to_string(ranks) + " ranks does not shard it: train it in one process");
}

// Every rank must hold the same parameters (they apply the same summed gradient); a
// 64-bit hash of their bits compared over the ranks at every checkpoint proves it.
void require_same_parameters(Communicator& comm, const Buffer<float>& params, int64_t step) {
  const uint64_t h = fnv1a64(params.data(), params.size() * sizeof(float));
  // (two 32-bit halves: each exact in a double)
  if (!same_on_every_rank(comm, {static_cast<double>(h >> 32), static_cast<double>(h & 0xffffffffULL)}))
    throw Error("step " + std::to_string(step) + ": the ranks' parameters differ (rank " + std::to_string(comm.rank()) +
                "'s hash is not every rank's)");
}

}  // namespace

Trainer::Trainer(const TrainConfig& cfg, std::shared_ptr<Communicator> comm) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.c = cfg;
  I.c.validate();
  I.comm = comm ? std::move(comm) : single_process();
  if (I.comm->size() > 1) require_data_parallel(I.c, I.comm->size());
  I.data = make_source(I.c);
  const ModelConfig mc = I.c.model_config(*I.data);
  I.model = std::make_unique<Model<float>>(mc);
  I.model->init(I.c.seed);
  if (!I.c.init_from.empty()) {
    // every tensor the source has is copied by name; tensors it lacks (a new exit
    // gate, time conditioning) keep their fresh initialisation
    const Model<float> src = load_model<float>(I.c.init_from);
    const ModelConfig& s = src.cfg;
    if (s.vocab_size != mc.vocab_size || s.context < mc.context || s.d_model != mc.d_model ||
        s.n_head != mc.n_head || s.d_ff != mc.d_ff || s.n_block != mc.n_block)
      throw Error("init_from '" + I.c.init_from + "': its architecture (V " + std::to_string(s.vocab_size) + ", C " +
                  std::to_string(s.d_model) + ", NH " + std::to_string(s.n_head) + ", F " + std::to_string(s.d_ff) +
                  ", L " + std::to_string(s.n_block) + ", context " + std::to_string(s.context) +
                  ") does not match the configuration's");
    for (const TensorInfo& t : I.model->layout.tensors()) {
      const TensorInfo* st = src.layout.find(t.name);
      if (!st) continue;
      if (st->numel < t.numel) throw Error("init_from '" + I.c.init_from + "': tensor " + t.name + " is too small");
      // (wpe of a longer source context: its first rows)
      std::copy_n(src.params.data() + st->offset, t.numel, I.model->params.data() + t.offset);
    }
  }
  I.opt = std::make_unique<AdamW>(I.model->layout, I.c);
  // the output directory must be writable before any work is done (rank 0 writes it)
  I.dir = I.c.out;
  if (I.comm->rank() == 0) require_writable(I.c.out);
}

TrainCost read_train_cost(const std::string& dir, double tokens_per_step) {
  TrainCost cost;
  std::ifstream in(std::filesystem::path(dir) / "metrics.jsonl");
  if (!in) throw Error("no training metrics at '" + (std::filesystem::path(dir) / "metrics.jsonl").string() + "'");
  double nfe = 0;
  for (std::string line; std::getline(in, line);) {
    const auto j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step")) continue;
    ++cost.steps;
    cost.flops += j.value("flops", 0.0);
    nfe += j.value("nfe_forward", 0.0);
    const double tps = j.value("tokens_per_s", 0.0);
    if (tps > 0) cost.seconds += tokens_per_step / tps;
    if (j.contains("test_accuracy"))
      cost.curve.push_back({j["step"].get<int64_t>(), cost.flops, cost.seconds, j["test_accuracy"].get<double>(),
                            j.value("test_loss", 0.0)});
  }
  if (cost.steps) cost.nfe_mean = nfe / static_cast<double>(cost.steps);
  return cost;
}

Trainer::~Trainer() = default;

const Model<float>& Trainer::model() const { return *impl_->model; }
void Trainer::set_device(Device d) {
  impl_->comm = communicator_for(impl_->comm, d);  // (several ranks on cuda: each its GPU, NCCL)
  impl_->model->set_device(d);
  impl_->use_device();
}

void Trainer::set_backend(std::shared_ptr<Backend<float>> be) {
  // (the backend's own device: no GPU is selected here, nor NCCL set up)
  require_same_device(*impl_->comm, be ? be->device() : Device::cpu);
  impl_->model->set_backend(std::move(be));
  impl_->use_device();
}

int64_t Trainer::step() const { return impl_->step; }

void Trainer::run(bool resume, std::ostream& progress, int64_t stop_at) {
  Impl& I = *impl_;
  const TrainConfig& c = I.c;
  Communicator& comm = *I.comm;
  const int ranks = comm.size();
  const bool lead = comm.rank() == 0;  // writes the metrics and checkpoints, evaluates, reports
  I.step = 0;
  if (resume) {
    if (!std::filesystem::exists(I.ckpt())) throw Error("--resume: no checkpoint at '" + I.ckpt() + "'");
    I.load_checkpoint_file();
  }
  std::ofstream log;
  if (lead) {
    start_metrics(I.metrics(), resume, I.step);
    write_file_atomic((I.dir / "config.json").string(), c.to_json() + "\n");
    log.open(I.metrics(), std::ios::app);
  }
  const bool tty = lead && isatty(fileno(stderr));
  Model<float>& m = *I.model;
  Buffer<float> grads(m.params.size());
  TokenBatch tok, tgt, global_tok, global_tgt;
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t first = I.step;
  LoopWork<float> w;
  OdeWork<float> ow;
  while (I.step < c.steps && (stop_at < 0 || I.step < stop_at)) {
    const auto t0 = std::chrono::steady_clock::now();
    I.opt->prepare(m.params.data());  // on a device: the (loaded) state there before the loss reads it
    // the global batch, whatever the number of ranks; each rank takes its rows
    I.data->batch(Split::Train, static_cast<uint64_t>(I.step), c.batch, global_tok, global_tgt);
    // This rank's share of the global mean loss (every rank holds the global batch, so
    // no communication is needed for it): its gradient is scaled by it after the step
    const ShardWeights sw = shard_weights(global_tgt, comm.rank(), ranks);
    if (ranks > 1) {
      tok = slice_rows(global_tok, sw.begin, sw.end);
      tgt = slice_rows(global_tgt, sw.begin, sw.end);
    } else {
      std::swap(tok, global_tok);
      std::swap(tgt, global_tgt);
    }
    std::fill(grads.begin(), grads.end(), 0.0f);
    float loss;
    int64_t nfe_f, nfe_b;
    double evals;  // this rank's field evaluations, summed over its sequences
    const float* lg;
    double exit_depth = 0, kinetic = 0, jacobian = 0;
    nlohmann::ordered_json drawn;  // the step's random discretisation, when drawn
    const bool ode = c.depth.ode();
    if (!ode && c.exit_gate) {
      loss = m.loop_gate_loss_and_grad(tok, tgt, c.depth.loops, c.gate_beta, grads.data(), w, &exit_depth);
      nfe_f = nfe_b = c.depth.loops;
      evals = static_cast<double>(nfe_f) * tok.B;
      lg = w.per_loop.back().logits.data();
    } else if (!ode) {
      const int K = c.random_depth_mean > 0 ? random_depth(c.random_depth_mean, c.seed, I.step) : c.depth.loops;
      const int k = c.random_depth_mean > 0 ? c.backprop_loops : 0;
      loss = m.loop_loss_and_grad(tok, tgt, K, grads.data(), w, nullptr, k);
      nfe_f = K;
      nfe_b = k > 0 ? std::min(K, k) : K;
      evals = static_cast<double>(K) * tok.B;
      lg = w.readout.logits.data();
    } else {
      GradStats st;
      const SolveOptions so = c.solve_options(I.step);
      if (c.randomized()) {
        drawn["solver"] = so.method;
        if (!so.adaptive) drawn["solver_steps"] = so.steps;
        drawn["t1"] = so.t1;
      }
      GradOptions go = c.grad_options(I.step);
      if (ranks > 1) go.kinetic *= sw.kinetic_factor;  // after the scaling: kinetic * (its rows' share) * R_K
      loss = m.ode_loss_and_grad(tok, tgt, so, go, grads.data(), st, ow);
      kinetic = st.kinetic;
      jacobian = st.jacobian;
      if (!st.ok()) throw Error("step " + std::to_string(I.step) + ": " + st.message);
      nfe_f = st.nfe_forward;
      nfe_b = st.nfe_backward;
      evals = static_cast<double>(st.forward_stats.seq_evals);
      lg = ow.readout.logits.data();
    }
    int64_t acc_count = 0;
    double acc = accuracy(lg, tgt, m.cfg.vocab_size, I.data->exact_match(), &acc_count);
    double allreduce_s = 0;
    std::array<double, 4> most{static_cast<double>(nfe_f), static_cast<double>(nfe_b), evals, 0.0};
    if (ranks > 1) {
      // the step's numbers, summed: the global loss, R_K, accuracy (right, counted), exit
      // depth and the field evaluations
      std::array<double, 6> sums{sw.share * loss, sw.row_share * kinetic, acc * static_cast<double>(acc_count),
                                 static_cast<double>(acc_count), sw.share * exit_depth, evals};
      const auto r0 = std::chrono::steady_clock::now();
      I.opt->reduce(grads.data(), static_cast<float>(sw.scale), comm);  // where the gradient lives
      if (m.backend()) m.backend()->synchronize();  // (the device's sum is queued: its time)
      allreduce_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - r0).count();
      comm.sum(sums.data(), sums.size());
      loss = static_cast<float>(sums[0]);
      kinetic = sums[1];
      acc = sums[3] > 0 ? sums[2] / sums[3] : 0.0;
      exit_depth = sums[4];
      most[3] = sums[5];  // the evaluations of all ranks (their mean: imbalance below)
    }
    if (!std::isfinite(loss)) throw Error("step " + std::to_string(I.step) + ": the loss is not finite");
    const double lr = learning_rate(c, I.step);
    const double gnorm = I.opt->step(m.params.data(), grads.data(), lr);
    ++I.step;
    const auto t1 = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(t1 - t0).count();
    double wall = std::chrono::duration<double>(t1 - t_start).count();
    bool out_of_time = c.max_seconds > 0 && wall >= c.max_seconds && I.step < c.steps;
    double total_evals = evals;
    if (ranks > 1) {  // the depths of the batch (its deepest sequence), and one decision to stop
      total_evals = most[3];
      std::array<double, 4> mx{most[0], most[1], evals, out_of_time ? 1.0 : 0.0};
      comm.max(mx.data(), mx.size());
      nfe_f = static_cast<int64_t>(mx[0]);
      nfe_b = static_cast<int64_t>(mx[1]);
      most[2] = mx[2];
      out_of_time = mx[3] > 0;
    }
    nlohmann::ordered_json line;
    line["step"] = I.step;
    line["loss"] = loss;
    line["accuracy"] = acc;
    line["lr"] = lr;
    line["grad_norm"] = gnorm;
    for (auto it = drawn.begin(); it != drawn.end(); ++it) line[it.key()] = it.value();
    line["nfe_forward"] = nfe_f;
    line["nfe_backward"] = nfe_b;
    line["flops"] = train_step_flops(m, c.batch, tok.T, static_cast<double>(nfe_f), static_cast<double>(nfe_b));
    line["tokens_per_s"] = static_cast<double>(c.batch) * tok.T / dt;
    line["device"] = device_name(m.device());
    if (ranks > 1) {
      line["ranks"] = ranks;
      line["communicator"] = comm.name();  // "mpi", or "mpi+nccl" where the GPUs sum
      // the slowest rank's field evaluations over the ranks' mean (1: balanced)
      line["load_imbalance"] = total_evals > 0 ? most[2] / (total_evals / ranks) : 1.0;
      line["allreduce_s"] = allreduce_s;
      line["step_s"] = dt;
      line["gradient_bytes"] = static_cast<double>(grads.size() * sizeof(float));
    }
    if (c.exit_gate) line["exit_depth"] = exit_depth;
    if (c.kinetic > 0) line["kinetic"] = kinetic;
    if (c.jacobian > 0) line["jacobian"] = jacobian;
    line["wall_s"] = wall;
    if (out_of_time) line["stopped"] = "max_seconds";
    const bool last = I.step == c.steps || out_of_time;  // evaluated and checkpointed
    if (lead && (I.step % c.eval_every == 0 || last)) {
      const EvalResult ev = evaluate(m, *I.data, c.depth, c.eval_batches, c.batch);
      ev.require_ok();
      line["test_loss"] = ev.loss;
      line["test_accuracy"] = ev.accuracy;
      line["test_nfe"] = ev.nfe;
      if (!tty)
        progress << "step " << I.step << "/" << c.steps << "  loss " << loss << "  test loss " << ev.loss
                 << "  test accuracy " << ev.accuracy << "  " << wall << " s" << std::endl;
    }
    if (lead) {
      log << line.dump() << "\n";
      log.flush();
    }
    if (I.step % c.checkpoint_every == 0 || last) {
      if (ranks > 1) require_same_parameters(comm, m.params, I.step);
      if (lead) I.save_checkpoint_file();
    }
    if (tty) progress << progress_line(I.step, c.steps, first, wall, loss, acc) << std::flush;
    if (out_of_time) {
      if (tty) progress << std::endl;
      if (lead)
        progress << "stopped at step " << I.step << " of " << c.steps << ": the time budget of " << c.max_seconds
                 << " s is spent (--resume goes on)" << std::endl;
      return;
    }
  }
  if (tty) progress << std::endl;
}

}  // namespace flowloop
