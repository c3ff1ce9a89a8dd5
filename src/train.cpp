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
#include "flowloop/io/hf.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/train/loop.hpp"
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
  X(task) X(task_n) X(task_hops) X(task_prime) X(text) X(context) X(tokenizer) X(d_model) X(n_head) X(n_block) X(d_ff) X(time_cond) X(time_freq) \
  X(time_scale) X(arch) X(n_kv_head) X(n_prelude) X(n_coda) X(rope_theta) X(qkv_bias) X(tie_head) X(core_norm)      \
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
  if (!tokenizer.empty() && text.empty()) throw fail("a tokenizer reads a text: give text too");
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
  if (arch != "gpt2" && arch != "llama") throw fail("unknown arch '" + arch + "' (gpt2 or llama)");
  if (arch != "llama" && (n_kv_head != 0 || qkv_bias || !tie_head || core_norm || rope_theta != 10000.0))
    throw fail("n_kv_head, rope_theta, qkv_bias, an untied head and core_norm need arch llama");
  if (n_kv_head < 0 || (n_kv_head > 0 && n_head % n_kv_head != 0))
    throw fail("n_kv_head (" + std::to_string(n_kv_head) + ") must divide n_head (" + std::to_string(n_head) + ")");
  if (n_prelude < 0 || n_coda < 0) throw fail("n_prelude and n_coda must be >= 0");
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

// ---------------------------------------------------------------- data, evaluation

std::unique_ptr<DataSource> make_source(const TrainConfig& c) {
  if (!c.task.empty()) return make_task({c.task, c.seed, c.task_n, c.task_hops, c.task_prime});
  return make_text_source(c.text, c.context, c.seed, c.tokenizer);
}

