// flowloop init: a randomly initialised model (a GPT-2 block, or a llama one with --arch llama).
#include <iostream>

#include "cli.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/nn/model.hpp"

namespace flowloop::cli {
namespace {

struct InitArgs {
  ModelConfig cfg;
  uint64_t seed = 0;
  std::string out, dtype = "f32";
};

template <class S>
void write(const InitArgs& a) {
  Model<S> m(a.cfg);
  m.init(a.seed);
  save_checkpoint(a.out, a.cfg, m.layout, m.params.data(), {{"seed", std::to_string(a.seed)}});
}

}  // namespace

Command register_init(CLI::App& app) {
  auto a = std::make_shared<InitArgs>();
  ModelConfig& cfg = a->cfg;
  auto* c = app.add_subcommand("init", "write a randomly initialised model (GPT-2 block, or --arch llama)");
  c->add_option("--vocab", cfg.vocab_size, "vocabulary size V")->required();
  c->add_option("--context", cfg.context, "context length Tmax")->required();
  c->add_option("--d-model", cfg.d_model, "model width C")->required();
  c->add_option("--n-head", cfg.n_head, "attention heads NH (C divisible by NH)")->required();
  c->add_option("--d-ff", cfg.d_ff, "MLP width F (default 4C)");
  c->add_option("--n-block", cfg.n_block, "blocks L inside one field evaluation")->required();
  c->add_option("--depth", cfg.depth, "loop count the model is meant for (T1 of the ODE)")->capture_default_str();
  add_arch_flags(c, cfg);
  c->add_flag("--time-cond", cfg.time_cond, "time-conditioned field f(h, t): adaLN from a sinusoidal embedding of t");
  auto* freq = c->add_option("--time-freq", cfg.time_freq, "time embedding width E (even)")->capture_default_str();
  auto* scale = c->add_option("--time-scale", cfg.time_scale, "tau = t * scale (default 1000 / depth)");
  c->add_option("--seed", a->seed, "random seed")->required();
  c->add_option("--dtype", a->dtype, "stored dtype")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();
  c->add_option("-o,--output", a->out, "output .safetensors file")->required();
  return {c, [a, freq, scale] {
            if (!a->cfg.time_cond && (freq->count() > 0 || scale->count() > 0))
              throw Error("--time-freq and --time-scale need --time-cond");
            a->cfg.finalize();
            if (a->dtype == "f32") write<float>(*a);
            else write<double>(*a);
            json s = {{"written", a->out}, {"config", json::parse(a->cfg.to_json())},
                      {"parameters", ParamLayout(a->cfg).size()}};
            std::cout << s.dump() << std::endl;
            return 0;
          }};
}

}  // namespace flowloop::cli
