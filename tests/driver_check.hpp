// integrate()'s driver on a backend's memory against the host driver, shared by the
// reference backend's tests ([device]) and the CUDA backend's ([cuda]): the Hairer
// problems and a failing one, G copies each at its own speed (so the sequences step,
// reject and finish apart, and the active rows are gathered and scattered), under
// every mode of the driver: adaptive with dense output, the I controller with the RMS
// first step and saved steps, fixed steps with Hermite output, a batch-coupled step,
// an error norm over part of the state, and the terminal condition.
// On the reference backend (algebra.hpp's own functions) everything is bit-identical;
// on a GPU the step counts are identical in double and the states agree to rounding.
#pragma once

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "check.hpp"
#include "flowloop/backend/backend.hpp"
#include "flowloop/ode/problems.hpp"
#include "flowloop/ode/solver.hpp"

namespace flowloop::test {

// G copies of a problem, copy g sped up by 1 + g/2, with its states in a backend's
// memory (null: the host's): an evaluation downloads the rows, evaluates on the host
// and uploads the derivatives.
class SpedUpCopies : public OdeSystem<double> {
 public:
  SpedUpCopies(OdeProblem p, int G, Backend<double>* be) : p_(std::move(p)), G_(G), be_(be) {}
  int groups() const override { return G_; }
  size_t dim() const override { return p_.y0.size(); }
  Backend<double>* backend() override { return be_; }
  void eval(double* dydt, const double* y, const double* t, const int* ids, int count) override {
    const size_t n = dim(), m = static_cast<size_t>(count) * n;
    in_.resize(m);
    out_.resize(m);
    if (be_)
      be_->download(in_.data(), y, m);
    else
      std::copy(y, y + m, in_.begin());
    for (int i = 0; i < count; ++i) {
      p_.f(t[i], in_.data() + i * n, out_.data() + i * n);
      for (size_t j = 0; j < n; ++j) out_[i * n + j] *= 1.0 + 0.5 * ids[i];
    }
    if (be_)
      be_->upload(dydt, out_.data(), m);
    else
      std::copy(out_.begin(), out_.end(), dydt);
  }

