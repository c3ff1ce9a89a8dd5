// integrate(): the generic explicit Runge-Kutta driver for batches of
// independent sequences, with per-sequence (default) or batch-coupled steps.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "flowloop/ode/algebra.hpp"
#include "flowloop/ode/state_ops.hpp"
#include "flowloop/ode/solver.hpp"
#include "coupled.hpp"
#include "tape.hpp"

namespace flowloop {

const char* status_name(SolveStatus s) {
  switch (s) {
    case SolveStatus::Success: return "success";
    case SolveStatus::Terminal: return "terminal";
    case SolveStatus::MaxSteps: return "max_steps";
    case SolveStatus::StepTooSmall: return "step_too_small";
    case SolveStatus::NonFinite: return "non_finite";
  }
  return "unknown";
}

void SolveOptions::validate() const {
  auto fail = [](const std::string& m) { return Error("solver options: " + m); };
  if (!std::isfinite(t0) || !std::isfinite(t1)) throw fail("t0 and t1 must be finite");
  if ((own_tableau_ && own_tableau_->name == method) || method.rfind("odeint-", 0) != 0) {
    const ButcherTableau& tab = method_tableau();
    if (adaptive && !tab.adaptive())
      throw fail("method '" + method + "' has no error estimate: give a step count or dt, not tolerances");
  }
  if (adaptive) {
    if (!(rtol >= 0) || !(atol >= 0) || !std::isfinite(rtol) || !std::isfinite(atol))
      throw fail("adaptive solves need finite rtol >= 0 and atol >= 0 (got rtol = " + std::to_string(rtol) +
                 ", atol = " + std::to_string(atol) + ")");
    if (rtol == 0 && atol == 0) throw fail("rtol and atol cannot both be 0");
    if (!(safety > 0 && safety <= 1)) throw fail("safety must be in (0, 1]");
    if (!(fac_min > 0 && fac_min < 1 && fac_max > 1)) throw fail("need 0 < fac_min < 1 < fac_max");
  } else if (t0 != t1) {
    if (steps <= 0 && !(dt > 0)) throw fail("fixed-step solves need steps > 0 or dt > 0");
    if (steps > 0 && dt > 0) throw fail("give either steps or dt, not both");
  }
  if (max_steps <= 0) throw fail("max_steps must be positive");
  if (norm_dims > 0 && (norm_period < norm_dims)) throw fail("norm_period must be >= norm_dims");
  if (!(terminal_threshold >= 0)) throw fail("terminal_threshold must be >= 0");
  if (save == SaveKind::Times) {
    const double dir = t1 >= t0 ? 1.0 : -1.0;
    double prev = t0;
    for (double s : save_times) {
      if (!std::isfinite(s) || (s - t0) * dir < 0 || (s - t1) * dir > 0)
        throw fail("save time " + std::to_string(s) + " lies outside [t0, t1]");
      if ((s - prev) * dir < 0) throw fail("save times must be ordered from t0 to t1");
      prev = s;
    }
  }
}

void SolveOptions::use_tableau(ButcherTableau tab) {
  tab.validate();
  method = tab.name;
  own_tableau_ = std::make_shared<const ButcherTableau>(std::move(tab));
}

void SolveOptions::use_controller(std::shared_ptr<StepSizeController> ctrl) {
  if (!ctrl) throw Error("solver options: use_controller needs a controller (got null)");
  own_controller_ = std::move(ctrl);
}

// (`method` set to another name after use_tableau selects that built-in instead)
const ButcherTableau& SolveOptions::method_tableau() const {
  return own_tableau_ && own_tableau_->name == method ? *own_tableau_ : tableau(method);
}

namespace {

constexpr double kUround = 2.3e-16;  // dopri5.f's rounding unit

// All G sequences as one: the batch-coupled mode (one shared step).
template <class S>
using CoupledSystem = detail::CoupledView<S, OdeSystem<S>>;

// Row g of a (G, n) array.
template <class S>
S* row_at(S* base, int g, size_t n) {
  return base + static_cast<size_t>(g) * n;
}

// ---------------------------------------------------------------- the method

// The tableau's nonzero coefficients, listed once per solve: stage j is
// y + h sum_m a[j][m] k_{a_idx[j][m]}, the propagated solution y + h sum_m b[m] k_{b_idx[m]}.
struct StageCoefficients {
  std::vector<std::vector<double>> a;
  std::vector<std::vector<int>> a_idx;
  std::vector<double> b;
  std::vector<int> b_idx;

  explicit StageCoefficients(const ButcherTableau& tab) : a(tab.stages()), a_idx(tab.stages()) {
    const int s = tab.stages();
    for (int j = 0; j < s; ++j)
      for (int l = 0; l < j; ++l)
        if (tab.A(j, l) != 0.0) {
          a[j].push_back(tab.A(j, l));
          a_idx[j].push_back(l);
        }
    for (int l = 0; l < s; ++l)
      if (tab.b[l] != 0.0) {
        b.push_back(tab.b[l]);
        b_idx.push_back(l);
      }
  }
};

// ---------------------------------------------------------------- the step-size controller

// Which step each sequence attempts next, and whether the attempt is accepted.
// Fixed steps follow a schedule (a count: t_k = t0 + k H, the last step ending on t1;
// a dt: the last step shortened to land on t1). Adaptive steps follow Hairer's PI
// controller (dopri5.f) or torchdiffeq's I controller, with Hairer's hinit for the
// first step. Its memory is per sequence: the previous accepted error, whether the
// last attempt was rejected, and the run of non-finite attempts.
class StepControl {
 public:
  enum class Verdict { Accept, Reject, Fail };

