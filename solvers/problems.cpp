#include "flowloop/ode/problems.hpp"

#include <cmath>

namespace flowloop {

OdeProblem ode_problem(const std::string& name) {
  OdeProblem p;
  p.name = name;
  if (name == "arenstorf") {  // restricted three-body orbit; one period
    const double mu = 0.012277471, mup = 1 - mu;
    p.y0 = {0.994, 0.0, 0.0, -2.00158510637908252240537862224};
    p.t1 = 17.0652165601579625588917206249;
    p.f = [mu, mup](double, const double* y, double* d) {
      const double r1 = std::pow((y[0] + mu) * (y[0] + mu) + y[1] * y[1], 1.5);
      const double r2 = std::pow((y[0] - mup) * (y[0] - mup) + y[1] * y[1], 1.5);
      d[0] = y[2];
      d[1] = y[3];
      d[2] = y[0] + 2 * y[3] - mup * (y[0] + mu) / r1 - mu * (y[0] - mup) / r2;
      d[3] = y[1] - 2 * y[2] - mup * y[1] / r1 - mu * y[1] / r2;
    };
  } else if (name == "lorenz") {
    p.y0 = {1.0, 1.0, 1.0};
    p.t1 = 20.0;
    p.f = [](double, const double* y, double* d) {
      d[0] = 10.0 * (y[1] - y[0]);
      d[1] = y[0] * (28.0 - y[2]) - y[1];
      d[2] = y[0] * y[1] - 8.0 / 3.0 * y[2];
    };
  } else if (name == "vdp") {
    p.y0 = {2.0, 0.0};
    p.t1 = 20.0;
    p.f = [](double, const double* y, double* d) {
      d[0] = y[1];
      d[1] = (1 - y[0] * y[0]) * y[1] - y[0];
    };
  } else if (name == "brusselator") {
    p.y0 = {1.5, 3.0};
    p.t1 = 20.0;
    p.f = [](double, const double* y, double* d) {
      d[0] = 1.0 + y[0] * y[0] * y[1] - 4.0 * y[0];
      d[1] = 3.0 * y[0] - y[0] * y[0] * y[1];
    };
  } else {
    throw Error("unknown problem '" + name + "' (known: arenstorf, lorenz, vdp, brusselator)");
  }
  return p;
}

std::vector<std::string> ode_problem_names() { return {"arenstorf", "lorenz", "vdp", "brusselator"}; }

}  // namespace flowloop
