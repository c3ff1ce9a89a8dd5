// flowloop/train/train.hpp: training looped and ODE-depth language models.
//
// AdamW with warm-up then cosine learning rate, gradient clipping, evaluation
// every N steps, atomic checkpoints holding model, optimiser state and step;
// `resume` continues with exactly the losses of an uninterrupted run (every
// batch is a function of (data, seed, step)). Metrics go to DIR/metrics.jsonl.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "flowloop/train/data.hpp"
#include "flowloop/ode/depth.hpp"
#include "flowloop/train/dist.hpp"
#include "flowloop/ode/grad.hpp"
#include "flowloop/nn/model.hpp"
#include "flowloop/train/optim.hpp"

namespace flowloop {

struct TrainConfig {
  // data: a built-in task, or a text file ("fortunes": the installed collection)
  std::string task;
  int task_n = 0, task_hops = 0, task_prime = 0;
  std::string text;
  int context = 64;  // text only: sequence length
  std::string tokenizer;  // text only: its tokens by this tokenizer.json (or model directory); empty: bytes
  // model
  int d_model = 64, n_head = 4, n_block = 1, d_ff = 0;
  // the block's family (ModelConfig::arch) and the llama block's options; n_prelude and
  // n_coda layers run once around the n_block of the looped core
  std::string arch = "gpt2";
  int n_kv_head = 0, n_prelude = 0, n_coda = 0;
  double rope_theta = 10000.0;
  bool qkv_bias = false, tie_head = true, core_norm = false;
  // the time-conditioned field (ModelConfig): time_scale 0 means 1000 / depth
  bool time_cond = false;
  int time_freq = 256;
  double time_scale = 0;
  // depth: loop K (depth.loops > 0), or an ODE solve (depth.solver). JSON keys: loops,
  // solver, solver_steps, rtol, atol, t1, controller, initial_norm, h0, solver_max_steps,
  // batch_coupled, exit_threshold (null: not given). An ODE solve's t1 defaults to
  // kDefaultTrainDepth; the trained model's depth is K, or round(t1).
  DepthSpec depth;
  bool exit_gate = false;  // loops only: train Ouro's exit gate with entropy weight gate_beta
  double gate_beta = 0.1;
  // loops only: Huginn's random depth. Each batch loops K = Poisson(tau) + 1 times,
  // tau ~ LogNormal(log(mean) - s^2/2, s = 0.5), backpropagating through the last
  // backprop_loops loops only. 0: off (evaluation then uses `loops`).
  double random_depth_mean = 0;
  int backprop_loops = 8;
  // ODE only: the discretisation drawn afresh for every batch (a function of seed and
  // step), so that the field cannot fit one solver's error (Huginn's random depth in
  // continuous time). random_steps_max > 0: fixed steps N ~ U{random_steps_min ..
  // random_steps_max} on [0, t1]. random_solvers: one of these methods per batch
  // (comma-separated; fixed-step ones take the random step count, or round(t1)).
  // t1_jitter b > 0 (STEER): t1 ~ U(t1 - b, t1 + b) per batch.
  int random_steps_min = 1, random_steps_max = 0;
  std::string random_solvers;
  double t1_jitter = 0;
  // Initial weights from a trained model (same architecture) instead of a fresh init,
  // for example a looped model continued as an ODE.
  std::string init_from;
  std::string grad = "backprop";
  // ODE only: weights of the kinetic-energy and Jacobian-norm regularisers (GradOptions)
  double kinetic = 0, jacobian = 0;
  // optimisation
  int steps = 1000, batch = 32, warmup = 100;
  double lr = 1e-3, min_lr = 1e-4, weight_decay = 0.1, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, clip = 1.0;
  int eval_every = 100, eval_batches = 8, checkpoint_every = 100;
  // Wall-clock budget of one run in seconds (0: none): after the step that reaches it,
  // the run evaluates, checkpoints and stops (a later --resume goes on to `steps`).
  // The schedule still spans `steps`. Not part of the configuration a resume compares.
  double max_seconds = 0;
  uint64_t seed = 0;
  std::string out;