  StepControl(const SolveOptions& o, const ButcherTableau& tab, int G)
      : o_(o), tab_(tab), dir_(o.t1 >= o.t0 ? 1.0 : -1.0),
        hmax_(o.hmax > 0 ? o.hmax : std::fabs(o.t1 - o.t0)),
        expo1_(1.0 / (tab.error_order + 1) - 0.75 * o.beta), facc1_(1.0 / o.fac_min), facc2_(1.0 / o.fac_max),
        facold_(G, 1e-4), hnext_(G, 0.0), last_rejected_(G, 0), nonfinite_(G, 0) {
    if (o.adaptive && o.step_controller()) o.step_controller()->start(G);
    if (o.adaptive || o.t0 == o.t1) return;
    if (o.steps > 0) {
      N_ = o.steps;
      H_ = (o.t1 - o.t0) / static_cast<double>(N_);
    } else {
      H_ = dir_ * o.dt;
      N_ = static_cast<int64_t>(std::ceil(std::fabs(o.t1 - o.t0) / o.dt * (1 - 1e-12)));
    }
  }

  bool adaptive() const { return o_.adaptive; }
  // The first step when the options give none (h0 = 0): Hairer's hinit, in two halves
  // around one evaluation of f at the probe point y0 + h_probe f0. The halves take the
  // sequence's scaled sums of squares (the driver's row-batched norms):
  // f0s = sum (f0 / sc)^2, y0s = sum (y0 / sc)^2, d2s = sum ((f_probe - f0) / sc)^2.
  bool automatic_first_step() const { return o_.adaptive && o_.h0 == 0.0; }
  double given_first_step() const { return dir_ * std::fabs(o_.h0); }
  double probe_step(double f0s, double y0s, size_t n, double& dnf) const;
  double first_step(double h_probe, double dnf, double d2s, size_t n) const;

  // Before a step of sequence g: its step [t, t + h] (t is set on a fixed count's
  // grid) and whether it ends on t1. Returns Success, or why the sequence cannot go
  // on (then `why` says so).
  SolveStatus plan(int g, const SequenceStats& q, double& t, double& h, bool& last, std::string& why) const;
  // After it: err is the scaled error norm (adaptive), finite whether the new state
  // is finite (fixed steps). A rejection sets h to the step to try again; after an
  // acceptance next_step() gives the following step. Fail: `why` says what happened.
  Verdict judge(int g, double err, bool finite, double& h, SequenceStats& q, std::string& why);
  double next_step(int g, double h) const { return o_.adaptive ? hnext_[g] : h; }

 private:
  double new_step(int g, double err, double h);

  const SolveOptions& o_;
  const ButcherTableau& tab_;
  const double dir_, hmax_, expo1_, facc1_, facc2_;
  double H_ = 0.0;  // fixed steps: the step, and their number
  int64_t N_ = 0;
  std::vector<double> facold_, hnext_;
  std::vector<char> last_rejected_;
  std::vector<int> nonfinite_;
};

double StepControl::probe_step(double f0s, double y0s, size_t n, double& dnf) const {
  const double norm = o_.initial_norm == InitialStepNorm::RMS ? static_cast<double>(n) : 1.0;
  dnf = f0s / norm;
  const double dny = y0s / norm;
  double h = (dnf <= 1e-10 || dny <= 1e-10) ? 1e-6 : 0.01 * std::sqrt(dny / dnf);
  h = std::min(h, hmax_);
  return dir_ * h;
}

double StepControl::first_step(double h_probe, double dnf, double d2s, size_t n) const {
  const double norm = o_.initial_norm == InitialStepNorm::RMS ? static_cast<double>(n) : 1.0;
  const double der2 = std::sqrt(d2s / norm) / std::fabs(h_probe);
  const double der12 = std::max(std::fabs(der2), std::sqrt(dnf));
  const double h1 = der12 <= 1e-15 ? std::max(1e-6, std::fabs(h_probe) * 1e-3)
                                   : std::pow(0.01 / der12, 1.0 / tab_.order);
  const double h = std::min({100 * std::fabs(h_probe), h1, hmax_});
  return dir_ * (std::isfinite(h) ? h : 1e-6);  // a NaN field is rejected by the first step
}

SolveStatus StepControl::plan(int g, const SequenceStats& q, double& t, double& h, bool& last,
                              std::string& why) const {
  if (!o_.adaptive) {
    const int64_t k = q.accepted;
    last = k + 1 >= N_;
    if (o_.steps > 0) {  // t_k = t0 + k H, not accumulated; the last step ends on t1
      t = o_.t0 + static_cast<double>(k) * H_;
      h = H_;
    } else {
      h = last ? o_.t1 - t : H_;
    }
    return SolveStatus::Success;
  }
  if (q.steps >= o_.max_steps) {
    why = "more than " + std::to_string(o_.max_steps) + " steps";
    return SolveStatus::MaxSteps;
  }
  if (0.1 * std::fabs(h) <= std::fabs(t) * kUround || h == 0.0) {
    if (nonfinite_[g] > 0) {  // the field is NaN or Inf just ahead: that is the cause
      why = "non-finite (NaN or Inf) evaluations ahead made the step size collapse";
      return SolveStatus::NonFinite;
    }
    why = "step size too small";
    return SolveStatus::StepTooSmall;
  }
  last = false;
  if ((t + 1.01 * h - o_.t1) * dir_ > 0) {
    h = o_.t1 - t;
    last = true;
  }
  return SolveStatus::Success;
}

StepControl::Verdict StepControl::judge(int g, double err, bool finite, double& h, SequenceStats& q,
                                        std::string& why) {
  if (!o_.adaptive) {
    if (finite) return Verdict::Accept;
    why = "non-finite state (NaN or Inf) after the step";
    return Verdict::Fail;
  }
  if (!std::isfinite(err) || !finite) {
    // NaN is never a small error: a rejection with the largest decrease; repeated, a failure
    if (q.accepted > 0) ++q.rejected;
    last_rejected_[g] = 1;
    if (++nonfinite_[g] > o_.max_nonfinite) {
      why = "non-finite error estimate or state (NaN or Inf) in " + std::to_string(nonfinite_[g]) +
            " consecutive attempts";
      return Verdict::Fail;
    }
    h *= o_.fac_min;
    return Verdict::Reject;
  }
  nonfinite_[g] = 0;
  double hnew;
  bool accept;
  if (StepSizeController* own = o_.step_controller()) {  // the user's: its verdict and step, within hmax
    accept = own->decide(g, err, h, tab_.error_order, hnew);
    if (!std::isfinite(hnew) || hnew * dir_ <= 0) {
      why = "the step-size controller gave the step " + std::to_string(hnew) + " after a step of " +
            std::to_string(h) + " (it must be finite and point from t0 to t1)";
      return Verdict::Fail;
    }
    if (std::fabs(hnew) > hmax_) hnew = dir_ * hmax_;
  } else {
    hnew = new_step(g, err, h);
    accept = err <= 1.0;
  }
  if (accept) {
    last_rejected_[g] = 0;
    hnext_[g] = hnew;
    return Verdict::Accept;
  }
  if (q.accepted > 0) ++q.rejected;
  last_rejected_[g] = 1;
  h = hnew;
  return Verdict::Reject;
}

// The next step size from the error of a step of size h (finite err).
double StepControl::new_step(int g, double err, double h) {
  double hnew;
  if (o_.controller == Controller::PI) {  // Hairer's dopri5.f
    const double fac11 = std::pow(err, expo1_);
    double fac = fac11 / std::pow(facold_[g], o_.beta);
    fac = std::max(facc2_, std::min(facc1_, fac / o_.safety));
    hnew = h / fac;
    if (err <= 1.0) {
      facold_[g] = std::max(err, 1e-4);
      if (last_rejected_[g]) hnew = dir_ * std::min(std::fabs(hnew), std::fabs(h));
    } else {
      hnew = h / std::min(facc1_, fac11 / o_.safety);
    }
  } else if (err == 0.0) {  // I controller (torchdiffeq's _optimal_step_size)
    hnew = h * o_.fac_max;
  } else {
    const double dfactor = err < 1.0 ? 1.0 : o_.fac_min;
    hnew = h * std::min(o_.fac_max, std::max(o_.safety * std::pow(err, -1.0 / (tab_.error_order + 1)), dfactor));
  }
  if (std::fabs(hnew) > hmax_) hnew = dir_ * hmax_;
  return hnew;
}

// ---------------------------------------------------------------- what to save

// The final state is the driver's y. Besides it: every accepted step (time, size,
// state), or the requested times by dense output over the accepted step that covers
// them: Dormand-Prince's continuous extension where the tableau has one, cubic
// Hermite on (y0, f0, y1, f1) else. Times a failed sequence never reached are NaN;
// times after a sequence's terminal stop hold its final state.
// The states are the backend's; the saves are host arrays, so the rows a save reads
// are downloaded when (and only when) it reads them.
template <class S>
class Saver {
 public:
  Saver(const SolveOptions& o, const ButcherTableau& tab, int G, size_t n, SolveResult<S>& r)
      : o_(o), tab_(tab), G_(G), n_(n), r_(r), next_(G, 0) {}

