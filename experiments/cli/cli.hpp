// The `flowloop` command line: one file per subcommand (its options and its run
// function), registered in main.cpp. What a Python binding would also need (the
// depth spec, the reports) lives in the library; this layer only parses flags.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "flowloop/backend/backend.hpp"
#include "flowloop/ode/depth.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/ode/solver.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop::cli {

using nlohmann::json;

// A registered subcommand: its CLI11 app and what runs when it was given.
// run() returns the exit code: 0 success, 1 bad input, 3 a numerical failure.
struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;
};

// The depth flags, the same on every command that runs a model:
//   --loops K | --solver NAME [--solver-steps N | --rtol R --atol A] [--t1 T]
//   [--controller pi|i] [--initial-norm hairer|torchdiffeq] [--h0 H]
//   [--solver-max-steps N] [--batch-coupled] [--exit-threshold E]
// Defaults are DepthSpec's (flowloop/ode/depth.hpp). Validation happens in the library.
// Returns each flag with its key in a training configuration (TrainConfig's JSON).
using KeyedOptions = std::vector<std::pair<std::string, CLI::Option*>>;
KeyedOptions add_depth_flags(CLI::App* app, DepthSpec& depth);

// The training options of `train` (task, model, remedies, optimiser, schedule,
// evaluation, seed, --out), with their keys in TrainConfig's JSON; the depth flags
// too when depth_flags. Commands that train (train, sweep) share them.
KeyedOptions add_train_flags(CLI::App* app, TrainConfig& c, bool depth_flags);
// The configuration file (if any), then the flags given, then the defaults.
TrainConfig merged_train_config(const KeyedOptions& given, const TrainConfig& flags_config,
                                const std::string& config_file);

// A configuration (TrainConfig, FlowMatchConfig: from_json and to_json) from the
// configuration file (if any), then the flags given, then the defaults.
template <class Config>
Config merged_config(const KeyedOptions& given, const Config& flags_config, const std::string& config_file,
                     const std::string& what) {
  json merged = json::object();
  if (!config_file.empty()) {
    merged = read_json_file(config_file, "config");
    Config::from_json(merged.dump(), "config '" + config_file + "'");  // names unknown keys, wrong types
  }
  const json defaults = json::parse(Config{}.to_json()), flags = json::parse(flags_config.to_json());
  for (const auto& [key, o] : given)
    if (o->count() > 0) merged[key] = flags[key];
  for (auto it = defaults.begin(); it != defaults.end(); ++it)
    if (!merged.contains(it.key())) merged[it.key()] = it.value();
  return Config::from_json(merged.dump(), what);
}

// --device auto|cpu|cuda: where the model's field runs (Model::set_device; resolved
// by the library's resolve_device: auto is cuda when this build has it and a GPU is
// visible, unless FLOWLOOP_DEVICE says otherwise).
CLI::Option* add_device_flag(CLI::App* app, std::string& device);

// -m,--model (a flowloop checkpoint, or a Hugging Face directory with config.json) and
// --core-layers a:b (a Hugging Face model's layers [a, b) as the recurrent core: io/hf.hpp).
CLI::Option* add_model_flags(CLI::App* app, std::string& model, std::string& core_layers, const std::string& help);

// One row of tokens: the text in the tokens of the tokenizer.json at `tokenizer` (a file, or
// a model directory that holds one).
TokenBatch text_tokens(const std::string& text, const std::string& tokenizer);

// The block's family and its options (ModelConfig's arch keys): --arch gpt2|llama,
// --n-kv-head, --d-head, --norm-eps, --rope-theta, --rope-fraction, --rope-interleaved,
// --qkv-bias, --o-bias, --mlp-bias, --untied-head, --n-prelude, --n-coda.
void add_arch_flags(CLI::App* app, ModelConfig& cfg);

// Whether any of these flags was given on the command line.
bool any_given(const KeyedOptions& flags);

// A training job on every rank of comm: make() builds the trainer, work(trainer) runs it.
// Alone, an error propagates as usual; on several ranks, the others would wait for a rank
// that fails in the next sum, so a failing rank names itself and ends them all (from
// inside, while the trainer and its NCCL communicator are alive).
[[noreturn]] void end_ranks(Communicator& comm, const std::exception& e);
template <class Make, class Work>
void run_on_ranks(Communicator& comm, Make make, Work work) {
  try {
    auto trainer = make();
    try {
      work(*trainer);
    } catch (const std::exception& e) {
      if (comm.size() == 1) throw;
      end_ranks(comm, e);
    }
  } catch (const std::exception& e) {
    if (comm.size() == 1) throw;
    end_ranks(comm, e);
  }
}


// A solve's statistics as JSON (per sequence and in total).
template <class S>
json solve_json(const SolveResult<S>& r, const SolveOptions& o);

Command register_init(CLI::App& app);
Command register_forward(CLI::App& app);
Command register_grad(CLI::App& app);
Command register_train(CLI::App& app);
Command register_eval(CLI::App& app);
Command register_study(CLI::App& app);
Command register_compare(CLI::App& app);
Command register_trajectory(CLI::App& app);
Command register_flow_match(CLI::App& app);
Command register_sweep(CLI::App& app);
Command register_export_hf(CLI::App& app);
Command register_tokenize(CLI::App& app);
Command register_ode_bench(CLI::App& app);
std::vector<Command> register_bench(CLI::App& app);  // bench field | solve | train

}  // namespace flowloop::cli
