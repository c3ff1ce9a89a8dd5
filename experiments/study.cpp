#include "study.hpp"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "flowloop/train.hpp"

namespace flowloop {

int run_study(const StudyOptions& o) {
  struct Arm {
    std::string name, label;
    int n_block, loops;
    bool ode;
  };
  const int K = o.depth;
  std::vector<Arm> arms = {
      {"looped", "1 block looped " + std::to_string(K) + "x", 1, K, false},
      {"deep", std::to_string(K) + " blocks once", K, 1, false},
      {"shallow", "1 block once", 1, 1, false},
  };
  if (o.ode) {
    std::ostringstream label;
    label << "1 block, dopri5 on [0, " << K << "]";
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
    arms = kept;
  }
  std::filesystem::create_directories(o.out);
  nlohmann::ordered_json results = nlohmann::ordered_json::array();
  std::ostringstream md;
  md << "| model | parameters | steps | test accuracy | test loss | nfe (eval) | train s |\n|---|---|---|---|---|---|---|\n";
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
    c.eval_every = std::max(1, c.steps / 4);
    c.eval_batches = 4;
    c.checkpoint_every = c.steps;
    c.seed = o.seed;
    c.out = (std::filesystem::path(o.out) / a.name).string();
    if (a.ode) {
      c.solver = "dopri5";
      c.rtol = o.rtol;
      c.atol = o.atol;
      c.t1 = K;
      c.max_seconds = o.ode_seconds;
      c.kinetic = o.kinetic;
      c.jacobian = o.jacobian;
    } else {
      c.loops = a.loops;
    }
    std::cerr << "== " << a.label << std::endl;
    const auto t0 = std::chrono::steady_clock::now();
    Trainer tr(c);
    tr.run(false, std::cerr);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto data = make_source(c);
    const EvalResult r = evaluate(tr.model(), *data, c, o.eval_batches, o.batch);
    const size_t params = tr.model().layout.size();
    results.push_back({{"model", a.name}, {"kinetic", a.ode ? o.kinetic : 0.0}, {"jacobian", a.ode ? o.jacobian : 0.0}, {"label", a.label}, {"n_block", a.n_block}, {"loops", a.loops},
                       {"solver", a.ode ? "dopri5" : ""}, {"steps", tr.step()}, {"planned_steps", c.steps}, {"parameters", params}, {"test_accuracy", r.accuracy},
                       {"test_loss", r.loss}, {"examples", r.examples}, {"nfe", r.nfe}, {"train_seconds", secs}});
    const std::string steps = tr.step() < c.steps ? std::to_string(tr.step()) + " of " + std::to_string(c.steps)
                                                  : std::to_string(c.steps);
    md << "| " << a.label << " | " << params << " | " << steps << " | " << std::fixed << std::setprecision(3) << r.accuracy << " | "
       << r.loss << " | " << std::setprecision(1) << r.nfe << " | " << std::setprecision(0) << secs << " |\n";
  }
  const nlohmann::ordered_json setup = {{"task", o.task}, {"task_n", o.task_n}, {"hops", o.hops}, {"prime", o.prime}, {"d_model", o.d_model},
                                        {"n_head", o.n_head}, {"steps", o.steps}, {"batch", o.batch}, {"lr", o.lr},
                                        {"seed", o.seed}};
  std::ofstream(std::filesystem::path(o.out) / "results.json") << nlohmann::ordered_json({{"setup", setup}, {"results", results}}).dump(2) << "\n";
  std::ofstream(std::filesystem::path(o.out) / "results.md") << md.str();
  std::cout << "study on " << o.task << " (n " << o.task_n << (o.task == "phop" ? ", hops " + std::to_string(o.hops) : "")
            << (o.task == "modarith" && o.prime ? ", prime " + std::to_string(o.prime) : "")
            << "), " << o.steps << " steps of batch " << o.batch << " each:\n" << md.str();
  return 0;
}

}  // namespace flowloop
