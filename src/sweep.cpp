#include "flowloop/study/sweep.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "flowloop/io/io.hpp"

namespace flowloop {

std::string SweepOptions::model_dir(const DepthSpec& d) const {
  std::string token = d.token();
  for (char& ch : token)
    if (ch == ':') ch = '_';
  return (std::filesystem::path(out) / ("train-" + token)).string();
}

namespace {
TrainConfig model_config(const SweepOptions& o, const DepthSpec& d) {
  TrainConfig c = o.base;
  c.depth = d;
  c.out = o.model_dir(d);
  return c;
}

}  // namespace

void SweepOptions::validate() const {
  if (out.empty()) throw Error("sweep: --out DIR is required");
  if (train_depths.empty()) throw Error("sweep: --train-depths lists no training regime");
  if (eval_batches < 1 || eval_batch < 1) throw Error("sweep: --eval-batches and --eval-batch must be at least 1");
  std::vector<std::string> seen;
  for (const DepthSpec& d : train_depths) {
    const std::string t = d.token();
    if (std::find(seen.begin(), seen.end(), t) != seen.end()) throw Error("sweep: training regime '" + t + "' is listed twice");
    seen.push_back(t);
    const TrainConfig c = model_config(*this, d);
    try {
      c.validate();
    } catch (const Error& e) {
      throw Error("sweep: training regime '" + t + "': " + e.what());
    }
    const auto data = make_source(c);
    const ModelConfig mc = c.model_config(*data);
    for (const Regime& r : eval_regimes) r.validate(mc);
  }
}

std::vector<SweepModel> run_sweep(const SweepOptions& o, std::ostream& progress) {
  o.validate();
  const Device device = resolve_device(o.device);
  namespace fs = std::filesystem;
  fs::create_directories(o.out);
  std::vector<SweepModel> models;
  for (size_t i = 0; i < o.train_depths.size(); ++i) {
    const DepthSpec& d = o.train_depths[i];
    const TrainConfig c = model_config(o, d);
    progress << "== sweep " << (i + 1) << "/" << o.train_depths.size() << ": training " << d.token() << " ("
             << c.steps << " steps)" << std::endl;
    Trainer tr(c);
    tr.set_device(device);
    tr.run(fs::exists(fs::path(c.out) / "checkpoint.safetensors"), progress);
    SweepModel m;
    m.depth = d;
    m.dir = c.out;
    m.steps = tr.step();
    const auto data = make_source(c);
    const TrainCost cost = read_train_cost(c.out, static_cast<double>(c.batch) * data->seq_len());
    m.train_flops = cost.flops;
    m.train_nfe = cost.nfe_mean;
    m.train_seconds = cost.seconds;
    const std::vector<Regime> regimes = o.eval_regimes.empty() ? default_regimes(tr.model().cfg) : o.eval_regimes;
    progress << "== sweep " << (i + 1) << "/" << o.train_depths.size() << ": " << regimes.size()
             << " evaluation regimes" << std::endl;
    m.rows = compare_regimes(tr.model(), *data, regimes, o.eval_batches, o.eval_batch);
    write_compare_files(c.out, m.rows, tr.model().cfg.depth);
    models.push_back(std::move(m));
    // the tables so far: a stopped sweep keeps what it finished
    write_file_atomic((fs::path(o.out) / "sweep.csv").string(), sweep_csv(models));
    write_file_atomic((fs::path(o.out) / "sweep_train.csv").string(), sweep_train_csv(models));
  }
  return models;
}


std::string sweep_csv(const std::vector<SweepModel>& models) {
  std::string out = "train_regime,eval_regime,accuracy,loss,nfe_mean,nfe_p90,nfe_max,wall_s,status\n";
  for (const auto& m : models)
    for (const auto& r : m.rows)
      out += m.depth.token() + "," + r.regime.label() + "," + format_number(r.result.accuracy) + "," + format_number(r.result.loss) + "," +
             format_number(r.result.nfe_mean) + "," + format_number(r.result.nfe_p90) + "," + format_number(r.result.nfe_max) + "," +
             format_number(r.result.wall_s) + "," + r.result.status() + "\n";
  return out;
}

std::string sweep_train_csv(const std::vector<SweepModel>& models) {
  std::string out = "train_regime,dir,steps,train_seconds,train_flops,train_nfe\n";
  for (const auto& m : models)
    out += m.depth.token() + "," + m.dir + "," + std::to_string(m.steps) + "," + format_number(m.train_seconds) + "," +
           format_number(m.train_flops) + "," + format_number(m.train_nfe) + "\n";
  return out;
}

}  // namespace flowloop