  void start(StateOps<S>& be, const S* y);  // y (G, n) at t0
  // Whether a save time inside sequence g's last step needs f(t1, y1); methods
  // without FSAL evaluate it only then.
  bool needs_f1_on_last(int g) const {
    const size_t i = static_cast<size_t>(next_[g]);
    return o_.save == SaveKind::Times && i < o_.save_times.size() && o_.save_times[i] != o_.t1;
  }
  // Sequence g accepted the step [t, t_end] of size h from y0 to y1 (its rows), its stages
  // in K; f1 = f(t_end, y1) (its row) when has_f1.
  void accepted(int g, double t, double h, double t_end, const S* y0, const S* y1, const std::vector<Array<S>>& K,
                bool has_f1, const S* f1);
  void stopped(int g, const S* state) {  // the times after the stop hold `state` (a row of the backend)
    if (o_.save != SaveKind::Times) return;
    be_->download(row_.data(), state, n_);
    fill_remaining(g, row_.data());
  }
  void failed(int g) {  // what could not be reached is NaN, not a guess
    if (o_.save != SaveKind::Times) return;
    std::fill(row_.begin(), row_.end(), std::numeric_limits<S>::quiet_NaN());
    fill_remaining(g, row_.data());
  }

 private:
  S* slot(size_t i, int g) { return r_.saved.data() + (i * G_ + g) * n_; }
  void fill_remaining(int g, const S* host_state);
  void dense_output(S* out, double th, double h, bool has_f1);

