// The `flowloop` command: init, forward, bench field.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <limits>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "flowloop/flowloop.hpp"
#include "flowloop/problems.hpp"
#include "flowloop/solver.hpp"
#include "flowloop/train.hpp"
#include "study.hpp"

using namespace flowloop;
using nlohmann::json;

namespace {

void write_text_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) throw Error("cannot write '" + path + "'");
    out << text;
    out.flush();
    if (!out) throw Error("cannot write '" + path + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Error("cannot write '" + path + "': rename failed");
}

template <class S>
json logits_json(const Buffer<S>& logits, int B, int T, int V) {
  json out = json::array();
  for (int b = 0; b < B; ++b) {
    json rows = json::array();
    for (int t = 0; t < T; ++t) {
      const S* p = logits.data() + (static_cast<size_t>(b) * T + t) * V;
      rows.push_back(std::vector<S>(p, p + V));
    }
    out.push_back(std::move(rows));
  }
  return out;
}

// How deep to run a model: `loop K`, or an ODE solve (forward, and later grad and eval).
struct DepthArgs {
  int loops = -1;
  std::string solver;
  int steps = 0;
  double rtol = std::numeric_limits<double>::quiet_NaN();
  double atol = std::numeric_limits<double>::quiet_NaN();
  double t1 = std::numeric_limits<double>::quiet_NaN();
  std::string controller = "pi";
  bool coupled = false;
  double h0 = 0.0;
  int64_t max_steps = 100000;
  double exit_threshold = 0.0;

  void add(CLI::App* app) {
    app->add_option("--loops", loops, "loop count K (default: the model's depth); without --solver: loop K");
    app->add_option("--solver", solver, "integrate the field: euler, midpoint, heun, rk4, rk38, bosh3, dopri5, "
                                        "dopri5-shampine, tsit5, odeint-rk4, odeint-dopri5");
    app->add_option("--steps", steps, "fixed step count on [0, t1] (default for fixed-step methods: t1 steps)");
    app->add_option("--rtol", rtol, "relative tolerance (adaptive methods; default 1e-3)");
    app->add_option("--atol", atol, "absolute tolerance (adaptive methods; default 1e-4)");
    app->add_option("--t1", t1, "end of the depth interval (default: --loops, else the model's depth)");
    app->add_option("--controller", controller, "step-size controller: pi (Hairer's DOPRI5) or i (torchdiffeq)")
        ->check(CLI::IsMember({"pi", "i"}))->capture_default_str();
    app->add_flag("--batch-coupled", coupled, "one shared step for the whole batch (default: per sequence)");
    app->add_option("--h0", h0, "first step (default: Hairer's automatic choice)");
    app->add_option("--max-steps", max_steps, "step limit per sequence")->capture_default_str();
    app->add_option("--exit-threshold", exit_threshold,
                    "stop a sequence when ||f(h)|| / ||h|| falls below this (0: off)")->capture_default_str();
  }
  bool ode() const { return !solver.empty(); }
  SolveOptions options(const ModelConfig& cfg) const {
    SolveOptions o;
    o.method = solver;
    o.t0 = 0.0;
    o.t1 = !std::isnan(t1) ? t1 : (loops >= 0 ? loops : cfg.depth);
    const bool odeint = solver.rfind("odeint-", 0) == 0;
    const bool embedded = odeint ? solver == "odeint-dopri5" : tableau(solver).adaptive();
    const bool tol_given = !std::isnan(rtol) || !std::isnan(atol);
    if (steps > 0 && tol_given) throw Error("give --steps or --rtol/--atol, not both");
    if (steps > 0 || !embedded) {
      if (tol_given) throw Error("solver '" + solver + "' has no error estimate: give --steps, not tolerances");
      o.steps = steps > 0 ? steps : std::max(1, static_cast<int>(std::lround(o.t1 - o.t0)));
    } else {
      o.adaptive = true;
      o.rtol = std::isnan(rtol) ? 1e-3 : rtol;
      o.atol = std::isnan(atol) ? 1e-4 : atol;
    }
    o.controller = controller == "pi" ? Controller::PI : Controller::I;
    o.batch_coupled = coupled;
    o.h0 = h0;
    o.max_steps = max_steps;
    o.terminal_threshold = exit_threshold;
    return o;
  }
};

