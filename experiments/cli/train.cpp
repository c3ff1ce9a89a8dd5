// flowloop train: a looped or ODE-depth model on a task or on text.
#include <iostream>
#include <sstream>

#include "cli.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop::cli {
KeyedOptions add_train_flags(CLI::App* tr, TrainConfig& tc, bool depth_flags) {
  KeyedOptions given;
  auto opt = [&](const char* flag, const char* key, auto& dst, const char* help) {
    given.push_back({key, tr->add_option(flag, dst, help)});
  };
  auto flag = [&](const char* name, const char* key, bool& dst, const char* help) {
    given.push_back({key, tr->add_flag(name, dst, help)});
  };
  opt("--task", "task", tc.task, "built-in task: parity, phop, modarith, addition");
  opt("--task-n", "task_n", tc.task_n, "task difficulty (bits, length, operators, digits)");
  opt("--hops", "task_hops", tc.task_hops, "phop: hops p");
  opt("--prime", "task_prime", tc.task_prime, "modarith: the prime");
  opt("--text", "text", tc.text, "text file for byte-level modelling ('fortunes': the installed collection)");
  opt("--context", "context", tc.context, "text: sequence length");
  opt("--tokenizer", "tokenizer", tc.tokenizer, "text: its tokens by this tokenizer.json (or model directory); default bytes");
  opt("--d-model", "d_model", tc.d_model, "model width C");
  opt("--n-head", "n_head", tc.n_head, "heads");
  opt("--n-block", "n_block", tc.n_block, "blocks L in the field");
  opt("--d-ff", "d_ff", tc.d_ff, "MLP width (default 4C)");
  opt("--arch", "arch", tc.arch, "the block: gpt2 or llama (RMSNorm, rotary, SwiGLU, grouped-query attention)");
  opt("--n-kv-head", "n_kv_head", tc.n_kv_head, "llama: key/value heads dividing --n-head (default: --n-head)");
  opt("--rope-theta", "rope_theta", tc.rope_theta, "llama: rotary base theta");
  flag("--qkv-bias", "qkv_bias", tc.qkv_bias, "llama: biases on q, k and v");
  given.push_back({"tie_head", tr->add_flag("!--untied-head", tc.tie_head, "llama: the head's own weight (default tied)")});
  opt("--n-prelude", "n_prelude", tc.n_prelude, "layers run once before the looped core");
  opt("--n-coda", "n_coda", tc.n_coda, "layers run once after the looped core");
  flag("--core-norm", "core_norm", tc.core_norm, "llama: an RMSNorm at the end of every loop of the core (Ouro's)");
  flag("--time-cond", "time_cond", tc.time_cond, "time-conditioned field f(h, t) (adaLN, zero-initialised)");
  opt("--time-freq", "time_freq", tc.time_freq, "time embedding width E");
  opt("--time-scale", "time_scale", tc.time_scale, "tau = t * scale (default 1000 / depth)");
  if (depth_flags)
    for (auto& k : add_depth_flags(tr, tc.depth)) given.push_back(k);
  flag("--exit-gate", "exit_gate", tc.exit_gate, "loops: train Ouro's exit gate");
  opt("--gate-beta", "gate_beta", tc.gate_beta, "exit gate: entropy weight beta");
  opt("--random-depth", "random_depth_mean", tc.random_depth_mean, "loops: Huginn's random depth around this mean");
  opt("--backprop-loops", "backprop_loops", tc.backprop_loops, "random depth: backpropagate through the last k loops");
  opt("--random-steps-min", "random_steps_min", tc.random_steps_min, "ODE: each batch takes N ~ U{min..max} fixed steps");
  opt("--random-steps-max", "random_steps_max", tc.random_steps_max, "ODE: upper end of the random step count (0: off)");
  opt("--random-solvers", "random_solvers", tc.random_solvers, "ODE: each batch draws one of these methods (comma-separated)");
  opt("--t1-jitter", "t1_jitter", tc.t1_jitter, "ODE: each batch's t1 ~ U(t1 - b, t1 + b) (STEER)");
  opt("--init-from", "init_from", tc.init_from, "start from this trained model's weights (same architecture)");
  opt("--grad", "grad", tc.grad, "backprop, checkpoint or adjoint");
  opt("--kinetic", "kinetic", tc.kinetic, "ODE: weight of the kinetic-energy regulariser int ||f||^2 dt");
  opt("--jacobian", "jacobian", tc.jacobian, "ODE: weight of the Jacobian-norm regulariser (Hutchinson)");
  opt("--steps", "steps", tc.steps, "training steps");
  opt("--batch", "batch", tc.batch, "batch size");
  opt("--lr", "lr", tc.lr, "peak learning rate");
  opt("--min-lr", "min_lr", tc.min_lr, "final learning rate of the cosine");
  opt("--warmup", "warmup", tc.warmup, "warm-up steps");
  opt("--weight-decay", "weight_decay", tc.weight_decay, "AdamW decay (matrices only)");
  opt("--clip", "clip", tc.clip, "gradient clipping by global norm (0: off)");
  opt("--eval-every", "eval_every", tc.eval_every, "evaluate every N steps");
  opt("--eval-batches", "eval_batches", tc.eval_batches, "test batches per evaluation");
  opt("--checkpoint-every", "checkpoint_every", tc.checkpoint_every, "checkpoint every N steps");
  opt("--max-seconds", "max_seconds", tc.max_seconds, "stop (evaluated and checkpointed) after this wall time; --resume goes on");
  opt("--seed", "seed", tc.seed, "seed of the weights and the data");
  opt("--out", "out", tc.out, "output directory");
  return given;
}

TrainConfig merged_train_config(const KeyedOptions& given, const TrainConfig& flags_config,
                                const std::string& config_file) {
  return merged_config(given, flags_config, config_file, "train options");
}

namespace {
struct TrainArgs {
  TrainConfig c;
  std::string config_file;
  bool resume = false;
  std::string device = "auto";
  KeyedOptions given;  // flags with their configuration keys
};
}  // namespace

Command register_train(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  auto* tr = app.add_subcommand("train", "train a looped or ODE-depth model on a task or on text");
  a->given = add_train_flags(tr, a->c, true);
  tr->add_option("--config", a->config_file, "JSON configuration (flags given override it)");
  tr->add_flag("--resume", a->resume, "continue from OUT/checkpoint.safetensors");
  add_device_flag(tr, a->device);
  return {tr, [a] {
            const TrainConfig c = merged_train_config(a->given, a->c, a->config_file);
            // under mpirun: every rank trains its rows of each batch; rank 0 writes and reports
            const std::shared_ptr<Communicator> comm = world();
            run_on_ranks(
                *comm, [&] { return std::make_unique<Trainer>(c, comm); },
                [&](Trainer& trainer) {
                  // several ranks on cuda: each takes its GPU, and the gradients are summed there
                  trainer.set_device(resolve_device(a->device));
                  std::ostringstream quiet;
                  trainer.run(a->resume, comm->rank() == 0 ? std::cerr : quiet);
                });
            if (comm->rank() == 0) {
              const json last = {{"out", c.out}, {"model", c.out + "/model.safetensors"},
                                 {"metrics", c.out + "/metrics.jsonl"}, {"ranks", comm->size()}};
              std::cout << last.dump() << std::endl;
            }
            return 0;
          }};
}

}  // namespace flowloop::cli
