// flowloop flow-match: flow matching over a teacher's latent trajectories.
//   record  the teacher's states h_0 .. h_K per sequence into safetensors shards
//   train   a time-conditioned student v(x, t) on them, simulation-free
//   eval    the student under every sampler against the teacher (and the truncated teacher)
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/hf.hpp"
#include "flowloop/train/flowmatch.hpp"
#include "flowloop/train/flowmatch_train.hpp"

namespace flowloop::cli {
namespace {
struct RecordArgs {
  std::string model, task, text, out;
  int context = 0;
  RecordOptions opt;
  KeyedOptions depth_flags;
};
struct FmTrainArgs {
  FlowMatchConfig c;
  std::string config_file, device = "auto";
  bool resume = false;
  KeyedOptions given;
};
struct FmEvalArgs {
  std::string model, data, samplers, csv, device = "auto";
  FlowEvalOptions opt;
  bool json = false, no_teacher = false;
};

CLI::App* add_train(CLI::App* fm, const std::shared_ptr<FmTrainArgs>& a) {
  auto* tr = fm->add_subcommand("train", "train a time-conditioned student v(x, t) on a recording, simulation-free "
                                         "(the teacher's embedding and readout stay fixed)");
  FlowMatchConfig& c = a->c;
  auto opt = [&](const char* flag, const char* key, auto& dst, const char* help) {
    a->given.push_back({key, tr->add_option(flag, dst, help)});
  };
  opt("--data", "data", c.data, "the recording (flow-match record's --out)");
  opt("--matcher", "matcher", c.matcher, "icfm, otcfm, sbcfm, vp, trajectory or generative");
  opt("--coupling", "coupling", c.coupling, "identity (the teacher's pairs), exact (Hungarian) or sinkhorn");
  opt("--sigma", "sigma", c.sigma, "bridge noise (sbcfm's sigma)");
  opt("--sinkhorn-reg", "sinkhorn_reg", c.sinkhorn_reg, "entropic coupling: reg relative to the largest cost");
  opt("--decode-weight", "decode_weight", c.decode_weight, "weight of the KL of the decoded one-step end against "
                                                          "the teacher's (0: plain flow matching)");
  opt("--state-stride", "state_stride", c.state_stride, "learn from every s-th recorded state (trajectory: K / s segments)");
  opt("--time-sampler", "time_sampler", c.time_sampler, "uniform, logit-normal or u-shaped");
  a->given.push_back({"shortcut", tr->add_flag("--shortcut", c.shortcut,
                                               "shortcut models: a step-conditioned student that also learns "
                                               "steps d = 1 .. 2 / shortcut-steps by self-consistency")});
  opt("--shortcut-fraction", "shortcut_fraction", c.shortcut_fraction, "the share of every batch that learns a step");
  opt("--shortcut-steps", "shortcut_steps", c.shortcut_steps, "the finest step is 2 / this (a power of two)");
  opt("--ema", "ema", c.ema, "EMA decay of the weights (the written model holds the EMA)");
  opt("--reflow", "reflow", c.reflow, "reflow rounds after the first training (rectified flow)");
  opt("--reflow-sampler", "reflow_sampler", c.reflow_sampler, "the solver that makes the reflow pairs, on [0, 1]");
  opt("--time-freq", "time_freq", c.time_freq, "time embedding width E");
  opt("--time-scale", "time_scale", c.time_scale, "tau = t * scale, t in [0, 1]");
  opt("--steps", "steps", c.steps, "training steps (per round)");
  opt("--batch", "batch", c.batch, "batch size");
  opt("--lr", "lr", c.lr, "peak learning rate");
  opt("--min-lr", "min_lr", c.min_lr, "final learning rate of the cosine");
  opt("--warmup", "warmup", c.warmup, "warm-up steps");
  opt("--weight-decay", "weight_decay", c.weight_decay, "AdamW decay (matrices only)");
  opt("--beta1", "beta1", c.beta1, "AdamW beta1");
  opt("--beta2", "beta2", c.beta2, "AdamW beta2");
  opt("--clip", "clip", c.clip, "gradient clipping by global norm (0: off)");
  opt("--eval-every", "eval_every", c.eval_every, "evaluate every N steps");
  opt("--eval-batches", "eval_batches", c.eval_batches, "test batches per evaluation");
  opt("--checkpoint-every", "checkpoint_every", c.checkpoint_every, "checkpoint every N steps");
  opt("--max-seconds", "max_seconds", c.max_seconds, "stop (evaluated and checkpointed) after this wall time");
  opt("--seed", "seed", c.seed, "seed of the fresh weights, the shuffling and the draws");
  opt("--out", "out", c.out, "output directory");
  tr->add_option("--config", a->config_file, "JSON configuration (flags given override it)");
  tr->add_flag("--resume", a->resume, "continue from OUT/checkpoint.safetensors");
  return tr;
}

CLI::App* add_eval(CLI::App* fm, const std::shared_ptr<FmEvalArgs>& a) {
  auto* ev = fm->add_subcommand("eval", "sample the student with every solver and compare with the teacher's h_K "
                                        "(and with the truncated teacher at equal NFE)");
  ev->add_option("-m,--model", a->model, "the student (flow-match train's model.safetensors)")->required()->check(CLI::ExistingFile);
  ev->add_option("--data", a->data, "the recording (its test split)")->required();
  ev->add_option("--samplers", a->samplers, "regime tokens on [0, 1], and shortcut:N (N Euler steps told d = 1/N), "
                                            "comma-separated (default: euler 1 2 4 8 K, midpoint 1 2, rk4 1 2, dopri5 "
                                            "1e-2 1e-3 1e-4, and shortcut 1 2 4 8 K for a step-conditioned student)");
  ev->add_option("--examples", a->opt.examples, "test examples (0: all)")->capture_default_str();
  ev->add_option("--batch", a->opt.batch, "sequences per solve")->capture_default_str();
  ev->add_option("--straightness-points", a->opt.straightness_points, "grid points of the straightness integral")
      ->capture_default_str();
  ev->add_option("--seed", a->opt.seed, "generative students: the seed of the noise they start from")
      ->capture_default_str();
  ev->add_flag("--no-teacher", a->no_teacher, "leave out the truncated teacher's rows");
  ev->add_flag("--json", a->json, "one JSON line per row");
  ev->add_option("--csv", a->csv, "also write the rows as CSV to this file");
  add_device_flag(ev, a->device);
  return ev;
}

int run_eval(const FmEvalArgs& a) {
  FlowEvalOptions opt = a.opt;
  set_samplers(opt, a.samplers);
  opt.teacher_rows = !a.no_teacher;
  const auto rows = flow_match_evaluate(a.model, a.data, opt, resolve_device(a.device), &std::cerr);
  if (!a.csv.empty()) write_file_atomic(a.csv, flow_eval_csv(rows));
  if (a.json) {
    for (const auto& r : rows) std::cout << r.to_json() << "\n";
  } else {
    std::cout << std::left << std::setw(16) << "sampler" << std::right << std::setw(7) << "nfe" << std::setw(10)
              << "rel_l2" << std::setw(10) << "kl" << std::setw(10) << "accuracy" << std::setw(14) << "straightness"
              << std::setw(10) << "frechet" << "\n";
    for (const auto& r : rows)
      std::cout << std::left << std::setw(16) << r.sampler << std::right << std::fixed << std::setprecision(1)
                << std::setw(7) << r.nfe << std::setprecision(4) << std::setw(10) << r.rel_l2 << std::setw(10) << r.kl
                << std::setw(10) << r.accuracy << std::setw(14) << std::defaultfloat << std::setprecision(4)
                << r.straightness << std::setw(10) << r.frechet << (r.status == "ok" ? "" : "  " + r.status) << "\n";
  }
  std::cout << std::flush;
  return 0;
}
}  // namespace

Command register_flow_match(CLI::App& app) {
  auto* fm = app.add_subcommand("flow-match", "flow matching over a teacher's latent trajectories");
  fm->require_subcommand(1);
  auto a = std::make_shared<RecordArgs>();
  auto* r = fm->add_subcommand("record", "record a teacher's latent paths h_0 .. h_K (train and test splits) "
                                         "into safetensors shards with a manifest; a rerun resumes");
  add_model_flags(r, a->model, a->opt.core_layers, "the teacher, a model written by train");
  r->add_option("--task", a->task, "the task it was trained on (checked; default: its own)");
  r->add_option("--text", a->text,
                "the text it was trained on (checked; default: its own); a Hugging Face teacher's text, in its tokens");
  r->add_option("--context", a->context, "a Hugging Face teacher's sequences: tokens each (default 128)");
  r->add_option("--states", a->opt.states, "solves: K + 1 states evenly over [0, t1] (default: depth + 1)");
  r->add_option("--examples", a->opt.train_examples, "training examples (whole batches)")->capture_default_str();
  r->add_option("--test-examples", a->opt.test_examples, "test examples (whole batches)")->capture_default_str();
  r->add_option("--batch", a->opt.batch, "teacher batch size")->capture_default_str();
  r->add_option("--shard-size", a->opt.shard_size, "recordings per shard (a multiple of --batch)")->capture_default_str();
  r->add_option("--out", a->out, "output directory DATA")->required();
  a->depth_flags = add_depth_flags(r, a->opt.depth);
  add_device_flag(r, a->opt.device);
  auto ta = std::make_shared<FmTrainArgs>();
  auto* tr = add_train(fm, ta);
  add_device_flag(tr, ta->device);
  auto ea = std::make_shared<FmEvalArgs>();
  auto* ev = add_eval(fm, ea);
  return {fm, [a, r, ta, tr, ea, ev] {
            if (tr->parsed()) {
              const FlowMatchConfig c = merged_config(ta->given, ta->c, ta->config_file, "flow-match train options");
              // under mpirun: every rank trains its rows of each batch; rank 0 writes and reports
              const std::shared_ptr<Communicator> comm = world();
              run_on_ranks(
                  *comm, [&] { return std::make_unique<FlowMatchTrainer>(c, comm); },
                  [&](FlowMatchTrainer& trainer) {
                    trainer.set_device(resolve_device(ta->device));
                    std::ostringstream quiet;
                    trainer.run(ta->resume, comm->rank() == 0 ? std::cerr : quiet);
                  });
              if (comm->rank() == 0) {
                const json last = {{"out", c.out}, {"model", c.out + "/model.safetensors"},
                                   {"metrics", c.out + "/metrics.jsonl"}, {"ranks", comm->size()}};
                std::cout << last.dump() << std::endl;
              }
              return 0;
            }
            if (ev->parsed()) return run_eval(*ea);
            if (!r->parsed()) return 1;
            TrainConfig tc = study_config(a->model, a->task, a->text, a->context);
            RecordOptions opt = a->opt;
            if (is_hf_dir(a->model)) {  // the data as the recorded teacher will name it
              tc.tokenizer = std::filesystem::absolute(tc.tokenizer).string();
              tc.text = std::filesystem::absolute(tc.text).string();
              opt.teacher_config = tc.to_json();
            }
            if (!any_given(a->depth_flags)) opt.depth = tc.depth;  // the trained regime
            opt.validate();
            const auto data = make_source(tc);
            require_writable(a->out);
            const TrajectoryManifest m = record_trajectories(a->model, *data, opt, a->out, std::cerr);
            std::cout << "recorded K = " << m.K << " (" << m.K + 1 << " states of " << m.T << " x " << m.C << "), "
                      << m.examples("train") << " train and " << m.examples("test") << " test examples into " << a->out
                      << "/manifest.json (teacher " << m.teacher_hash << ")" << std::endl;
            return 0;
          }};
}

}  // namespace flowloop::cli
