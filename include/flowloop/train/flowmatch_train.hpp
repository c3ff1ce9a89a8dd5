// flowloop/train/flowmatch_train.hpp: training and evaluating a flow student on recorded
// latent trajectories (`flowloop flow-match train` and `flow-match eval`).
//
// The student is the teacher's architecture with a time-conditioned field, integrated
// over t in [0, 1] (its depth is 1): v(x, t) carries the teacher's h_0 to its h_K. It
// starts from the teacher's weights (the block, its embedding and readout; the time
// embedding fresh, the modulation zero), and only the field's parameters train: the
// embedding and readout stay the teacher's, so that the student decodes as it does.
// Training reads the recorded shards in a shuffled order that is a function of (seed,
// step), holding at most two shards in memory; it keeps an EMA of the weights (written
// as the model), and resumes exactly.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "flowloop/ode/depth.hpp"
#include "flowloop/train/flowmatch.hpp"
#include "flowloop/nn/model.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop {

// ---- reading a recording -----------------------------------------------------------

// One batch of recordings: states (B, K + 1, T, C), tokens and targets (B, T).
struct TrajectoryBatch {
  int B = 0, K = 0, T = 0, C = 0;
  std::vector<float> states;
  TokenBatch tokens, targets;
  size_t offset(int b, int k) const {
    return (static_cast<size_t>(b) * static_cast<size_t>(K + 1) + static_cast<size_t>(k)) * static_cast<size_t>(T) *
           static_cast<size_t>(C);
  }
  const float* state(int b, int k) const { return states.data() + offset(b, k); }
  float* state(int b, int k) { return states.data() + offset(b, k); }
  // Keeps every s-th state (K a multiple of s), in place: K becomes K / s.
  void subsample(int s);
};

// Reads one split of DATA. Training batches come from an endless sequence of epochs;
// epoch e visits the shards in an order drawn from (seed, e) and the examples of each
// shard in an order drawn from (seed, e, shard), so batch i is a function of (seed, i)
// and the loader keeps at most two shards in memory.
class TrajectoryLoader {
 public:
  // Checks the manifest (and that DATA/teacher.safetensors is the recorded teacher).
  TrajectoryLoader(const std::string& dir, const std::string& split, uint64_t seed);
  const TrajectoryManifest& manifest() const { return m_; }
  const std::string& dir() const { return dir_; }
  std::string teacher_path() const;
  // The teacher's task scores a row by exact match of every scored position.
  bool exact_match() const { return exact_match_; }
  int64_t examples() const { return total_; }
  // Training batch `index` of B examples (positions [index B, index B + B) of the epochs).
  void batch(int64_t index, int B, TrajectoryBatch& out);
  // The examples [first, first + n) in recorded order (evaluation).
  void range(int64_t first, int n, TrajectoryBatch& out);

 private:
  const TrajectoryShardData& shard(size_t i);
  void take(size_t shard_index, int example, int slot, TrajectoryBatch& out);
  void shape(int B, TrajectoryBatch& out) const;
  std::string dir_, split_;
  TrajectoryManifest m_;
  std::vector<TrajectoryShard> shards_;
  std::vector<int64_t> first_;  // each shard's first index in the split
  int64_t total_ = 0;
  uint64_t seed_;
  bool exact_match_ = false;
  std::map<size_t, TrajectoryShardData> cache_;  // at most two shards
  std::vector<size_t> lru_;
  // the order of the current epoch
  int64_t epoch_ = -1;
  std::vector<size_t> shard_order_;
  std::vector<int64_t> epoch_first_;  // cumulative examples in shard_order_
  std::vector<std::vector<int>> example_order_;
};

// log-softmax of every row of logits (N, V), in double, into out (N * V).
template <class S>
void log_softmax_rows(std::vector<double>& out, const S* logits, size_t N, size_t V);

// ---- the decode loss -----------------------------------------------------------------

// weight times the mean over scored positions of KL(p_teacher || p_student), p the
// next-token distributions that the (frozen) readout decodes from the recording's h_K
// and from the step's x1_hat: an EndpointLoss that weighs the latent error by what it
// changes in the answer. Slot b's end is recording st.x1_row[b]'s.
template <class S>
class DecodeLoss {
 public:
  DecodeLoss(const Model<S>& model, double weight) : model_(model), weight_(weight) {}
  // The batch's recordings: their ends h_K (B, T, C) and targets (B, T; -1: not scored).
  void set_batch(const S* ends, const TokenBatch& targets);
  double operator()(const S* x1hat, const FlowMatchStep& st, S* grad);
  EndpointLoss<S> as_endpoint() {
    return [this](const S* x, const FlowMatchStep& st, S* g) { return (*this)(x, st, g); };
  }

