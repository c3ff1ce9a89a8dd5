// flowloop flow-match: flow matching over a teacher's latent trajectories.
//   record  the teacher's states h_0 .. h_K per sequence into safetensors shards
#include <iostream>

#include "cli.hpp"
#include "flowloop/flowmatch.hpp"

namespace flowloop::cli {
namespace {
struct RecordArgs {
  std::string model, task, text, out;
  RecordOptions opt;
  KeyedOptions depth_flags;
};
}  // namespace

Command register_flow_match(CLI::App& app) {
  auto* fm = app.add_subcommand("flow-match", "flow matching over a teacher's latent trajectories");
  fm->require_subcommand(1);
  auto a = std::make_shared<RecordArgs>();
  auto* r = fm->add_subcommand("record", "record a teacher's latent paths h_0 .. h_K (train and test splits) "
                                         "into safetensors shards with a manifest; a rerun resumes");
  r->add_option("-m,--model", a->model, "the teacher, a model written by train")->required()->check(CLI::ExistingFile);
  r->add_option("--task", a->task, "the task it was trained on (checked; default: its own)");
  r->add_option("--text", a->text, "the text it was trained on (checked; default: its own)");
  r->add_option("--states", a->opt.states, "solves: K + 1 states evenly over [0, t1] (default: depth + 1)");
  r->add_option("--examples", a->opt.train_examples, "training examples (whole batches)")->capture_default_str();
  r->add_option("--test-examples", a->opt.test_examples, "test examples (whole batches)")->capture_default_str();
  r->add_option("--batch", a->opt.batch, "teacher batch size")->capture_default_str();
  r->add_option("--shard-size", a->opt.shard_size, "recordings per shard (a multiple of --batch)")->capture_default_str();
  r->add_option("--out", a->out, "output directory DATA")->required();
  a->depth_flags = add_depth_flags(r, a->opt.depth);
  return {fm, [a, r] {
            if (!r->parsed()) return 1;
            const TrainConfig tc = trained_config(a->model, a->task, a->text);
            RecordOptions opt = a->opt;
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