template <class S>
json solve_json(const SolveResult<S>& r, const SolveOptions& o) {
  json seq = json::array();
  for (const auto& q : r.seq) {
    json e = {{"nfe", q.nfe}, {"steps", q.steps}, {"accepted", q.accepted}, {"rejected", q.rejected},
              {"status", status_name(q.status)}, {"t", q.t}};
    if (!q.message.empty()) e["message"] = q.message;
    seq.push_back(e);
  }
  json j = {{"solver", o.method}, {"t1", o.t1}, {"adaptive", o.adaptive}, {"nfe", r.nfe}, {"calls", r.calls},
            {"seq_evals", r.seq_evals}, {"steps_total", r.steps_total}, {"steps", r.steps}, {"accepted", r.accepted}, {"rejected", r.rejected},
            {"status", status_name(r.status)}, {"per_sequence", seq}};
  if (o.adaptive) {
    j["rtol"] = o.rtol;
    j["atol"] = o.atol;
    j["controller"] = o.controller == Controller::PI ? "pi" : "i";
    j["batch_coupled"] = o.batch_coupled;
  } else {
    j["fixed_steps"] = o.steps;
  }
  if (!r.message.empty()) j["message"] = r.message;
  return j;
}

template <class S>
int run_forward(const std::string& model_path, const std::string& tokens_path, const DepthArgs& depth,
                const std::string& out_path) {
  Model<S> model = load_model<S>(model_path);
  const TokenBatch tokens = read_token_file(tokens_path, "tokens");
  tokens.check(model.cfg, "'" + tokens_path + "' tokens");
  json out, summary = {{"written", out_path}, {"B", tokens.B}, {"T", tokens.T}};
  bool ok = true;
  if (!depth.ode()) {
    const int K = depth.loops >= 0 ? depth.loops : model.cfg.depth;
    LoopWork<S> w;
    const int nfe = model.loop_forward(tokens, K, w);
    out["logits"] = logits_json(w.readout.logits, tokens.B, tokens.T, model.cfg.vocab_size);
    out["nfe"] = nfe;
    out["loops"] = K;
    summary["loops"] = K;
    summary["nfe"] = nfe;
  } else {
    const SolveOptions o = depth.options(model.cfg);
    Buffer<S> h;
    ReadoutCache<S> rc;
    const SolveResult<S> r = model.ode_forward(tokens, o, h, rc);
    out = solve_json(r, o);
    out["logits"] = logits_json(rc.logits, tokens.B, tokens.T, model.cfg.vocab_size);
    for (const char* k : {"solver", "nfe", "steps", "accepted", "rejected", "status"}) summary[k] = out[k];
    ok = r.ok();
    if (!ok) std::cerr << "flowloop: solve failed: " << r.message << std::endl;
  }
  out["B"] = tokens.B;
  out["T"] = tokens.T;
  out["V"] = model.cfg.vocab_size;
  write_text_atomic(out_path, out.dump());
  std::cout << summary.dump() << std::endl;
  return ok ? 0 : 3;
}