  // JSON object with any of the fields above; unknown keys and wrong types are
  // errors that name the key. Missing keys keep their defaults.
  static TrainConfig from_json(const std::string& text, const std::string& where);
  std::string to_json() const;
  void validate() const;  // names the first bad field
  // The depth the trained model is written with (ModelConfig::depth): K, or round(t1).
  int trained_depth() const;
  // The architecture of the model it trains on `data` (vocabulary and context from the data).
  ModelConfig model_config(const DataSource& data) const;
  // The solve of training step `step`: the depth spec, with the step's random
  // discretisation and end time when those are on.
  SolveOptions solve_options(int64_t step) const;
  bool randomized() const { return random_steps_max > 0 || !random_solvers.empty() || t1_jitter > 0; }
  static constexpr double kDefaultTrainDepth = 4.0;
  // The gradient method and regularisers of training step `step` (its Hutchinson
  // draw is a function of seed and step).
  GradOptions grad_options(int64_t step) const;
  // The optimiser's settings: AdamW's and the learning-rate schedule's.
  OptimConfig optim() const { return {steps, warmup, lr, min_lr, weight_decay, beta1, beta2, eps, clip}; }
};

// Huginn's depth for training step `step` (a function of seed and step).
int random_depth(double mean, uint64_t seed, int64_t step);

// The configuration a model was trained with (its train_config metadata, written by
// Trainer). Throws Error naming the file when it has none, or when task / text (non-empty)
// is not what it was trained on.
TrainConfig trained_config(const std::string& model, const std::string& task = "", const std::string& text = "");
// The data of a study command (compare, eval, trajectory, flow-match record) on `model`: a
// flowloop training run's own (trained_config), or, for a Hugging Face directory, the text
// file `text` in the model's own tokens (its tokenizer.json), sequences of `context` tokens
// (0: 128, at most the model's context). A Hugging Face directory without text is refused.
TrainConfig study_config(const std::string& model, const std::string& task, const std::string& text, int context = 0);

// Learning rate at step s of c.optim()'s schedule.
inline double learning_rate(const TrainConfig& c, int64_t step) { return learning_rate(c.optim(), step); }

std::unique_ptr<DataSource> make_source(const TrainConfig& c);
// Throws Error unless the model can read the data: the same vocabulary, a context
// at least the sequence length. `what` names the data in the message.
void require_fits(const ModelConfig& model, const DataSource& data, const std::string& what);

// Loss, accuracy and nfe over `batches` test batches (batch i is test batch i of
// the source, so every regime sees the same examples). A solve that fails
// (max steps, step too small, non-finite) does not throw: it is counted in
// status_counts (see EvalResult::require_ok). With an exit rule ("q":
// the gate's cumulative exit probability reaches the threshold; "delta":
// ||h_t - h_{t-1}|| falls below it) each token answers at its exit loop.
// `depth` is resolved against model.cfg.depth (its default loop count and t1).
EvalResult evaluate(const Model<float>& model, const DataSource& data, const DepthSpec& depth, int batches,
                    int batch_size, const std::string& exit_rule = "", double exit_threshold = 0.0);

// FLOPs of a training step of batch (B, T): nfe_forward field evaluations and
// nfe_backward vjps (each twice an evaluation), plus the readout forward and
// backward (3 x 2BTCV). An ODE step counts at the batch's depth (the most
// evaluations over its sequences): an upper bound for per-sequence solves.
// metrics.jsonl logs it per step as "flops".
double train_step_flops(const Model<float>& model, int B, int T, double nfe_forward, double nfe_backward);

// Accuracy of logits (B*T, V) against targets: exact match of every scored
// position of a row, or the fraction of scored positions right.
double accuracy(const float* logits, const TokenBatch& targets, int V, bool exact_match, int64_t* count);

// What a run's DIR/metrics.jsonl records, step by step (a resumed run adds up): the
// steps, the training seconds (each step's tokens_per_step / tokens_per_s; evaluations
// and checkpoints excluded), FLOPs, the mean forward NFE per step, and the test
// evaluations along the way with the cumulative FLOPs and seconds at each.
struct TrainCost {
  struct Point {
    int64_t step = 0;
    double flops = 0, seconds = 0, accuracy = 0, loss = 0;
  };
  int64_t steps = 0;
  double seconds = 0, flops = 0, nfe_mean = 0;
  std::vector<Point> curve;
};
TrainCost read_train_cost(const std::string& dir, double tokens_per_step);

// What a training loop shares (train, flow-match train):
// Creates the directory and proves it writable (a probe file) before any work; throws
// Error naming it.
void require_writable(const std::string& dir);
// Starts DIR's metrics file: empty for a new run; for a run resumed at `step`, the lines
// of the steps up to it (those after the checkpoint are dropped), written atomically.
void start_metrics(const std::string& metrics_file, bool resume, int64_t step);
// The progress bar of a terminal: "\r[####....] step/total loss L [acc A] ETA MmSSs",
// the ETA from the wall time since the run's first step `first`. acc < 0: not shown.
std::string progress_line(int64_t step, int64_t total, int64_t first, double wall, double loss, double acc = -1);

// A resume's check of its configuration (TrainConfig, FlowMatchConfig): the schedule
// depends on every setting; what only decides where and how often a run reports (its
// directory, evaluation and checkpoint intervals, test batches) and its time budget may
// change between runs. Throws Error naming the checkpoint otherwise.
template <class Config>
void require_resumable(Config saved, const Config& now, const std::string& checkpoint) {
  saved.max_seconds = now.max_seconds;
  saved.out = now.out;
  saved.eval_every = now.eval_every;
  saved.eval_batches = now.eval_batches;
  saved.checkpoint_every = now.checkpoint_every;
  if (saved.to_json() != now.to_json())
    throw Error("checkpoint '" + checkpoint + "' was written with another configuration; resume with the same one");
}

class Trainer {
 public:
  // Checks everything (config, data, output directory) before any work. With a
  // communicator of N > 1 ranks (world() under mpirun), each rank trains on its rows of
  // every global batch (shard_rows) and the gradients are summed over the ranks before
  // the update, which every rank applies: the losses and gradients are the one-process
  // run's to rounding. Rank 0 writes the metrics (with the ranks, the load imbalance:
  // the slowest rank's field evaluations over the mean, and the allreduce's seconds)
  // and the checkpoints, and evaluates; every rank resumes from them, with any N.
  // Per-sequence solves only (no batch_coupled), no Jacobian regulariser. On a device
  // (set_device, set_backend) the gradient is summed there: on cuda each rank takes the
  // GPU of its local rank, and NCCL sums on the GPUs where built and every rank has its
  // own (communicator_for); otherwise the sum goes through the host.
  explicit Trainer(const TrainConfig& c, std::shared_ptr<Communicator> comm = nullptr);
  ~Trainer();
  // Trains to c.steps; with resume, continues from DIR/checkpoint.safetensors.
  // stop_at >= 0 stops after that many steps in all (as if the run were killed).
  void run(bool resume, std::ostream& progress, int64_t stop_at = -1);
  const Model<float>& model() const;
  int64_t step() const;  // steps done so far
  // Where the model's field runs (Model::set_device) and the optimiser updates; every
  // metrics line names it.
  void set_device(Device d);
  // The same with a given backend (the reference backend: the device path on the host).
  void set_backend(std::shared_ptr<Backend<float>> be);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace flowloop