 private:
  const Model<S>& model_;
  double weight_;
  int B_ = 0, T_ = 0;
  std::vector<double> ref_;  // (B*T, V) the teacher's log-probabilities
  std::vector<double> lp_;   // (B*T, V) the student's, scratch
  std::vector<int32_t> targets_;
  ReadoutCache<S> rc_;
  Buffer<S> junk_;           // the readout's parameter gradients (frozen: dropped)
};

// ---- training ----------------------------------------------------------------------

struct FlowMatchConfig {
  std::string data;  // the recording (flow-match record's --out)
  std::string matcher = "icfm", coupling = "identity", time_sampler = "uniform";
  double sigma = 0.0, sinkhorn_reg = 0.05;
  // Weight of the DecodeLoss beside the velocity regression (0: plain flow matching).
  double decode_weight = 0.0;
  // Every s-th recorded state only (h_0, h_s, .., h_K; K a multiple of s): the
  // trajectory matcher then follows K / s segments.
  int state_stride = 1;
  // Shortcut models (FlowMatchOptions): the student is step-conditioned and learns
  // steps d = 1 .. 2 / shortcut_steps on a shortcut_fraction of every batch, its
  // targets made by the EMA weights; `flow-match eval` then samples it with
  // "shortcut:N" (N Euler steps told d = 1 / N).
  bool shortcut = false;
  double shortcut_fraction = 0.125;
  int shortcut_steps = 128;
  // The student's time embedding (ModelConfig): t in [0, 1], tau = t time_scale
  int time_freq = 256;
  double time_scale = 1000.0;
  // EMA of the weights: ema <- d ema + (1 - d) w after every step, with d =
  // min(ema, (1 + s) / (10 + s)), s the step within the round; the written model holds
  // the EMA.
  double ema = 0.999;
  // Reflow rounds after the first training (rectified flow): round r trains a fresh
  // run of `steps` steps, starting from round r - 1's model, on the pairs (x0, flow(x0))
  // of round r - 1's EMA model solved with reflow_sampler (a regime token, on [0, 1]).
  int reflow = 0;
  std::string reflow_sampler = "rk4:4";
  // optimisation and reporting (as train's)
  int steps = 2000, batch = 64, warmup = 100;
  double lr = 1e-3, min_lr = 1e-4, weight_decay = 0.0, beta1 = 0.9, beta2 = 0.99, eps = 1e-8, clip = 1.0;
  int eval_every = 200, eval_batches = 4, checkpoint_every = 200;
  double max_seconds = 0;
  uint64_t seed = 0;
  std::string out;

  // JSON with any of these keys; unknown keys and wrong types are errors naming the key.
  static FlowMatchConfig from_json(const std::string& text, const std::string& where);
  std::string to_json() const;
  void validate() const;  // names the first bad field (an unknown matcher, sigma < 0, ...)
  FlowMatchOptions options() const;
  // The optimiser's settings (AdamW, learning_rate).
  OptimConfig optimiser() const;
};

// The student of a teacher: its configuration with time_cond, depth 1 (t in [0, 1]),
// no exit gate; the teacher's tensors copied by name (a time-conditioned teacher's
// time embedding and modulation excepted), the time embedding initialised from seed
// and the modulation zero. step_cond: also a step embedding (shortcut), initialised from
// seed; with zero modulation it does not change the field at step 0 either. A llama
// teacher's student is the time-conditioned gpt2 block of the same width, MLP width and core
// depth, initialised from seed (adaLN is that block's).
Model<float> make_student(const Model<float>& teacher, int time_freq, double time_scale, uint64_t seed,
                          bool step_cond = false);

