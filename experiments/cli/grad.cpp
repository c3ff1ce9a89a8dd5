// flowloop grad: the loss's gradient through the loops or the solve.
#include <iostream>

#include "cli.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/hf.hpp"
#include "flowloop/nn/model.hpp"

namespace flowloop::cli {
namespace {

struct GradArgs {
  std::string model, core_layers, tokens, out, precision = "f32", method = "backprop", device = "auto";
  DepthSpec depth;
  GradOptions opt;
};

template <class S>
int run(GradArgs& a) {
  a.depth.validate();
  a.opt.method = grad_method(a.method);
  Model<S> model = load_any<S>(a.model, {a.core_layers});
  model.set_device(resolve_device(a.device));
  const TokenBatch tokens = read_token_file(a.tokens, "tokens");
  const TokenBatch targets = read_token_file(a.tokens, "targets");
  tokens.check(model.cfg, "'" + a.tokens + "' tokens");
  Buffer<S> grads(model.params.size(), S(0));
  json out = {{"model", a.model}, {"B", tokens.B}, {"T", tokens.T},
              {"depth", json::parse(a.depth.to_json(model.cfg.depth))}, {"device", device_name(model.device())}};
  S loss;
  if (!a.depth.ode()) {
    if (a.opt.regularized()) throw Error("--kinetic and --jacobian regularise a solve: give --solver");
    const int K = a.depth.loop_count(model.cfg.depth);
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
    const SolveOptions o = a.depth.solve_options(model.cfg.depth);
    GradStats st;
    OdeWork<S> ow;
    loss = model.ode_loss_and_grad(tokens, targets, o, a.opt, grads.data(), st, ow);
    out["solver"] = o.method;
    out["grad"] = grad_method_name(a.opt.method);
    out["t1"] = o.t1;
    out["nfe_forward"] = st.nfe_forward;
    out["nfe_backward"] = st.nfe_backward;
    out["vjp_calls"] = st.vjp_calls;
    out["recompute_calls"] = st.recompute_calls;
    out["forward_steps"] = st.forward_stats.steps;
    out["peak_bytes"] = st.peak_bytes;
    if (a.opt.regularized()) {
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
  save_checkpoint(a.out, model.cfg, model.layout, grads.data(), {{"kind", "gradients"}, {"loss", std::to_string(loss)}});
  out["written"] = a.out;
  std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace

Command register_grad(CLI::App& app) {
  auto a = std::make_shared<GradArgs>();
  auto* c = app.add_subcommand("grad", "the loss's gradient through the loops or the solve");
  add_model_flags(c, a->model, a->core_layers, "model .safetensors");
  c->add_option("--tokens", a->tokens, "JSON file {\"tokens\": [[...]], \"targets\": [[...]]} (-1: ignore)")
      ->required()->check(CLI::ExistingFile);
  add_depth_flags(c, a->depth);
  add_device_flag(c, a->device);
  c->add_option("--grad", a->method, "backprop, checkpoint or adjoint")
      ->check(CLI::IsMember({"backprop", "checkpoint", "adjoint"}))->capture_default_str();
  c->add_option("--adjoint-solver", a->opt.adjoint_method, "adjoint: backward method (default: the forward's)");
  c->add_option("--adjoint-rtol", a->opt.adjoint_rtol, "adjoint: backward rtol (default: the forward's)");
  c->add_option("--adjoint-atol", a->opt.adjoint_atol, "adjoint: backward atol (default: the forward's)");
  c->add_flag("--seminorm", a->opt.seminorm, "adjoint: leave the parameter adjoint out of the error norm");
  c->add_option("--kinetic", a->opt.kinetic, "weight of the kinetic-energy regulariser int ||f||^2 dt")
      ->check(CLI::NonNegativeNumber);
  c->add_option("--jacobian", a->opt.jacobian, "weight of the Jacobian-norm regulariser (Hutchinson)")
      ->check(CLI::NonNegativeNumber);
  c->add_option("--noise-seed", a->opt.noise_seed, "seed of the Hutchinson vector")->capture_default_str();
  c->add_option("--precision", a->precision, "arithmetic")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();
  c->add_option("-o,--output", a->out, "output .safetensors of the gradients")->required();
  return {c, [a] { return a->precision == "f32" ? run<float>(*a) : run<double>(*a); }};
}

}  // namespace flowloop::cli
