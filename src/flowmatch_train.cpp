// Training a flow student on recorded latent trajectories: the shard loader, the
// configuration, and the trainer (AdamW over the field, EMA, reflow rounds, exact resume).
#include "flowloop/train/flowmatch_train.hpp"
#include "flowloop/train/loop.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>

#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/io.hpp"

namespace flowloop {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {
// A well-mixed seed from two numbers (splitmix64's finaliser).
uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t z = a * 0x9E3779B97F4A7C15ULL + b + 0x632BE59BD9B4E019ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Fisher-Yates with the generator's raw draws (the same order on every machine).
template <class T>
void shuffle(std::vector<T>& v, Rng& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<size_t>(rng.next() % i)]);
}
}  // namespace

// ---------------------------------------------------------------- loader

void TrajectoryBatch::subsample(int s) {
  if (s < 1) throw Error("trajectory data: a state stride must be at least 1, not " + std::to_string(s));
  if (K % s != 0)
    throw Error("trajectory data: a stride of " + std::to_string(s) + " does not divide K = " + std::to_string(K));
  if (s == 1) return;
  const size_t n = static_cast<size_t>(T) * static_cast<size_t>(C);
  const int k2 = K / s;
  for (int b = 0; b < B; ++b)
    for (int k = 0; k <= k2; ++k) {  // each destination lies before its source, or is it
      const float* src = states.data() + offset(b, k * s);
      float* dst = states.data() + (static_cast<size_t>(b) * static_cast<size_t>(k2 + 1) + static_cast<size_t>(k)) * n;
      if (dst != src) std::copy_n(src, n, dst);
    }
  K = k2;
  states.resize(static_cast<size_t>(B) * static_cast<size_t>(K + 1) * n);
}

TrajectoryLoader::TrajectoryLoader(const std::string& dir, const std::string& split, uint64_t seed)
    : dir_(dir), split_(split), m_(TrajectoryManifest::read(dir)), seed_(seed) {
  const std::string where = "trajectory data '" + dir + "'";
  if (m_.K < 1) throw Error(where + ": K is " + std::to_string(m_.K) + "; a recording needs K >= 1 (K + 1 states)");
  if (m_.T < 1 || m_.C < 1) throw Error(where + ": an empty state shape (T " + std::to_string(m_.T) + ", C " +
                                        std::to_string(m_.C) + ")");
  shards_ = m_.split(split);
  for (const auto& s : shards_) {
    if (s.examples < 1) throw Error(where + ": shard '" + s.file + "' has no examples");
    first_.push_back(total_);
    total_ += s.examples;
  }
  if (total_ == 0) throw Error(where + ": the " + split + " split has no examples");
  const std::string teacher = teacher_path();
  if (!fs::exists(teacher)) throw Error(where + ": the manifest names the teacher '" + m_.teacher_file + "', which is missing");
  const std::string h = file_hash(teacher);
  if (h != m_.teacher_hash)
    throw Error(where + ": its teacher file '" + teacher + "' has hash " + h + ", the manifest says " + m_.teacher_hash +
                " (another teacher)");
  const SafetensorsFile f = SafetensorsFile::read(teacher);
  auto it = f.metadata().find("train_config");
  if (it != f.metadata().end()) {
    try {
      exact_match_ = make_source(TrainConfig::from_json(it->second, teacher))->exact_match();
    } catch (const Error& e) {
      throw Error(where + ": cannot tell how the teacher's data is scored (its training data: " + e.what() + ")");
    }
  }
}

std::string TrajectoryLoader::teacher_path() const { return (fs::path(dir_) / m_.teacher_file).string(); }

const TrajectoryShardData& TrajectoryLoader::shard(size_t i) {
  auto pos = std::find(lru_.begin(), lru_.end(), i);
  if (pos != lru_.end()) {
    lru_.erase(pos);
    lru_.push_back(i);
    return cache_.at(i);
  }
  if (lru_.size() >= 2) {
    cache_.erase(lru_.front());
    lru_.erase(lru_.begin());
  }
  cache_.emplace(i, read_trajectory_shard(m_, dir_, shards_[i]));
  lru_.push_back(i);
  return cache_.at(i);
}

