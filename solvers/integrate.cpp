// integrate(): the generic explicit Runge-Kutta driver for batches of
// independent sequences, with per-sequence (default) or batch-coupled steps.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <sstream>

#include "flowloop/algebra.hpp"
#include "flowloop/solver.hpp"
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
  if (method.rfind("odeint-", 0) != 0) {
    const ButcherTableau& tab = tableau(method);
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

namespace {

constexpr double kUround = 2.3e-16;  // dopri5.f's rounding unit

// All G sequences as one: the batch-coupled mode (one shared step).
template <class S>
using CoupledSystem = detail::CoupledView<S, OdeSystem<S>>;

template <class S>
class Driver {
 public:
  Driver(OdeSystem<S>& sys, const SolveOptions& opt, DiffSystem<S>* dsys = nullptr,
         detail::Tape* tape = nullptr)
      : sys_(sys), o_(opt), tab_(tableau(opt.method)), G_(sys.groups()), n_(sys.dim()),
        s_(tab_.stages()), dsys_(dsys), tape_(tape) {}

  SolveResult<S> run(S* y);

 private:
  S* row(Buffer<S>& b, int g) { return b.data() + static_cast<size_t>(g) * n_; }
  S* yrow(int g) { return y_ + static_cast<size_t>(g) * n_; }
  // Returns the tape's call index when recording, else -1.
  int eval(const std::vector<int>& ids, Buffer<S>& in, Buffer<S>& out, const std::vector<double>& t,
           bool record = true);
  void fail(int g, SolveStatus st, const std::string& what);
  void initial_steps(const std::vector<int>& ids);
  void save_times_upto(int g, double t_end, bool has_f1, const S* f1, double h);
  void fill_remaining_saves(int g, const S* state);

  OdeSystem<S>& sys_;
  const SolveOptions& o_;
  const ButcherTableau& tab_;
  const int G_;
  const size_t n_;
  const int s_;
  DiffSystem<S>* dsys_;
  detail::Tape* tape_;
  S* y_ = nullptr;       // the current states (G, n): Ys_, copied to user_y_ at the end
  S* user_y_ = nullptr;
  Buffer<S> Ys_;
  double dir_ = 1.0;
  std::vector<Buffer<S>> K_;  // s stages, each (G, n)
  Buffer<S> Y_, Y1_, Kn_, gin_, gout_;
  std::vector<double> t_, h_, hnext_, facold_, tstage_, err_;
  std::vector<char> finite_;
  std::vector<double> tgather_;
  std::vector<int> stage_call_;
  std::vector<bool> done_, last_rejected_, last_;
  std::vector<int> nonfinite_, next_save_;
  SolveResult<S> r_;
};

template <class S>
int Driver<S>::eval(const std::vector<int>& ids, Buffer<S>& in, Buffer<S>& out,
                    const std::vector<double>& t, bool record) {
  const int count = static_cast<int>(ids.size());
  if (count == 0) return -1;
  bool consecutive = true;
  for (int i = 1; i < count && consecutive; ++i) consecutive = ids[i] == ids[i - 1] + 1;
  std::vector<double>& tt = tgather_;  // sized G once
  for (int i = 0; i < count; ++i) tt[i] = t[ids[i]];
  int call = -1;
  auto f = [&](S* dst, const S* src) {
    if (tape_ && record) {
      call = static_cast<int>(tape_->calls.size());
      // slots follow calls: dropped calls give their slots back
      dsys_->reserve_slots(call + 1);
      dsys_->eval_record(dst, src, tt.data(), ids.data(), count, call);
      tape_->calls.push_back({call, ids});
    } else {
      sys_.eval(dst, src, tt.data(), ids.data(), count);
    }
  };
  if (consecutive) {
    f(row(out, ids[0]), row(in, ids[0]));
  } else {  // gather the active rows, evaluate them together, scatter back
    for (int i = 0; i < count; ++i)
      std::memcpy(gin_.data() + static_cast<size_t>(i) * n_, row(in, ids[i]), n_ * sizeof(S));
    f(gout_.data(), gin_.data());
    for (int i = 0; i < count; ++i)
      std::memcpy(row(out, ids[i]), gout_.data() + static_cast<size_t>(i) * n_, n_ * sizeof(S));
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
  if (o_.save == SaveKind::Times) {  // what could not be reached is NaN, not a guess
    Buffer<S> nan(n_, std::numeric_limits<S>::quiet_NaN());
    fill_remaining_saves(g, nan.data());
  }
}

// Hairer's hinit (dopri5.f), for every listed sequence in one batched evaluation.
template <class S>
void Driver<S>::initial_steps(const std::vector<int>& ids) {
  const double hmax = o_.hmax > 0 ? o_.hmax : std::fabs(o_.t1 - o_.t0);
  const double norm = o_.initial_norm == InitialStepNorm::RMS ? static_cast<double>(n_) : 1.0;
  std::vector<double> dnf(G_), hh(G_);
  for (int g : ids) {
    const S* y0 = yrow(g);
    const S* f0 = row(K_[0], g);
    dnf[g] = algebra::scaled_sum_squares(f0, y0, o_.rtol, o_.atol, n_) / norm;
    const double dny = algebra::scaled_sum_squares(y0, y0, o_.rtol, o_.atol, n_) / norm;
    double h = (dnf[g] <= 1e-10 || dny <= 1e-10) ? 1e-6 : 0.01 * std::sqrt(dny / dnf[g]);
    h = std::min(h, hmax);
    hh[g] = dir_ * h;
    const double one = 1.0;
    const S* k0 = f0;
    algebra::rk_combine(row(Y_, g), y0, hh[g], &one, &k0, 1, n_);
    tstage_[g] = o_.t0 + hh[g];
  }
  eval(ids, Y_, K_[1], tstage_, /*record=*/false);  // step sizes are constants: not differentiated
  for (int g : ids) {
    const double der2 =
        std::sqrt(algebra::scaled_diff_sum_squares(row(K_[1], g), row(K_[0], g), yrow(g), o_.rtol, o_.atol, n_) / norm) /
        std::fabs(hh[g]);
    const double der12 = std::max(std::fabs(der2), std::sqrt(dnf[g]));
    const double h1 = der12 <= 1e-15 ? std::max(1e-6, std::fabs(hh[g]) * 1e-3)
                                     : std::pow(0.01 / der12, 1.0 / tab_.order);
    const double h = std::min({100 * std::fabs(hh[g]), h1, hmax});
    h_[g] = dir_ * (std::isfinite(h) ? h : 1e-6);  // a NaN field is rejected by the first step
  }
}

template <class S>
void Driver<S>::fill_remaining_saves(int g, const S* state) {
  const size_t nt = o_.save_times.size();
  for (size_t i = static_cast<size_t>(next_save_[g]); i < nt; ++i)
    std::memcpy(r_.saved.data() + (i * G_ + g) * n_, state, n_ * sizeof(S));
  next_save_[g] = static_cast<int>(nt);
}

// Dense output over the step just accepted for sequence g: [t_g, t_end], state
// y_g -> Y1_g, stages in K_. f1 = f(t_end, y1) when has_f1.
template <class S>
void Driver<S>::save_times_upto(int g, double t_end, bool has_f1, const S* f1, double h) {
  const size_t nt = o_.save_times.size();
  const S* y0 = yrow(g);
  const S* y1 = row(Y1_, g);
  while (static_cast<size_t>(next_save_[g]) < nt) {
    const double ts = o_.save_times[static_cast<size_t>(next_save_[g])];
    if ((ts - t_end) * dir_ > 0) break;
    S* out = r_.saved.data() + (static_cast<size_t>(next_save_[g]) * G_ + g) * n_;
    const double th = (ts - t_[g]) / h;
    if (ts == t_end || th >= 1.0) {
      std::memcpy(out, y1, n_ * sizeof(S));
    } else if (!tab_.dense.empty()) {
      // Hairer's contd5: y0 + th (dy + (1-th) (h k1 - dy + th (dy - h k7 - (h k1 - dy) + (1-th) h sum d_j k_j)))
      const double th1 = 1.0 - th;
      for (size_t i = 0; i < n_; ++i) {
        const double r2 = double(y1[i]) - double(y0[i]);
        const double r3 = h * double(row(K_[0], g)[i]) - r2;
        const double r4 = r2 - h * double(row(K_[s_ - 1], g)[i]) - r3;
        double r5 = 0.0;
        for (int j = 0; j < s_; ++j)
          if (tab_.dense[j] != 0.0) r5 += tab_.dense[j] * double(row(K_[j], g)[i]);
        r5 *= h;
        out[i] = static_cast<S>(double(y0[i]) + th * (r2 + th1 * (r3 + th * (r4 + th1 * r5))));
      }
    } else {
      // cubic Hermite on (y0, f0, y1, f1)
      const double h00 = (1 + 2 * th) * (1 - th) * (1 - th), h10 = th * (1 - th) * (1 - th);
      const double h01 = th * th * (3 - 2 * th), h11 = th * th * (th - 1);
      const S* f0 = row(K_[0], g);
      for (size_t i = 0; i < n_; ++i)
        out[i] = static_cast<S>(h00 * y0[i] + h10 * h * f0[i] + h01 * y1[i] + (has_f1 ? h11 * h * f1[i] : 0.0));
    }
    ++next_save_[g];
  }
}

template <class S>
SolveResult<S> Driver<S>::run(S* y) {
  user_y_ = y;
  const size_t total = static_cast<size_t>(G_) * n_;
  Ys_.assign(y, y + total);
  y_ = Ys_.data();
  dir_ = o_.t1 >= o_.t0 ? 1.0 : -1.0;
  r_.seq.assign(static_cast<size_t>(G_), SequenceStats{});
  for (auto& q : r_.seq) q.t = o_.t0;
  t_.assign(G_, o_.t0);
  h_.assign(G_, 0.0);
  hnext_.assign(G_, 0.0);
  err_.assign(G_, 0.0);
  finite_.assign(G_, 1);
  tgather_.assign(G_, 0.0);
  stage_call_.assign(static_cast<size_t>(s_), -1);
  facold_.assign(G_, 1e-4);
  tstage_.assign(G_, o_.t0);
  done_.assign(G_, false);
  last_rejected_.assign(G_, false);
  last_.assign(G_, false);
  nonfinite_.assign(G_, 0);
  next_save_.assign(G_, 0);
  if (o_.save == SaveKind::Times) r_.saved.assign(o_.save_times.size() * total, S(0));
  if (o_.save == SaveKind::Steps) {
    r_.step_times.assign(G_, {o_.t0});
    r_.step_h.assign(G_, {});
    r_.step_states.resize(G_);
    for (int g = 0; g < G_; ++g) r_.step_states[g].assign(yrow(g), yrow(g) + n_);
  }
  // save times equal to t0 are the initial state
  if (o_.save == SaveKind::Times)
    for (int g = 0; g < G_; ++g)
      while (static_cast<size_t>(next_save_[g]) < o_.save_times.size() && o_.save_times[next_save_[g]] == o_.t0) {
        std::memcpy(r_.saved.data() + (static_cast<size_t>(next_save_[g]) * G_ + g) * n_, yrow(g), n_ * sizeof(S));
        ++next_save_[g];
      }
  if (o_.t0 == o_.t1) return std::move(r_);

  K_.assign(static_cast<size_t>(s_), Buffer<S>(total));
  Y_.assign(total, S(0));
  Y1_.assign(total, S(0));
  if (!tab_.fsal) Kn_.assign(total, S(0));
  gin_.assign(total, S(0));
  gout_.assign(total, S(0));

  std::vector<int> all(G_);
  for (int g = 0; g < G_; ++g) all[g] = g;
  const int call0 = eval(all, Ys_, K_[0], t_);
  if (tape_) tape_->k0_call.assign(static_cast<size_t>(G_), call0);

  // fixed steps: H, and the number of steps N
  double H = 0.0;
  int64_t N = 0;
  if (!o_.adaptive) {
    if (o_.steps > 0) {
      N = o_.steps;
      H = (o_.t1 - o_.t0) / static_cast<double>(N);
    } else {
      H = dir_ * o_.dt;
      N = static_cast<int64_t>(std::ceil(std::fabs(o_.t1 - o_.t0) / o_.dt * (1 - 1e-12)));
    }
  } else if (o_.h0 != 0.0) {
    std::fill(h_.begin(), h_.end(), dir_ * std::fabs(o_.h0));
  } else {
    initial_steps(all);
  }
  const double hmax = o_.hmax > 0 ? o_.hmax : std::fabs(o_.t1 - o_.t0);
  const double expo1 = 1.0 / (tab_.error_order + 1) - 0.75 * o_.beta;
  const double facc1 = 1.0 / o_.fac_min, facc2 = 1.0 / o_.fac_max;

  // coefficient lists of each stage, zeros dropped
  std::vector<std::vector<double>> coef(s_);
  std::vector<std::vector<int>> idx(s_);
  for (int j = 0; j < s_; ++j)
    for (int l = 0; l < j; ++l)
      if (tab_.A(j, l) != 0.0) {
        coef[j].push_back(tab_.A(j, l));
        idx[j].push_back(l);
      }
  std::vector<double> bcoef;
  std::vector<int> bidx;
  for (int l = 0; l < s_; ++l)
    if (tab_.b[l] != 0.0) {
      bcoef.push_back(tab_.b[l]);
      bidx.push_back(l);
    }
  std::vector<const S*> kp(static_cast<size_t>(s_));

  std::vector<int> active, accepted_ids, need_f1;
  std::vector<char> has_f1(G_, 0);
  for (;;) {
    active.clear();
    for (int g = 0; g < G_; ++g) {
      if (done_[g]) continue;
      auto& q = r_.seq[g];
      if (o_.adaptive) {
        if (q.steps >= o_.max_steps) {
          fail(g, SolveStatus::MaxSteps, "more than " + std::to_string(o_.max_steps) + " steps");
          continue;
        }
        if (0.1 * std::fabs(h_[g]) <= std::fabs(t_[g]) * kUround || h_[g] == 0.0) {
          if (nonfinite_[g] > 0)  // the field is NaN or Inf just ahead: that is the cause
            fail(g, SolveStatus::NonFinite, "non-finite (NaN or Inf) evaluations ahead made the step size collapse");
          else
            fail(g, SolveStatus::StepTooSmall, "step size too small");
          continue;
        }
        last_[g] = false;
        if ((t_[g] + 1.01 * h_[g] - o_.t1) * dir_ > 0) {
          h_[g] = o_.t1 - t_[g];
          last_[g] = true;
        }
      } else {
        const int64_t k = q.accepted;
        last_[g] = k + 1 >= N;
        if (o_.steps > 0) {  // t_k = t0 + k H, not accumulated; the last step ends on t1
          t_[g] = o_.t0 + static_cast<double>(k) * H;
          h_[g] = H;
        } else {
          h_[g] = last_[g] ? o_.t1 - t_[g] : H;
        }
      }
      active.push_back(g);
    }
    if (active.empty()) break;

    // stages 1..s-1 (stage 0 is f(t, y), kept from the previous step)
    const size_t calls_before = tape_ ? tape_->calls.size() : 0;
    std::vector<int>& stage_call = stage_call_;
    for (int j = 1; j < s_; ++j) {
      for (size_t m = 0; m < idx[j].size(); ++m) kp[m] = K_[idx[j][m]].data();
      algebra::rk_combine_rows(Y_.data(), y_, h_.data(), coef[j].data(), kp.data(),
                               static_cast<int>(idx[j].size()), active.data(),
                               static_cast<int>(active.size()), n_);
      for (int g : active) tstage_[g] = t_[g] + tab_.c[j] * h_[g];
      stage_call[j] = eval(active, Y_, K_[j], tstage_);
    }
    // the propagated solution: for FSAL methods it is the last stage's state
    if (tab_.fsal) {
      std::swap(Y_, Y1_);
    } else {
      for (size_t m = 0; m < bidx.size(); ++m) kp[m] = K_[bidx[m]].data();
      algebra::rk_combine_rows(Y1_.data(), y_, h_.data(), bcoef.data(), kp.data(), static_cast<int>(bidx.size()),
                               active.data(), static_cast<int>(active.size()), n_);
    }
    // error estimates and finiteness, the sequences in parallel
    const int na = static_cast<int>(active.size());
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(n_) * na * s_ >= kParallelMin)
    for (int i = 0; i < na; ++i) {
      const int g = active[i];
      // (the error norm is NaN when the state is not finite)
      if (!o_.adaptive) finite_[g] = std::isfinite(algebra::sum_squares(row(Y1_, g), n_));
      if (o_.adaptive) {
        const S* kr[32];
        for (int l = 0; l < s_; ++l) kr[l] = row(K_[l], g);
        if (o_.norm_dims == 0) {
          err_[g] = algebra::error_norm(h_[g], tab_.e.data(), kr, s_, yrow(g), row(Y1_, g), o_.rtol, o_.atol, n_);
        } else {  // only the first norm_dims of every norm_period values
          double sum = 0.0;
          size_t counted = 0;
          const S* kc[32];
          for (size_t off = 0; off < n_; off += o_.norm_period) {
            const size_t len = std::min(o_.norm_dims, n_ - off);
            for (int l = 0; l < s_; ++l) kc[l] = kr[l] + off;
            sum += algebra::error_sum_squares(h_[g], tab_.e.data(), kc, s_, yrow(g) + off, row(Y1_, g) + off,
                                              o_.rtol, o_.atol, len);
            counted += len;
          }
          err_[g] = std::sqrt(sum / static_cast<double>(counted));
        }
      }
    }
    // accept or reject, per sequence
    accepted_ids.clear();
    for (int g : active) {
      auto& q = r_.seq[g];
      ++q.steps;
      const bool finite_state = finite_[g];
      if (!o_.adaptive) {
        if (!finite_state) {
          fail(g, SolveStatus::NonFinite, "non-finite state (NaN or Inf) after the step");
          continue;
        }
        accepted_ids.push_back(g);
        continue;
      }
      const double err = err_[g];
      const double h = h_[g];
      if (!std::isfinite(err) || !finite_state) {
        // NaN is never a small error: a rejection with the largest decrease; repeated, a failure
        if (q.accepted > 0) ++q.rejected;
        last_rejected_[g] = true;
        if (++nonfinite_[g] > o_.max_nonfinite) {
          fail(g, SolveStatus::NonFinite,
               "non-finite error estimate or state (NaN or Inf) in " + std::to_string(nonfinite_[g]) +
                   " consecutive attempts");
          continue;
        }
        h_[g] = h * o_.fac_min;
        continue;
      }
      nonfinite_[g] = 0;
      double hnew;
      if (o_.controller == Controller::PI) {  // Hairer's dopri5.f
        const double fac11 = std::pow(err, expo1);
        double fac = fac11 / std::pow(facold_[g], o_.beta);
        fac = std::max(facc2, std::min(facc1, fac / o_.safety));
        hnew = h / fac;
        if (err <= 1.0) {
          facold_[g] = std::max(err, 1e-4);
          if (last_rejected_[g]) hnew = dir_ * std::min(std::fabs(hnew), std::fabs(h));
        } else {
          hnew = h / std::min(facc1, fac11 / o_.safety);
        }
      } else if (err == 0.0) {  // I controller (torchdiffeq's _optimal_step_size)
        hnew = h * o_.fac_max;
      } else {
        const double dfactor = err < 1.0 ? 1.0 : o_.fac_min;
        hnew = h * std::min(o_.fac_max,
                            std::max(o_.safety * std::pow(err, -1.0 / (tab_.error_order + 1)), dfactor));
      }
      if (std::fabs(hnew) > hmax) hnew = dir_ * hmax;
      hnext_[g] = hnew;
      if (err <= 1.0) {
        last_rejected_[g] = false;
        accepted_ids.push_back(g);
      } else {
        if (q.accepted > 0) ++q.rejected;
        last_rejected_[g] = true;
        h_[g] = hnew;
      }
    }

    // f(t + h, y1) for methods without FSAL: the next step's first stage, and what
    // the terminal condition and Hermite output read. Skipped after the last step
    // unless a save time inside it needs it.
    need_f1.clear();
    int f1_call = -1;
    if (!tab_.fsal) {
      for (int g : accepted_ids) {
        bool need = !last_[g];
        if (last_[g] && o_.save == SaveKind::Times && static_cast<size_t>(next_save_[g]) < o_.save_times.size())
          need = o_.save_times[next_save_[g]] != o_.t1;
        if (need) {
          need_f1.push_back(g);
          tstage_[g] = last_[g] ? o_.t1 : t_[g] + h_[g];
        }
      }
      f1_call = eval(need_f1, Y1_, Kn_, tstage_);
    }
    if (tape_) {
      if (accepted_ids.empty()) {
        tape_->calls.resize(calls_before);  // nothing of this round is in the graph
      } else {
        detail::Tape::Round rd;
        rd.groups = accepted_ids;
        rd.stage_call = stage_call;
        for (int g : accepted_ids) {
          rd.t.push_back(t_[g]);
          rd.h.push_back(h_[g]);
          rd.k0_call.push_back(tape_->k0_call[g]);
        }
        tape_->rounds.push_back(std::move(rd));
        for (int g : accepted_ids) tape_->k0_call[g] = tab_.fsal ? stage_call[s_ - 1] : -1;
        for (int g : need_f1) tape_->k0_call[g] = f1_call;
      }
    }
    std::fill(has_f1.begin(), has_f1.end(), static_cast<char>(tab_.fsal));
    for (int g : need_f1) has_f1[g] = 1;

    for (int g : accepted_ids) {
      auto& q = r_.seq[g];
      const double t_end = last_[g] ? o_.t1 : t_[g] + h_[g];
      const S* f1 = tab_.fsal ? row(K_[s_ - 1], g) : row(Kn_, g);
      if (o_.save == SaveKind::Times) save_times_upto(g, t_end, has_f1[g], f1, h_[g]);
      bool stop = last_[g];
      if (!stop && o_.terminal_threshold > 0 && has_f1[g]) {
        const double fy = std::sqrt(algebra::sum_squares(f1, n_));
        const double yy = std::sqrt(algebra::sum_squares(row(Y1_, g), n_));
        if (fy < o_.terminal_threshold * yy) {
          stop = true;
          q.status = SolveStatus::Terminal;
        }
      }
      ++q.accepted;
      q.h = h_[g];
      t_[g] = t_end;
      q.t = t_end;
      if (o_.save == SaveKind::Steps) {
        r_.step_times[g].push_back(t_end);
        r_.step_h[g].push_back(h_[g]);
        r_.step_states[g].insert(r_.step_states[g].end(), row(Y1_, g), row(Y1_, g) + n_);
      }
      if (o_.adaptive) h_[g] = hnext_[g];
      if (stop) {
        done_[g] = true;
        if (o_.save == SaveKind::Times) fill_remaining_saves(g, row(Y1_, g));
      }
    }
    // commit: y <- y1 and f(t, y) <- f(t + h, y1); whole buffers trade places when every
    // sequence stepped and was accepted, rows are copied otherwise
    Buffer<S>& F1 = tab_.fsal ? K_[s_ - 1] : Kn_;
    if (static_cast<int>(accepted_ids.size()) == G_) {
      std::swap(Ys_, Y1_);
      y_ = Ys_.data();
      if (tab_.fsal || static_cast<int>(need_f1.size()) == G_) std::swap(K_[0], F1);
      else
        for (int g : need_f1) std::memcpy(row(K_[0], g), row(F1, g), n_ * sizeof(S));
    } else {
      for (int g : accepted_ids) {
        std::memcpy(yrow(g), row(Y1_, g), n_ * sizeof(S));
        if (has_f1[g]) std::memcpy(row(K_[0], g), row(F1, g), n_ * sizeof(S));
      }
    }
  }
  std::memcpy(user_y_, Ys_.data(), total * sizeof(S));

  // totals
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
  if (opt.method.rfind("odeint-", 0) == 0) return integrate_odeint(sys, y, opt);
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
  if (opt.save == SaveKind::Steps) {
    r.step_times.assign(static_cast<size_t>(G), one.step_times[0]);
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
