// The one training loop (train/loop.hpp): resume, the time budget, metrics, the evaluation
// and checkpoint cadence, data-parallel sums and the update, around a task's step.
#include "flowloop/train/loop.hpp"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "flowloop/io/io.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop {
namespace {

// Every rank must hold the same parameters (they apply the same summed gradient); a
// 64-bit hash of their bits compared over the ranks at every checkpoint proves it.
void require_same_parameters(Communicator& comm, const Buffer<float>& params, int64_t step) {
  const uint64_t h = fnv1a64(params.data(), params.size() * sizeof(float));
  // (two 32-bit halves: each exact in a double)
  if (!same_on_every_rank(comm, {static_cast<double>(h >> 32), static_cast<double>(h & 0xffffffffULL)}))
    throw Error("step " + std::to_string(step) + ": the ranks' parameters differ (rank " + std::to_string(comm.rank()) +
                "'s hash is not every rank's)");
}

// The checkpoint: every parameter, AdamW's moments over its range (m[i] is parameter
// begin + i), the task's tensors; the run's step and AdamW's t beside the task's metadata.
std::map<std::string, std::string> run_metadata(const TrainTask& task, int64_t step) {
  auto md = task.metadata();
  md["step"] = std::to_string(step);
  return md;
}

void save_checkpoint_file(TrainTask& task, const std::filesystem::path& dir, int64_t step) {
  Model<float>& m = task.model();
  AdamW& opt = task.optimiser();
  opt.sync_host();
  std::vector<TensorOut<float>> ts;
  for (const auto& t : m.layout.tensors()) {
    ts.push_back({t.name, t.shape, m.params.data() + t.offset});
    if (t.offset < opt.begin() || t.offset >= opt.end()) continue;  // frozen
    ts.push_back({"optim.m." + t.name, t.shape, opt.m.data() + (t.offset - opt.begin())});
    ts.push_back({"optim.v." + t.name, t.shape, opt.v.data() + (t.offset - opt.begin())});
  }
  task.extra_tensors(ts);
  auto md = run_metadata(task, step);
  md["format"] = "flowloop";
  md["config"] = m.cfg.to_json();
  md["adam_t"] = std::to_string(opt.t);
  write_safetensors((dir / "checkpoint.safetensors").string(), ts, md);
  task.write_model((dir / "model.safetensors").string(), run_metadata(task, step));
}

int64_t load_checkpoint_file(TrainTask& task, const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::read(path);
  task.check_resumable(f, path);
  auto get = [&](const std::string& k) { return f.metadata_value(k, "checkpoint"); };
  Model<float>& m = task.model();
  AdamW& opt = task.optimiser();
  for (const auto& t : m.layout.tensors()) {
    f.copy_to(t.name, t.shape, m.params.data() + t.offset);
    if (t.offset < opt.begin() || t.offset >= opt.end()) continue;
    f.copy_to("optim.m." + t.name, t.shape, opt.m.data() + (t.offset - opt.begin()));
    f.copy_to("optim.v." + t.name, t.shape, opt.v.data() + (t.offset - opt.begin()));
  }
  const int64_t step = std::stoll(get("step"));
  opt.t = std::stoll(get("adam_t"));
  task.load_extra(f, step);
  opt.state_changed();
  opt.prepare(m.params.data());  // an evaluation before the next step reads the loaded state
  return step;
}

}  // namespace

