// `flowloop study`: looped versus deep versus ODE depth at equal training budget,
// over several seeds, each model evaluated under a list of depth regimes.
#pragma once

#include <string>

#include "flowloop/ode/depth.hpp"

namespace flowloop {

struct StudyOptions {
  std::string task = "phop";
  int task_n = 16, hops = 4, prime = 0;  // prime: modarith's modulus (0: its default, 7)
  int d_model = 64, n_head = 4, depth = 4;
  int steps = 2000, batch = 64, warmup = 100;
  double lr = 1e-3;
  int eval_batches = 16;
  int curve_points = 8;       // evaluations along each arm's training (its learning curve)
  int seeds = 1;              // seeds seed, seed + 1, ...: every arm is trained once per seed
  // The ODE arm: one block integrated under ode_depth on [0, depth] (default dopri5
  // with the depth spec's default tolerances), trained with these remedies.
  DepthSpec ode_depth;
  int ode_steps = 0;          // its training steps (0: the same as the others)
  double ode_seconds = 0;     // its wall-clock budget (0: none); it stops there if not done
  double kinetic = 0, jacobian = 0;  // regularisers
  int random_steps_min = 1, random_steps_max = 0;  // random fixed steps per batch (TrainConfig)
  std::string random_solvers;
  double t1_jitter = 0;
  bool time_cond = false;     // a time-conditioned field
  bool ode_from_looped = false;  // start from the looped arm of the same seed (trained first)
  std::string arms = "looped,deep,shallow,ode";  // which arms to train (comma-separated)
  // Every arm is evaluated under each of these regimes (DepthSpec::parse_list tokens,
  // t1 = depth); empty: only under its own.
  std::string eval_depths;
  uint64_t seed = 0;
  std::string out = "study";
  std::string device = "auto";  // where every arm trains and is evaluated (resolve_device)
};

// Trains, at the same steps, batch and learning rate: one block looped `depth`
// times, `depth` distinct blocks run once, one block run once, and one block as an
// ODE on [0, depth]. Writes OUT/<model>[-s<seed>]/ for each, OUT/results.json (every
// run and the mean and spread per arm), OUT/results.md, and OUT/curves.csv (every
// arm's test accuracy and loss against steps, training FLOPs and seconds); prints
// the tables.
int run_study(const StudyOptions& opt);

}  // namespace flowloop
