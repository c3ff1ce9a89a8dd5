// flowloop eval: test loss and accuracy of a trained model under any depth.
#include <iostream>

#include "cli.hpp"
#include "flowloop/io/hf.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop::cli {
namespace {
struct EvalArgs {
  std::string model, core_layers, task, text, device = "auto";
  int context = 0;
  DepthSpec depth;
  int batches = 16, batch = 32;
  bool json_out = false;
  double exit_q = -1, exit_delta = -1;
  KeyedOptions depth_flags;
};
}  // namespace

Command register_eval(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  auto* ev = app.add_subcommand("eval", "test loss and accuracy of a trained model, under any depth");
  add_model_flags(ev, a->model, a->core_layers, "model .safetensors written by train");
  ev->add_option("--text", a->text, "a Hugging Face model's text (in its own tokens)");
  ev->add_option("--context", a->context, "a Hugging Face model's sequences: tokens each (default 128)");
  ev->add_option("--task", a->task, "task (default: the one it was trained on)");
  a->depth_flags = add_depth_flags(ev, a->depth);
  ev->add_option("--batches", a->batches, "test batches")->capture_default_str();
  ev->add_option("--batch", a->batch, "batch size")->capture_default_str();
  ev->add_flag("--json", a->json_out, "one JSON line");
  add_device_flag(ev, a->device);
  ev->add_option("--exit-q", a->exit_q, "loops + exit gate: each token exits where the cumulative exit probability reaches Q");
  ev->add_option("--exit-delta", a->exit_delta, "loops: each token exits where ||h_t - h_{t-1}|| < D");
  return {ev, [a] {
            const bool hf = is_hf_dir(a->model);
            TrainConfig c = hf ? study_config(a->model, a->task, a->text, a->context) : trained_config(a->model);
            if (!hf && !a->text.empty()) throw Error("--text is for a Hugging Face model; '" + a->model + "' has its own");
            if (!hf && !a->task.empty()) {
              if (c.task.empty()) throw Error("'" + a->model + "' was trained on text, not on a task");
              c.task = a->task;
            }
            // depth flags given: they say the whole regime; none: the trained one
            bool any = false;
            for (const auto& [key, o] : a->depth_flags) any = any || o->count() > 0;
            const DepthSpec depth = any ? a->depth : c.depth;
            depth.validate();
            if (a->exit_q >= 0 && a->exit_delta >= 0) throw Error("give --exit-q or --exit-delta, not both");
            const std::string rule = a->exit_q >= 0 ? "q" : a->exit_delta >= 0 ? "delta" : "";
            const auto data = make_source(c);
            Model<float> model = load_any<float>(a->model, {a->core_layers});
            model.set_device(resolve_device(a->device));
            require_fits(model.cfg, *data, c.task.empty() ? "text '" + c.text + "'" : "task '" + c.task + "'");
            const double thr = a->exit_q >= 0 ? a->exit_q : a->exit_delta;
            const EvalResult r = evaluate(model, *data, depth, a->batches, a->batch, rule, thr);
            r.require_ok();
            json j = {{"model", a->model}, {"data", json::parse(data->describe())}, {"loss", r.loss},
                      {"accuracy", r.accuracy}, {"examples", r.examples}, {"nfe", r.nfe},
                      {"depth", json::parse(depth.to_json(model.cfg.depth))}, {"device", device_name(model.device())}};
            if (!rule.empty()) {
              j["exit_rule"] = rule;
              j["exit_threshold"] = thr;
              j["exit_depth"] = r.exit_depth;
            }
            if (!depth.ode()) j["loops"] = depth.loop_count(model.cfg.depth);
            else j["solver"] = depth.solver;
            if (a->json_out) std::cout << j.dump() << std::endl;
            else std::cout << "loss " << r.loss << "  accuracy " << r.accuracy << " on " << r.examples
                           << " examples  nfe " << r.nfe << "  (" << depth.describe(model.cfg.depth) << ")" << std::endl;
            return 0;
          }};
}

}  // namespace flowloop::cli
