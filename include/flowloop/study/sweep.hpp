// flowloop/study/sweep.hpp: the tolerance-vs-quality study. One model per training
// regime (loop K, a fixed-step solver, an adaptive solver at a tolerance) at an
// equal step budget, each evaluated under every regime of compare: the matrix of
// accuracy and NFE (train regime x evaluation regime), with each model's training
// cost. `flowloop sweep` writes it and notebooks/tolerance_study.ipynb plots it.
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "flowloop/study/compare.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop {

struct SweepOptions {
  TrainConfig base;                    // everything but the depth and the output directory
  std::vector<DepthSpec> train_depths;  // one model each
  std::vector<Regime> eval_regimes;     // empty: default_regimes of each model
  int eval_batches = 16, eval_batch = 64;
  std::string out;
  std::string device = "auto";  // where the models train and are evaluated (resolve_device)
  // The directory of a training regime's model: OUT/train-<token> (':' becomes '_').
  std::string model_dir(const DepthSpec& d) const;
  // Every configuration and regime checked, before any training.
  void validate() const;
};

struct SweepModel {
  DepthSpec depth;
  std::string dir;
  int64_t steps = 0;
  double train_seconds = 0, train_flops = 0, train_nfe = 0;  // train_nfe: mean forward evaluations a step
  std::vector<CompareRow> rows;
};

// Trains every model (a model already complete in its directory, with the same
// configuration, is reused: a sweep that was stopped goes on), then evaluates it.
// Writes OUT/sweep.csv (one row per model and evaluation regime), OUT/sweep_train.csv
// (the models' training cost) and each model's compare files in its directory.
std::vector<SweepModel> run_sweep(const SweepOptions& opt, std::ostream& progress);

std::string sweep_csv(const std::vector<SweepModel>& models);
std::string sweep_train_csv(const std::vector<SweepModel>& models);

}  // namespace flowloop
