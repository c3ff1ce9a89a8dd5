// flowloop/train/loop.hpp: the one training loop. A task (the language model's in
// train.hpp, flow matching's in flowmatch_train.hpp) supplies a step's gradient, its
// evaluation and the tensors of its state; the loop owns everything around them:
//   - resume: DIR/checkpoint.safetensors holds the parameters, AdamW's moments over its
//     range and its step count, the run's step and the task's own tensors and metadata,
//     written atomically; a resumed run continues with exactly the uninterrupted run's
//     losses (every batch is a function of the step);
//   - the time budget (max_seconds: evaluate, checkpoint and stop; --resume goes on);
//   - DIR/metrics.jsonl (one JSON line a step, cut back to the checkpoint on resume) and
//     DIR/config.json;
//   - the evaluation and checkpoint cadence (and at the last step, at the time budget, and
//     at the task's boundaries: a reflow round's end);
//   - data parallelism: the gradient of each rank's share, scaled by the task, summed over
//     the ranks where the optimiser keeps it (AdamW::reduce), one decision to stop, and
//     the ranks' parameters checked equal at every checkpoint; rank 0 writes the metrics
//     and checkpoints and evaluates;
//   - the optimiser's update, and the progress line.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flowloop/io/checkpoint.hpp"
#include "flowloop/nn/model.hpp"
#include "flowloop/train/dist.hpp"
#include "flowloop/train/optim.hpp"

namespace flowloop {

// When a run reports and stops (not part of what a resume compares).
struct TrainSchedule {
  int64_t steps = 0;  // in all
  int eval_every = 1, checkpoint_every = 1;
  double max_seconds = 0;   // 0: no budget
  std::string out;          // the run's directory
  std::string config_json;  // DIR/config.json
};

// What one step of a task hands the loop.
struct TaskStep {
  double loss = 0;   // the step's loss over every rank (the task sums its ranks' shares)
  double scale = 1;  // this rank's gradient is multiplied by it before the sum over the ranks
};

// What the loop hands a task's metrics line.
struct StepTiming {
  double lr = 0, grad_norm = 0;
  double seconds = 0;      // the step's wall time
  double allreduce_s = 0;  // of which the gradient's sum over the ranks
};

class TrainTask {
 public:
  virtual ~TrainTask() = default;
  virtual Model<float>& model() = 0;  // its parameters are the optimiser's
  virtual AdamW& optimiser() = 0;
  virtual double learning_rate(int64_t step) const = 0;
  // The gradient of step `step`, of this rank's share of the batch, into grads (the
  // model's layout; zeroed by the loop). Every rank calls it: it may sum its metrics over comm.
  virtual TaskStep gradient(int64_t step, float* grads, Communicator& comm) = 0;
  // After the update of step `done - 1` (an EMA of the weights, say).
  virtual void updated(int64_t done) { (void)done; }
  // The metrics line's fields of the step just done, after "step" and before "wall_s"
  // (every rank builds the line; it may take maxima over comm).
  virtual void metrics(nlohmann::ordered_json& line, const StepTiming& timing, Communicator& comm) = 0;
  // Whether `done` steps end a part of the run (a reflow round): evaluated and
  // checkpointed as the last step is, at_boundary running between the two on every rank
  // (`lead`: rank 0, which alone writes files).
  virtual bool boundary(int64_t done) const { (void)done; return false; }
  virtual void at_boundary(int64_t done, bool lead) { (void)done, (void)lead; }
  // The evaluation (rank 0): its fields into the line, a few words for a log.
  virtual void evaluate(nlohmann::ordered_json& line, std::ostream& summary) = 0;
  virtual double progress_accuracy() const { return -1; }  // the progress bar's (< 0: none)
  // The checkpoint: the task's metadata (what a resume checks: its configuration, its
  // data), its tensors beside the parameters and moments, the final model.
  virtual std::map<std::string, std::string> metadata() const = 0;
  virtual void extra_tensors(std::vector<TensorOut<float>>& ts) { (void)ts; }
  // A resume: throws Error unless the checkpoint was written by the same task (its
  // configuration, its data); then reads the task's own tensors (the run is at `step`).
  virtual void check_resumable(const SafetensorsFile& f, const std::string& path) const = 0;
  virtual void load_extra(const SafetensorsFile& f, int64_t step) { (void)f, (void)step; }
  virtual void write_model(const std::string& path, const std::map<std::string, std::string>& meta) const = 0;
};

// Trains `task` from step 0, or from its checkpoint in s.out with resume, to s.steps;
// stop_at >= 0 stops after that many steps in all (as if the run were killed). `step`
// holds the steps done (updated as the run goes).
void run_training(TrainTask& task, const TrainSchedule& s, Communicator& comm, bool resume, std::ostream& progress,
                  int64_t stop_at, int64_t& step);

}  // namespace flowloop
