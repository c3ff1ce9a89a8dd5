#include "cli.hpp"
#include "flowloop/io/tokenizer.hpp"

#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/io.hpp"

namespace flowloop::cli {

CLI::Option* add_device_flag(CLI::App* app, std::string& device) {
  return app
      ->add_option("--device", device,
                   "where the field runs: cpu, cuda, or auto (cuda when built with it and a GPU is visible)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
}

CLI::Option* add_model_flags(CLI::App* app, std::string& model, std::string& core_layers, const std::string& help) {
  app->add_option("--core-layers", core_layers,
                  "a Hugging Face model's layers a:b as the recurrent core (the layers before run once as the "
                  "prelude, those after as the coda; default: every layer is the core, looped once)");
  return app->add_option("-m,--model", model, help + " (or a Hugging Face directory: config.json, *.safetensors)")
      ->required()
      ->check(CLI::ExistingPath);
}

TokenBatch text_tokens(const std::string& text, const std::string& tokenizer) {
  const Tokenizer tok = Tokenizer::from_file(tokenizer);
  TokenBatch b;
  b.data = tok.encode(text);
  b.B = 1;
  b.T = static_cast<int>(b.data.size());
  if (b.T == 0) throw Error("--text: the text has no tokens");
  return b;
}

void add_arch_flags(CLI::App* app, ModelConfig& cfg) {
  app->add_option("--arch", cfg.arch, "the block: gpt2 (model-spec.md) or llama (RMSNorm, rotary, SwiGLU, GQA)")
      ->check(CLI::IsMember({"gpt2", "llama"}))
      ->capture_default_str();
  app->add_option("--n-kv-head", cfg.n_kv_head, "llama: key/value heads, dividing --n-head (default: --n-head)");
  app->add_option("--d-head", cfg.d_head, "llama: a head's width (default d_model / n_head)");
  app->add_option("--norm-eps", cfg.norm_eps, "llama: RMSNorm's eps")->capture_default_str();
  app->add_option("--rope-theta", cfg.rope_theta, "llama: rotary base theta")->capture_default_str();
  app->add_option("--rope-fraction", cfg.rope_fraction, "llama: the rotated share of each head")->capture_default_str();
  app->add_flag("--rope-interleaved", cfg.rope_interleaved, "llama: rotate pairs (2i, 2i+1) instead of halves");
  app->add_flag("--qkv-bias", cfg.qkv_bias, "llama: biases on q, k and v");
  app->add_flag("--o-bias", cfg.o_bias, "llama: a bias on the attention's output projection");
  app->add_flag("--mlp-bias", cfg.mlp_bias, "llama: biases on the MLP's projections");
  app->add_flag("!--untied-head,--tied-head", cfg.tie_head, "llama: the head's own weight lm_head (default: tied to wte)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app->add_option("--n-prelude", cfg.n_prelude, "layers run once before the recurrent core");
  app->add_option("--n-coda", cfg.n_coda, "layers run once after the recurrent core");
  app->add_flag("--core-norm", cfg.core_norm, "llama: an RMSNorm at the end of every step of the core (Ouro's loop)");
}

KeyedOptions add_depth_flags(CLI::App* app, DepthSpec& d) {
  const std::string g = "Depth";
  std::string methods;
  for (const auto& m : method_names()) methods += (methods.empty() ? "" : ", ") + m;
  KeyedOptions o;
  o.push_back({"loops", app->add_option("--loops", d.loops, "loop K times (default without --solver: the model's depth)")->group(g)});
  o.push_back({"solver", app->add_option("--solver", d.solver, "integrate dh/dt = f(h, t) on [0, t1] with: " + methods)->group(g)});
  o.push_back({"solver_steps", app->add_option("--solver-steps", d.steps, "fixed step count (default for fixed-step methods: round(t1))")->group(g)});
  o.push_back({"rtol", app->add_option("--rtol", d.rtol, "relative tolerance of an adaptive method (default 1e-3)")->group(g)});
  o.push_back({"atol", app->add_option("--atol", d.atol, "absolute tolerance of an adaptive method (default 1e-4)")->group(g)});
  o.push_back({"t1", app->add_option("--t1", d.t1, "end of the depth interval (default: the depth the model was trained at)")->group(g)});
  o.push_back({"controller", app->add_option("--controller", d.controller, "adaptive: pi (Hairer's DOPRI5, default) or i (torchdiffeq)")->group(g)});
  o.push_back({"initial_norm", app->add_option("--initial-norm", d.initial_norm,
                  "adaptive: first-step estimate with hairer's sums (default) or torchdiffeq's RMS norms")->group(g)});
  o.push_back({"h0", app->add_option("--h0", d.h0, "adaptive: first step (default: automatic)")->group(g)});
  o.push_back({"solver_max_steps", app->add_option("--solver-max-steps", d.max_steps, "adaptive: step limit per sequence (default 100000)")->group(g)});
  o.push_back({"batch_coupled", app->add_flag("--batch-coupled", d.coupled, "adaptive: one shared step for the batch (default: per sequence)")->group(g)});
  o.push_back({"exit_threshold", app->add_option("--exit-threshold", d.exit_threshold,
                  "solve: stop a sequence where ||f(h)|| / ||h|| falls below this (default 0: off)")->group(g)});
  return o;
}

bool any_given(const KeyedOptions& flags) {
  for (const auto& [key, o] : flags)
    if (o->count() > 0) return true;
  return false;
}

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
            {"seq_evals", r.seq_evals}, {"steps_total", r.steps_total}, {"steps", r.steps}, {"accepted", r.accepted},
            {"rejected", r.rejected}, {"status", status_name(r.status)}, {"per_sequence", seq}};
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

template json solve_json<float>(const SolveResult<float>&, const SolveOptions&);
template json solve_json<double>(const SolveResult<double>&, const SolveOptions&);

void end_ranks(Communicator& comm, const std::exception& e) {
  std::cerr << "flowloop: error (rank " << comm.rank() << " of " << comm.size() << "): " << e.what() << std::endl;
  comm.abort(1);
  std::abort();  // (not reached: abort ends every rank)
}

}  // namespace flowloop::cli
