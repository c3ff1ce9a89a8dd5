#include "flowloop/ode/depth.hpp"
#include "flowloop/io/io.hpp"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "flowloop/core/tensor.hpp"

namespace flowloop {

namespace {
const char* kOdeintMethods[] = {"odeint-rk4", "odeint-dopri5"};

bool given(double v) { return !std::isnan(v); }

std::string num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}
}  // namespace

std::vector<std::string> method_names() {
  std::vector<std::string> n = tableau_names();
  for (const char* m : kOdeintMethods) n.emplace_back(m);
  return n;
}

bool method_is_adaptive(const std::string& method) {
  if (method == "odeint-rk4") return false;
  if (method == "odeint-dopri5") return true;
  const auto names = tableau_names();
  if (std::find(names.begin(), names.end(), method) == names.end()) {
    std::string list;
    for (const auto& n : method_names()) list += (list.empty() ? "" : ", ") + n;
    throw Error("depth: unknown solver '" + method + "' (known: " + list + ")");
  }
  return tableau(method).adaptive();
}

bool DepthSpec::adaptive() const { return ode() && steps == 0 && method_is_adaptive(solver); }

void DepthSpec::validate() const {
  auto fail = [](const std::string& m) { return Error("depth: " + m); };
  const bool tol = given(rtol) || given(atol);
  if (loops < 0) throw fail("--loops must be positive (got " + std::to_string(loops) + ")");
  if (given(t1) && !(t1 > 0 && std::isfinite(t1))) throw fail("--t1 must be finite and > 0 (got " + num(t1) + ")");
  if (!ode()) {
    // loop K: every solver option is a contradiction
    if (steps != 0) throw fail("--solver-steps needs --solver (looping takes --loops K)");
    if (tol) throw fail("--rtol/--atol need an adaptive --solver (looping takes --loops K)");
    if (given(t1)) throw fail("--t1 needs --solver (looping K times runs on [0, K])");
    if (!controller.empty() || !initial_norm.empty() || h0 != 0.0 || max_steps != 0 || coupled)
      throw fail("--controller, --initial-norm, --h0, --solver-max-steps and --batch-coupled need an adaptive --solver");
    if (exit_threshold != 0.0) throw fail("--exit-threshold needs --solver (looping exits with eval's --exit-delta)");
    return;
  }
  if (loops > 0)
    throw fail("give --loops K (looping) or --solver (an ODE solve), not both; --t1 sets the solve's interval");
  const bool embedded = method_is_adaptive(solver);  // names an unknown method
  if (steps < 0) throw fail("--solver-steps must be positive (got " + std::to_string(steps) + ")");
  if (steps > 0 && tol) throw fail("give --solver-steps or --rtol/--atol, not both");
  if (!embedded && tol)
    throw fail("solver '" + solver + "' has no error estimate: give --solver-steps, not --rtol/--atol");
  const bool adapt = steps == 0 && embedded;
  if (!adapt && (!controller.empty() || !initial_norm.empty() || h0 != 0.0 || max_steps != 0 || coupled))
    throw fail("--controller, --initial-norm, --h0, --solver-max-steps and --batch-coupled apply to adaptive solves "
               "only (solver '" + solver + "' " + (embedded ? "with --solver-steps" : "takes fixed steps") + ")");
  if (given(rtol) && !(rtol >= 0 && std::isfinite(rtol))) throw fail("--rtol must be finite and >= 0 (got " + num(rtol) + ")");
  if (given(atol) && !(atol >= 0 && std::isfinite(atol))) throw fail("--atol must be finite and >= 0 (got " + num(atol) + ")");
  if (adapt && rtol == 0 && atol == 0) throw fail("--rtol and --atol cannot both be 0");
  if (!controller.empty() && controller != "pi" && controller != "i")
    throw fail("--controller must be pi (Hairer's) or i (torchdiffeq's), not '" + controller + "'");
  if (!initial_norm.empty() && initial_norm != "hairer" && initial_norm != "torchdiffeq")
    throw fail("--initial-norm must be hairer (sums) or torchdiffeq (RMS), not '" + initial_norm + "'");
  if (!(h0 >= 0 && std::isfinite(h0))) throw fail("--h0 must be finite and >= 0 (got " + num(h0) + ")");
  if (max_steps < 0) throw fail("--solver-max-steps must be positive (got " + std::to_string(max_steps) + ")");
  if (!(exit_threshold >= 0 && std::isfinite(exit_threshold)))
    throw fail("--exit-threshold must be finite and >= 0 (got " + num(exit_threshold) + ")");
}

int DepthSpec::loop_count(int trained_depth) const { return loops > 0 ? loops : trained_depth; }

double DepthSpec::end_time(double trained_depth) const { return given(t1) ? t1 : trained_depth; }

