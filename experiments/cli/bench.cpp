// flowloop bench field | solve | train: one JSON line each, measured against a peer
// (sgemm of the same shape) or as absolute times of whole solves and steps.
#include <iostream>

#include "cli.hpp"
#include "flowloop/bench.hpp"

namespace flowloop::cli {
namespace {

void add_size_flags(CLI::App* c, std::string& size, int& threads, int& reps, double& seconds) {
  c->add_option("--size", size, "benchmark size")->check(CLI::IsMember({"S", "M", "G"}))->capture_default_str();
  c->add_option("--threads", threads, "threads (0 = all)")->capture_default_str();
  c->add_option("--reps", reps, "minimum timed repetitions")->capture_default_str();
  c->add_option("--seconds", seconds, "minimum timed seconds")->capture_default_str();
}

void add_solve_flags(CLI::App* c, BenchSolveOptions& o) {
  add_size_flags(c, o.size, o.threads, o.min_reps, o.min_seconds);
  add_depth_flags(c, o.depth);
  c->add_option("-m,--model", o.model_path, "weights (default: GPT-2 init, seed 1234)");
  c->add_option("--tokens", o.tokens_path, "token rows (default: random, seed 42); bench train reads targets too");
}

}  // namespace

std::vector<Command> register_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "benchmarks (one JSON line each)");
  bench->require_subcommand(1);

  auto field = std::make_shared<BenchOptions>();
  auto* f = bench->add_subcommand("field", "time one field evaluation and its vjp against sgemm");
  add_size_flags(f, field->size, field->threads, field->min_reps, field->min_seconds);
  f->add_flag("--time-cond", field->time_cond, "also the time-conditioned field, with the ratio of the two");

  auto solve = std::make_shared<BenchSolveOptions>();
  solve->depth.solver = "dopri5";
  auto* s = bench->add_subcommand("solve", "time one whole solve of the field from the embedding (default dopri5, t1 4)");
  add_solve_flags(s, *solve);

  auto train = std::make_shared<BenchTrainOptions>();
  train->min_reps = 3;
  auto* t = bench->add_subcommand("train", "time one training step: forward, loss, gradient (t1 default 4)");
  add_solve_flags(t, *train);
  t->add_option("--grad", train->grad, "backprop, checkpoint or adjoint")
      ->check(CLI::IsMember({"backprop", "checkpoint", "adjoint"}))->capture_default_str();
  t->add_flag("--seminorm", train->seminorm, "adjoint: leave the parameter adjoint out of the error norm");
  t->add_flag("--adamw", train->adamw, "include an AdamW update in the step");

  return {{f, [field] { std::cout << bench_field(*field) << std::endl; return 0; }},
          {s, [solve] { std::cout << bench_solve(*solve) << std::endl; return 0; }},
          {t, [train] {
             if (!train->depth.ode() && train->depth.loops <= 0)
               throw Error("bench train: give --loops K or --solver (with --solver-steps N or tolerances)");
             std::cout << bench_train(*train) << std::endl;
             return 0;
           }}};
}

}  // namespace flowloop::cli