  const SolveOptions& o_;
  const ButcherTableau& tab_;
  const int G_;
  const size_t n_;
  SolveResult<S>& r_;
  StateOps<S>* be_ = nullptr;
  std::vector<int> next_;  // per sequence, the next save time to fill
  Buffer<S> row_;          // a downloaded row
  Buffer<S> y0_, y1_, f1_;  // the rows of the step being saved, and its stages (s, n)
  Buffer<S> k_;
};

template <class S>
void Saver<S>::start(StateOps<S>& be, const S* y) {
  be_ = &be;
  row_.assign(n_, S(0));
  if (o_.save == SaveKind::Steps || o_.record_steps) {
    r_.step_times.assign(G_, {o_.t0});
    r_.step_h.assign(G_, {});
  }
  if (o_.save == SaveKind::Steps) {
    r_.step_states.resize(G_);
    for (int g = 0; g < G_; ++g) {
      r_.step_states[g].resize(n_);
      be.download(r_.step_states[g].data(), row_at(y, g, n_), n_);
    }
  }
  if (o_.save != SaveKind::Times) return;
  const size_t nt = o_.save_times.size();
  r_.saved.assign(nt * G_ * n_, S(0));
  for (int g = 0; g < G_; ++g)  // save times equal to t0 are the initial state
    while (static_cast<size_t>(next_[g]) < nt && o_.save_times[next_[g]] == o_.t0) {
      be.download(slot(static_cast<size_t>(next_[g]), g), row_at(y, g, n_), n_);
      ++next_[g];
    }
}

template <class S>
void Saver<S>::accepted(int g, double t, double h, double t_end, const S* y0, const S* y1,
                        const std::vector<Array<S>>& K, bool has_f1, const S* f1) {
  if (o_.save == SaveKind::Steps || o_.record_steps) {
    r_.step_times[g].push_back(t_end);
    r_.step_h[g].push_back(h);
  }
  if (o_.save == SaveKind::Steps) {
    Buffer<S>& states = r_.step_states[g];
    states.resize(states.size() + n_);
    be_->download(states.data() + states.size() - n_, y1, n_);
  }
  if (o_.save != SaveKind::Times) return;
  const double dir = o_.t1 >= o_.t0 ? 1.0 : -1.0;
  const size_t nt = o_.save_times.size();
  bool fetched = false;
  for (; static_cast<size_t>(next_[g]) < nt; ++next_[g]) {
    const double ts = o_.save_times[static_cast<size_t>(next_[g])];
    if ((ts - t_end) * dir > 0) break;
    if (!fetched) {  // the step's rows, once
      const int s = tab_.stages();
      y0_.resize(n_), y1_.resize(n_), f1_.resize(n_), k_.resize(static_cast<size_t>(s) * n_);
      be_->download(y0_.data(), y0, n_);
      be_->download(y1_.data(), y1, n_);
      if (has_f1) be_->download(f1_.data(), f1, n_);
      for (int j = 0; j < s; ++j)  // the continuous extension reads every stage, Hermite only f0
        if (j == 0 || !tab_.dense.empty()) be_->download(k_.data() + j * n_, row_at(K[j].data(), g, n_), n_);
      fetched = true;
    }
    S* out = slot(static_cast<size_t>(next_[g]), g);
    const double th = (ts - t) / h;
    if (ts == t_end || th >= 1.0)
      std::memcpy(out, y1_.data(), n_ * sizeof(S));
    else
      dense_output(out, th, h, has_f1);
  }
}

// The state at t + th h inside the step (0 <= th < 1), from the fetched rows.
template <class S>
void Saver<S>::dense_output(S* out, double th, double h, bool has_f1) {
  const int s = tab_.stages();
  const S* y0 = y0_.data();
  const S* y1 = y1_.data();
  const S* f1 = f1_.data();
  const S* k0 = k_.data();
  if (!tab_.dense.empty()) {
    // Hairer's contd5: y0 + th (dy + (1-th) (h k1 - dy + th (dy - h k7 - (h k1 - dy) + (1-th) h sum d_j k_j)))
    const S* klast = k_.data() + static_cast<size_t>(s - 1) * n_;
    const double th1 = 1.0 - th;
    for (size_t i = 0; i < n_; ++i) {
      const double r2 = double(y1[i]) - double(y0[i]);
      const double r3 = h * double(k0[i]) - r2;
      const double r4 = r2 - h * double(klast[i]) - r3;
      double r5 = 0.0;
      for (int j = 0; j < s; ++j)
        if (tab_.dense[j] != 0.0) r5 += tab_.dense[j] * double(k_[static_cast<size_t>(j) * n_ + i]);
      r5 *= h;
      out[i] = static_cast<S>(double(y0[i]) + th * (r2 + th1 * (r3 + th * (r4 + th1 * r5))));
    }
    return;
  }
  // cubic Hermite on (y0, f0, y1, f1)
  const double h00 = (1 + 2 * th) * (1 - th) * (1 - th), h10 = th * (1 - th) * (1 - th);
  const double h01 = th * th * (3 - 2 * th), h11 = th * th * (th - 1);
  for (size_t i = 0; i < n_; ++i)
    out[i] = static_cast<S>(h00 * y0[i] + h10 * h * k0[i] + h01 * y1[i] + (has_f1 ? h11 * h * f1[i] : 0.0));
}

template <class S>
void Saver<S>::fill_remaining(int g, const S* host_state) {
  const size_t nt = o_.save_times.size();
  for (size_t i = static_cast<size_t>(next_[g]); i < nt; ++i) std::memcpy(slot(i, g), host_state, n_ * sizeof(S));
  next_[g] = static_cast<int>(nt);
}

// ---------------------------------------------------------------- the terminal condition

// A sequence stops where its latent settles: ||f(y)|| < threshold ||y|| (the
// continuous analogue of exiting a loop once h stops changing). Off at threshold 0.
// ff and yy are the sums of squares of f and y.
bool terminal_reached(double threshold, double ff, double yy) {
  if (!(threshold > 0)) return false;
  return std::sqrt(ff) < threshold * std::sqrt(yy);
}

// ---------------------------------------------------------------- the tape (grad.cpp's hooks)

// For backprop through the solver: every field evaluation of a step goes through the
// DiffSystem's recording slots (slots follow calls), and each round in which some
// sequences accepted their step is written down with where its stages were evaluated.
// A round in which nobody accepted gives its calls and slots back. Off for plain solves.
template <class S>
class TapeRecorder {
 public:
  TapeRecorder(DiffSystem<S>* sys, detail::Tape* tape) : sys_(sys), tape_(tape) {}
  bool on() const { return tape_ != nullptr; }