void require_fits(const ModelConfig& model, const DataSource& data, const std::string& what) {
  // (a model's vocabulary may be padded past its tokenizer's: the data's ids must fit in it)
  if (model.vocab_size < data.vocab_size() || model.context < data.seq_len())
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

// The language-model task of the one training loop: a batch of the data source per step,
// each rank its rows; the loss of loop K (with the exit gate, or random depth and
// truncated backprop) or of an ODE-depth solve.
struct Trainer::Impl final : TrainTask {
  TrainConfig c;
  std::shared_ptr<Communicator> comm;  // the ranks training together (one: a single process)
  std::unique_ptr<DataSource> data;
  std::unique_ptr<Model<float>> model_;
  std::unique_ptr<AdamW> opt;
  int64_t step = 0;
  // the step's work and what its metrics line reports
  TokenBatch tok, tgt, global_tok, global_tgt;
  LoopWork<float> w;
  OdeWork<float> ow;
  ShardWeights sw;
  float loss = 0;
  int64_t nfe_f = 0, nfe_b = 0;
  double evals = 0, total_evals = 0;  // field evaluations summed over the sequences: this rank's, all ranks'
  double acc = 0, exit_depth = 0, kinetic = 0, jacobian = 0;
  nlohmann::ordered_json drawn;  // the step's random discretisation, when drawn

  Model<float>& model() override { return *model_; }
  AdamW& optimiser() override { return *opt; }
  double learning_rate(int64_t s) const override { return flowloop::learning_rate(c, s); }
  double progress_accuracy() const override { return acc; }

  std::map<std::string, std::string> metadata() const override {
    return {{"train_config", c.to_json()}, {"data", data->describe()}};
  }
  void check_resumable(const SafetensorsFile& f, const std::string& path) const override {
    require_resumable(TrainConfig::from_json(f.metadata_value("train_config", "checkpoint"), path), c, path);
  }
  void write_model(const std::string& path, const std::map<std::string, std::string>& meta) const override {
    save_checkpoint(path, model_->cfg, model_->layout, model_->params.data(), meta);
  }

  // The optimiser on the model's backend, and the model's field reading its parameters
  // there and adding its gradient there (nothing of the field crosses per step).
  void use_device() {
    opt->set_backend(model_->backend());
    if (!model_->backend()) return;
    // the optimiser's range holds the whole model from parameter 0 (AdamW's default)
    const size_t fb = model_->layout.field_begin() - opt->begin();
    opt->prepare(model_->params.data());  // the device's parameters are current before anything reads them
    model_->set_device_training(opt->device_params() + fb, opt->device_grads() + fb);
  }

  TaskStep gradient(int64_t at, float* grads, Communicator& cm) override {
    Model<float>& m = *model_;
    const int ranks = cm.size();
    // the global batch, whatever the number of ranks; each rank takes its rows
    data->batch(Split::Train, static_cast<uint64_t>(at), c.batch, global_tok, global_tgt);
    // This rank's share of the global mean loss (every rank holds the global batch, so
    // no communication is needed for it): its gradient is scaled by it before the sum
    sw = shard_weights(global_tgt, cm.rank(), ranks);
    if (ranks > 1) {
      tok = slice_rows(global_tok, sw.begin, sw.end);
      tgt = slice_rows(global_tgt, sw.begin, sw.end);
    } else {
      std::swap(tok, global_tok);
      std::swap(tgt, global_tgt);
    }
    const float* lg;
    exit_depth = kinetic = jacobian = 0;
    drawn = nlohmann::ordered_json();
    const bool ode = c.depth.ode();
    if (!ode && c.exit_gate) {
      loss = m.loop_gate_loss_and_grad(tok, tgt, c.depth.loops, c.gate_beta, grads, w, &exit_depth);
      nfe_f = nfe_b = c.depth.loops;
      evals = static_cast<double>(nfe_f) * tok.B;
      lg = w.per_loop.back().logits.data();
    } else if (!ode) {
      const int K = c.random_depth_mean > 0 ? random_depth(c.random_depth_mean, c.seed, at) : c.depth.loops;
      const int k = c.random_depth_mean > 0 ? c.backprop_loops : 0;
      loss = m.loop_loss_and_grad(tok, tgt, K, grads, w, nullptr, k);
      nfe_f = K;
      nfe_b = k > 0 ? std::min(K, k) : K;
      evals = static_cast<double>(K) * tok.B;
      lg = w.readout.logits.data();
    } else {
      GradStats st;
      const SolveOptions so = c.solve_options(at);
      if (c.randomized()) {
        drawn["solver"] = so.method;
        if (!so.adaptive) drawn["solver_steps"] = so.steps;
        drawn["t1"] = so.t1;
      }
      GradOptions go = c.grad_options(at);
      if (ranks > 1) go.kinetic *= sw.kinetic_factor;  // after the scaling: kinetic * (its rows' share) * R_K
      loss = m.ode_loss_and_grad(tok, tgt, so, go, grads, st, ow);
      kinetic = st.kinetic;
      jacobian = st.jacobian;
      if (!st.ok()) throw Error("step " + std::to_string(at) + ": " + st.message);
      nfe_f = st.nfe_forward;
      nfe_b = st.nfe_backward;
      evals = static_cast<double>(st.forward_stats.seq_evals);
      lg = ow.readout.logits.data();
    }
    int64_t acc_count = 0;
    acc = accuracy(lg, tgt, m.cfg.vocab_size, data->exact_match(), &acc_count);
    total_evals = evals;
    if (ranks > 1) {
      // the step's numbers, summed: the global loss, R_K, accuracy (right, counted), exit
      // depth and the field evaluations
      std::array<double, 6> sums{sw.share * loss, sw.row_share * kinetic, acc * static_cast<double>(acc_count),
                                 static_cast<double>(acc_count), sw.share * exit_depth, evals};
      cm.sum(sums.data(), sums.size());
      loss = static_cast<float>(sums[0]);
      kinetic = sums[1];
      acc = sums[3] > 0 ? sums[2] / sums[3] : 0.0;
      exit_depth = sums[4];
      total_evals = sums[5];  // the evaluations of all ranks (their mean: imbalance below)
    }
    return {loss, sw.scale};
  }

  void metrics(nlohmann::ordered_json& line, const StepTiming& tm, Communicator& cm) override {
    const int ranks = cm.size();
    double most_evals = evals;
    if (ranks > 1) {  // the depths of the batch (its deepest sequence)
      std::array<double, 3> mx{static_cast<double>(nfe_f), static_cast<double>(nfe_b), evals};
      cm.max(mx.data(), mx.size());
      nfe_f = static_cast<int64_t>(mx[0]);
      nfe_b = static_cast<int64_t>(mx[1]);
      most_evals = mx[2];
    }
    line["loss"] = loss;
    line["accuracy"] = acc;
    line["lr"] = tm.lr;
    line["grad_norm"] = tm.grad_norm;
    for (auto it = drawn.begin(); it != drawn.end(); ++it) line[it.key()] = it.value();
    line["nfe_forward"] = nfe_f;
    line["nfe_backward"] = nfe_b;
    line["flops"] = train_step_flops(*model_, c.batch, tok.T, static_cast<double>(nfe_f), static_cast<double>(nfe_b));
    line["tokens_per_s"] = static_cast<double>(c.batch) * tok.T / tm.seconds;
    line["device"] = device_name(model_->device());
    // the slowest rank's field evaluations over the ranks' mean (1: balanced)
    if (ranks > 1) line["load_imbalance"] = total_evals > 0 ? most_evals / (total_evals / ranks) : 1.0;
    if (c.exit_gate) line["exit_depth"] = exit_depth;
    if (c.kinetic > 0) line["kinetic"] = kinetic;
    if (c.jacobian > 0) line["jacobian"] = jacobian;
  }

  void evaluate(nlohmann::ordered_json& line, std::ostream& summary) override {
    const EvalResult ev = flowloop::evaluate(*model_, *data, c.depth, c.eval_batches, c.batch);
    ev.require_ok();
    line["test_loss"] = ev.loss;
    line["test_accuracy"] = ev.accuracy;
    line["test_nfe"] = ev.nfe;
    summary << "  test loss " << ev.loss << "  test accuracy " << ev.accuracy;
  }
};

TrainConfig study_config(const std::string& model, const std::string& task, const std::string& text, int context) {
  if (!is_hf_dir(model)) return trained_config(model, task, text);
  if (!task.empty())
    throw Error("'" + model + "' is a Hugging Face model: give it a text (--text FILE, read in its own tokens), not a "
                "task");
  if (text.empty())
    throw Error("'" + model + "' is a Hugging Face model, which holds no training data: give --text FILE (read in its "
                "own tokens, tokenizer.json)");
  TrainConfig c;
  c.text = text;
  c.tokenizer = model;
  c.context = context > 0 ? context : 128;
  c.depth.loops = 1;  // the checkpoint's own forward
  return c;
}

TrainConfig trained_config(const std::string& model, const std::string& task, const std::string& text) {
  if (is_hf_dir(model))
    throw Error("'" + model + "' is a Hugging Face directory, which holds no flowloop training run (its task or text): "
                "compare, eval and trajectory take it with --text FILE; train takes it with --init-from");
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
  mc.arch = arch;
  if (arch == "llama") {
    mc.n_kv_head = n_kv_head;
    mc.rope_theta = rope_theta;
    mc.qkv_bias = qkv_bias;
    mc.tie_head = tie_head;
    mc.core_norm = core_norm;
  }
  mc.n_prelude = n_prelude;
  mc.n_coda = n_coda;
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

}  // namespace

Trainer::Trainer(const TrainConfig& cfg, std::shared_ptr<Communicator> comm) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.c = cfg;
  I.c.validate();
  I.comm = comm ? std::move(comm) : single_process();
  if (I.comm->size() > 1) require_data_parallel(I.c, I.comm->size());
  I.data = make_source(I.c);
  const ModelConfig mc = I.c.model_config(*I.data);
  I.model_ = std::make_unique<Model<float>>(mc);
  I.model_->init(I.c.seed);
  if (!I.c.init_from.empty()) {
    // every tensor the source has is copied by name; tensors it lacks (a new exit
    // gate, time conditioning) keep their fresh initialisation
    const Model<float> src = load_any<float>(I.c.init_from);
    const ModelConfig& s = src.cfg;
    if (s.vocab_size != mc.vocab_size || s.context < mc.context || s.d_model != mc.d_model ||
        s.n_head != mc.n_head || s.d_ff != mc.d_ff || s.n_block != mc.n_block || s.arch != mc.arch ||
        s.kv_heads() != mc.kv_heads() || s.n_prelude != mc.n_prelude || s.n_coda != mc.n_coda)
      throw Error("init_from '" + I.c.init_from + "': its architecture (V " + std::to_string(s.vocab_size) + ", C " +
                  std::to_string(s.d_model) + ", NH " + std::to_string(s.n_head) + ", F " + std::to_string(s.d_ff) +
                  ", L " + std::to_string(s.n_block) + ", context " + std::to_string(s.context) + ", arch " + s.arch +
                  ") does not match the configuration's");
    for (const TensorInfo& t : I.model_->layout.tensors()) {
      const TensorInfo* st = src.layout.find(t.name);
      if (!st) continue;
      if (st->numel < t.numel) throw Error("init_from '" + I.c.init_from + "': tensor " + t.name + " is too small");
      // (wpe of a longer source context: its first rows)
      std::copy_n(src.params.data() + st->offset, t.numel, I.model_->params.data() + t.offset);
    }
  }
  I.opt = std::make_unique<AdamW>(I.model_->layout, I.c.optim());
  // the output directory must be writable before any work is done (rank 0 writes it)
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

const Model<float>& Trainer::model() const { return *impl_->model_; }
void Trainer::set_device(Device d) {
  impl_->comm = communicator_for(impl_->comm, d);  // (several ranks on cuda: each its GPU, NCCL)
  impl_->model_->set_device(d);
  impl_->use_device();
}

void Trainer::set_backend(std::shared_ptr<Backend<float>> be) {
  // (the backend's own device: no GPU is selected here, nor NCCL set up)
  require_same_device(*impl_->comm, be ? be->device() : Device::cpu);
  impl_->model_->set_backend(std::move(be));
  impl_->use_device();
}

int64_t Trainer::step() const { return impl_->step; }

void Trainer::run(bool resume, std::ostream& progress, int64_t stop_at) {
  Impl& I = *impl_;
  const TrainSchedule s{I.c.steps, I.c.eval_every, I.c.checkpoint_every, I.c.max_seconds, I.c.out, I.c.to_json()};
  run_training(I, s, *I.comm, resume, progress, stop_at, I.step);
}

}  // namespace flowloop
