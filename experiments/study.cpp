#include "study.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "flowloop/io/io.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop {

namespace {
struct Arm {
  std::string name, label;
  int n_block, loops;
  bool ode;
};

// Mean and sample standard deviation.
struct Spread {
  double mean = 0, sd = 0;
  int n = 0;
};
Spread spread(const std::vector<double>& v) {
  Spread s;
  s.n = static_cast<int>(v.size());
  if (v.empty()) return s;
  for (double x : v) s.mean += x;
  s.mean /= s.n;
  if (s.n > 1) {
    for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(s.sd / (s.n - 1));
  }
  return s;
}
std::string fmt(const Spread& s, int prec) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(prec) << s.mean;
  if (s.n > 1) o << " ± " << s.sd;
  return o.str();
}
}  // namespace

int run_study(const StudyOptions& o) {
  const int K = o.depth;
  if (o.seeds < 1) throw Error("study: --seeds must be >= 1");
  DepthSpec ode_depth = o.ode_depth;
  if (!ode_depth.ode()) {
    if (ode_depth.loops > 0) throw Error("study: the ODE arm's depth needs --solver, not --loops");
    ode_depth.solver = "dopri5";
  }
  if (std::isnan(ode_depth.t1)) ode_depth.t1 = K;
  ode_depth.validate();
  const std::vector<DepthSpec> regimes = o.eval_depths.empty() ? std::vector<DepthSpec>{} : DepthSpec::parse_list(o.eval_depths);

  std::vector<Arm> arms = {
      {"looped", "1 block looped " + std::to_string(K) + "x", 1, K, false},
      {"deep", std::to_string(K) + " blocks once", K, 1, false},
      {"shallow", "1 block once", 1, 1, false},
  };
  {
    std::ostringstream label;
    label << "1 block, " << ode_depth.describe(K);
    if (o.random_steps_max > 0) label << ", random " << o.random_steps_min << "-" << o.random_steps_max << " steps";
    if (!o.random_solvers.empty()) label << ", random solver of " << o.random_solvers;
    if (o.t1_jitter > 0) label << ", t1 jitter " << o.t1_jitter;
    if (o.time_cond) label << ", time-conditioned";
    if (o.ode_from_looped) label << ", from the looped model";
    if (o.kinetic > 0) label << ", kinetic " << o.kinetic;
    if (o.jacobian > 0) label << ", jacobian " << o.jacobian;
    arms.push_back({"ode", label.str(), 1, 0, true});
  }
  {  // keep the arms asked for, in the table's order
    std::vector<std::string> want;
    std::stringstream ss(o.arms);
    for (std::string a; std::getline(ss, a, ',');)
      if (!a.empty()) want.push_back(a);
    for (const auto& w : want)
      if (w != "looped" && w != "deep" && w != "shallow" && w != "ode")
        throw Error("study: unknown arm '" + w + "' (known: looped, deep, shallow, ode)");
    std::vector<Arm> kept;
    for (const Arm& a : arms)
      if (std::find(want.begin(), want.end(), a.name) != want.end()) kept.push_back(a);
    if (kept.empty()) throw Error("study: no arm left to train (--arms '" + o.arms + "')");
    if (o.ode_from_looped && (std::find(want.begin(), want.end(), "looped") == want.end() ||
                              std::find(want.begin(), want.end(), "ode") == want.end()))
      throw Error("study: --ode-from-looped needs the looped and ode arms");
    arms = kept;
  }
  std::filesystem::create_directories(o.out);
  nlohmann::ordered_json runs = nlohmann::ordered_json::array();
  // per arm: accuracy, loss, eval nfe, train seconds, train nfe, steps; per arm and regime: accuracy, nfe
  std::map<std::string, std::map<std::string, std::vector<double>>> agg;
  std::map<std::string, std::map<std::string, std::pair<std::vector<double>, std::vector<double>>>> by_regime;
  std::map<std::string, int> planned;
  std::ostringstream curves;
  curves.precision(10);
  curves << "arm,seed,step,train_flops,train_seconds,test_accuracy,test_loss\n";
  for (int si = 0; si < o.seeds; ++si) {
    const uint64_t seed = o.seed + static_cast<uint64_t>(si);
    std::string looped_model;
    for (const Arm& a : arms) {
      TrainConfig c;
      c.task = o.task;
      c.task_n = o.task_n;
      c.task_hops = o.task == "phop" ? o.hops : 0;
      c.task_prime = o.task == "modarith" ? o.prime : 0;
      c.d_model = o.d_model;
      c.n_head = o.n_head;
      c.n_block = a.n_block;
      c.steps = a.ode && o.ode_steps > 0 ? o.ode_steps : o.steps;
      c.batch = o.batch;
      c.warmup = o.warmup;
      c.lr = o.lr;
      c.min_lr = o.lr / 10;
      c.eval_every = std::max(1, c.steps / std::max(1, o.curve_points));
      c.eval_batches = 4;
      c.checkpoint_every = c.eval_every;  // a stopped study loses at most one curve interval
      c.seed = seed;
      c.out = (std::filesystem::path(o.out) / (o.seeds > 1 ? a.name + "-s" + std::to_string(seed) : a.name)).string();
      if (a.ode) {
        c.depth = ode_depth;
        c.max_seconds = o.ode_seconds;
        c.kinetic = o.kinetic;
        c.jacobian = o.jacobian;
        c.random_steps_min = o.random_steps_min;
        c.random_steps_max = o.random_steps_max;
        c.random_solvers = o.random_solvers;
        c.t1_jitter = o.t1_jitter;
        c.time_cond = o.time_cond;
        if (o.ode_from_looped) c.init_from = looped_model;
      } else {
        c.depth.loops = a.loops;
      }
      planned[a.name] = c.steps;
      std::cerr << "== " << a.label << " (seed " << seed << ")" << std::endl;
      // a rerun goes on from the arm's checkpoint: a finished arm is not trained again
      Trainer tr(c);
      tr.set_device(resolve_device(o.device));
      tr.run(std::filesystem::exists(std::filesystem::path(c.out) / "checkpoint.safetensors"), std::cerr);
      if (a.name == "looped") looped_model = c.out + "/model.safetensors";
      const auto data = make_source(c);
      const EvalResult r = evaluate(tr.model(), *data, c.depth, o.eval_batches, o.batch);
      r.require_ok();
      // the training seconds and NFE, and the learning curve (test accuracy against
      // steps, cumulative FLOPs and seconds), from metrics.jsonl
      const TrainCost cost = read_train_cost(c.out, static_cast<double>(c.batch) * data->seq_len());
      for (const auto& p : cost.curve)
        curves << a.name << "," << seed << "," << p.step << "," << p.flops << "," << p.seconds << "," << p.accuracy
               << "," << p.loss << "\n";
      const double secs = cost.seconds, train_nfe = cost.nfe_mean;
      nlohmann::ordered_json row = {{"model", a.name}, {"label", a.label}, {"seed", seed}, {"n_block", a.n_block},
                                    {"depth", nlohmann::json::parse(c.depth.to_json(K))}, {"steps", tr.step()},
                                    {"planned_steps", c.steps}, {"parameters", tr.model().layout.size()},
                                    {"test_accuracy", r.accuracy}, {"test_loss", r.loss}, {"examples", r.examples},
                                    {"nfe", r.nfe}, {"train_seconds", secs}, {"train_nfe", train_nfe},
                                    {"kinetic", a.ode ? o.kinetic : 0.0}, {"jacobian", a.ode ? o.jacobian : 0.0}};
      auto& g = agg[a.name];
      g["accuracy"].push_back(r.accuracy);
      g["loss"].push_back(r.loss);
      g["nfe"].push_back(r.nfe);
      g["seconds"].push_back(secs);
      g["train_nfe"].push_back(train_nfe);
      g["steps"].push_back(static_cast<double>(tr.step()));
      g["parameters"].push_back(static_cast<double>(tr.model().layout.size()));
      nlohmann::ordered_json evals = nlohmann::ordered_json::array();
      for (const DepthSpec& d : regimes) {
        const EvalResult e = evaluate(tr.model(), *data, d, o.eval_batches, o.batch);
        e.require_ok();
        evals.push_back({{"regime", d.token()}, {"depth", nlohmann::json::parse(d.to_json(K))},
                         {"accuracy", e.accuracy}, {"loss", e.loss}, {"nfe", e.nfe}});
        by_regime[a.name][d.token()].first.push_back(e.accuracy);
        by_regime[a.name][d.token()].second.push_back(e.nfe);
      }
      if (!regimes.empty()) row["regimes"] = evals;
      runs.push_back(row);
    }
  }
  // the tables: mean ± sample sd over seeds
  std::ostringstream md;
  md << "| model | parameters | steps | test accuracy | test loss | nfe (eval) | train nfe | train s |\n"
        "|---|---|---|---|---|---|---|---|\n";
  nlohmann::ordered_json summary = nlohmann::ordered_json::array();
  for (const Arm& a : arms) {
    auto& g = agg[a.name];
    const Spread st = spread(g["steps"]);
    const std::string steps = st.mean < planned[a.name]
                                  ? fmt(st, 0) + " of " + std::to_string(planned[a.name])
                                  : std::to_string(planned[a.name]);
    md << "| " << a.label << " | " << static_cast<int64_t>(g["parameters"][0]) << " | " << steps << " | "
       << fmt(spread(g["accuracy"]), 3) << " | " << fmt(spread(g["loss"]), 3) << " | " << fmt(spread(g["nfe"]), 1)
       << " | " << fmt(spread(g["train_nfe"]), 1) << " | " << fmt(spread(g["seconds"]), 0) << " |\n";
    nlohmann::ordered_json s = {{"model", a.name}, {"label", a.label}, {"seeds", o.seeds}};
    for (const char* k : {"accuracy", "loss", "nfe", "train_nfe", "seconds", "steps"}) {
      const Spread sp = spread(g[k]);
      s[k] = {{"mean", sp.mean}, {"sd", sp.sd}};
    }
    summary.push_back(s);
  }
  if (!regimes.empty()) {
    md << "\nEach model under each depth regime on [0, " << K << "] (accuracy; mean nfe):\n\n| regime |";
    for (const Arm& a : arms) md << " " << a.name << " |";
    md << "\n|---|";
    for (size_t i = 0; i < arms.size(); ++i) md << "---|";
    md << "\n";
    for (const DepthSpec& d : regimes) {
      md << "| " << d.describe(K) << " |";
      for (const Arm& a : arms) {
        const auto& p = by_regime[a.name][d.token()];
        md << " " << fmt(spread(p.first), 3) << " (" << fmt(spread(p.second), 0) << ") |";
      }
      md << "\n";
    }
  }
  const nlohmann::ordered_json setup = {{"task", o.task}, {"task_n", o.task_n}, {"hops", o.hops}, {"prime", o.prime},
                                        {"d_model", o.d_model}, {"n_head", o.n_head}, {"depth", K}, {"steps", o.steps},
                                        {"batch", o.batch}, {"lr", o.lr}, {"seed", o.seed}, {"seeds", o.seeds},
                                        {"eval_depths", o.eval_depths}, {"curve_points", o.curve_points}};
  write_file_atomic((std::filesystem::path(o.out) / "results.json").string(),
                    nlohmann::ordered_json({{"setup", setup}, {"summary", summary}, {"results", runs}}).dump(2) + "\n");
  write_file_atomic((std::filesystem::path(o.out) / "results.md").string(), md.str());
  write_file_atomic((std::filesystem::path(o.out) / "curves.csv").string(), curves.str());
  std::cout << "study on " << o.task << " (n " << o.task_n << (o.task == "phop" ? ", hops " + std::to_string(o.hops) : "")
            << (o.task == "modarith" && o.prime ? ", prime " + std::to_string(o.prime) : "") << "), " << o.steps
            << " steps of batch " << o.batch << " each, " << o.seeds << " seed" << (o.seeds > 1 ? "s" : "")
            << " (mean ± sd):\n" << md.str();
  return 0;
}

}  // namespace flowloop