  // f for the `ids.size()` rows of y, recorded; returns the call's index.
  int eval(S* dydt, const S* y, const double* t, const std::vector<int>& ids) {
    const int call = static_cast<int>(tape_->calls.size());
    sys_->reserve_slots(call + 1);
    sys_->eval_record(dydt, y, t, ids.data(), static_cast<int>(ids.size()), call);
    tape_->calls.push_back({call, ids});
    return call;
  }
  void start(int G, int k0_call) {  // f(t0, y0) of every sequence
    if (tape_) tape_->k0_call.assign(static_cast<size_t>(G), k0_call);
  }
  void begin_round() {
    if (tape_) calls_before_ = tape_->calls.size();
  }
  // The round's accepted sequences with their step starts t and sizes h (indexed by
  // sequence), where its stages were evaluated, and where each accepted sequence's
  // next f(t, y) lies: next_k0 (FSAL: the last stage), or f1_call for those in need_f1.
  void end_round(const std::vector<int>& accepted, const std::vector<double>& t, const std::vector<double>& h,
                 const std::vector<int>& stage_call, int next_k0, const std::vector<int>& need_f1, int f1_call);

 private:
  DiffSystem<S>* sys_;
  detail::Tape* tape_;
  size_t calls_before_ = 0;
};

template <class S>
void TapeRecorder<S>::end_round(const std::vector<int>& accepted, const std::vector<double>& t,
                                const std::vector<double>& h, const std::vector<int>& stage_call, int next_k0,
                                const std::vector<int>& need_f1, int f1_call) {
  if (!tape_) return;
  if (accepted.empty()) {
    tape_->calls.resize(calls_before_);  // nothing of this round is in the graph
    return;
  }
  detail::Tape::Round rd;
  rd.groups = accepted;
  rd.stage_call = stage_call;
  for (int g : accepted) {
    rd.t.push_back(t[g]);
    rd.h.push_back(h[g]);
    rd.k0_call.push_back(tape_->k0_call[g]);
  }
  tape_->rounds.push_back(std::move(rd));
  for (int g : accepted) tape_->k0_call[g] = next_k0;
  for (int g : need_f1) tape_->k0_call[g] = f1_call;
}

// ---------------------------------------------------------------- the driver

// Joins the pieces: each round, every sequence still running plans its step, the
// stages are evaluated for all of them in one batched call per stage, the controller
// judges each sequence's step, and the accepted ones are saved, checked for the
// terminal condition, recorded and committed.
//
// The states live in the memory of the system's backend (the host's for systems
// without one): every element-wise operation, norm and row move is the backend's
// (ode/state_ops.hpp's state algebra), so a device solve keeps its states on the device.
// The controller is per-sequence scalar work on the host. Each round it uploads the
// step sizes h (G doubles) and the active rows (one int each), and downloads one small
// array: each active sequence's error sum (adaptive) or sum of squares (fixed steps; the
// finite check). When only some sequences are accepted, committing them uploads their row
// list (and, where it differs, the list of rows whose f(t + h, y1) is kept); the terminal
// condition uploads the rows it tests and downloads two sums each; saves download the
// rows they keep.
template <class S>
class Driver {
 public:
  Driver(OdeSystem<S>& sys, const SolveOptions& opt, DiffSystem<S>* dsys = nullptr, detail::Tape* tape = nullptr)
      : sys_(sys), be_(sys.backend() ? *sys.backend() : host_state_ops<S>()), o_(opt), tab_(opt.method_tableau()),
        G_(sys.groups()), n_(sys.dim()), s_(tab_.stages()), coef_(tab_), ctl_(opt, tab_, G_),
        saver_(opt, tab_, G_, n_, r_), tape_(dsys, tape) {}

  // y: (G, n) in the system's memory.
  SolveResult<S> run(S* y) {
    start(y);
    if (o_.t0 == o_.t1) return std::move(r_);
    first_stage();
    for (;;) {
      plan_steps();
      if (active_.empty()) break;
      attempt_steps();
      judge_steps();
      next_first_stages();
      tape_.end_round(accepted_, t_, h_, stage_call_, tab_.fsal ? stage_call_[s_ - 1] : -1, need_f1_, f1_call_);
      accept_steps();
      commit_steps();
    }
    be_.copy(y, Ys_.data(), static_cast<size_t>(G_) * n_);
    be_.synchronize();
    return totals();
  }

 private:
  S* row(Array<S>& b, int g) { return row_at(b.data(), g, n_); }
  S* yrow(int g) { return row(Ys_, g); }

  void start(const S* y);
  void first_stage();
  void plan_steps();
  void attempt_steps();
  void estimate_errors();
  void judge_steps();
  void next_first_stages();
  void accept_steps();
  void commit_steps();
  SolveResult<S> totals();
  // f for the listed sequences, rows `ids` of `in` into the same rows of `out`, at
  // times t[ids]. ids_dev: ids in the backend's memory when already there (else null).
  // Returns the tape's call index when recording, else -1.
  int eval(const std::vector<int>& ids, const int* ids_dev, Array<S>& in, Array<S>& out, const std::vector<double>& t,
           bool record = true);
  // A row list in the backend's memory (scratch `slot`: 0 the active rows, 1 the others).
  const int* upload_rows(const std::vector<int>& rows, int slot) {
    Array<S, int>& a = slot == 0 ? active_dev_ : rows_dev_;
    a.upload(rows.data(), rows.size());
    return a.data();
  }
  void fail(int g, SolveStatus st, const std::string& what);