class FlowMatchTrainer {
 public:
  // Checks everything (configuration, recording, teacher, output directory) before any work.
  // With a communicator of N > 1 ranks (world() under mpirun), each rank evaluates and
  // differentiates its rows of every batch (shard_rows; the draws and couplings are the
  // whole batch's, made alike on every rank) and the gradients are summed before the
  // update, which every rank applies: the losses are the one-process run's to rounding.
  // Rank 0 writes the metrics and checkpoints and evaluates (the training loop's rules,
  // train/loop.hpp). The decode loss reads the whole batch: one process only.
  explicit FlowMatchTrainer(const FlowMatchConfig& c, std::shared_ptr<Communicator> comm = nullptr);
  ~FlowMatchTrainer();
  // Trains to c.steps (and the reflow rounds); with resume, continues from OUT's
  // checkpoint. stop_at >= 0 stops after that many steps in all (rounds included), as
  // if the run were killed. Call it once per trainer.
  void run(bool resume, std::ostream& progress, int64_t stop_at = -1);
  const Model<float>& model() const;  // the EMA weights
  int64_t step() const;
  // Where the teacher, the student and its EMA evaluate the field (Model::set_device):
  // the flow-matching step, the test loss and the sampling evaluations.
  void set_device(Device d);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A model written by flow-match train, with what it was trained on.
struct FlowStudent {
  Model<float> model;
  FlowMatchConfig config;
  std::string teacher_hash;
};
// Throws Error naming the file when it is not a flow-match model.
FlowStudent load_flow_student(const std::string& path);
// Throws Error unless the student learned from a recording of the loader's teacher.
void require_same_teacher(const FlowStudent& s, const TrajectoryLoader& data);

// ---- evaluation ----------------------------------------------------------------------

struct FlowEvalOptions {
  // The student's samplers, regime tokens on [0, 1] (DepthSpec::parse): empty means
  // euler at 1, 2, 4, 8 and K steps, midpoint at 1 and 2, rk4 at 1 and 2, and dopri5
  // at 1e-2, 1e-3 and 1e-4.
  std::vector<DepthSpec> samplers;
  // Shortcut samplers of a step-conditioned student: N Euler steps with the field told
  // its step d = 1 / N, rows "shortcut:N" (after the samplers' rows). When samplers and
  // shortcut are both empty, a step-conditioned student gets 1, 2, 4, 8 and K.
  std::vector<int> shortcut;
  bool teacher_rows = true;  // the truncated teacher: loop N and N Euler steps, N < K
  int examples = 0;          // test examples from the start of the split (0: all)
  int batch = 256;
  int straightness_points = 8;  // midpoints of the grid on which straightness is taken
  // A generative student (noise to the distribution of h_K): x0 is Gaussian noise (drawn
  // from seed and the batch), and the rows compare distributions only (frechet, and kl of
  // the mean decoded distributions per position); rel_l2 and accuracy are NaN.
  bool generative = false;
  uint64_t seed = 0;
};

// One row: a sampler (or the truncated teacher) at its NFE against the teacher's h_K.
//   rel_l2        ||x1_hat - h_K|| / ||h_K|| over all values
//   kl            mean over scored positions of KL(teacher || student) of the decoded
//                 next-token distributions (through the teacher's readout)
//   accuracy      of the decoded tokens against the targets
//   straightness  S = int_0^1 E ||(x1_hat - x0) - v(x_t, t)||^2 dt (E: the mean over
//                 values), on the midpoint grid of the sampler's own path; for the
//                 teacher rows, the piecewise-linear path through its states
//   frechet       the Frechet distance between Gaussians fitted to the token states (C
//                 values each) of x1_hat and of h_K: ||mu1 - mu2||^2 + tr(S1 + S2 -
//                 2 (S1^1/2 S2 S1^1/2)^1/2), a distance between distributions that needs
//                 no pairs
//   nfe           field evaluations per sequence (mean; the most for adaptive solves)
// A generative student's kl is that of the mean decoded distributions per position.
struct FlowEvalRow {
  std::string sampler;  // a regime token, "shortcut:N", or "teacher-loop" / "teacher-euler"
  double nfe = 0, nfe_max = 0;
  double rel_l2 = 0, kl = 0, accuracy = 0, straightness = 0, frechet = 0;
  int64_t examples = 0;
  std::string status = "ok";
  std::string to_json() const;
};
std::string flow_eval_csv(const std::vector<FlowEvalRow>& rows);

// The Frechet distance between Gaussians of the given means (C) and covariances (C, C).
double frechet_distance(const std::vector<double>& mu1, const std::vector<double>& cov1,
                        const std::vector<double>& mu2, const std::vector<double>& cov2, int C);

// The student's (and the truncated teacher's) rows on the test split of the loader.
// teacher: the recording's teacher (require_same_teacher checks a stored student
// against the recording). Throws Error if the shapes differ or a sampler cannot be used.
std::vector<FlowEvalRow> flow_match_evaluate(const Model<float>& student, const Model<float>& teacher,
                                             TrajectoryLoader& test, const FlowEvalOptions& opt,
                                             std::ostream* progress = nullptr);

// The samplers of a comma-separated list: regime tokens (DepthSpec::parse) into
// opt.samplers, "shortcut:N" into opt.shortcut, in order; an empty list leaves both
// empty (the defaults). Throws Error naming a bad token.
void set_samplers(FlowEvalOptions& opt, const std::string& list);

// `flow-match eval`: the student stored at `student` (load_flow_student) against the
// teacher of the recording DATA, on its test split, both on device d; a generative
// student (its matcher) is compared as distributions (opt.generative is set from it).
std::vector<FlowEvalRow> flow_match_evaluate(const std::string& student, const std::string& data, FlowEvalOptions opt,
                                             Device d, std::ostream* progress = nullptr);

}  // namespace flowloop