 private:
  OdeProblem p_;
  int G_;
  Backend<double>* be_;
  std::vector<double> in_, out_;
};

// The equality the backend allows: bits on the reference backend, else rel < 1e-11.
inline void check_close(const std::vector<double>& got, const std::vector<double>& want, bool exact) {
  REQUIRE(got.size() == want.size());
  if (exact) {
    bool same = true;
    for (size_t i = 0; i < got.size() && same; ++i)
      same = (got[i] == want[i]) || (std::isnan(got[i]) && std::isnan(want[i]));
    CHECK(same);
  } else {
    CHECK(rel_error_of(got, want) < 1e-11);
  }
}

inline void check_backend_driver(Backend<double>& be, bool exact) {
  std::vector<OdeProblem> problems;
  for (const auto& name : ode_problem_names()) problems.push_back(ode_problem(name));
  // a field that turns NaN at t = 0.4: every sequence fails there, with where it failed
  problems.push_back({"nan-ahead", {1.0, 2.0}, 0.0, 1.0, [](double t, const double* y, double* d) {
                        d[0] = t > 0.4 ? std::numeric_limits<double>::quiet_NaN() : -y[0];
                        d[1] = -0.5 * y[1];
                      }});
  struct Mode {
    std::string name;
    SolveOptions opt;
  };
  std::vector<Mode> modes;
  auto adaptive = [](const std::string& method, double rtol) {
    SolveOptions o;
    o.method = method;
    o.adaptive = true;
    o.rtol = rtol;
    o.atol = rtol * 1e-2;
    return o;
  };
  modes.push_back({"dopri5, dense output", adaptive("dopri5", 1e-7)});
  modes.push_back({"bosh3, I controller, RMS first step, saved steps", adaptive("bosh3", 1e-5)});
  modes.back().opt.controller = Controller::I;
  modes.back().opt.initial_norm = InitialStepNorm::RMS;
  modes.back().opt.save = SaveKind::Steps;
  SolveOptions fixed;
  fixed.method = "rk4";
  fixed.steps = 120;
  modes.push_back({"rk4, fixed steps, Hermite output", fixed});
  modes.push_back({"dopri5, batch-coupled", adaptive("dopri5", 1e-6)});
  modes.back().opt.batch_coupled = true;
  modes.back().opt.record_steps = true;
  modes.push_back({"tsit5, error norm over the first value", adaptive("tsit5", 1e-6)});
  modes.back().opt.norm_period = 0;  // set per problem: the state's size
  modes.back().opt.norm_dims = 1;
  modes.push_back({"dopri5, terminal condition", adaptive("dopri5", 1e-5)});
  modes.back().opt.terminal_threshold = 0.3;
  const int G = 4;
  int terminal = 0;
  for (const OdeProblem& p : problems)
    for (Mode m : modes) {
      const size_t n = p.y0.size();
      SolveOptions o = m.opt;
      o.t0 = p.t0;
      o.t1 = p.name == "nan-ahead" ? p.t1 : p.t0 + 0.25 * (p.t1 - p.t0);
      if (o.norm_dims) o.norm_period = n;
      if (m.name.find("dense") != std::string::npos || m.name.find("Hermite") != std::string::npos) {
        o.save = SaveKind::Times;
        for (int i = 0; i <= 9; ++i) o.save_times.push_back(o.t0 + (o.t1 - o.t0) * i / 9.0);
      }
      std::vector<double> yh;
      for (int g = 0; g < G; ++g) yh.insert(yh.end(), p.y0.begin(), p.y0.end());
      SpedUpCopies host(p, G, nullptr), dev(p, G, &be);
      Array<double> yd(be, yh.size());
      yd.upload(yh.data(), yh.size());
      const SolveResult<double> a = integrate(host, yh.data(), o);
      const SolveResult<double> b = integrate(dev, yd.data(), o);
      std::vector<double> yb(yh.size());
      yd.download(yb.data(), yb.size());
      INFO(p.name << ", " << m.name << " on " << be.name());
      CHECK(b.status == a.status);
      CHECK(b.message == a.message);
      CHECK(b.calls == a.calls);
      REQUIRE(b.seq.size() == a.seq.size());
      for (size_t g = 0; g < a.seq.size(); ++g) {
        INFO("sequence " << g);
        CHECK(b.seq[g].steps == a.seq[g].steps);
        CHECK(b.seq[g].accepted == a.seq[g].accepted);
        CHECK(b.seq[g].rejected == a.seq[g].rejected);
        CHECK(b.seq[g].nfe == a.seq[g].nfe);
        CHECK(b.seq[g].status == a.seq[g].status);
      }
      check_close(yb, yh, exact);
      check_close(std::vector<double>(b.saved.begin(), b.saved.end()), std::vector<double>(a.saved.begin(), a.saved.end()),
                  exact);
      REQUIRE(b.step_times.size() == a.step_times.size());
      for (size_t g = 0; g < a.step_times.size(); ++g) {
        check_close(b.step_times[g], a.step_times[g], exact);
        check_close(b.step_h[g], a.step_h[g], exact);
      }
      REQUIRE(b.step_states.size() == a.step_states.size());
      for (size_t g = 0; g < a.step_states.size(); ++g)
        check_close(std::vector<double>(b.step_states[g].begin(), b.step_states[g].end()),
                    std::vector<double>(a.step_states[g].begin(), a.step_states[g].end()), exact);
      // the modes reach what they are for
      if (p.name == "nan-ahead") CHECK(a.status == SolveStatus::NonFinite);
      if (p.name != "nan-ahead" && !o.batch_coupled && o.adaptive) CHECK(a.seq[0].steps != a.seq[G - 1].steps);
      for (const auto& q : a.seq) terminal += q.status == SolveStatus::Terminal;
    }
  CHECK(terminal > 0);
}

}  // namespace flowloop::test