  OdeSystem<S>& sys_;
  StateOps<S>& be_;
  const SolveOptions& o_;
  const ButcherTableau& tab_;
  const int G_;
  const size_t n_;
  const int s_;
  const StageCoefficients coef_;
  SolveResult<S> r_;
  StepControl ctl_;
  Saver<S> saver_;
  TapeRecorder<S> tape_;
  Array<S> Ys_;  // the current states (G, n), copied to the caller's y at the end
  std::vector<Array<S>> K_;  // s stages, each (G, n)
  Array<S> Y_, Y1_, Kn_, gin_, gout_;
  Array<S, double> h_dev_, sums_dev_;         // (G) the step sizes; (2G) per-row sums
  Array<S, int> active_dev_, rows_dev_;      // (G) row lists
  std::vector<double> t_, h_, tstage_, err_, tgather_, sums_;
  std::vector<char> finite_, done_, last_, has_f1_;
  std::vector<int> stage_call_, active_, accepted_, need_f1_, rows_;
  std::vector<const S*> kp_;
  int f1_call_ = -1;
  std::string why_;
};

template <class S>
int Driver<S>::eval(const std::vector<int>& ids, const int* ids_dev, Array<S>& in, Array<S>& out,
                    const std::vector<double>& t, bool record) {
  const int count = static_cast<int>(ids.size());
  if (count == 0) return -1;
  bool consecutive = true;
  for (int i = 1; i < count && consecutive; ++i) consecutive = ids[i] == ids[i - 1] + 1;
  std::vector<double>& tt = tgather_;  // sized G once
  for (int i = 0; i < count; ++i) tt[i] = t[ids[i]];
  int call = -1;
  auto f = [&](S* dst, const S* src) {
    if (tape_.on() && record)
      call = tape_.eval(dst, src, tt.data(), ids);
    else
      sys_.eval(dst, src, tt.data(), ids.data(), count);
  };
  if (consecutive) {
    f(row(out, ids[0]), row(in, ids[0]));
  } else {  // gather the active rows, evaluate them together, scatter back
    if (!ids_dev) ids_dev = upload_rows(ids, 1);
    be_.gather_rows(gin_.data(), in.data(), ids_dev, count, n_);
    f(gout_.data(), gin_.data());
    be_.scatter_rows(out.data(), gout_.data(), ids_dev, count, n_);
  }
  ++r_.calls;
  for (int g : ids) ++r_.seq[g].nfe;
  return call;
}

template <class S>
void Driver<S>::fail(int g, SolveStatus st, const std::string& what) {
  auto& q = r_.seq[g];
  q.status = st;
  q.t = t_[g];
  q.h = h_[g];
  std::ostringstream m;
  m.precision(10);
  m << (G_ > 1 ? "sequence " + std::to_string(g) + ": " : std::string()) << what << " at t = " << t_[g]
    << " (step " << q.steps << ", h = " << h_[g] << ")";
  q.message = m.str();
  done_[g] = true;
  saver_.failed(g);
}

// The per-sequence state at t0, and the saves of the initial state.
template <class S>
void Driver<S>::start(const S* y) {
  const size_t total = static_cast<size_t>(G_) * n_;
  Ys_ = Array<S>(be_, total);
  be_.copy(Ys_.data(), y, total);
  r_.seq.assign(static_cast<size_t>(G_), SequenceStats{});
  for (auto& q : r_.seq) q.t = o_.t0;
  t_.assign(G_, o_.t0);
  h_.assign(G_, 0.0);
  err_.assign(G_, 0.0);
  sums_.assign(2 * static_cast<size_t>(G_), 0.0);
  finite_.assign(G_, 1);
  tgather_.assign(G_, 0.0);
  stage_call_.assign(static_cast<size_t>(s_), -1);
  tstage_.assign(G_, o_.t0);
  done_.assign(G_, 0);
  last_.assign(G_, 0);
  has_f1_.assign(G_, 0);
  saver_.start(be_, Ys_.data());
}

// Workspaces, f(t0, y0) for every sequence, and the first step sizes.
template <class S>
void Driver<S>::first_stage() {
  const size_t total = static_cast<size_t>(G_) * n_;
  auto zeros = [&](Array<S>& a) {
    a = Array<S>(be_, total);
    a.zero();
  };
  K_.clear();
  K_.resize(static_cast<size_t>(s_));
  for (Array<S>& k : K_) zeros(k);
  zeros(Y_);
  zeros(Y1_);
  if (!tab_.fsal) zeros(Kn_);
  zeros(gin_);
  zeros(gout_);
  h_dev_ = Array<S, double>(be_, static_cast<size_t>(G_));
  sums_dev_ = Array<S, double>(be_, 2 * static_cast<size_t>(G_));
  active_dev_ = Array<S, int>(be_, static_cast<size_t>(G_));
  rows_dev_ = Array<S, int>(be_, static_cast<size_t>(G_));
  kp_.assign(static_cast<size_t>(s_), nullptr);

  std::vector<int> all(G_);
  for (int g = 0; g < G_; ++g) all[g] = g;
  tape_.start(G_, eval(all, nullptr, Ys_, K_[0], t_));
  if (!ctl_.adaptive()) return;
  if (!ctl_.automatic_first_step()) {
    std::fill(h_.begin(), h_.end(), ctl_.given_first_step());
    return;
  }
  // Hairer's hinit, every sequence in one batched evaluation at its probe point
  double* sums = sums_dev_.data();
  be_.scaled_sum_squares_rows(sums, K_[0].data(), nullptr, Ys_.data(), o_.rtol, o_.atol, G_, n_);
  be_.scaled_sum_squares_rows(sums + G_, Ys_.data(), nullptr, Ys_.data(), o_.rtol, o_.atol, G_, n_);
  sums_dev_.download(sums_.data(), 2 * static_cast<size_t>(G_));
  std::vector<double> dnf(G_), probe(G_);
  for (int g : all) {
    probe[g] = ctl_.probe_step(sums_[g], sums_[G_ + g], n_, dnf[g]);
    tstage_[g] = o_.t0 + probe[g];
  }
  const double one = 1.0;
  const S* k0 = K_[0].data();
  h_dev_.upload(probe.data(), static_cast<size_t>(G_));
  be_.rk_combine_rows(Y_.data(), Ys_.data(), h_dev_.data(), &one, &k0, 1, upload_rows(all, 0), G_, n_);
  eval(all, active_dev_.data(), Y_, K_[1], tstage_, /*record=*/false);  // step sizes are constants
  be_.scaled_sum_squares_rows(sums, K_[1].data(), K_[0].data(), Ys_.data(), o_.rtol, o_.atol, G_, n_);
  sums_dev_.download(sums_.data(), static_cast<size_t>(G_));
  for (int g : all) h_[g] = ctl_.first_step(probe[g], dnf[g], sums_[g], n_);
}

// The sequences still running, each with the step it attempts; the others fail here.
template <class S>
void Driver<S>::plan_steps() {
  active_.clear();
  for (int g = 0; g < G_; ++g) {
    if (done_[g]) continue;
    bool last = false;
    const SolveStatus st = ctl_.plan(g, r_.seq[g], t_[g], h_[g], last, why_);
    if (st != SolveStatus::Success) {
      fail(g, st, why_);
      continue;
    }
    last_[g] = last;
    active_.push_back(g);
  }
}

// Stages 1..s-1 (stage 0 is f(t, y), kept from the previous step), the propagated
// solution Y1_ and the error estimates of the active sequences.
template <class S>
void Driver<S>::attempt_steps() {
  tape_.begin_round();
  const int na = static_cast<int>(active_.size());
  h_dev_.upload(h_.data(), static_cast<size_t>(G_));
  const int* rows = upload_rows(active_, 0);
  for (int j = 1; j < s_; ++j) {
    const auto& idx = coef_.a_idx[j];
    for (size_t m = 0; m < idx.size(); ++m) kp_[m] = K_[idx[m]].data();
    be_.rk_combine_rows(Y_.data(), Ys_.data(), h_dev_.data(), coef_.a[j].data(), kp_.data(),
                        static_cast<int>(idx.size()), rows, na, n_);
    for (int g : active_) tstage_[g] = t_[g] + tab_.c[j] * h_[g];
    stage_call_[j] = eval(active_, rows, Y_, K_[j], tstage_);
  }
  // the propagated solution: for FSAL methods it is the last stage's state
  if (tab_.fsal) {
    std::swap(Y_, Y1_);
  } else {
    for (size_t m = 0; m < coef_.b_idx.size(); ++m) kp_[m] = K_[coef_.b_idx[m]].data();
    be_.rk_combine_rows(Y1_.data(), Ys_.data(), h_dev_.data(), coef_.b.data(), kp_.data(),
                        static_cast<int>(coef_.b_idx.size()), rows, na, n_);
  }
  estimate_errors();
}

// err_ (adaptive: the scaled error norm, NaN when the state is not finite) or
// finite_ (fixed steps) of every active sequence: one row-batched reduction and one
// download of its na sums.
template <class S>
void Driver<S>::estimate_errors() {
  const int na = static_cast<int>(active_.size());
  double* sums = sums_dev_.data();
  if (!o_.adaptive) {
    be_.sum_squares_rows(sums, Y1_.data(), active_dev_.data(), na, n_);
    sums_dev_.download(sums_.data(), static_cast<size_t>(na));
    for (int i = 0; i < na; ++i) finite_[active_[i]] = std::isfinite(sums_[i]);
    return;
  }
  for (int l = 0; l < s_; ++l) kp_[l] = K_[l].data();
  be_.error_sum_squares_rows(sums, h_dev_.data(), tab_.e.data(), kp_.data(), s_, Ys_.data(), Y1_.data(), o_.rtol,
                             o_.atol, o_.norm_dims ? o_.norm_period : 0, o_.norm_dims, active_dev_.data(), na, n_);
  sums_dev_.download(sums_.data(), static_cast<size_t>(na));
  size_t counted = n_;  // the values the norm counts: only the first norm_dims of every norm_period
  if (o_.norm_dims) {
    counted = 0;
    for (size_t off = 0; off < n_; off += o_.norm_period) counted += std::min(o_.norm_dims, n_ - off);
  }
  for (int i = 0; i < na; ++i) err_[active_[i]] = std::sqrt(sums_[i] / static_cast<double>(counted));
}

// The controller's verdict on every active sequence's step: accepted_ lists the accepted.
template <class S>
void Driver<S>::judge_steps() {
  accepted_.clear();
  for (int g : active_) {
    auto& q = r_.seq[g];
    ++q.steps;
    switch (ctl_.judge(g, err_[g], finite_[g], h_[g], q, why_)) {
      case StepControl::Verdict::Accept: accepted_.push_back(g); break;
      case StepControl::Verdict::Reject: break;
      case StepControl::Verdict::Fail: fail(g, SolveStatus::NonFinite, why_); break;
    }
  }
}

// f(t + h, y1) into Kn_ for methods without FSAL: the next step's first stage, and
// what the terminal condition and Hermite output read. Skipped after the last step
// unless a save time inside it needs it. has_f1_ says who has f(t + h, y1).
template <class S>
void Driver<S>::next_first_stages() {
  need_f1_.clear();
  f1_call_ = -1;
  if (!tab_.fsal) {
    for (int g : accepted_)
      if (!last_[g] || saver_.needs_f1_on_last(g)) {
        need_f1_.push_back(g);
        tstage_[g] = last_[g] ? o_.t1 : t_[g] + h_[g];
      }
    f1_call_ = eval(need_f1_, nullptr, Y1_, Kn_, tstage_);
  }
  std::fill(has_f1_.begin(), has_f1_.end(), static_cast<char>(tab_.fsal));
  for (int g : need_f1_) has_f1_[g] = 1;
}

// The accepted sequences move to the step's end: saves, the terminal condition, statistics.
template <class S>
void Driver<S>::accept_steps() {
  Array<S>& F1 = tab_.fsal ? K_[s_ - 1] : Kn_;
  // the terminal condition's norms of f(y1) and y1, of those who may stop there
  rows_.clear();
  if (o_.terminal_threshold > 0)
    for (int g : accepted_)
      if (!last_[g] && has_f1_[g]) rows_.push_back(g);
  const int nt = static_cast<int>(rows_.size());
  if (nt > 0) {
    const int* rows = upload_rows(rows_, 1);
    be_.sum_squares_rows(sums_dev_.data(), F1.data(), rows, nt, n_);
    be_.sum_squares_rows(sums_dev_.data() + nt, Y1_.data(), rows, nt, n_);
    sums_dev_.download(sums_.data(), 2 * static_cast<size_t>(nt));
  }
  int it = 0;  // position in rows_ (accepted_ and rows_ are in the same order)
  for (int g : accepted_) {
    auto& q = r_.seq[g];
    const double t_end = last_[g] ? o_.t1 : t_[g] + h_[g];
    const S* y1 = row(Y1_, g);
    saver_.accepted(g, t_[g], h_[g], t_end, yrow(g), y1, K_, has_f1_[g], row(F1, g));
    bool stop = last_[g];
    if (it < nt && rows_[it] == g) {
      if (terminal_reached(o_.terminal_threshold, sums_[it], sums_[nt + it])) {
        stop = true;
        q.status = SolveStatus::Terminal;
      }
      ++it;
    }
    ++q.accepted;
    q.h = h_[g];
    t_[g] = t_end;
    q.t = t_end;
    h_[g] = ctl_.next_step(g, h_[g]);
    if (stop) {
      done_[g] = true;
      saver_.stopped(g, y1);
    }
  }
}

// y <- y1 and f(t, y) <- f(t + h, y1) for the accepted sequences: whole arrays trade
// places when every sequence stepped and was accepted, rows are copied otherwise.
template <class S>
void Driver<S>::commit_steps() {
  Array<S>& F1 = tab_.fsal ? K_[s_ - 1] : Kn_;
  const int na = static_cast<int>(accepted_.size());
  if (na == G_) {
    std::swap(Ys_, Y1_);
    if (tab_.fsal || static_cast<int>(need_f1_.size()) == G_) {
      std::swap(K_[0], F1);
    } else if (!need_f1_.empty()) {
      be_.copy_rows(K_[0].data(), F1.data(), upload_rows(need_f1_, 1), static_cast<int>(need_f1_.size()), n_);
    }
    return;
  }
  if (na == 0) return;
  be_.copy_rows(Ys_.data(), Y1_.data(), upload_rows(accepted_, 1), na, n_);
  rows_.clear();
  for (int g : accepted_)
    if (has_f1_[g]) rows_.push_back(g);
  if (static_cast<int>(rows_.size()) == na) {
    be_.copy_rows(K_[0].data(), F1.data(), rows_dev_.data(), na, n_);
  } else if (!rows_.empty()) {
    be_.copy_rows(K_[0].data(), F1.data(), upload_rows(rows_, 1), static_cast<int>(rows_.size()), n_);
  }
}

// The result's totals over sequences, and its worst status.
template <class S>
SolveResult<S> Driver<S>::totals() {
  for (const auto& q : r_.seq) {
    r_.nfe = std::max(r_.nfe, q.nfe);
    r_.seq_evals += q.nfe;
    r_.steps = std::max(r_.steps, q.steps);
    r_.accepted = std::max(r_.accepted, q.accepted);
    r_.rejected = std::max(r_.rejected, q.rejected);
    r_.steps_total += q.steps;
    if (static_cast<int>(q.status) > static_cast<int>(r_.status)) {
      r_.status = q.status;
      if (!q.message.empty()) r_.message = q.message;
    }
  }
  return std::move(r_);
}

}  // namespace

template <class S>
SolveResult<S> integrate_odeint(OdeSystem<S>& sys, S* y, const SolveOptions& opt);

template <class S>
SolveResult<S> integrate(OdeSystem<S>& sys, S* y, const SolveOptions& opt) {
  opt.validate();
  if (opt.method.rfind("odeint-", 0) == 0) {
    if (sys.backend())
      throw Error("method '" + opt.method + "': the odeint steppers run on host states only, and this system's are on " +
                  sys.backend()->name());
    return integrate_odeint(sys, y, opt);
  }
  if (!opt.batch_coupled || sys.groups() == 1) return Driver<S>(sys, opt).run(y);
  // one shared step: solve the batch as a single sequence, report it for every sequence
  CoupledSystem<S> coupled(sys);
  SolveResult<S> one = Driver<S>(coupled, opt).run(y);
  const int G = sys.groups();
  const size_t n = sys.dim();
  SolveResult<S> r = one;
  r.seq.assign(static_cast<size_t>(G), one.seq[0]);
  r.seq_evals = one.seq[0].nfe * G;
  r.steps_total = one.steps * G;
  if (opt.save == SaveKind::Steps || opt.record_steps) {
    r.step_times.assign(static_cast<size_t>(G), one.step_times[0]);
    r.step_h.assign(static_cast<size_t>(G), one.step_h[0]);
  }
  if (opt.save == SaveKind::Steps) {
    r.step_states.assign(static_cast<size_t>(G), Buffer<S>());
    const size_t nsteps = one.step_times[0].size();
    for (int g = 0; g < G; ++g)
      for (size_t k = 0; k < nsteps; ++k) {
        const S* src = one.step_states[0].data() + k * G * n + static_cast<size_t>(g) * n;
        r.step_states[g].insert(r.step_states[g].end(), src, src + n);
      }
  }
  return r;
}

namespace detail {
template <class S>
SolveResult<S> integrate_taped(DiffSystem<S>& sys, S* y, const SolveOptions& opt, Tape& tape) {
  opt.validate();
  if (opt.batch_coupled && sys.groups() > 1)
    throw Error("integrate_taped: couple the system first (CoupledDiffSystem)");
  tape = Tape{};
  return Driver<S>(sys, opt, &sys, &tape).run(y);
}
template SolveResult<float> integrate_taped<float>(DiffSystem<float>&, float*, const SolveOptions&, Tape&);
template SolveResult<double> integrate_taped<double>(DiffSystem<double>&, double*, const SolveOptions&, Tape&);
}  // namespace detail

template SolveResult<float> integrate<float>(OdeSystem<float>&, float*, const SolveOptions&);
template SolveResult<double> integrate<double>(OdeSystem<double>&, double*, const SolveOptions&);

}  // namespace flowloop