void TrajectoryLoader::shape(int B, TrajectoryBatch& out) const {
  out.B = B;
  out.K = m_.K;
  out.T = m_.T;
  out.C = m_.C;
  out.states.resize(static_cast<size_t>(B) * static_cast<size_t>(m_.K + 1) * static_cast<size_t>(m_.T) *
                    static_cast<size_t>(m_.C));
  for (TokenBatch* t : {&out.tokens, &out.targets}) {
    t->B = B;
    t->T = m_.T;
    t->data.resize(static_cast<size_t>(B) * static_cast<size_t>(m_.T));
  }
}

void TrajectoryLoader::take(size_t s, int example, int slot, TrajectoryBatch& out) {
  const TrajectoryShardData& d = shard(s);
  const size_t rec = static_cast<size_t>(m_.K + 1) * static_cast<size_t>(m_.T) * static_cast<size_t>(m_.C);
  const size_t e = static_cast<size_t>(example), j = static_cast<size_t>(slot), T = static_cast<size_t>(m_.T);
  std::copy_n(d.states.data() + e * rec, rec, out.states.data() + j * rec);
  std::copy_n(d.tokens.data() + e * T, T, out.tokens.data.data() + j * T);
  std::copy_n(d.targets.data() + e * T, T, out.targets.data.data() + j * T);
}

void TrajectoryLoader::batch(int64_t index, int B, TrajectoryBatch& out) {
  if (B < 1 || index < 0) throw Error("trajectory data: batch " + std::to_string(index) + " of size " + std::to_string(B));
  shape(B, out);
  for (int j = 0; j < B; ++j) {
    const int64_t pos = index * B + j, e = pos / total_, p = pos % total_;
    if (e != epoch_) {
      // this epoch's shard order, and each shard's example order
      epoch_ = e;
      Rng rng(mix(seed_, static_cast<uint64_t>(e)));
      shard_order_.resize(shards_.size());
      std::iota(shard_order_.begin(), shard_order_.end(), size_t{0});
      shuffle(shard_order_, rng);
      epoch_first_.assign(1, 0);
      example_order_.assign(shards_.size(), {});
      for (size_t k = 0; k < shard_order_.size(); ++k) {
        const size_t s = shard_order_[k];
        epoch_first_.push_back(epoch_first_.back() + shards_[s].examples);
        Rng r(mix(mix(seed_, static_cast<uint64_t>(e)), s + 1));
        auto& order = example_order_[s];
        order.resize(static_cast<size_t>(shards_[s].examples));
        std::iota(order.begin(), order.end(), 0);
        shuffle(order, r);
      }
    }
    const size_t k = static_cast<size_t>(std::upper_bound(epoch_first_.begin(), epoch_first_.end(), p) - epoch_first_.begin()) - 1;
    const size_t s = shard_order_[k];
    take(s, example_order_[s][static_cast<size_t>(p - epoch_first_[k])], j, out);
  }
}

void TrajectoryLoader::range(int64_t first, int n, TrajectoryBatch& out) {
  if (first < 0 || n < 1 || first + n > total_)
    throw Error("trajectory data: examples [" + std::to_string(first) + ", " + std::to_string(first + n) + ") of the " +
                split_ + " split, which has " + std::to_string(total_));
  shape(n, out);
  for (int j = 0; j < n; ++j) {
    const int64_t i = first + j;
    const size_t s = static_cast<size_t>(std::upper_bound(first_.begin(), first_.end(), i) - first_.begin()) - 1;
    take(s, static_cast<int>(i - first_[s]), j, out);
  }
}

// ---------------------------------------------------------------- decode loss

