// flowloop/ode/depth.hpp: how deep to run a model, said once for every command.
//
// A DepthSpec is either `loop K` (h_{k+1} = h_k + f(h_k, k), K times) or an ODE
// solve of dh/dt = f(h, t) on [0, t1] with one method, taking fixed steps or
// adaptive steps under tolerances. Every command (forward, grad, eval, train,
// bench, study, and the ones after them) and the training configuration hold one;
// it is validated once, with one error text per mistake, and turned into
// SolveOptions in one place.
//
// Defaults, the same everywhere:
//   - nothing given: loop K, K = the depth the model was trained at;
//   - t1: the depth the model was trained at (ModelConfig::depth);
//   - a fixed-step method without a step count: one step per unit of t1
//     (round(t1), at least 1), so `euler` on [0, K] is `loop K` bit for bit;
//   - an adaptive method without tolerances: rtol kDefaultRtol, atol kDefaultAtol;
//   - controller pi (Hairer's DOPRI5), initial-step norm hairer (sums), h0 automatic,
//     solver_max_steps 100000, per-sequence steps, no terminal condition.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "flowloop/ode/solver.hpp"

namespace flowloop {

struct DepthSpec {
  static constexpr double kDefaultRtol = 1e-3;
  static constexpr double kDefaultAtol = 1e-4;
  static constexpr int64_t kDefaultMaxSteps = 100000;

  int loops = 0;           // loop K (> 0); 0: not given
  std::string solver;      // a method name (tableau_names(), odeint-rk4, odeint-dopri5); empty: loop
  int steps = 0;           // fixed step count on [0, t1]; 0: not given
  double rtol = std::numeric_limits<double>::quiet_NaN();  // NaN: not given
  double atol = std::numeric_limits<double>::quiet_NaN();
  double t1 = std::numeric_limits<double>::quiet_NaN();    // NaN: the trained depth
  std::string controller;    // "pi" or "i"; empty: pi
  std::string initial_norm;  // "hairer" (sums, dopri5.f) or "torchdiffeq" (RMS); empty: hairer
  double h0 = 0.0;           // first step of an adaptive solve; 0: automatic
  int64_t max_steps = 0;     // step limit per sequence of an adaptive solve; 0: kDefaultMaxSteps
  bool coupled = false;      // one shared step for the batch (adaptive only)
  double exit_threshold = 0.0;  // terminal condition ||f(h)|| / ||h|| < threshold (solves only); 0: off

  bool ode() const { return !solver.empty(); }
  // True for a solve under tolerances (an adaptive method given no step count).
  bool adaptive() const;

  // Throws Error naming the first mistake: contradicting flags (loops with a
  // solver, steps with tolerances, tolerances or an adaptive-only option for a
  // fixed-step method, solver-only options with loops), an unknown method,
  // t1 <= 0, and values out of range. Names the flags as the CLI spells them.
  void validate() const;

  // The loop count of a `loop K` spec: loops, or the trained depth.
  int loop_count(int trained_depth) const;
  // The end of the depth interval: t1, or the trained depth.
  double end_time(double trained_depth) const;
  // The SolveOptions of an ODE spec (validates first).
  SolveOptions solve_options(double trained_depth) const;

  // One line for people ("loop 4", "dopri5 rtol 1e-3 atol 1e-4 on [0, 4]", "rk4 8 steps on [0, 4]").
  std::string describe(double trained_depth) const;
  // A JSON object of the resolved spec: mode, loops or solver, t1, steps or
  // rtol/atol, controller, initial_norm, h0, max_steps, coupled, exit_threshold.
  std::string to_json(double trained_depth) const;

  // A regime in one token, as studies list them: "loop" (the trained depth),
  // "loop:K", "METHOD" (its defaults), "METHOD:N" for a fixed-step method (N steps),
  // "METHOD:RTOL" for an adaptive one (atol = RTOL / 10, as the defaults 1e-3 / 1e-4),
  // and "METHOD:N" with an integer N >= 1 for an adaptive method: N fixed steps.
  // t1 is left to the trained depth. Throws Error naming the token.
  static DepthSpec parse(const std::string& token);
  // A comma-separated list of tokens.
  static std::vector<DepthSpec> parse_list(const std::string& list);
  // The token that parse() reads back (a label for tables).
  std::string token() const;
};

// Built-in methods that take fixed steps only, and those with an error estimate.
bool method_is_adaptive(const std::string& method);  // throws Error for an unknown method
std::vector<std::string> method_names();

}  // namespace flowloop
