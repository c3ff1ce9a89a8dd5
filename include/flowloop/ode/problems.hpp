// flowloop/ode/problems.hpp: the classical non-stiff test problems of Hairer,
// Norsett and Wanner, for `flowloop ode-bench` and the solver tests.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "flowloop/ode/solver.hpp"

namespace flowloop {

struct OdeProblem {
  std::string name;
  std::vector<double> y0;
  double t0 = 0.0, t1 = 0.0;
  std::function<void(double t, const double* y, double* dydt)> f;
};

// arenstorf, lorenz, vdp (mu = 1), brusselator (A = 1, B = 3).
OdeProblem ode_problem(const std::string& name);
std::vector<std::string> ode_problem_names();

// A plain right-hand side as an OdeSystem: G copies of one n-dimensional ODE.
class FunctionSystem : public OdeSystem<double> {
 public:
  using Fn = std::function<void(double t, const double* y, double* dydt)>;
  FunctionSystem(Fn f, size_t n, int groups = 1) : f_(std::move(f)), n_(n), groups_(groups) {}
  int groups() const override { return groups_; }
  size_t dim() const override { return n_; }
  void eval(double* dydt, const double* y, const double* t, const int*, int count) override {
    for (int i = 0; i < count; ++i) f_(t[i], y + i * n_, dydt + i * n_);
  }

 private:
  Fn f_;
  size_t n_;
  int groups_;
};

}  // namespace flowloop
