// flowloop study: looped vs deep vs shallow vs ODE depth at equal training budget.
#include "cli.hpp"
#include "flowloop/train/data.hpp"
#include "../study.hpp"

namespace flowloop::cli {

Command register_study(CLI::App& app) {
  auto so = std::make_shared<StudyOptions>();
  StudyOptions& o = *so;
  auto* st = app.add_subcommand("study", "looped vs deep vs shallow vs ODE depth at equal training budget, over seeds");
  st->add_option("--task", o.task, "task")->check(CLI::IsMember(task_names()))->capture_default_str();
  st->add_option("--task-n", o.task_n, "task difficulty")->capture_default_str();
  st->add_option("--hops", o.hops, "phop: hops")->capture_default_str();
  st->add_option("--prime", o.prime, "modarith: the prime (0: 7)")->capture_default_str();
  st->add_option("--depth", o.depth, "loops of the looped model = blocks of the deep one = t1 of the ODE")->capture_default_str();
  st->add_option("--d-model", o.d_model, "width")->capture_default_str();
  st->add_option("--n-head", o.n_head, "heads")->capture_default_str();
  st->add_option("--steps", o.steps, "training steps of each model")->capture_default_str();
  st->add_option("--batch", o.batch, "batch size")->capture_default_str();
  st->add_option("--lr", o.lr, "peak learning rate")->capture_default_str();
  st->add_option("--warmup", o.warmup, "warm-up steps")->capture_default_str();
  st->add_option("--eval-batches", o.eval_batches, "test batches of the final evaluation")->capture_default_str();
  st->add_option("--curve-points", o.curve_points,
                 "test evaluations along training per arm (4 batches each): curves.csv, accuracy against steps and FLOPs")
      ->capture_default_str();
  st->add_option("--seeds", o.seeds, "train every arm with seeds seed .. seed + N - 1; tables show mean ± sd")
      ->capture_default_str();
  st->add_option("--eval-depths", o.eval_depths,
                 "evaluate every model under these regimes too, e.g. loop,dopri5:1e-2,dopri5:1e-3,rk4:4,rk4:8 "
                 "(METHOD:RTOL has atol RTOL/10; METHOD:N takes N fixed steps)");
  // the ODE arm: the shared depth flags say its solve (default dopri5, t1 = --depth)
  add_depth_flags(st, o.ode_depth);
  st->add_option("--ode-steps", o.ode_steps, "the ODE arm's training steps (default: --steps)")->capture_default_str();
  st->add_option("--ode-seconds", o.ode_seconds, "its wall-clock budget (0: none)")->check(CLI::NonNegativeNumber)->capture_default_str();
  st->add_option("--kinetic", o.kinetic, "its kinetic-energy weight")->check(CLI::NonNegativeNumber)->capture_default_str();
  st->add_option("--jacobian", o.jacobian, "its Jacobian-norm weight")->check(CLI::NonNegativeNumber)->capture_default_str();
  st->add_option("--random-steps-min", o.random_steps_min, "its random fixed steps per batch: lower end")->capture_default_str();
  st->add_option("--random-steps-max", o.random_steps_max, "upper end (0: off)")->capture_default_str();
  st->add_option("--random-solvers", o.random_solvers, "its random method per batch (comma-separated)");
  st->add_option("--t1-jitter", o.t1_jitter, "its t1 ~ U(t1 - b, t1 + b) per batch")->capture_default_str();
  st->add_flag("--time-cond", o.time_cond, "its field is time-conditioned");
  st->add_flag("--ode-from-looped", o.ode_from_looped, "it starts from the looped model of the same seed");
  st->add_option("--arms", o.arms, "arms to train, comma-separated: looped, deep, shallow, ode")->capture_default_str();
  st->add_option("--seed", o.seed, "first seed")->capture_default_str();
  st->add_option("--out", o.out, "output directory")->capture_default_str();
  add_device_flag(st, o.device);
  return {st, [so] { return run_study(*so); }};
}

}  // namespace flowloop::cli