template <class S>
void DecodeLoss<S>::set_batch(const S* ends, const TokenBatch& targets) {
  B_ = targets.B;
  T_ = targets.T;
  const int N = B_ * T_, V = model_.cfg.vocab_size;
  targets_ = targets.data;
  rc_.resize(model_.cfg, N);
  model_.readout(ends, B_, T_, rc_);
  log_softmax_rows(ref_, rc_.logits.data(), static_cast<size_t>(N), static_cast<size_t>(V));
}

template <class S>
double DecodeLoss<S>::operator()(const S* x1hat, const FlowMatchStep& st, S* grad) {
  const int N = B_ * T_, V = model_.cfg.vocab_size;
  const size_t n = static_cast<size_t>(T_) * static_cast<size_t>(model_.cfg.d_model);
  if (st.x1_row.size() != static_cast<size_t>(B_)) throw Error("decode loss: set_batch was given another batch size");
  model_.readout(x1hat, B_, T_, rc_);
  log_softmax_rows(lp_, rc_.logits.data(), static_cast<size_t>(N), static_cast<size_t>(V));
  // the scored positions of each slot's end
  int64_t count = 0;
  for (int b = 0; b < B_; ++b)
    for (int t = 0; t < T_; ++t) count += targets_[static_cast<size_t>(st.x1_row[static_cast<size_t>(b)]) * T_ + t] >= 0;
  double loss = 0;
  const double scale = count ? weight_ / static_cast<double>(count) : 0.0;
  for (int b = 0; b < B_; ++b)
    for (int t = 0; t < T_; ++t) {
      const size_t src = static_cast<size_t>(st.x1_row[static_cast<size_t>(b)]) * T_ + t;
      const size_t row = static_cast<size_t>(b) * T_ + t;
      S* d = rc_.dlogits.data() + row * V;
      if (targets_[src] < 0) {
        std::fill_n(d, V, S(0));
        continue;
      }
      const double* r = ref_.data() + src * V;
      const double* l = lp_.data() + row * V;
      for (int v = 0; v < V; ++v) {
        const double lp = l[v], pr = std::exp(r[v]);
        loss += pr * (r[v] - lp);
        d[v] = static_cast<S>(scale * (std::exp(lp) - pr));
      }
    }
  std::fill_n(grad, static_cast<size_t>(B_) * n, S(0));
  junk_.assign(model_.params.size(), S(0));
  model_.readout_backward(grad, junk_.data(), x1hat, B_, T_, rc_);
  return scale * loss;
}

template class DecodeLoss<float>;
template class DecodeLoss<double>;

// ---------------------------------------------------------------- configuration

#define FLOWLOOP_FM_FIELDS(X)                                                                                  \
  X(data) X(matcher) X(coupling) X(time_sampler) X(sigma) X(sinkhorn_reg) X(decode_weight) X(state_stride) X(shortcut) X(shortcut_fraction) X(shortcut_steps) X(time_freq) X(time_scale) X(ema)    \
  X(reflow) X(reflow_sampler) X(steps) X(batch) X(warmup) X(lr) X(min_lr) X(weight_decay) X(beta1) X(beta2)    \
  X(eps) X(clip) X(eval_every) X(eval_batches) X(checkpoint_every) X(max_seconds) X(seed) X(out)

FlowMatchConfig FlowMatchConfig::from_json(const std::string& text, const std::string& where) {
  static const std::vector<std::string> known = {
#define X(name) #name,
      FLOWLOOP_FM_FIELDS(X)
#undef X
  };
  const json j = parse_json_object(text, where, known);
  FlowMatchConfig c;
#define X(name) json_field(j, #name, c.name, where);
  FLOWLOOP_FM_FIELDS(X)
#undef X
  return c;
}

std::string FlowMatchConfig::to_json() const {
  nlohmann::ordered_json j;
#define X(name) j[#name] = name;
  FLOWLOOP_FM_FIELDS(X)
#undef X
  return j.dump(2);
}

