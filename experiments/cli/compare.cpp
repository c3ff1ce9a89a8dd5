// flowloop compare: one trained model under every depth regime, on the same test
// examples; writes compare.csv, compare.jsonl, pareto.csv and compare_meta.json.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <iostream>

#include "cli.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/hf.hpp"
#include "flowloop/study/compare.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/core/tensor.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop::cli {
namespace {
struct CompareArgs {
  std::string model, core_layers, task, text, out, regimes, device = "auto";
  int batches = 16, batch = 64, context = 0;
  bool list = false;
};

}  // namespace

Command register_compare(CLI::App& app) {
  auto a = std::make_shared<CompareArgs>();
  auto* c = app.add_subcommand("compare", "one trained model under every depth regime: accuracy, NFE, Pareto front");
  add_model_flags(c, a->model, a->core_layers, "model .safetensors written by train");
  c->add_option("--task", a->task, "the task it was trained on (checked; default: its own)");
  c->add_option("--text", a->text,
                "the text it was trained on (checked; default: its own); a Hugging Face model's text, in its tokens");
  c->add_option("--context", a->context, "a Hugging Face model's sequences: tokens each (default 128)");
  c->add_option("--out", a->out, "output directory (required unless --list)");
  c->add_option("--regimes", a->regimes,
                "comma-separated regimes (default: the full set, see --list): loop:K, METHOD:N, METHOD:RTOL, "
                "with @coupled, @terminalE, @qQ, @deltaD");
  c->add_option("--batches", a->batches, "test batches")->capture_default_str();
  c->add_option("--batch", a->batch, "batch size")->capture_default_str();
  c->add_flag("--list", a->list, "print the regimes and stop");
  add_device_flag(c, a->device);
  return {c, [a] {
            const TrainConfig tc = study_config(a->model, a->task, a->text, a->context);
            const std::string trained_on = tc.task.empty() ? "text '" + tc.text + "'" : "task '" + tc.task + "'";
            Model<float> model = load_any<float>(a->model, {a->core_layers});
            model.set_device(resolve_device(a->device));
            const std::vector<Regime> regimes =
                a->regimes.empty() ? default_regimes(model.cfg) : Regime::parse_list(a->regimes);
            for (const auto& r : regimes) r.validate(model.cfg);
            if (a->list) {
              for (const auto& r : regimes) std::cout << r.label() << "\n";
              return 0;
            }
            if (a->out.empty()) throw Error("compare: --out DIR is required");
            if (a->batches < 1 || a->batch < 1) throw Error("--batches and --batch must be at least 1");
            const auto data = make_source(tc);
            require_fits(model.cfg, *data, trained_on);
            require_writable(a->out);

            const bool tty = isatty(fileno(stderr));
            auto progress = [&](size_t i, size_t n, const std::string& label) {
              if (!tty) return;
              const int width = 30, done = static_cast<int>(width * i / std::max<size_t>(n, 1));
              std::fprintf(stderr, "\r[%s%s] %zu/%zu %-32s", std::string(static_cast<size_t>(done), '#').c_str(),
                           std::string(static_cast<size_t>(width - done), '.').c_str(), i, n, label.c_str());
              if (i == n) std::fprintf(stderr, "\n");
              std::fflush(stderr);
            };
            const auto rows = compare_regimes(model, *data, regimes, a->batches, a->batch, progress);
            const auto front = write_compare_files(a->out, rows, model.cfg.depth);
            namespace fs = std::filesystem;
            const fs::path dir(a->out);
            json meta = {{"model", a->model},
                         {"data", json::parse(data->describe())},
                         {"trained_depth", model.cfg.depth},
                         {"trained", json::parse(tc.depth.to_json(model.cfg.depth))},
                         {"batches", a->batches},
                         {"batch", a->batch},
                         {"examples", rows.empty() ? 0 : rows[0].result.examples},
                         {"threads", num_threads()},
                         {"device", device_name(model.device())},
                         {"regimes", rows.size()}};
            write_file_atomic((dir / "compare_meta.json").string(), meta.dump(2) + "\n");

            std::printf("%-28s %9s %9s %8s %8s %6s %8s %s\n", "regime", "accuracy", "loss", "nfe", "nfe_p90", "exit",
                        "wall_s", "status");
            for (size_t i = 0; i < rows.size(); ++i) {
              const auto& e = rows[i].result;
              const bool on = std::find(front.begin(), front.end(), i) != front.end();
              const std::string exit = rows[i].regime.exit_rule.empty() ? "" : std::to_string(e.exit_depth).substr(0, 4);
              std::printf("%-28s %9.4f %9.4f %8.1f %8.0f %6s %8.2f %s%s\n", rows[i].regime.label().c_str(), e.accuracy,
                          e.loss, e.nfe_mean, e.nfe_p90, exit.c_str(), e.wall_s, e.status().c_str(), on ? "  (pareto)" : "");
            }
            std::cout << "wrote " << (dir / "compare.csv").string() << ", compare.jsonl, pareto.csv ("
                      << front.size() << " rows), compare_meta.json" << std::endl;
            return 0;
          }};
}

}  // namespace flowloop::cli
