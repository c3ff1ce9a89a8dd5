// flowloop sweep: one model per training regime at an equal step budget, each
// evaluated under every regime of compare; writes OUT/sweep.csv and sweep_train.csv.
#include <iostream>

#include "cli.hpp"
#include "flowloop/study/sweep.hpp"

namespace flowloop::cli {
namespace {
struct SweepArgs {
  TrainConfig c;
  KeyedOptions given;
  std::string config_file, train_depths, regimes, device = "auto";
  int batches = 16, batch = 64;
};
}  // namespace

Command register_sweep(CLI::App& app) {
  auto a = std::make_shared<SweepArgs>();
  auto* sw = app.add_subcommand("sweep", "one model per training regime at equal steps, each under every "
                                         "evaluation regime: accuracy and NFE, train x eval");
  a->given = add_train_flags(sw, a->c, false);
  sw->add_option("--config", a->config_file, "JSON training configuration (flags given override it)");
  sw->add_option("--train-depths", a->train_depths,
                 "training regimes, comma-separated: loop:K, METHOD:N, METHOD:RTOL (e.g. loop:4,dopri5:1e-2,rk4:8)")
      ->required();
  sw->add_option("--regimes", a->regimes, "evaluation regimes (default: compare's full set)");
  sw->add_option("--compare-batches", a->batches, "test batches of each evaluation")->capture_default_str();
  sw->add_option("--compare-batch", a->batch, "their batch size")->capture_default_str();
  add_device_flag(sw, a->device);
  return {sw, [a] {
            SweepOptions o;
            o.device = a->device;
            o.base = merged_train_config(a->given, a->c, a->config_file);
            o.out = o.base.out;
            o.train_depths = DepthSpec::parse_list(a->train_depths);
            if (!a->regimes.empty()) o.eval_regimes = Regime::parse_list(a->regimes);
            o.eval_batches = a->batches;
            o.eval_batch = a->batch;
            o.validate();
            require_writable(o.out);
            const auto models = run_sweep(o, std::cerr);
            std::printf("%-16s %8s %14s %9s  %s\n", "train regime", "steps", "train FLOPs", "train s", "own regime: accuracy (nfe)");
            for (const auto& m : models) {
              const CompareRow* own = nullptr;
              for (const auto& r : m.rows)
                if (r.regime.exit_rule.empty() && !r.regime.depth.coupled && r.regime.depth.exit_threshold == 0 &&
                    r.regime.depth.token() == m.depth.token())
                  own = &r;
              std::printf("%-16s %8lld %14.4g %9.1f  ", m.depth.token().c_str(), static_cast<long long>(m.steps),
                          m.train_flops, m.train_seconds);
              if (own) std::printf("%.4f (%.1f)\n", own->result.accuracy, own->result.nfe_mean);
              else std::printf("-\n");
            }
            std::cout << "wrote " << o.out << "/sweep.csv (train x eval regime) and sweep_train.csv" << std::endl;
            return 0;
          }};
}

}  // namespace flowloop::cli