FlowMatchOptions FlowMatchConfig::options() const {
  FlowMatchOptions o;
  o.matcher = parse_matcher(matcher);
  o.coupling = parse_coupling(coupling);
  o.time_sampler = parse_time_sampler(time_sampler);
  o.sigma = sigma;
  o.sinkhorn_reg = sinkhorn_reg;
  o.shortcut = shortcut;
  o.shortcut_fraction = shortcut_fraction;
  o.shortcut_steps = shortcut_steps;
  return o;
}

OptimConfig FlowMatchConfig::optimiser() const {
  return {steps, warmup, lr, min_lr, weight_decay, beta1, beta2, eps, clip};
}

void FlowMatchConfig::validate() const {
  auto fail = [](const std::string& m) { return Error("flow-match config: " + m); };
  if (data.empty()) throw fail("no recording (data)");
  const FlowMatchOptions o = options();  // names an unknown matcher, coupling or time sampler
  o.validate();
  if (reflow < 0) throw fail("reflow must be 0 or more");
  if (state_stride < 1) throw fail("state_stride must be at least 1");
  if (!(decode_weight >= 0) || !std::isfinite(decode_weight)) throw fail("decode_weight must be finite and >= 0");
  if (decode_weight > 0 && (o.matcher == Matcher::VP || o.matcher == Matcher::Trajectory))
    throw fail("decode_weight needs a linear path (icfm, otcfm, sbcfm, generative), not " + matcher);
  if (reflow > 0) {
    if (o.matcher == Matcher::Trajectory || o.matcher == Matcher::Generative)
      throw fail("reflow pairs each recording's h_0 with the flow's end; the " + matcher +
                 " matcher does not learn from such pairs");
    const DepthSpec s = DepthSpec::parse(reflow_sampler);
    if (!s.ode()) throw fail("reflow_sampler must be a solver regime (e.g. rk4:4), not '" + reflow_sampler + "'");
    s.validate();
  }
  if (!(ema >= 0 && ema < 1)) throw fail("ema must be in [0, 1)");
  if (shortcut && decode_weight > 0) throw fail("shortcut and decode_weight do not combine (the decode loss reads v as the velocity to t = 1)");
  if (time_freq <= 0 || time_freq % 2 != 0) throw fail("time_freq must be positive and even");
  if (!(time_scale > 0) || !std::isfinite(time_scale)) throw fail("time_scale must be positive");
  if (steps <= 0 || batch <= 0) throw fail("steps and batch must be positive");
  if (warmup < 0 || !(lr > 0) || !(min_lr >= 0) || min_lr > lr) throw fail("need lr > 0, 0 <= min_lr <= lr, warmup >= 0");
  if (!(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1 && eps > 0 && weight_decay >= 0 && clip >= 0))
    throw fail("AdamW settings out of range");
  if (eval_every <= 0 || eval_batches <= 0 || checkpoint_every <= 0)
    throw fail("eval_every, eval_batches and checkpoint_every must be positive");
  if (!(max_seconds >= 0) || !std::isfinite(max_seconds)) throw fail("max_seconds must be finite and >= 0");
  if (out.empty()) throw fail("no output directory (out)");
}

Model<float> make_student(const Model<float>& teacher, int time_freq, double time_scale, uint64_t seed,
                          bool step_cond) {
  ModelConfig mc = teacher.cfg;
  if (teacher.cfg.llama()) {
    // adaLN's time conditioning is the gpt2 block's: a llama teacher's student is that block at
    // the same width, MLP width and core depth (heads: the teacher's where they divide the
    // width), freshly initialised; its positions table covers the recorded sequences
    ModelConfig g;
    g.vocab_size = teacher.cfg.vocab_size;
    g.context = std::min(teacher.cfg.context, 4096);
    g.d_model = teacher.cfg.d_model;
    g.n_head = teacher.cfg.d_model % teacher.cfg.n_head == 0 ? teacher.cfg.n_head : 1;
    g.d_ff = teacher.cfg.d_ff;
    g.n_block = teacher.cfg.n_block;
    mc = g;
  }
  mc.time_cond = true;
  mc.step_cond = step_cond;
  mc.time_freq = time_freq;
  mc.time_scale = time_scale;
  mc.depth = 1;
  mc.exit_gate = false;
  mc.finalize();
  Model<float> s(mc);
  s.init(seed);
  for (const TensorInfo& t : s.layout.tensors()) {
    if (t.name.rfind("time_embed.", 0) == 0 || t.name.rfind("step_embed.", 0) == 0 ||
        t.name.find(".ada.") != std::string::npos)
      continue;  // fresh
    const TensorInfo* src = teacher.layout.find(t.name);
    if (src && src->shape == t.shape) std::copy_n(teacher.params.data() + src->offset, t.numel, s.params.data() + t.offset);
  }
  return s;
}

