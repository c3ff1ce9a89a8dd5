// flowloop bench field | solve | train | wp: one JSON line each (wp: one per row), measured against a peer
// (sgemm of the same shape) or as absolute times of whole solves and steps.
#include <iostream>
#include <sstream>

#include "cli.hpp"
#include "flowloop/study/bench.hpp"
#include "flowloop/io/io.hpp"

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
  add_device_flag(c, o.device);
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
  add_device_flag(f, field->device);

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

  auto wp = std::make_shared<BenchWpOptions>();
  wp->min_reps = 3;
  wp->min_seconds = 0.3;
  auto wp_lists = std::make_shared<std::pair<std::string, std::string>>("bosh3,dopri5,tsit5", "1e-2,1e-3,1e-4,1e-5,1e-6");
  auto* w = bench->add_subcommand("wp", "work-precision: error at t1 against a double-precision reference, NFE and "
                                        "time, for every adaptive solver and tolerance");
  add_solve_flags(w, *wp);
  w->add_option("--solvers", wp_lists->first, "adaptive methods, comma-separated")->capture_default_str();
  w->add_option("--rtols", wp_lists->second, "relative tolerances, comma-separated (atol = rtol / 10)")->capture_default_str();
  w->add_option("--reference-rtol", wp->reference_rtol, "the reference: dopri5 in double at this rtol")->capture_default_str();
  w->add_option("--reference-out", wp->reference_out, "write the reference h(t1) (F64 safetensors, tensor h_t1)");

  auto fmo = std::make_shared<BenchFlowMatchOptions>();
  auto* fm = bench->add_subcommand("flow-match", "time a flow-matching step against a loop-1 training step, and the "
                                                 "exact OT coupling of a batch");
  add_size_flags(fm, fmo->size, fmo->threads, fmo->min_reps, fmo->min_seconds);
  fm->add_option("--ot-batch", fmo->ot_batch, "the exact coupling's batch")->capture_default_str();

  return {{fm, [fmo] { std::cout << bench_flow_match(*fmo) << std::endl; return 0; }},
          {f, [field] { std::cout << bench_field(*field) << std::endl; return 0; }},
          {s, [solve] { std::cout << bench_solve(*solve) << std::endl; return 0; }},
          {w, [wp, wp_lists] {
             wp->solvers = split_list(wp_lists->first);
             wp->rtols.clear();
             for (const auto& r : split_list(wp_lists->second)) {
               double v = 0;
               if (!parse_number(r, v)) throw Error("bench wp: --rtols: '" + r + "' is not a number");
               wp->rtols.push_back(v);
             }
             for (const auto& line : bench_wp(*wp)) std::cout << line << std::endl;
             return 0;
           }},
          {t, [train] {
             if (!train->depth.ode() && train->depth.loops <= 0)
               throw Error("bench train: give --loops K or --solver (with --solver-steps N or tolerances)");
             std::cout << bench_train(*train) << std::endl;
             return 0;
           }}};
}

}  // namespace flowloop::cli