template <class S>
int run_grad(const std::string& model_path, const std::string& tokens_path, const DepthArgs& depth,
             const GradOptions& gopt, const std::string& out_path) {
  Model<S> model = load_model<S>(model_path);
  const TokenBatch tokens = read_token_file(tokens_path, "tokens");
  const TokenBatch targets = read_token_file(tokens_path, "targets");
  tokens.check(model.cfg, "'" + tokens_path + "' tokens");
  Buffer<S> grads(model.params.size(), S(0));
  json out = {{"model", model_path}, {"B", tokens.B}, {"T", tokens.T}};
  S loss;
  if (!depth.ode()) {
    const int K = depth.loops >= 0 ? depth.loops : model.cfg.depth;
    const size_t base = MemoryStats::current();
    MemoryStats::reset_peak();
    LoopWork<S> w;
    loss = model.loop_loss_and_grad(tokens, targets, K, grads.data(), w);
    out["loops"] = K;
    out["nfe_forward"] = K;
    out["nfe_backward"] = K;
    out["peak_bytes"] = MemoryStats::peak() - base;
    out["status"] = "success";
  } else {
    const SolveOptions o = depth.options(model.cfg);
    GradStats st;
    OdeWork<S> ow;
    loss = model.ode_loss_and_grad(tokens, targets, o, gopt, grads.data(), st, ow);
    out["solver"] = o.method;
    out["grad"] = grad_method_name(gopt.method);
    out["t1"] = o.t1;
    out["nfe_forward"] = st.nfe_forward;
    out["nfe_backward"] = st.nfe_backward;
    out["vjp_calls"] = st.vjp_calls;
    out["recompute_calls"] = st.recompute_calls;
    out["forward_steps"] = st.forward_stats.steps;
    out["peak_bytes"] = st.peak_bytes;
    if (gopt.regularized()) {
      out["kinetic"] = st.kinetic;
      out["jacobian"] = st.jacobian;
    }
    out["status"] = status_name(st.status);
    if (!st.ok()) {
      out["message"] = st.message;
      std::cout << out.dump() << std::endl;
      std::cerr << "flowloop: gradient failed: " << st.message << std::endl;
      return 3;
    }
  }
  out["loss"] = loss;
  save_checkpoint(out_path, model.cfg, model.layout, grads.data(),
                  {{"kind", "gradients"}, {"loss", std::to_string(loss)}});
  out["written"] = out_path;
  std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flowloop: looped and continuous-depth transformers"};
  app.require_subcommand(1);

  // ---- init
  ModelConfig cfg;
  uint64_t seed = 0;
  std::string init_out;
  std::string init_dtype = "f32";
  auto* init = app.add_subcommand("init", "write a GPT-2-style randomly initialised model");
  init->add_option("--vocab", cfg.vocab_size, "vocabulary size V")->required();
  init->add_option("--context", cfg.context, "context length Tmax")->required();
  init->add_option("--d-model", cfg.d_model, "model width C")->required();
  init->add_option("--n-head", cfg.n_head, "attention heads NH (C divisible by NH)")->required();
  init->add_option("--d-ff", cfg.d_ff, "MLP width F (default 4C)");
  init->add_option("--n-block", cfg.n_block, "blocks L inside one field evaluation")->required();
  init->add_option("--depth", cfg.depth, "loop count the model is meant for (T1 of the ODE)")
      ->capture_default_str();
  init->add_option("--seed", seed, "random seed")->required();
  init->add_option("--dtype", init_dtype, "stored dtype")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();
  init->add_option("-o,--output", init_out, "output .safetensors file")->required();

  // ---- forward
  std::string fwd_model, fwd_tokens, fwd_out, fwd_precision = "f32";
  DepthArgs fwd_depth;
  auto* fwd = app.add_subcommand("forward", "logits of a looped model on token rows");
  fwd->add_option("-m,--model", fwd_model, "model .safetensors")->required()->check(CLI::ExistingFile);
  fwd->add_option("--tokens", fwd_tokens, "JSON file {\"tokens\": [[...], ...]}")->required()->check(CLI::ExistingFile);
  fwd_depth.add(fwd);
  fwd->add_option("--precision", fwd_precision, "arithmetic")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();
  fwd->add_option("-o,--output", fwd_out, "output JSON {logits, nfe}")->required();

  // ---- bench
  auto* bench = app.add_subcommand("bench", "benchmarks (one JSON line each)");
  bench->require_subcommand(1);
  BenchOptions bopt;
  auto* bfield = bench->add_subcommand("field", "time one field evaluation against sgemm");
  bfield->add_option("--size", bopt.size, "benchmark size")->check(CLI::IsMember({"S", "M", "G"}))->capture_default_str();
  bfield->add_option("--threads", bopt.threads, "threads (0 = all)")->capture_default_str();
  bfield->add_option("--reps", bopt.min_reps, "minimum timed repetitions")->capture_default_str();
  bfield->add_option("--seconds", bopt.min_seconds, "minimum timed seconds")->capture_default_str();

  // ---- ode-bench
  std::string ob_problem = "arenstorf", ob_solver = "dopri5", ob_controller = "pi";
  double ob_rtol = std::numeric_limits<double>::quiet_NaN(), ob_atol = std::numeric_limits<double>::quiet_NaN();
  int ob_steps = 0;
  bool ob_json = false;
  auto* ob = app.add_subcommand("ode-bench", "a solver on a classical non-stiff problem");
  ob->add_option("--problem", ob_problem, "arenstorf, lorenz, vdp or brusselator")
      ->check(CLI::IsMember(ode_problem_names()))->capture_default_str();
  ob->add_option("--solver", ob_solver, "method")->capture_default_str();
  ob->add_option("--rtol", ob_rtol, "relative tolerance (adaptive)");
  ob->add_option("--atol", ob_atol, "absolute tolerance (adaptive)");
  ob->add_option("--steps", ob_steps, "fixed step count (instead of tolerances)");
  ob->add_option("--controller", ob_controller, "pi (Hairer) or i (torchdiffeq)")
      ->check(CLI::IsMember({"pi", "i"}))->capture_default_str();
  ob->add_flag("--json", ob_json, "one JSON line instead of text");

  BenchSolveOptions bsopt;
  auto* bsolve = bench->add_subcommand("solve", "time one whole solve of the field from the embedding");
  bsolve->add_option("--size", bsopt.size, "benchmark size")->check(CLI::IsMember({"S", "M", "G"}))->capture_default_str();
  bsolve->add_option("--solver", bsopt.solver, "method")->capture_default_str();
  bsolve->add_option("--steps", bsopt.steps, "fixed step count");
  bsolve->add_option("--rtol", bsopt.rtol, "relative tolerance (adaptive)");
  bsolve->add_option("--atol", bsopt.atol, "absolute tolerance (adaptive)");
  bsolve->add_option("--t1", bsopt.t1, "end of the depth interval")->capture_default_str();
  bsolve->add_option("--controller", bsopt.controller, "pi or i")->check(CLI::IsMember({"pi", "i"}))->capture_default_str();
  bsolve->add_flag("--batch-coupled", bsopt.batch_coupled, "one shared step for the batch");
  bsolve->add_option("--threads", bsopt.threads, "threads (0 = all)")->capture_default_str();
  bsolve->add_option("--reps", bsopt.min_reps, "minimum timed repetitions")->capture_default_str();
  bsolve->add_option("--seconds", bsopt.min_seconds, "minimum timed seconds")->capture_default_str();
  bsolve->add_option("-m,--model", bsopt.model_path, "weights (default: GPT-2 init, seed 1234)");
  bsolve->add_option("--tokens", bsopt.tokens_path, "token rows (default: random, seed 42)");

  BenchTrainOptions btopt;
  btopt.min_reps = 3;
  auto* btrain = bench->add_subcommand("train", "time one training step: forward, loss, gradient");
  btrain->add_option("--size", btopt.size, "benchmark size")->check(CLI::IsMember({"S", "M", "G"}))->capture_default_str();
  btrain->add_option("--solver", btopt.solver, "method")->capture_default_str();
  btrain->add_option("--loops", btopt.loops, "loop K instead of a solve");
  btrain->add_option("--steps", btopt.steps, "fixed step count");
  btrain->add_option("--rtol", btopt.rtol, "relative tolerance (adaptive)");
  btrain->add_option("--atol", btopt.atol, "absolute tolerance (adaptive)");
  btrain->add_option("--t1", btopt.t1, "end of the depth interval")->capture_default_str();
  btrain->add_option("--controller", btopt.controller, "pi or i")->check(CLI::IsMember({"pi", "i"}))->capture_default_str();
  btrain->add_flag("--batch-coupled", btopt.batch_coupled, "one shared step for the batch");
  btrain->add_option("--grad", btopt.grad, "backprop, checkpoint or adjoint")
      ->check(CLI::IsMember({"backprop", "checkpoint", "adjoint"}))->capture_default_str();
  btrain->add_flag("--seminorm", btopt.seminorm, "adjoint: leave the parameter adjoint out of the error norm");
  btrain->add_flag("--adamw", btopt.adamw, "include an AdamW update in the step");
  btrain->add_option("--threads", btopt.threads, "threads (0 = all)")->capture_default_str();
  btrain->add_option("--reps", btopt.min_reps, "minimum timed repetitions")->capture_default_str();
  btrain->add_option("--seconds", btopt.min_seconds, "minimum timed seconds")->capture_default_str();
  btrain->add_option("-m,--model", btopt.model_path, "weights (default: GPT-2 init, seed 1234)");
  btrain->add_option("--tokens", btopt.tokens_path, "tokens and targets (default: random, seed 42)");

  // ---- grad
  std::string gr_model, gr_tokens, gr_out, gr_precision = "f32", gr_method = "backprop";
  DepthArgs gr_depth;
  GradOptions gr_opt;
  auto* gr = app.add_subcommand("grad", "the loss's gradient through the loops or the solve");
  gr->add_option("-m,--model", gr_model, "model .safetensors")->required()->check(CLI::ExistingFile);
  gr->add_option("--tokens", gr_tokens, "JSON file {\"tokens\": [[...]], \"targets\": [[...]]} (-1: ignore)")
      ->required()->check(CLI::ExistingFile);
  gr_depth.add(gr);
  gr->add_option("--grad", gr_method, "backprop, checkpoint or adjoint")
      ->check(CLI::IsMember({"backprop", "checkpoint", "adjoint"}))->capture_default_str();
  gr->add_option("--adjoint-solver", gr_opt.adjoint_method, "adjoint: backward method (default: the forward's)");
  gr->add_option("--adjoint-rtol", gr_opt.adjoint_rtol, "adjoint: backward rtol (default: the forward's)");
  gr->add_option("--adjoint-atol", gr_opt.adjoint_atol, "adjoint: backward atol (default: the forward's)");
  gr->add_flag("--seminorm", gr_opt.seminorm, "adjoint: leave the parameter adjoint out of the error norm");
  gr->add_option("--kinetic", gr_opt.kinetic, "weight of the kinetic-energy regulariser int ||f||^2 dt")
      ->check(CLI::NonNegativeNumber);
  gr->add_option("--jacobian", gr_opt.jacobian, "weight of the Jacobian-norm regulariser (Hutchinson)")
      ->check(CLI::NonNegativeNumber);
  gr->add_option("--noise-seed", gr_opt.noise_seed, "seed of the Hutchinson vector")->capture_default_str();
  gr->add_option("--precision", gr_precision, "arithmetic")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();
  gr->add_option("-o,--output", gr_out, "output .safetensors of the gradients")->required();

  // ---- train
  TrainConfig tc;
  std::string tc_file;
  bool tc_resume = false;
  auto* tr = app.add_subcommand("train", "train a looped or ODE-depth model on a task or on text");
  std::vector<std::pair<std::string, CLI::Option*>> tr_opts;
  auto topt = [&](const char* flag, const char* key, auto& dst, const char* help) {
    tr_opts.push_back({key, tr->add_option(flag, dst, help)});
  };
  topt("--task", "task", tc.task, "built-in task: parity, phop, modarith, addition");
  topt("--task-n", "task_n", tc.task_n, "task difficulty (bits, length, operators, digits)");
  topt("--hops", "task_hops", tc.task_hops, "phop: hops p");
  topt("--prime", "task_prime", tc.task_prime, "modarith: the prime");
  topt("--text", "text", tc.text, "text file for byte-level modelling ('fortunes': the installed collection)");
  topt("--context", "context", tc.context, "text: sequence length");
  topt("--d-model", "d_model", tc.d_model, "model width C");
  topt("--n-head", "n_head", tc.n_head, "heads");
  topt("--n-block", "n_block", tc.n_block, "blocks L in the field");
  topt("--d-ff", "d_ff", tc.d_ff, "MLP width (default 4C)");
  topt("--loops", "loops", tc.loops, "depth: loop K times");
  tr_opts.push_back({"exit_gate", tr->add_flag("--exit-gate", tc.exit_gate, "loops: train Ouro's exit gate")});
  topt("--gate-beta", "gate_beta", tc.gate_beta, "exit gate: entropy weight beta");
  topt("--random-depth", "random_depth_mean", tc.random_depth_mean, "loops: Huginn's random depth around this mean");
  topt("--backprop-loops", "backprop_loops", tc.backprop_loops, "random depth: backpropagate through the last k loops");
  topt("--solver", "solver", tc.solver, "depth: integrate with this method");
  topt("--solver-steps", "solver_steps", tc.solver_steps, "fixed steps of the solver");
  topt("--rtol", "rtol", tc.rtol, "adaptive solver rtol");
  topt("--atol", "atol", tc.atol, "adaptive solver atol");
  topt("--t1", "t1", tc.t1, "depth interval [0, t1] (default 4)");
  topt("--controller", "controller", tc.controller, "pi or i");
  topt("--solver-max-steps", "solver_max_steps", tc.solver_max_steps,
       "adaptive: step limit per sequence and solve; hitting it stops training with an error (default 100000)");
  tr_opts.push_back({"batch_coupled", tr->add_flag("--batch-coupled", tc.batch_coupled, "one shared step")});
  topt("--grad", "grad", tc.grad, "backprop, checkpoint or adjoint");
  topt("--kinetic", "kinetic", tc.kinetic, "ODE: weight of the kinetic-energy regulariser int ||f||^2 dt");
  topt("--jacobian", "jacobian", tc.jacobian, "ODE: weight of the Jacobian-norm regulariser (Hutchinson)");
  topt("--steps", "steps", tc.steps, "training steps");
  topt("--batch", "batch", tc.batch, "batch size");
  topt("--lr", "lr", tc.lr, "peak learning rate");
  topt("--min-lr", "min_lr", tc.min_lr, "final learning rate of the cosine");
  topt("--warmup", "warmup", tc.warmup, "warm-up steps");
  topt("--weight-decay", "weight_decay", tc.weight_decay, "AdamW decay (matrices only)");
  topt("--clip", "clip", tc.clip, "gradient clipping by global norm (0: off)");
  topt("--eval-every", "eval_every", tc.eval_every, "evaluate every N steps");
  topt("--eval-batches", "eval_batches", tc.eval_batches, "test batches per evaluation");
  topt("--checkpoint-every", "checkpoint_every", tc.checkpoint_every, "checkpoint every N steps");
  topt("--max-seconds", "max_seconds", tc.max_seconds, "stop (evaluated and checkpointed) after this wall time; --resume goes on");
  topt("--seed", "seed", tc.seed, "seed of the weights and the data");
  topt("--out", "out", tc.out, "output directory");
  tr->add_option("--config", tc_file, "JSON configuration (flags given override it)");
  tr->add_flag("--resume", tc_resume, "continue from OUT/checkpoint.safetensors");

  // ---- eval
  std::string ev_model, ev_task;
  DepthArgs ev_depth;
  int ev_batches = 16, ev_batch = 32;
  bool ev_json = false;
  double ev_exit_q = -1, ev_exit_delta = -1;
  auto* ev = app.add_subcommand("eval", "test loss and accuracy of a trained model");
  ev->add_option("-m,--model", ev_model, "model .safetensors written by train")->required()->check(CLI::ExistingFile);
  ev->add_option("--task", ev_task, "task (default: the one it was trained on)");
  ev_depth.add(ev);
  ev->add_option("--batches", ev_batches, "test batches")->capture_default_str();
  ev->add_option("--batch", ev_batch, "batch size")->capture_default_str();
  ev->add_flag("--json", ev_json, "one JSON line");
  ev->add_option("--exit-q", ev_exit_q, "loops + exit gate: each token exits where the cumulative exit probability reaches Q");
  ev->add_option("--exit-delta", ev_exit_delta, "loops: each token exits where ||h_t - h_{t-1}|| < D");

  // ---- study
  StudyOptions so;
  auto* st = app.add_subcommand("study", "looped vs deep vs shallow (and ODE) at equal training budget");
  st->add_option("--task", so.task, "task")->check(CLI::IsMember(task_names()))->capture_default_str();
  st->add_option("--task-n", so.task_n, "task difficulty")->capture_default_str();
  st->add_option("--hops", so.hops, "phop: hops")->capture_default_str();
  st->add_option("--prime", so.prime, "modarith: the prime (0: 7)")->capture_default_str();
  st->add_option("--depth", so.depth, "loops of the looped model = blocks of the deep one")->capture_default_str();
  st->add_option("--d-model", so.d_model, "width")->capture_default_str();
  st->add_option("--n-head", so.n_head, "heads")->capture_default_str();
  st->add_option("--steps", so.steps, "training steps of each model")->capture_default_str();
  st->add_option("--batch", so.batch, "batch size")->capture_default_str();
  st->add_option("--lr", so.lr, "peak learning rate")->capture_default_str();
  st->add_option("--warmup", so.warmup, "warm-up steps")->capture_default_str();
  st->add_option("--eval-batches", so.eval_batches, "test batches of the final evaluation")->capture_default_str();
  st->add_option("--ode", so.ode, "also train an ODE-depth model (dopri5)")->capture_default_str();
  st->add_option("--ode-steps", so.ode_steps, "its training steps (default: --steps)")->capture_default_str();
  st->add_option("--ode-seconds", so.ode_seconds, "its wall-clock budget (0: none)")->check(CLI::NonNegativeNumber)->capture_default_str();
  st->add_option("--rtol", so.rtol, "the ODE arm's rtol")->capture_default_str();
  st->add_option("--atol", so.atol, "the ODE arm's atol")->capture_default_str();
  st->add_option("--kinetic", so.kinetic, "the ODE arm's kinetic-energy weight")->check(CLI::NonNegativeNumber)->capture_default_str();
  st->add_option("--jacobian", so.jacobian, "the ODE arm's Jacobian-norm weight")->check(CLI::NonNegativeNumber)->capture_default_str();
  st->add_option("--arms", so.arms, "arms to train, comma-separated: looped, deep, shallow, ode")->capture_default_str();
  st->add_option("--seed", so.seed, "seed")->capture_default_str();
  st->add_option("--out", so.out, "output directory")->capture_default_str();

  CLI11_PARSE(app, argc, argv);

  try {
    if (*init) {
      cfg.finalize();
      const std::map<std::string, std::string> meta = {{"seed", std::to_string(seed)}};
      if (init_dtype == "f32") {
        Model<float> m(cfg);
        m.init(seed);
        save_checkpoint(init_out, cfg, m.layout, m.params.data(), meta);
      } else {
        Model<double> m(cfg);
        m.init(seed);
        save_checkpoint(init_out, cfg, m.layout, m.params.data(), meta);
      }
      json s = {{"written", init_out}, {"config", json::parse(cfg.to_json())},
                {"parameters", ParamLayout(cfg).size()}};
      std::cout << s.dump() << std::endl;
    } else if (*fwd) {
      return fwd_precision == "f32" ? run_forward<float>(fwd_model, fwd_tokens, fwd_depth, fwd_out)
                                    : run_forward<double>(fwd_model, fwd_tokens, fwd_depth, fwd_out);
    } else if (*ob) {
      const OdeProblem p = ode_problem(ob_problem);
      SolveOptions o;
      o.method = ob_solver;
      o.t0 = p.t0;
      o.t1 = p.t1;
      o.controller = ob_controller == "pi" ? Controller::PI : Controller::I;
      if (ob_steps > 0) {
        o.steps = ob_steps;
      } else {
        if (std::isnan(ob_rtol) || std::isnan(ob_atol))
          throw Error("ode-bench: give --rtol and --atol (adaptive) or --steps (fixed)");
        o.adaptive = true;
        o.rtol = ob_rtol;
        o.atol = ob_atol;
      }
      FunctionSystem sys(p.f, p.y0.size());
      std::vector<double> y = p.y0;
      const auto r = integrate(sys, y.data(), o);
      json j = {{"problem", ob_problem}, {"solver", ob_solver}, {"rtol", ob_rtol}, {"atol", ob_atol},
                {"nfe", r.nfe}, {"steps", r.steps}, {"accepted", r.accepted}, {"rejected", r.rejected},
                {"y_end", y}, {"status", status_name(r.status)}};
      if (ob_steps > 0) j["fixed_steps"] = ob_steps;
      if (!r.message.empty()) j["message"] = r.message;
      if (ob_json) {
        std::cout << j.dump() << std::endl;
      } else {
        std::cout << ob_problem << " with " << ob_solver << ": status " << status_name(r.status) << ", nfe "
                  << r.nfe << ", steps " << r.steps << " (" << r.accepted << " accepted, " << r.rejected
                  << " rejected)\n  y_end = " << json(y).dump() << std::endl;
        if (!r.message.empty()) std::cout << "  " << r.message << std::endl;
      }
      if (!r.ok()) return 3;
    } else if (*st) {
      return run_study(so);
    } else if (*tr) {
      json merged = json::object();
      if (!tc_file.empty()) {
        std::ifstream in(tc_file);
        if (!in) throw Error("config '" + tc_file + "': cannot open");
        std::stringstream ss;
        ss << in.rdbuf();
        TrainConfig::from_json(ss.str(), "config '" + tc_file + "'");  // names unknown keys, wrong types
        merged = json::parse(ss.str());
      }
      const json defaults = json::parse(TrainConfig{}.to_json()), flags = json::parse(tc.to_json());
      for (const auto& [key, o] : tr_opts)
        if (o->count() > 0) merged[key] = flags[key];
      for (auto it = defaults.begin(); it != defaults.end(); ++it)
        if (!merged.contains(it.key())) merged[it.key()] = it.value();
      const TrainConfig c = TrainConfig::from_json(merged.dump(), "train options");
      Trainer trainer(c);
      trainer.run(tc_resume, std::cerr);
      const json last = {{"out", c.out}, {"model", c.out + "/model.safetensors"}, {"metrics", c.out + "/metrics.jsonl"}};
      std::cout << last.dump() << std::endl;
    } else if (*ev) {
      const SafetensorsFile f = SafetensorsFile::read(ev_model);
      auto it = f.metadata().find("train_config");
      if (it == f.metadata().end()) throw Error("'" + ev_model + "' has no train_config: was it written by flowloop train?");
      TrainConfig c = TrainConfig::from_json(it->second, ev_model);
      if (!ev_task.empty()) {
        if (c.task.empty()) throw Error("'" + ev_model + "' was trained on text, not on a task");
        c.task = ev_task;
      }
      if (ev_depth.ode()) {
        c.loops = 0;
        c.solver = ev_depth.solver;
        c.solver_steps = ev_depth.steps;
        c.rtol = std::isnan(ev_depth.rtol) ? 0 : ev_depth.rtol;
        c.atol = std::isnan(ev_depth.atol) ? 0 : ev_depth.atol;
        if (!std::isnan(ev_depth.t1)) c.t1 = ev_depth.t1;
        c.controller = ev_depth.controller;
        c.batch_coupled = ev_depth.coupled;
      } else if (ev_depth.loops > 0) {
        c.loops = ev_depth.loops;
        c.solver.clear();
      }
      const auto data = make_source(c);
      Model<float> model = load_model<float>(ev_model);
      if (model.cfg.vocab_size != data->vocab_size() || model.cfg.context < data->seq_len())
        throw Error("task '" + c.task + "' does not fit the model (vocabulary " + std::to_string(data->vocab_size()) +
                    ", length " + std::to_string(data->seq_len()) + ")");
      if (ev_exit_q >= 0 && ev_exit_delta >= 0) throw Error("give --exit-q or --exit-delta, not both");
      const std::string rule = ev_exit_q >= 0 ? "q" : ev_exit_delta >= 0 ? "delta" : "";
      const EvalResult r = evaluate(model, *data, c, ev_batches, ev_batch, rule, ev_exit_q >= 0 ? ev_exit_q : ev_exit_delta);
      json j = {{"model", ev_model}, {"data", json::parse(data->describe())}, {"loss", r.loss}, {"accuracy", r.accuracy},
                {"examples", r.examples}, {"nfe", r.nfe}};
      if (!rule.empty()) {
        j["exit_rule"] = rule;
        j["exit_threshold"] = ev_exit_q >= 0 ? ev_exit_q : ev_exit_delta;
        j["exit_depth"] = r.exit_depth;
      }
      if (c.loops > 0) j["loops"] = c.loops;
      else j["solver"] = c.solver;
      if (ev_json) std::cout << j.dump() << std::endl;
      else std::cout << "loss " << r.loss << "  accuracy " << r.accuracy << " on " << r.examples << " examples  nfe " << r.nfe << std::endl;
    } else if (*gr) {
      gr_opt.method = grad_method(gr_method);
      return gr_precision == "f32" ? run_grad<float>(gr_model, gr_tokens, gr_depth, gr_opt, gr_out)
                                   : run_grad<double>(gr_model, gr_tokens, gr_depth, gr_opt, gr_out);
    } else if (*btrain) {
      if (btopt.loops <= 0 && btopt.steps <= 0 && !(btopt.rtol > 0 || btopt.atol > 0))
        throw Error("bench train: give --loops K, --steps N or --rtol R --atol A");
      std::cout << bench_train(btopt) << std::endl;
    } else if (*bsolve) {
      if (bsopt.steps <= 0 && !(bsopt.rtol > 0 || bsopt.atol > 0))
        throw Error("bench solve: give --steps N or --rtol R --atol A");
      std::cout << bench_solve(bsopt) << std::endl;
    } else if (*bfield) {
      std::cout << bench_field(bopt) << std::endl;
    }
  } catch (const Error& e) {
    std::cerr << "flowloop: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "flowloop: error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