// ---------------------------------------------------------------- trainer

// The flow-matching task of the one training loop: a batch of recorded latent paths per
// step (reflow rounds re-target them by the previous round's flow), the student's field
// trained on them, an EMA of its weights evaluated and saved.
struct FlowMatchTrainer::Impl final : TrainTask {
  FlowMatchConfig c;
  std::shared_ptr<Communicator> comm;  // the ranks training together (one: a single process)
  FlowMatchOptions fo;
  OptimConfig oc;  // the optimiser's settings
  std::unique_ptr<TrajectoryLoader> train, test;
  std::unique_ptr<Model<float>> teacher, model_, ema_model;
  Buffer<float> prev;  // reflow: the previous round's EMA field (empty in round 0)
  std::unique_ptr<AdamW> opt;
  int64_t step = 0;  // over all rounds: round step / steps
  size_t fb = 0, fe = 0;
  // the step's work and what its metrics line reports
  Buffer<float> y, ends;
  TrajectoryBatch tb;
  FlowMatchWork<float> w, tw;
  std::unique_ptr<FieldSystem<float>> prev_sys;
  std::unique_ptr<DecodeLoss<float>> decode;
  EndpointLoss<float> decode_fn;
  FlowEvalOptions quick;   // the quick look at sampling quality during training
  std::string quick_main;  // its test_accuracy: Euler with K steps
  FlowMatchStep st;

  // the round of the next step (the last round once all are done)
  int round() const { return static_cast<int>(std::min<int64_t>(step / c.steps, c.reflow)); }
  float* ema() { return ema_model->params.data() + fb; }
  int64_t total() const { return static_cast<int64_t>(c.steps) * (c.reflow + 1); }

  Model<float>& model() override { return *model_; }
  AdamW& optimiser() override { return *opt; }
  double learning_rate(int64_t s) const override { return flowloop::learning_rate(oc, s % c.steps); }

  std::map<std::string, std::string> metadata() const override {
    return {{"flow_match_config", c.to_json()},
            {"teacher_hash", train->manifest().teacher_hash},
            {"data", fs::absolute(c.data).string()},
            {"matcher", c.matcher}};
  }
  void write_model(const std::string& path, const std::map<std::string, std::string>& meta) const override {
    save_checkpoint(path, ema_model->cfg, ema_model->layout, ema_model->params.data(), meta);
  }
  void extra_tensors(std::vector<TensorOut<float>>& ts) override {
    for (const auto& t : model_->layout.tensors()) {
      if (t.offset < fb || t.offset >= fe) continue;  // frozen: the teacher's
      ts.push_back({"ema." + t.name, t.shape, ema_model->params.data() + t.offset});
      if (!prev.empty()) ts.push_back({"prev." + t.name, t.shape, prev.data() + (t.offset - fb)});
    }
  }
  void check_resumable(const SafetensorsFile& f, const std::string& path) const override {
    auto get = [&](const std::string& k) { return f.metadata_value(k, "checkpoint"); };
    if (get("teacher_hash") != train->manifest().teacher_hash)
      throw Error("checkpoint '" + path + "' learned from teacher " + get("teacher_hash") + ", the recording at '" +
                  c.data + "' is of teacher " + train->manifest().teacher_hash);
    require_resumable(FlowMatchConfig::from_json(get("flow_match_config"), path), c, path);
  }
  void load_extra(const SafetensorsFile& f, int64_t at) override {
    step = at;
    if (round() > 0) prev.assign(fe - fb, 0.0f);
    for (const auto& t : model_->layout.tensors()) {
      if (t.offset < fb || t.offset >= fe) {
        std::copy_n(model_->params.data() + t.offset, t.numel, ema_model->params.data() + t.offset);
        continue;
      }
      f.copy_to("ema." + t.name, t.shape, ema_model->params.data() + t.offset);
      if (!prev.empty()) f.copy_to("prev." + t.name, t.shape, prev.data() + (t.offset - fb));
    }
  }

