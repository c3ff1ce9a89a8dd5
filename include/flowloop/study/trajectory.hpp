// flowloop/study/trajectory.hpp: the logit lens over continuous depth. A model's latent
// h(t) is taken at N times of [0, t1] (the dense output of one solve; a loop gives
// its integer depths 0..K) and decoded through the readout at each: loss,
// accuracy, KL to the final distribution, ||f||, ||h||, the distance to h(t1), the
// cosine between consecutive f; with the steps the solver took, a 2-D PCA of a
// sample of token paths, and the states themselves. `flowloop trajectory` writes
// them and notebooks/latent_trajectories.ipynb plots them.
#pragma once

#include <array>
#include <string>
#include <vector>

#include "flowloop/train/data.hpp"
#include "flowloop/ode/depth.hpp"

namespace flowloop {

struct TrajectoryOptions {
  DepthSpec depth;     // a loop (times 0..K) or a solve (times linspace(0, t1, times))
  int times = 17;      // solves: the number of times, at least 2
  int batches = 1;     // test batches; the states kept are those of the first
  int batch_size = 16;
  int pca_tokens = 64;  // token paths in the PCA sample (spread evenly over the first batch)
  void validate() const;
};

// One depth time, averaged over the scored tokens (loss, accuracy as the task
// scores them, KL(p(t1) || p(t))) or over all tokens (the norms, per token).
struct LensPoint {
  double time = 0;
  double loss = 0, accuracy = 0, kl_to_final = 0;
  double f_norm = 0, h_norm = 0, dist_to_final = 0;
  double cos_prev_f = 0;  // NaN at the first time
};

struct StepPoint {
  int sequence = 0;  // over all batches, in order
  double t = 0, h = 0;  // where the accepted step ended, and its size
};

struct PcaPoint {
  int sample = 0, b = 0, pos = 0;
  double time = 0, pc1 = 0, pc2 = 0;
};

struct TrajectoryResult {
  std::string source;  // "loop" or "solve"
  std::vector<double> times;
  std::vector<LensPoint> lens;
  std::vector<StepPoint> steps;  // solves only
  std::vector<PcaPoint> pca;
  std::array<double, 2> pca_explained{};  // fraction of the variance on each component
  int B = 0, T = 0, C = 0;
  std::vector<float> states;  // (N, B, T, C) of the first batch
  double nfe = 0;             // the solve's (or loop's) evaluations per batch, mean
  int64_t examples = 0;
  EvalResult final_eval;      // loss and accuracy at t1, as `eval` reports them
};

// Throws Error for bad options (before any work) and for a failed solve (naming
// where it failed).
TrajectoryResult trace(const Model<float>& model, const DataSource& data, const TrajectoryOptions& opt);

// The files: lens.csv, steps.csv, pca.csv (CSV with a header line).
std::string lens_csv(const TrajectoryResult& r);
std::string steps_csv(const TrajectoryResult& r);
std::string pca_csv(const TrajectoryResult& r);

}  // namespace flowloop
