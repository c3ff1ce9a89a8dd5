// flowloop ode-bench: a solver on a classical non-stiff problem (Hairer's test set).
#include <cmath>
#include <iostream>

#include "cli.hpp"
#include "flowloop/ode/problems.hpp"

namespace flowloop::cli {
namespace {
struct OdeBenchArgs {
  std::string problem = "arenstorf";
  DepthSpec depth;
  bool json_out = false;
};
}  // namespace

Command register_ode_bench(CLI::App& app) {
  auto a = std::make_shared<OdeBenchArgs>();
  a->depth.solver = "dopri5";
  auto* c = app.add_subcommand("ode-bench", "a solver on a classical non-stiff problem");
  c->add_option("--problem", a->problem, "arenstorf, lorenz, vdp or brusselator")
      ->check(CLI::IsMember(ode_problem_names()))->capture_default_str();
  add_depth_flags(c, a->depth);
  c->add_flag("--json", a->json_out, "one JSON line instead of text");
  return {c, [a] {
            const OdeProblem p = ode_problem(a->problem);
            if (!a->depth.ode()) throw Error("ode-bench: give --solver");
            if (!std::isnan(a->depth.t1)) throw Error("ode-bench: the problem sets the interval; --t1 does not apply");
            if (a->depth.adaptive() && (std::isnan(a->depth.rtol) || std::isnan(a->depth.atol)))
              throw Error("ode-bench: give --rtol and --atol (adaptive) or --solver-steps (fixed)");
            SolveOptions o = a->depth.solve_options(p.t1 - p.t0);
            o.t0 = p.t0;
            o.t1 = p.t1;
            FunctionSystem sys(p.f, p.y0.size());
            std::vector<double> y = p.y0;
            const auto r = integrate(sys, y.data(), o);
            json j = {{"problem", a->problem}, {"solver", o.method}, {"nfe", r.nfe}, {"steps", r.steps},
                      {"accepted", r.accepted}, {"rejected", r.rejected}, {"y_end", y}, {"status", status_name(r.status)}};
            if (o.adaptive) {
              j["rtol"] = o.rtol;
              j["atol"] = o.atol;
            } else {
              j["fixed_steps"] = o.steps;
            }
            if (!r.message.empty()) j["message"] = r.message;
            if (a->json_out) {
              std::cout << j.dump() << std::endl;
            } else {
              std::cout << a->problem << " with " << o.method << ": status " << status_name(r.status) << ", nfe "
                        << r.nfe << ", steps " << r.steps << " (" << r.accepted << " accepted, " << r.rejected
                        << " rejected)\n  y_end = " << json(y).dump() << std::endl;
              if (!r.message.empty()) std::cout << "  " << r.message << std::endl;
            }
            return r.ok() ? 0 : 3;
          }};
}

}  // namespace flowloop::cli