  // Reflow: x1 of every recording in the batch becomes the previous round's flow from its x0.
  void reflow_targets(TrajectoryBatch& b, FieldSystem<float>& sys, Buffer<float>& out) const {
    const size_t n = static_cast<size_t>(b.T) * static_cast<size_t>(b.C);
    out.resize(static_cast<size_t>(b.B) * n);
    for (int i = 0; i < b.B; ++i) std::copy_n(b.state(i, 0), n, out.data() + static_cast<size_t>(i) * n);
    const auto r = sys.solve(out.data(), DepthSpec::parse(c.reflow_sampler).solve_options(1.0));
    if (!r.ok()) throw Error("reflow: the previous round's flow failed: " + r.message);
    for (int i = 0; i < b.B; ++i)
      std::copy_n(out.data() + static_cast<size_t>(i) * n, n, b.state(i, b.K));
  }

  // Sets up the step's work (once per run).
  void prepare_run() {
    w.device = model_->device_field();
    tw.device = ema_model->device_field();
    prev_sys.reset();
    decode.reset();
    if (c.decode_weight > 0) {
      decode = std::make_unique<DecodeLoss<float>>(*model_, c.decode_weight);
      decode_fn = decode->as_endpoint();
    }
    quick = FlowEvalOptions();
    for (int k : {1, 2, train->manifest().K}) quick.samplers.push_back(DepthSpec::parse("euler:" + std::to_string(k)));
    if (quick.samplers[2].token() == quick.samplers[1].token() || quick.samplers[2].token() == quick.samplers[0].token())
      quick.samplers.pop_back();
    quick.teacher_rows = false;
    if (c.shortcut) quick.shortcut = {1, 2};
    quick_main = quick.samplers.back().token();
    quick.generative = fo.matcher == Matcher::Generative;
    quick.seed = c.seed;
    quick.examples = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(c.eval_batches) * c.batch, test->examples()));
    quick.batch = std::min(quick.examples, 256);
  }

  TaskStep gradient(int64_t at, float* grads, Communicator& cm) override {
    Model<float>& m = *model_;
    step = at;
    const size_t n = static_cast<size_t>(train->manifest().T) * static_cast<size_t>(train->manifest().C);
    const int64_t local = at % c.steps;
    train->batch(local + static_cast<int64_t>(round()) * c.steps, c.batch, tb);
    tb.subsample(c.state_stride);
    if (decode) {  // the teacher's ends (a reflow round then overwrites them with the flow's)
      ends.resize(static_cast<size_t>(tb.B) * n);
      for (int b = 0; b < tb.B; ++b) std::copy_n(tb.state(b, tb.K), n, ends.data() + static_cast<size_t>(b) * n);
      decode->set_batch(ends.data(), tb.targets);
    }
    if (round() > 0) {
      if (!prev_sys || prev_sys->groups() != tb.B)
        prev_sys = std::make_unique<FieldSystem<float>>(m.field, prev.data(), tb.B, tb.T, m.device_field());
      prev_sys->set_params(prev.data());
      reflow_targets(tb, *prev_sys, y);
    }
    Rng rng(mix(c.seed, static_cast<uint64_t>(at)));
    const EndpointLoss<float>* endpoint = decode ? &decode_fn : nullptr;
    // this rank's rows (all of them in one process); its loss and gradient are its parts
    // of the whole batch's means, so the sums over the ranks are the whole batch's
    const auto [r0, r1] = shard_rows(tb.B, cm.rank(), cm.size());
    st = flow_match_step(m.field, m.field_params(), tb.states.data(), tb.B, tb.K, tb.T, fo, rng, grads + fb, w,
                         endpoint, ema(), r0, r1);
    if (cm.size() > 1) {
      double sums[2] = {st.loss, st.shortcut_loss};
      cm.sum(sums, 2);
      st.loss = sums[0];
      st.shortcut_loss = sums[1];
    }
    return {st.loss, 1.0};
  }

  // EMA, warmed up over the round's first steps
  void updated(int64_t done) override {
    step = done;
    const int64_t local = (done - 1) % c.steps;
    const float d = static_cast<float>(std::min(c.ema, (1.0 + static_cast<double>(local)) / (10.0 + static_cast<double>(local))));
    float* e = ema();
    const float* p = model_->field_params();
    for (size_t i = 0, nf = fe - fb; i < nf; ++i) e[i] = d * e[i] + (1 - d) * p[i];
  }

  void metrics(nlohmann::ordered_json& line, const StepTiming& tm, Communicator&) override {
    if (c.reflow > 0) line["round"] = (step - 1) / c.steps;
    line["loss"] = st.loss;
    line["coupling_cost"] = st.coupling_cost;
    if (decode) line["decode_loss"] = st.endpoint_loss;
    line["lr"] = tm.lr;
    line["grad_norm"] = tm.grad_norm;
    if (c.shortcut) line["shortcut_loss"] = st.shortcut_loss;
    // per sequence: the trained evaluation, and the shortcut slots' two target evaluations
    line["nfe_forward"] = 1.0 + 2.0 * st.shortcut_rows / tb.B;
    line["nfe_backward"] = 1;
    line["flops"] = 3.0 * model_->field.flops(tb.B, tb.T) + 2.0 * model_->field.flops(st.shortcut_rows, tb.T);
    line["tokens_per_s"] = static_cast<double>(tb.B) * tb.T / tm.seconds;
    line["device"] = device_name(model_->device());
  }

  bool boundary(int64_t done) const override { return done % c.steps == 0; }
  // the round's model (rank 0 writes it), then the next round starts from it with fresh moments
  void at_boundary(int64_t done, bool lead) override {
    step = done;
    if (lead) {
      std::map<std::string, std::string> meta = metadata();
      meta["step"] = std::to_string(done);
      write_model((fs::path(c.out) / ("model-round-" + std::to_string(round() - 1) + ".safetensors")).string(), meta);
    }
    const size_t nf = fe - fb;
    prev.assign(ema(), ema() + nf);
    std::copy_n(ema(), nf, model_->params.data() + fb);
    std::fill(opt->m.begin(), opt->m.end(), 0.0f);
    std::fill(opt->v.begin(), opt->v.end(), 0.0f);
    opt->t = 0;
    opt->state_changed();
  }

  void evaluate(nlohmann::ordered_json& line, std::ostream& summary) override {
    line["test_loss"] = test_loss(tw);
    const auto rows = flow_match_evaluate(*ema_model, *teacher, *test, quick);
    for (const auto& r : rows) {
      line["test_accuracy_" + r.sampler] = r.accuracy;
      line["test_rel_l2_" + r.sampler] = r.rel_l2;
    }
    for (const auto& r : rows)
      if (r.sampler == quick_main) line["test_accuracy"] = r.accuracy;
    summary << "  test loss " << line["test_loss"].get<double>();
    for (const auto& r : rows) summary << "  acc " << r.sampler << " " << r.accuracy;
  }

  // The test loss of the EMA weights on eval_batches test batches (fixed draws).
  double test_loss(FlowMatchWork<float>& work) {
    const int64_t B = std::min<int64_t>(c.batch, test->examples());
    const int nb = static_cast<int>(std::min<int64_t>(c.eval_batches, test->examples() / B));
    TrajectoryBatch batch;
    double sum = 0;
    for (int i = 0; i < nb; ++i) {
      test->range(i * B, static_cast<int>(B), batch);
      batch.subsample(c.state_stride);
      Rng rng(mix(c.seed ^ 0x74657374ULL, static_cast<uint64_t>(i)));
      sum += flow_match_step(ema_model->field, ema_model->field_params(), batch.states.data(), batch.B, batch.K, batch.T, fo, rng,
                             static_cast<float*>(nullptr), work)
                 .loss;
    }
    return sum / nb;
  }
};

