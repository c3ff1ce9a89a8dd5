// Boost.Odeint interop: any OdeSystem (a flowloop field included) integrated by
// odeint's own steppers, offered as solvers "odeint-rk4" and "odeint-dopri5"
// and used by the tests as an independent oracle.
#include <boost/numeric/odeint.hpp>
#include <cmath>
#include <cstring>
#include <numeric>

#include "flowloop/ode/solver.hpp"

namespace flowloop {

template <class S>
SolveResult<S> integrate_odeint(OdeSystem<S>& sys, S* y, const SolveOptions& opt) {
  namespace ode = boost::numeric::odeint;
  using State = std::vector<S>;
  const int G = sys.groups();
  const size_t total = sys.dim() * static_cast<size_t>(G);
  std::vector<int> ids(static_cast<size_t>(G));
  std::iota(ids.begin(), ids.end(), 0);
  std::vector<double> tt(static_cast<size_t>(G));
  int64_t calls = 0;
  auto rhs = [&](const State& x, State& dxdt, double t) {
    std::fill(tt.begin(), tt.end(), t);
    sys.eval(dxdt.data(), x.data(), tt.data(), ids.data(), G);
    ++calls;
  };
  State x(y, y + total);
  SolveResult<S> r;
  r.seq.assign(static_cast<size_t>(G), SequenceStats{});
  int64_t steps = 0;
  if (opt.method == "odeint-rk4") {
    if (opt.adaptive) throw Error("solver options: odeint-rk4 takes fixed steps (--steps or dt), not tolerances");
    ode::runge_kutta4<State, S, State, double> st;
    const double dir = opt.t1 >= opt.t0 ? 1.0 : -1.0;
    const int64_t N = opt.steps > 0 ? opt.steps
                                    : static_cast<int64_t>(std::ceil(std::fabs(opt.t1 - opt.t0) / opt.dt * (1 - 1e-12)));
    const double H = opt.steps > 0 ? (opt.t1 - opt.t0) / static_cast<double>(N) : dir * opt.dt;
    double t = opt.t0;
    for (int64_t k = 0; k < N; ++k) {
      const double tk = opt.steps > 0 ? opt.t0 + static_cast<double>(k) * H : t;
      const double h = (opt.steps > 0 || k + 1 < N) ? H : opt.t1 - tk;
      st.do_step(rhs, x, tk, h);
      t = tk + h;
    }
    steps = N;
  } else if (opt.method == "odeint-dopri5") {
    if (!opt.adaptive) throw Error("solver options: odeint-dopri5 is adaptive: give rtol and atol");
    const double h0 = opt.h0 != 0.0 ? opt.h0 : 1e-3 * (opt.t1 - opt.t0);
    if (opt.save == SaveKind::Times) {
      auto stepper = ode::make_dense_output(static_cast<S>(opt.atol), static_cast<S>(opt.rtol), ode::runge_kutta_dopri5<State, S, State, double>());
      std::vector<double> times = opt.save_times;
      if (times.empty() || times.back() != opt.t1) times.push_back(opt.t1);
      times.insert(times.begin(), opt.t0);
      r.saved.resize(opt.save_times.size() * total);
      size_t k = 0;
      steps = static_cast<int64_t>(ode::integrate_times(stepper, rhs, x, times.begin(), times.end(), h0,
                                                        [&](const State& xs, double) {
                                                          if (k >= 1 && k - 1 < opt.save_times.size())
                                                            std::memcpy(r.saved.data() + (k - 1) * total, xs.data(), total * sizeof(S));
                                                          ++k;
                                                        }));
    } else {
      auto stepper = ode::make_controlled(static_cast<S>(opt.atol), static_cast<S>(opt.rtol), ode::runge_kutta_dopri5<State, S, State, double>());
      steps = static_cast<int64_t>(ode::integrate_adaptive(stepper, rhs, x, opt.t0, opt.t1, h0));
    }
  } else {
    throw Error("unknown solver '" + opt.method + "' (odeint solvers: odeint-rk4, odeint-dopri5)");
  }
  std::memcpy(y, x.data(), total * sizeof(S));
  const bool finite = std::all_of(x.begin(), x.end(), [](S v) { return std::isfinite(v); });
  for (auto& q : r.seq) {
    q.nfe = calls;
    q.steps = q.accepted = steps;  // odeint does not report its rejections
    q.t = opt.t1;
    if (!finite) {
      q.status = SolveStatus::NonFinite;
      q.message = "odeint: non-finite state at t1";
    }
  }
  r.status = finite ? SolveStatus::Success : SolveStatus::NonFinite;
  if (!finite) r.message = "odeint: non-finite state at t1";
  r.calls = r.nfe = calls;
  r.seq_evals = calls * G;
  r.steps = r.accepted = steps;
  r.steps_total = steps * G;
  return r;
}

template SolveResult<float> integrate_odeint<float>(OdeSystem<float>&, float*, const SolveOptions&);
template SolveResult<double> integrate_odeint<double>(OdeSystem<double>&, double*, const SolveOptions&);

}  // namespace flowloop