SolveOptions DepthSpec::solve_options(double trained_depth) const {
  validate();
  if (!ode()) throw Error("depth: loop K has no solve options");
  SolveOptions o;
  o.method = solver;
  o.t0 = 0.0;
  o.t1 = end_time(trained_depth);
  if (!(o.t1 > 0)) throw Error("depth: t1 must be > 0 (the model's depth is " + num(trained_depth) + ")");
  if (adaptive()) {
    o.adaptive = true;
    // a tolerance not given keeps its documented default
    o.rtol = given(rtol) ? rtol : kDefaultRtol;
    o.atol = given(atol) ? atol : kDefaultAtol;
    o.controller = controller == "i" ? Controller::I : Controller::PI;
    o.initial_norm = initial_norm == "torchdiffeq" ? InitialStepNorm::RMS : InitialStepNorm::Sum;
    o.h0 = h0;
    o.max_steps = max_steps > 0 ? max_steps : kDefaultMaxSteps;
    o.batch_coupled = coupled;
  } else {
    o.steps = steps > 0 ? steps : std::max(1, static_cast<int>(std::lround(o.t1)));
  }
  o.terminal_threshold = exit_threshold;
  o.validate();
  return o;
}

std::string DepthSpec::describe(double trained_depth) const {
  if (!ode()) return "loop " + std::to_string(loop_count(static_cast<int>(std::lround(trained_depth))));
  const SolveOptions o = solve_options(trained_depth);
  std::ostringstream s;
  s << solver;
  if (o.adaptive) s << " rtol " << o.rtol << " atol " << o.atol << (o.batch_coupled ? " coupled" : "");
  else s << " " << o.steps << " steps";
  s << " on [0, " << o.t1 << "]";
  return s.str();
}

std::string DepthSpec::to_json(double trained_depth) const {
  nlohmann::ordered_json j;
  if (!ode()) {
    j["mode"] = "loop";
    j["loops"] = loop_count(static_cast<int>(std::lround(trained_depth)));
    return j.dump();
  }
  const SolveOptions o = solve_options(trained_depth);
  j["mode"] = o.adaptive ? "adaptive" : "fixed";
  j["solver"] = solver;
  j["t1"] = o.t1;
  if (o.adaptive) {
    j["rtol"] = o.rtol;
    j["atol"] = o.atol;
    j["controller"] = o.controller == Controller::PI ? "pi" : "i";
    j["initial_norm"] = o.initial_norm == InitialStepNorm::Sum ? "hairer" : "torchdiffeq";
    j["h0"] = o.h0;
    j["max_steps"] = o.max_steps;
    j["batch_coupled"] = o.batch_coupled;
  } else {
    j["solver_steps"] = o.steps;
  }
  if (o.terminal_threshold > 0) j["exit_threshold"] = o.terminal_threshold;
  return j.dump();
}

DepthSpec DepthSpec::parse(const std::string& token) {
  auto fail = [&](const std::string& m) { return Error("depth regime '" + token + "': " + m); };
  const auto colon = token.find(':');
  const std::string head = token.substr(0, colon);
  const std::string arg = colon == std::string::npos ? "" : token.substr(colon + 1);
  DepthSpec d;
  if (head.empty()) throw fail("empty method");
  double v = 0;
  if (!arg.empty()) {
    if (!parse_number(arg, v) || !(v > 0)) throw fail("'" + arg + "' is not a positive number");
  } else if (colon != std::string::npos) {
    throw fail("nothing after ':'");
  }
  const bool integer = !arg.empty() && v == std::floor(v) && arg.find_first_of(".eE") == std::string::npos;
  if (head == "loop") {
    if (!arg.empty()) {
      if (!integer) throw fail("a loop count is a positive integer");
      d.loops = static_cast<int>(v);
    }
    return d;
  }
  d.solver = head;
  const bool embedded = method_is_adaptive(head);
  if (!arg.empty()) {
    if (integer) {
      d.steps = static_cast<int>(v);
    } else if (embedded) {
      d.rtol = v;
      d.atol = v / 10;
    } else {
      throw fail("solver '" + head + "' takes a step count, not a tolerance");
    }
  }
  d.validate();
  return d;
}

std::vector<DepthSpec> DepthSpec::parse_list(const std::string& list) {
  std::vector<DepthSpec> out;
  for (const auto& item : split_list(list)) out.push_back(parse(item));
  if (out.empty()) throw Error("depth regimes: the list '" + list + "' is empty");
  return out;
}

std::string DepthSpec::token() const {
  if (!ode()) return loops > 0 ? "loop:" + std::to_string(loops) : "loop";
  if (steps > 0) return solver + ":" + std::to_string(steps);
  if (given(rtol)) return solver + ":" + num(rtol);
  return solver;
}

}  // namespace flowloop