FlowMatchTrainer::FlowMatchTrainer(const FlowMatchConfig& cfg, std::shared_ptr<Communicator> comm)
    : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.c = cfg;
  I.c.validate();
  I.comm = comm ? std::move(comm) : single_process();
  if (I.comm->size() > 1) {
    shard_rows(I.c.batch, 0, I.comm->size());  // every rank gets a row
    if (I.c.decode_weight > 0)
      throw Error("flow-match train: the decode loss reads the whole batch; data-parallel training over " +
                  std::to_string(I.comm->size()) + " ranks does not shard it: train it in one process");
  }
  I.fo = I.c.options();
  I.oc = I.c.optimiser();
  I.train = std::make_unique<TrajectoryLoader>(I.c.data, "train", I.c.seed);
  I.test = std::make_unique<TrajectoryLoader>(I.c.data, "test", I.c.seed);
  const TrajectoryManifest& m = I.train->manifest();
  I.teacher = std::make_unique<Model<float>>(load_model<float>(I.train->teacher_path()));
  if (I.teacher->cfg.d_model != m.C || I.teacher->cfg.context < m.T)
    throw Error("trajectory data '" + I.c.data + "': states of " + std::to_string(m.T) + " x " + std::to_string(m.C) +
                " do not fit its teacher (context " + std::to_string(I.teacher->cfg.context) + ", width " +
                std::to_string(I.teacher->cfg.d_model) + ")");
  if (m.K % I.c.state_stride != 0)
    throw Error("flow-match config: state_stride " + std::to_string(I.c.state_stride) + " does not divide the recording's K = " +
                std::to_string(m.K));
  I.model_ = std::make_unique<Model<float>>(make_student(*I.teacher, I.c.time_freq, I.c.time_scale, I.c.seed, I.c.shortcut));
  I.ema_model = std::make_unique<Model<float>>(*I.model_);
  I.fb = I.model_->layout.field_begin();
  I.fe = I.model_->layout.field_end();
  I.opt = std::make_unique<AdamW>(I.model_->layout, I.oc, I.fb, I.fe);
  if (I.comm->rank() == 0) require_writable(I.c.out);
}

FlowMatchTrainer::~FlowMatchTrainer() = default;
const Model<float>& FlowMatchTrainer::model() const { return *impl_->ema_model; }
void FlowMatchTrainer::set_device(Device d) {
  // the step's arrays live on the models' present backend: freed while it is alive
  impl_->w = FlowMatchWork<float>();
  impl_->tw = FlowMatchWork<float>();
  impl_->prev_sys.reset();
  impl_->comm = communicator_for(impl_->comm, d);  // (several ranks on cuda: each its GPU, NCCL)
  for (Model<float>* m : {impl_->teacher.get(), impl_->model_.get(), impl_->ema_model.get()}) m->set_device(d);
  impl_->opt->set_backend(impl_->model_->backend());
}
int64_t FlowMatchTrainer::step() const { return impl_->step; }

void FlowMatchTrainer::run(bool resume, std::ostream& progress, int64_t stop_at) {
  Impl& I = *impl_;
  I.step = 0;
  I.prev.clear();
  I.prepare_run();
  const TrainSchedule s{I.total(), I.c.eval_every, I.c.checkpoint_every, I.c.max_seconds, I.c.out, I.c.to_json()};
  run_training(I, s, *I.comm, resume, progress, stop_at, I.step);
}

}  // namespace flowloop
