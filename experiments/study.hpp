// `flowloop study`: the looped-versus-deep comparison at equal training budget.
#pragma once

#include <string>

namespace flowloop {

struct StudyOptions {
  std::string task = "phop";
  int task_n = 16, hops = 4, prime = 0;  // prime: modarith's modulus (0: its default, 7)
  int d_model = 64, n_head = 4, depth = 4;
  int steps = 2000, batch = 64, warmup = 100;
  double lr = 1e-3;
  int eval_batches = 16;
  bool ode = true;            // also an ODE-depth model (dopri5 on [0, depth])
  int ode_steps = 0;          // its training steps (0: the same as the others)
  double ode_seconds = 0;     // its wall-clock budget (0: none); it stops there if not done
  double rtol = 1e-3, atol = 1e-4;
  double kinetic = 0, jacobian = 0;  // the ODE arm's regularisers
  std::string arms = "looped,deep,shallow,ode";  // which arms to train (comma-separated)
  uint64_t seed = 0;
  std::string out = "study";
};

// Trains, at the same steps, batch and learning rate: one block looped `depth`
// times, `depth` distinct blocks run once, one block run once, and (with ode) one
// block integrated by dopri5 on [0, depth]. Writes OUT/<model>/ for each, and
// OUT/results.json and OUT/results.md; prints the table. Returns 0.
int run_study(const StudyOptions& opt);

}  // namespace flowloop
