// flowloop trajectory: the logit lens over continuous depth; writes lens.csv,
// steps.csv, pca.csv, states.safetensors and trajectory_meta.json.
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "cli.hpp"
#include "flowloop/io/hf.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/study/trajectory.hpp"

namespace flowloop::cli {
namespace {
struct TrajectoryArgs {
  std::string model, core_layers, task, text, out, device = "auto";
  int context = 0;
  TrajectoryOptions opt;
  KeyedOptions depth_flags;
};
}  // namespace

Command register_trajectory(CLI::App& app) {
  auto a = std::make_shared<TrajectoryArgs>();
  auto* c = app.add_subcommand("trajectory", "the logit lens over continuous depth: h(t) decoded at N times, "
                                             "step sizes, PCA paths, the states");
  add_model_flags(c, a->model, a->core_layers, "model .safetensors written by train");
  c->add_option("--task", a->task, "the task it was trained on (checked; default: its own)");
  c->add_option("--text", a->text,
                "the text it was trained on (checked; default: its own); a Hugging Face model's text, in its tokens");
  c->add_option("--context", a->context, "a Hugging Face model's sequences: tokens each (default 128)");
  c->add_option("--out", a->out, "output directory")->required();
  c->add_option("--times", a->opt.times, "solves: N times evenly over [0, t1] (a loop gives 0..K)")->capture_default_str();
  c->add_option("--batches", a->opt.batches, "test batches (the states kept are the first one's)")->capture_default_str();
  c->add_option("--batch", a->opt.batch_size, "batch size")->capture_default_str();
  c->add_option("--pca-tokens", a->opt.pca_tokens, "token paths in the PCA sample")->capture_default_str();
  a->depth_flags = add_depth_flags(c, a->opt.depth);
  add_device_flag(c, a->device);
  return {c, [a] {
            const TrainConfig tc = study_config(a->model, a->task, a->text, a->context);
            TrajectoryOptions opt = a->opt;
            if (!any_given(a->depth_flags)) opt.depth = tc.depth;  // the trained regime
            opt.validate();
            Model<float> model = load_any<float>(a->model, {a->core_layers});
            model.set_device(resolve_device(a->device));
            const auto data = make_source(tc);
            require_fits(model.cfg, *data, "the model's training data");
            require_writable(a->out);
            const TrajectoryResult r = trace(model, *data, opt);

            namespace fs = std::filesystem;
            const fs::path dir(a->out);
            write_file_atomic((dir / "lens.csv").string(), lens_csv(r));
            write_file_atomic((dir / "steps.csv").string(), steps_csv(r));
            write_file_atomic((dir / "pca.csv").string(), pca_csv(r));
            const int64_t N = static_cast<int64_t>(r.times.size());
            const std::vector<float> times(r.times.begin(), r.times.end());
            json meta = {{"model", a->model},
                         {"data", json::parse(data->describe())},
                         {"depth", json::parse(opt.depth.to_json(model.cfg.depth))},
                         {"source", r.source},
                         {"times", r.times},
                         {"batches", opt.batches},
                         {"batch", opt.batch_size},
                         {"examples", r.examples},
                         {"nfe", r.nfe},
                         {"device", device_name(model.device())},
                         {"loss", r.final_eval.loss},
                         {"accuracy", r.final_eval.accuracy},
                         {"states_shape", {N, r.B, r.T, r.C}},
                         {"pca_tokens", std::min(opt.pca_tokens, r.B * r.T)},
                         {"pca_explained", r.pca_explained}};
            write_safetensors<float>((dir / "states.safetensors").string(),
                                     {{"states", {N, r.B, r.T, r.C}, r.states.data()}, {"times", {N}, times.data()}},
                                     {{"format", "flowloop-trajectory"}, {"meta", meta.dump()}});
            write_file_atomic((dir / "trajectory_meta.json").string(), meta.dump(2) + "\n");

            std::printf("%8s %9s %9s %10s %9s %9s %9s %8s\n", "t", "loss", "accuracy", "kl_final", "|f|", "|h|",
                        "|h-h(t1)|", "cos f");
            for (const auto& p : r.lens)
              std::printf("%8.3f %9.4f %9.4f %10.4g %9.4f %9.4f %9.4f %8.4f\n", p.time, p.loss, p.accuracy, p.kl_to_final,
                          p.f_norm, p.h_norm, p.dist_to_final, p.cos_prev_f);
            std::cout << opt.depth.describe(model.cfg.depth) << ", nfe " << r.nfe << ", " << r.steps.size()
                      << " steps recorded; wrote " << (dir / "lens.csv").string()
                      << ", steps.csv, pca.csv, states.safetensors, trajectory_meta.json" << std::endl;
            return 0;
          }};
}

}  // namespace flowloop::cli
