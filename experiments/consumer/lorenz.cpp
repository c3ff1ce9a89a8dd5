// The README's C++ example: a Lorenz system with a tableau and a step-size controller of
// one's own, integrated by flowloop's driver (built against the installed package).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <flowloop/flowloop.hpp>
using namespace flowloop;

struct Lorenz : OdeSystem<double> {  // one sequence of 3 values
  int groups() const override { return 1; }
  size_t dim() const override { return 3; }
  void eval(double* f, const double* y, const double*, const int*, int) override {
    f[0] = 10 * (y[1] - y[0]), f[1] = y[0] * (28 - y[2]) - y[1], f[2] = y[0] * y[1] - 8.0 / 3 * y[2];
  }
};
struct IController : StepSizeController {  // h *= 0.9 err^(-1/(q+1)), within [0.2, 5]
  bool decide(int, double err, double h, int q, double& next) override {
    next = h * std::clamp(0.9 * std::pow(err, -1.0 / (q + 1)), 0.2, 5.0);
    return err <= 1;
  }
};
int main() {
  SolveOptions opt;  // Heun-Euler 2(1): c, a (row-major), b, and the error weights b - b_hat
  opt.use_tableau({"heun-euler", 2, 1, {0, 1}, {0, 0, 1, 0}, {0.5, 0.5}, {-0.5, 0.5}});
  opt.use_controller(std::make_shared<IController>());
  opt.adaptive = true, opt.t1 = 1, opt.rtol = opt.atol = 1e-6;
  Lorenz sys;
  double y[3] = {1, 1, 1};
  SolveResult<double> r = integrate(sys, y, opt);
  std::printf("%s: y(1) = (%.5f, %.5f, %.5f) in %lld steps (%lld rejected)\n", status_name(r.status), y[0], y[1],
              y[2], static_cast<long long>(r.steps), static_cast<long long>(r.rejected));
  return r.ok() ? 0 : 1;
}