void run_training(TrainTask& task, const TrainSchedule& s, Communicator& comm, bool resume, std::ostream& progress,
                  int64_t stop_at, int64_t& step) {
  const std::filesystem::path dir = s.out;
  const std::string ckpt = (dir / "checkpoint.safetensors").string(), metrics = (dir / "metrics.jsonl").string();
  const int ranks = comm.size();
  const bool lead = comm.rank() == 0;  // writes the metrics and checkpoints, evaluates, reports
  step = 0;
  if (resume) {
    if (!std::filesystem::exists(ckpt)) throw Error("--resume: no checkpoint at '" + ckpt + "'");
    step = load_checkpoint_file(task, ckpt);
  }
  std::ofstream log;
  if (lead) {
    start_metrics(metrics, resume, step);
    write_file_atomic((dir / "config.json").string(), s.config_json + "\n");
    log.open(metrics, std::ios::app);
  }
  const bool tty = lead && isatty(fileno(stderr));
  Model<float>& m = task.model();
  AdamW& opt = task.optimiser();
  Buffer<float> grads(m.params.size(), 0.0f);
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t first = step;
  while (step < s.steps && (stop_at < 0 || step < stop_at)) {
    const auto t0 = std::chrono::steady_clock::now();
    opt.prepare(m.params.data());  // on a device: the (loaded) state there before the loss reads it
    std::fill(grads.begin(), grads.end(), 0.0f);
    const TaskStep ts = task.gradient(step, grads.data(), comm);
    StepTiming timing;
    if (ranks > 1) {  // the gradient summed over the ranks where the optimiser keeps it
      const auto r0 = std::chrono::steady_clock::now();
      opt.reduce(grads.data(), static_cast<float>(ts.scale), comm);
      if (m.backend()) m.backend()->synchronize();  // (the device's sum is queued: its time)
      timing.allreduce_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - r0).count();
    }
    if (!std::isfinite(ts.loss)) throw Error("step " + std::to_string(step) + ": the loss is not finite");
    timing.lr = task.learning_rate(step);
    timing.grad_norm = opt.step(m.params.data(), grads.data(), timing.lr);
    ++step;
    task.updated(step);
    const auto t1 = std::chrono::steady_clock::now();
    timing.seconds = std::chrono::duration<double>(t1 - t0).count();
    const double wall = std::chrono::duration<double>(t1 - t_start).count();
    bool out_of_time = s.max_seconds > 0 && wall >= s.max_seconds && step < s.steps;
    nlohmann::ordered_json line;
    line["step"] = step;
    task.metrics(line, timing, comm);
    if (ranks > 1) {
      line["ranks"] = ranks;
      line["communicator"] = comm.name();  // "mpi", or "mpi+nccl" where the GPUs sum
      line["allreduce_s"] = timing.allreduce_s;
      line["step_s"] = timing.seconds;
      line["gradient_bytes"] = static_cast<double>((opt.end() - opt.begin()) * sizeof(float));  // what is summed
    }
    if (ranks > 1) {  // one decision to stop
      double stop = out_of_time ? 1.0 : 0.0;
      comm.max(&stop, 1);
      out_of_time = stop > 0;
    }
    line["wall_s"] = wall;
    if (out_of_time) line["stopped"] = "max_seconds";
    const bool boundary = task.boundary(step);
    const bool last = step == s.steps || out_of_time || boundary;  // evaluated and checkpointed
    if (lead && (step % s.eval_every == 0 || last)) {
      std::ostringstream summary;
      task.evaluate(line, summary);
      if (!tty)
        progress << "step " << step << "/" << s.steps << "  loss " << ts.loss << summary.str() << "  " << wall << " s"
                 << std::endl;
    }
    if (lead) {
      log << line.dump() << "\n";
      log.flush();
    }
    if (boundary && step < s.steps) task.at_boundary(step, lead);
    if (step % s.checkpoint_every == 0 || last) {
      if (ranks > 1) require_same_parameters(comm, m.params, step);
      if (lead) save_checkpoint_file(task, dir, step);
    }
    if (tty) progress << progress_line(step, s.steps, first, wall, ts.loss, task.progress_accuracy()) << std::flush;
    if (out_of_time) {
      if (tty) progress << std::endl;
      if (lead)
        progress << "stopped at step " << step << " of " << s.steps << ": the time budget of " << s.max_seconds
                 << " s is spent (--resume goes on)" << std::endl;
      return;
    }
  }
  if (tty) progress << std::endl;
}

}  // namespace flowloop
