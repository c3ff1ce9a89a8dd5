// Gradients through an ODE solve: backprop, checkpoint and the continuous adjoint.
#include "flowloop/ode/grad.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>

#include "flowloop/ode/algebra.hpp"
#include "flowloop/ode/state_ops.hpp"
#include "coupled.hpp"
#include "tape.hpp"

namespace flowloop {

GradMethod grad_method(const std::string& name) {
  if (name == "backprop") return GradMethod::Backprop;
  if (name == "checkpoint") return GradMethod::Checkpoint;
  if (name == "adjoint") return GradMethod::Adjoint;
  throw Error("unknown gradient method '" + name + "' (known: backprop, checkpoint, adjoint)");
}

const char* grad_method_name(GradMethod m) {
  switch (m) {
    case GradMethod::Backprop: return "backprop";
    case GradMethod::Checkpoint: return "checkpoint";
    case GradMethod::Adjoint: return "adjoint";
  }
  return "unknown";
}

namespace {

// The whole batch as one sequence (one shared step), differentiable.
template <class S>
class CoupledDiffSystem : public detail::CoupledView<S, DiffSystem<S>> {
  using Base = detail::CoupledView<S, DiffSystem<S>>;

 public:
  explicit CoupledDiffSystem(DiffSystem<S>& in) : Base(in) {}
  size_t num_params() const override { return this->in_.num_params(); }
  void reserve_slots(int n) override { this->in_.reserve_slots(n); }
  void eval_record(S* dydt, const S* y, const double* t, const int*, int, int slot) override {
    this->in_.eval_record(dydt, y, this->times(t[0]), this->ids_.data(), this->in_.groups(), slot);
  }
  // One coupled row: its parameter gradient is the sum over the inner sequences.
  void vjp(S* dy, S* dparams, size_t, const S* g, int slot) override { this->in_.vjp(dy, dparams, 0, g, slot); }
};

// A system with its regularisers' integrands riding along: each sequence's
// state is [y (n), E, Q] with
//   E' = ||f(y)||^2 / n,   Q' = ||u||^2 / n,   u = (f(y + d e) - f(y)) / d,
// e the sequence's Rademacher vector (drawn once, from the seed). Recording slot k
// of this system uses the inner slots 2k (at y) and 2k+1 (at y + d e).
template <class S>
class RegularizedSystem : public DiffSystem<S> {
 public:
  RegularizedSystem(DiffSystem<S>& in, bool jacobian, double fd, uint64_t seed)
      : in_(in), n_(in.dim()), W_(n_ + 2), jac_(jacobian), d_(static_cast<S>(fd)) {
    if (jac_) {
      e_.resize(static_cast<size_t>(in.groups()) * n_);
      Rng rng(seed);
      for (auto& v : e_) v = (rng.next() >> 63) ? S(1) : S(-1);
    }
  }
  int groups() const override { return in_.groups(); }
  size_t dim() const override { return W_; }
  size_t num_params() const override { return in_.num_params(); }
  int evals_per_call() const { return jac_ ? 2 : 1; }
  void reserve_slots(int k) override {
    in_.reserve_slots(2 * k);
    if (rec_.size() < static_cast<size_t>(k)) rec_.resize(static_cast<size_t>(k));
  }
  void eval(S* dydt, const S* y, const double* t, const int* ids, int count) override {
    run(dydt, y, t, ids, count, -1, scratch_);
  }
  void eval_record(S* dydt, const S* y, const double* t, const int* ids, int count, int slot) override {
    run(dydt, y, t, ids, count, slot, rec_.at(static_cast<size_t>(slot)));
  }
  void vjp(S* dy, S* dparams, size_t param_stride, const S* g, int slot) override {
    const Record& r = rec_.at(static_cast<size_t>(slot));
    const size_t rows = static_cast<size_t>(r.count) * n_;
    gc_.resize(rows);
    dc_.assign(rows, S(0));
    const S inv_n = S(1) / static_cast<S>(n_);
    // d(Q')/du = 2 u / n, and u = (f(y + d e) - f(y)) / d: the vjp at y + d e gets +cj u, at y -cj u
    auto cj = [&](int i) { return 2 * g[static_cast<size_t>(i) * W_ + n_ + 1] * inv_n / d_; };
    for (int i = 0; i < r.count; ++i) {
      const S* gi = g + static_cast<size_t>(i) * W_;
      const S* f = r.f.data() + static_cast<size_t>(i) * n_;
      S* o = gc_.data() + static_cast<size_t>(i) * n_;
      const S ck = 2 * gi[n_] * inv_n;
      for (size_t k = 0; k < n_; ++k) o[k] = gi[k] + ck * f[k];
      if (jac_) {
        const S c = cj(i);
        const S* u = r.u.data() + static_cast<size_t>(i) * n_;
        for (size_t k = 0; k < n_; ++k) o[k] -= c * u[k];
      }
    }
    in_.vjp(dc_.data(), dparams, param_stride, gc_.data(), 2 * slot);
    if (jac_) {
      for (int i = 0; i < r.count; ++i) {
        const S c = cj(i);
        const S* u = r.u.data() + static_cast<size_t>(i) * n_;
        S* o = gc_.data() + static_cast<size_t>(i) * n_;
        for (size_t k = 0; k < n_; ++k) o[k] = c * u[k];
      }
      in_.vjp(dc_.data(), dparams, param_stride, gc_.data(), 2 * slot + 1);
    }
    for (int i = 0; i < r.count; ++i) {
      S* o = dy + static_cast<size_t>(i) * W_;
      const S* d = dc_.data() + static_cast<size_t>(i) * n_;
      for (size_t k = 0; k < n_; ++k) o[k] += d[k];
    }
  }

 private:
  struct Record {
    int count = 0;
    Buffer<S> f, u;  // (count, n): f(y) and the difference quotient
  };
  void run(S* dydt, const S* y, const double* t, const int* ids, int count, int slot, Record& r) {
    const size_t rows = static_cast<size_t>(count) * n_;
    yc_.resize(rows);
    r.count = count;
    r.f.resize(rows);
    algebra::copy_rows(yc_.data(), n_, y, W_, static_cast<size_t>(count), n_);
    if (slot >= 0)
      in_.eval_record(r.f.data(), yc_.data(), t, ids, count, 2 * slot);
    else
      in_.eval(r.f.data(), yc_.data(), t, ids, count);
    if (jac_) {
      r.u.resize(rows);
      for (int i = 0; i < count; ++i) {
        const S* e = e_.data() + static_cast<size_t>(ids ? ids[i] : i) * n_;
        S* yp = yc_.data() + static_cast<size_t>(i) * n_;
        for (size_t k = 0; k < n_; ++k) yp[k] += d_ * e[k];
      }
      if (slot >= 0)
        in_.eval_record(r.u.data(), yc_.data(), t, ids, count, 2 * slot + 1);
      else
        in_.eval(r.u.data(), yc_.data(), t, ids, count);
      const S inv_d = S(1) / d_;
      for (size_t k = 0; k < rows; ++k) r.u[k] = (r.u[k] - r.f[k]) * inv_d;
    }
    const double inv_n = 1.0 / static_cast<double>(n_);
    for (int i = 0; i < count; ++i) {
      S* o = dydt + static_cast<size_t>(i) * W_;
      const S* f = r.f.data() + static_cast<size_t>(i) * n_;
      std::memcpy(o, f, n_ * sizeof(S));
      o[n_] = static_cast<S>(algebra::sum_squares(f, n_) * inv_n);
      o[n_ + 1] = jac_ ? static_cast<S>(algebra::sum_squares(r.u.data() + static_cast<size_t>(i) * n_, n_) * inv_n) : S(0);
    }
  }

  DiffSystem<S>& in_;
  size_t n_, W_;
  bool jac_;
  S d_;
  Buffer<S> e_, yc_, gc_, dc_;
  Record scratch_;
  std::vector<Record> rec_;
};

// The continuous adjoint's augmented system, integrated from t1 back to t0:
//   y' = f(y),  a' = -J(y)^T a,  a_theta' = -(df/dtheta)^T a
// Each sequence's state is [y (n), a (n), a_theta (P)], in f's memory (its backend's,
// or the host's), packed and unpacked by the backend's strided copies.
template <class S>
class AdjointSystem : public OdeSystem<S> {
 public:
  explicit AdjointSystem(DiffSystem<S>& f)
      : f_(f), mem_(f.backend() ? *f.backend() : host_state_ops<S>()), n_(f.dim()), P_(f.num_params()),
        W_(2 * n_ + P_) {
    const size_t cap = n_ * static_cast<size_t>(f.groups());
    yc_ = Array<S>(mem_, cap);
    ac_ = Array<S>(mem_, cap);
    fc_ = Array<S>(mem_, cap);
    dc_ = Array<S>(mem_, cap);
    f_.reserve_slots(1);
  }
  int groups() const override { return f_.groups(); }
  size_t dim() const override { return W_; }
  StateOps<S>* backend() override { return f_.backend(); }
  void eval(S* dydt, const S* y, const double* t, const int* ids, int count) override {
    const size_t rows = static_cast<size_t>(count);
    mem_.strided_copy(yc_.data(), n_, y, W_, rows, n_, S(1));
    mem_.strided_copy(ac_.data(), n_, y + n_, W_, rows, n_, S(1));
    mem_.strided_copy(dydt + 2 * n_, W_, nullptr, 0, rows, P_, S(0));
    f_.eval_record(fc_.data(), yc_.data(), t, ids, count, 0);
    mem_.fill(dc_.data(), S(0), rows * n_);
    f_.vjp(dc_.data(), dydt + 2 * n_, W_, ac_.data(), 0);
    ++vjps;
    mem_.strided_copy(dydt, W_, fc_.data(), n_, rows, n_, S(1));
    mem_.strided_copy(dydt + n_, W_, dc_.data(), n_, rows, n_, S(-1));
    mem_.strided_copy(dydt + 2 * n_, W_, dydt + 2 * n_, W_, rows, P_, S(-1));
  }
  int64_t vjps = 0;

 private:
  DiffSystem<S>& f_;
  StateOps<S>& mem_;
  size_t n_, P_, W_;
  Array<S> yc_, ac_, fc_, dc_;
};

std::string where(int g, int groups, double t, int64_t step) {
  std::ostringstream m;
  m.precision(10);
  if (groups > 1) m << "sequence " << g << ": ";
  m << "non-finite (NaN or Inf) gradient in the backward pass at t = " << t << " (step " << step << ")";
  return m.str();
}

}  // namespace

template <class S>
struct OdeGradient<S>::Impl {
  DiffSystem<S>& user;
  SolveOptions opt;
  GradOptions gopt;
  std::unique_ptr<RegularizedSystem<S>> reg;
  std::unique_ptr<CoupledDiffSystem<S>> coupled;
  DiffSystem<S>* sys = nullptr;  // user, regularised, then perhaps the coupled view
  int G = 0;
  size_t n = 0, P = 0;
  int per_call = 1;  // field evaluations per evaluation of sys
  Buffer<S> yaug, gaug;  // with regularisers: the state and its gradient, (groups, n + 2)
  const ButcherTableau* tab = nullptr;
  SolveResult<S> fwd;
  detail::Tape tape;
  Array<S> y1;  // y(t1), for the adjoint's backsolve (in the system's memory)
  GradStats st;
  size_t base_bytes = 0;
  bool forward_done = false;

  Impl(DiffSystem<S>& s, const SolveOptions& o, const GradOptions& g) : user(s), opt(o), gopt(g) {
    opt.validate();
    if (opt.method.rfind("odeint-", 0) == 0) throw Error("gradients: odeint solvers are not differentiable here; use a flowloop method");
    tab = &opt.method_tableau();
    if (gopt.truncate < 0) throw Error("gradients: truncate must be >= 0 (0: every step), got " + std::to_string(gopt.truncate));
    if (gopt.truncate > 0 && gopt.method == GradMethod::Adjoint)
      throw Error("gradients: truncate applies to backprop and checkpoint, not to the adjoint");
    DiffSystem<S>* base = &user;
    if (gopt.regularized()) {
      if (!std::isfinite(gopt.kinetic) || !std::isfinite(gopt.jacobian))
        throw Error("gradients: regulariser weights must be finite");
      if (!(gopt.jacobian_fd >= 0.0) || !std::isfinite(gopt.jacobian_fd))
        throw Error("gradients: the jacobian regulariser's difference step must be >= 0 (0: automatic), got " +
                    std::to_string(gopt.jacobian_fd));
      if (opt.norm_dims != 0) throw Error("gradients: regularisers cannot be combined with a custom error norm (norm_dims)");
      const double fd = gopt.jacobian_fd > 0.0 ? gopt.jacobian_fd : std::sqrt(std::numeric_limits<S>::epsilon());
      reg = std::make_unique<RegularizedSystem<S>>(user, gopt.jacobian != 0.0, fd, gopt.noise_seed);
      per_call = reg->evals_per_call();
      base = reg.get();
      opt.norm_period = base->dim();  // the integrals stay out of the step control
      opt.norm_dims = user.dim();
    }
    if (opt.batch_coupled && base->groups() > 1) {
      coupled = std::make_unique<CoupledDiffSystem<S>>(*base);
      sys = coupled.get();
      opt.batch_coupled = false;
    } else {
      sys = base;
    }
    G = sys->groups();
    n = sys->dim();
    P = sys->num_params();
    mem = sys->backend() ? sys->backend() : &host_state_ops<S>();
  }

  // The system's states must stay where they were when the gradient was built.
  void require_same_memory(const char* what) const {
    if ((sys->backend() ? sys->backend() : &host_state_ops<S>()) != mem)
      throw Error(std::string("OdeGradient::") + what +
                  ": the system's states moved (made resident or not) after the gradient was built");
  }

  void note_peak() { st.peak_bytes = std::max(st.peak_bytes, MemoryStats::peak() - base_bytes); }

  // The reverse of one step for the sequences `gs` (all with the same stage
  // layout): stage j of sequence gs[i] was evaluated in slot slot[j][i], row
  // row[j][i], of a call with count[j][i] rows. gy (G, n) holds dL/dy_{n+1} of
  // each sequence on entry and dL/dy_n on exit. The arrays are the memory's (mem:
  // the host's, or a resident system's device), every operation its state algebra.
  struct StageRef {
    int slot, row, count;
  };
  StateOps<S>* mem = nullptr;
  Array<S> kbar, gbuf, dbuf;  // (G, n) each: the stage cotangents by sequence; a call's rows in and out
  std::vector<Array<S>> Ybar;
  Array<S, double> hdev, sums;  // (G) each: step sizes by sequence; per-row sums
  Array<S, int> gsdev, srcdev, dstdev;  // (G) each: row lists
  std::vector<double> hrow, sumh;
  std::vector<int> src, dst;

  void reverse_step(const std::vector<int>& gs, const std::vector<double>& h,
                    const std::vector<std::vector<StageRef>>& ref, S* gy, S* gparams) {
    StateOps<S>& be = *mem;
    const int s = tab->stages();
    const int rows = static_cast<int>(gs.size());
    const size_t total = static_cast<size_t>(G) * n;
    if (Ybar.size() != static_cast<size_t>(s)) {
      Ybar.clear();
      for (int j = 0; j < s; ++j) Ybar.emplace_back(be, total);
      kbar = Array<S>(be, total);
      gbuf = Array<S>(be, total);
      dbuf = Array<S>(be, total);
      hdev = Array<S, double>(be, static_cast<size_t>(G));
      gsdev = Array<S, int>(be, static_cast<size_t>(G));
      srcdev = Array<S, int>(be, static_cast<size_t>(G));
      dstdev = Array<S, int>(be, static_cast<size_t>(G));
      hrow.assign(static_cast<size_t>(G), 0.0);
    }
    for (int i = 0; i < rows; ++i) hrow[static_cast<size_t>(gs[i])] = h[static_cast<size_t>(i)];
    hdev.upload(hrow.data(), static_cast<size_t>(G));
    gsdev.upload(gs.data(), gs.size());
    const int last = tab->fsal ? s - 2 : s - 1;  // FSAL: the last stage feeds only the next step
    std::vector<double> c;
    std::vector<const S*> k;
    for (int j = last; j >= 0; --j) {
      // kbar_j = h (b_j gy + sum_{l > j} a_lj Ybar_l), per sequence; then Ybar_j = J_j^T kbar_j
      c.clear();
      k.clear();
      if (tab->b[j] != 0.0) {
        c.push_back(tab->b[j]);
        k.push_back(gy);
      }
      for (int l = j + 1; l <= last; ++l)
        if (tab->A(l, j) != 0.0) {
          c.push_back(tab->A(l, j));
          k.push_back(Ybar[l].data());
        }
      const bool any = !c.empty();  // else the stage's cotangent is 0
      if (any)
        be.scaled_sum_rows(kbar.data(), hdev.data(), c.data(), k.data(), static_cast<int>(c.size()), gsdev.data(),
                           rows, n);
      std::map<int, std::vector<size_t>> by_slot;  // slot -> indices into gs
      for (int i = 0; i < rows; ++i) by_slot[ref[j][i].slot].push_back(static_cast<size_t>(i));
      for (auto& [slot, idx] : by_slot) {
        const size_t count = static_cast<size_t>(ref[j][idx[0]].count) * n;
        src.clear();
        dst.clear();
        for (size_t i : idx) {
          src.push_back(gs[i]);
          dst.push_back(ref[j][i].row);
        }
        srcdev.upload(src.data(), src.size());
        dstdev.upload(dst.data(), dst.size());
        const int m = static_cast<int>(idx.size());
        be.fill(dbuf.data(), S(0), count);
        if (any) {
          if (static_cast<size_t>(m) * n != count) be.fill(gbuf.data(), S(0), count);  // rows no one here writes
          be.move_rows(gbuf.data(), dstdev.data(), kbar.data(), srcdev.data(), m, n);  // the call's row order
          sys->vjp(dbuf.data(), gparams, 0, gbuf.data(), slot);
          ++st.vjp_calls;
          st.nfe_backward += 1;
        }
        be.move_rows(Ybar[j].data(), srcdev.data(), dbuf.data(), dstdev.data(), m, n);
      }
    }
    // dL/dy_n = dL/dy_{n+1} + sum_j Ybar_j
    k.clear();
    for (int j = 0; j <= last; ++j) k.push_back(Ybar[j].data());
    be.accumulate_rows(gy, k.data(), last + 1, gsdev.data(), rows, n);
  }

  bool check_finite(const std::vector<int>& gs, const std::vector<double>& t, const S* gy, int64_t step) {
    if (gs.empty()) return true;
    const int rows = static_cast<int>(gs.size());
    if (sums.size() < gs.size()) sums = Array<S, double>(*mem, static_cast<size_t>(G));
    gsdev.resize(*mem, static_cast<size_t>(G));
    gsdev.upload(gs.data(), gs.size());
    mem->sum_squares_rows(sums.data(), gy, gsdev.data(), rows, n);
    sumh.resize(gs.size());
    sums.download(sumh.data(), gs.size());
    for (size_t i = 0; i < gs.size(); ++i)
      if (!std::isfinite(sumh[i])) {
        st.status = SolveStatus::NonFinite;
        st.message = where(gs[i], G, t[i], step);
        return false;
      }
    return true;
  }

  // Rows k = 1..N-1 of gy_steps (N+1, G, n) join gy once the reverse pass reaches state k.
  void add_step_cotangent(S* gy, const S* gy_steps, int64_t k, int64_t N) {
    if (gy_steps && k >= 1 && k < N)
      mem->axpy(gy, S(1), gy_steps + static_cast<size_t>(k) * G * n, static_cast<size_t>(G) * n);
  }

  // Truncation: which sequences still differentiate (each has `truncate` reversed steps at
  // most), and zero cotangents for those cut short at the end.
  std::vector<int> reversed;
  bool truncated(int g) const { return gopt.truncate > 0 && reversed[static_cast<size_t>(g)] >= gopt.truncate; }
  void zero_truncated(S* gy) {
    if (gopt.truncate <= 0) return;
    std::vector<int> cut;
    for (int g = 0; g < G; ++g)
      if (truncated(g) && accepted_steps(g) > gopt.truncate) cut.push_back(g);
    if (cut.empty()) return;
    gsdev.resize(*mem, static_cast<size_t>(G));
    gsdev.upload(cut.data(), cut.size());
    mem->strided_copy(dbuf.data(), n, nullptr, 0, cut.size(), n, S(0));  // zero rows, then scattered
    mem->scatter_rows(gy, dbuf.data(), gsdev.data(), static_cast<int>(cut.size()), n);
  }
  int64_t accepted_steps(int g) const { return fwd.seq[static_cast<size_t>(g)].accepted; }

  void backprop(S* gy, S* gparams, const S* gy_steps) {
    const int64_t N = static_cast<int64_t>(tape.rounds.size());
    int64_t step = N;
    reversed.assign(static_cast<size_t>(G), 0);
    std::vector<int> gs;
    std::vector<double> hs, ts;
    for (auto it = tape.rounds.rbegin(); it != tape.rounds.rend(); ++it) {
      const auto& rd = *it;
      add_step_cotangent(gy, gy_steps, step, N);
      const int s = tab->stages();
      std::vector<std::vector<StageRef>> ref(static_cast<size_t>(s));
      gs.clear();
      hs.clear();
      ts.clear();
      for (size_t i = 0; i < rd.groups.size(); ++i) {
        if (truncated(rd.groups[i])) continue;
        gs.push_back(rd.groups[i]);
        hs.push_back(rd.h[i]);
        ts.push_back(rd.t[i]);
        ++reversed[static_cast<size_t>(rd.groups[i])];
        for (int j = 0; j < s; ++j) {
          const int call = j == 0 ? rd.k0_call[i] : rd.stage_call[j];
          if (call < 0) {  // the FSAL stage of a last step, never needed
            ref[j].push_back({-1, 0, 0});
            continue;
          }
          const auto& cl = tape.calls[static_cast<size_t>(call)];
          ref[j].push_back({cl.slot, tape.row_of(call, rd.groups[i]), static_cast<int>(cl.ids.size())});
        }
      }
      --step;
      if (gs.empty()) continue;
      reverse_step(gs, hs, ref, gy, gparams);
      if (!check_finite(gs, ts, gy, step)) return;
    }
    zero_truncated(gy);
  }

  // Each step again from its saved start (the forward kept every accepted state on the
  // host), its stages recomputed and recorded in the system's memory, then reversed.
  void checkpoint(S* gy, S* gparams, const S* gy_steps) {
    StateOps<S>& be = *mem;
    const int s = tab->stages();
    std::vector<int64_t> nsteps(static_cast<size_t>(G));
    int64_t most = 0;
    for (int g = 0; g < G; ++g) {
      nsteps[g] = static_cast<int64_t>(fwd.step_h[g].size());
      most = std::max(most, nsteps[g]);
    }
    reversed.assign(static_cast<size_t>(G), 0);
    const int64_t N = most;
    if (gopt.truncate > 0) most = std::min<int64_t>(most, gopt.truncate);
    sys->reserve_slots(s);
    const size_t total = static_cast<size_t>(G) * n;
    Array<S> y0(be, total), Y(be, total), K(be, static_cast<size_t>(s) * total);
    Array<S, double> hstep(be, static_cast<size_t>(G));
    Array<S, int> ident(be, static_cast<size_t>(G));
    std::vector<int> order(static_cast<size_t>(G));
    for (int i = 0; i < G; ++i) order[static_cast<size_t>(i)] = i;
    ident.upload(order.data(), order.size());
    Buffer<S> y0h(total);
    std::vector<int> gs;
    std::vector<double> h, t, tt;
    for (int64_t back = 0; back < most; ++back) {
      add_step_cotangent(gy, gy_steps, N - back, N);
      gs.clear();
      h.clear();
      t.clear();
      for (int g = 0; g < G; ++g)
        if (nsteps[g] > back) {
          const int64_t k = nsteps[g] - 1 - back;
          ++reversed[static_cast<size_t>(g)];
          gs.push_back(g);
          h.push_back(fwd.step_h[g][static_cast<size_t>(k)]);
          t.push_back(fwd.step_times[g][static_cast<size_t>(k)]);
        }
      const int count = static_cast<int>(gs.size());
      const size_t cn = static_cast<size_t>(count) * n;
      for (int i = 0; i < count; ++i) {
        const int g = gs[i];
        const int64_t k = nsteps[g] - 1 - back;
        std::memcpy(y0h.data() + static_cast<size_t>(i) * n,
                    fwd.step_states[g].data() + static_cast<size_t>(k) * n, n * sizeof(S));
      }
      y0.upload(y0h.data(), cn);
      hstep.upload(h.data(), h.size());
      // recompute the step's stages, recording each in its slot
      const int last = tab->fsal ? s - 2 : s - 1;
      tt.resize(static_cast<size_t>(count));
      std::vector<const S*> kp;
      std::vector<double> cf;
      for (int j = 0; j <= last; ++j) {
        cf.clear();
        kp.clear();
        for (int l = 0; l < j; ++l)
          if (tab->A(j, l) != 0.0) {
            cf.push_back(tab->A(j, l));
            kp.push_back(K.data() + static_cast<size_t>(l) * cn);
          }
        be.rk_combine_rows(Y.data(), y0.data(), hstep.data(), cf.data(), kp.data(), static_cast<int>(kp.size()),
                           ident.data(), count, n);
        for (int i = 0; i < count; ++i) tt[i] = t[i] + tab->c[j] * h[i];
        sys->eval_record(K.data() + static_cast<size_t>(j) * cn, Y.data(), tt.data(), gs.data(), count, j);
        ++st.recompute_calls;
        ++st.nfe_backward;
      }
      std::vector<std::vector<StageRef>> ref(static_cast<size_t>(s));
      for (int j = 0; j < s; ++j)
        for (int i = 0; i < count; ++i) ref[j].push_back({j, i, count});
      reverse_step(gs, h, ref, gy, gparams);
      note_peak();
      if (!check_finite(gs, t, gy, 0)) {
        st.message += " (" + std::to_string(back + 1) + " steps from the end)";
        return;
      }
    }
    zero_truncated(gy);
  }

  void adjoint(S* gy, S* gparams) {
    AdjointSystem<S> aug(*sys);
    const size_t W = aug.dim();
    StateOps<S>& be = *mem;
    Array<S> state(be, static_cast<size_t>(G) * W);
    be.strided_copy(state.data(), W, y1.data(), n, static_cast<size_t>(G), n, S(1));
    be.strided_copy(state.data() + n, W, gy, n, static_cast<size_t>(G), n, S(1));
    be.strided_copy(state.data() + 2 * n, W, nullptr, 0, static_cast<size_t>(G), P, S(0));
    SolveOptions b = opt;
    b.t0 = opt.t1;
    b.t1 = opt.t0;
    b.save = SaveKind::Final;
    b.save_times.clear();
    b.terminal_threshold = 0.0;
    if (!gopt.adjoint_method.empty()) b.method = gopt.adjoint_method;
    if (!std::isnan(gopt.adjoint_rtol)) b.rtol = gopt.adjoint_rtol;
    if (!std::isnan(gopt.adjoint_atol)) b.atol = gopt.adjoint_atol;
    if (b.adaptive && !b.method_tableau().adaptive()) {
      b.adaptive = false;
      b.steps = static_cast<int>(std::max<int64_t>(1, fwd.steps));
    }
    if (gopt.seminorm) {
      b.norm_period = W;
      b.norm_dims = 2 * n;
    }
    const SolveResult<S> r = integrate(aug, state.data(), b);
    st.nfe_backward += r.calls + aug.vjps;
    st.recompute_calls += r.calls;
    st.vjp_calls += aug.vjps;
    note_peak();
    if (!r.ok()) {
      st.status = r.status;
      st.message = "adjoint backsolve: " + r.message;
      return;
    }
    be.strided_copy(gy, n, state.data() + n, W, static_cast<size_t>(G), n, S(1));
    // gparams += a_theta of every sequence, in sequence order
    const int zero = 0;
    gsdev.resize(be, static_cast<size_t>(G));
    gsdev.upload(&zero, 1);
    std::vector<const S*> ath;
    for (int g = 0; g < G; ++g) {
      ath.push_back(state.data() + static_cast<size_t>(g) * W + 2 * n);
      if (ath.size() == 32 || g == G - 1) {  // the algebra's most terms per call
        be.accumulate_rows(gparams, ath.data(), static_cast<int>(ath.size()), gsdev.data(), 1, P);
        ath.clear();
      }
    }
    std::vector<int> all(static_cast<size_t>(G));
    std::vector<double> t0(static_cast<size_t>(G), opt.t0);
    for (int g = 0; g < G; ++g) all[g] = g;
    check_finite(all, t0, gy, 0);
  }
};

template <class S>
OdeGradient<S>::OdeGradient(DiffSystem<S>& sys, const SolveOptions& opt, const GradOptions& gopt) {
  // every method runs on the system's memory; the regularisers' integrals are host arrays
  if (sys.backend() && gopt.regularized())
    throw Error("gradients: the system's states are on " + sys.backend()->name() +
                "; the regularisers need host states (a field on a device evaluates there from host states)");
  impl_ = new Impl(sys, opt, gopt);
}

template <class S>
OdeGradient<S>::~OdeGradient() {
  delete impl_;
}

template <class S>
const SolveResult<S>& OdeGradient<S>::forward(S* y) {
  Impl& I = *impl_;
  I.require_same_memory("forward");
  I.base_bytes = MemoryStats::current();
  MemoryStats::reset_peak();
  SolveOptions o = I.opt;
  S* const user_y = y;
  const int Gu = I.user.groups();
  const size_t nu = I.user.dim();
  if (I.reg) {  // [y, 0, 0] per sequence
    I.yaug.assign(static_cast<size_t>(Gu) * (nu + 2), S(0));
    algebra::copy_rows(I.yaug.data(), nu + 2, y, nu, static_cast<size_t>(Gu), nu);
    y = I.yaug.data();
  }
  switch (I.gopt.method) {
    case GradMethod::Backprop:
      I.fwd = detail::integrate_taped(*I.sys, y, o, I.tape);
      break;
    case GradMethod::Checkpoint:
      o.save = SaveKind::Steps;
      I.fwd = integrate(*I.sys, y, o);
      break;
    case GradMethod::Adjoint:
      I.fwd = integrate(*I.sys, y, o);
      I.y1.resize(*I.mem, static_cast<size_t>(I.G) * I.n);
      I.mem->copy(I.y1.data(), y, static_cast<size_t>(I.G) * I.n);
      break;
  }
  I.note_peak();
  I.st.kinetic = I.st.jacobian = 0.0;
  if (I.reg) {
    algebra::copy_rows(user_y, nu, y, nu + 2, static_cast<size_t>(Gu), nu);
    for (int g = 0; g < Gu; ++g) {
      const S* row = y + static_cast<size_t>(g) * (nu + 2);
      I.st.kinetic += static_cast<double>(row[nu]) / Gu;
      I.st.jacobian += static_cast<double>(row[nu + 1]) / Gu;
    }
  }
  I.st.nfe_forward = I.fwd.nfe * I.per_call;
  I.st.status = I.fwd.status;
  I.st.message = I.fwd.message;
  auto& fs = I.st.forward_stats;
  fs.status = I.fwd.status;
  fs.message = I.fwd.message;
  fs.calls = I.fwd.calls;
  fs.nfe = I.fwd.nfe;
  fs.seq_evals = I.fwd.seq_evals;
  fs.steps = I.fwd.steps;
  fs.accepted = I.fwd.accepted;
  fs.rejected = I.fwd.rejected;
  fs.steps_total = I.fwd.steps_total;
  fs.seq = I.fwd.seq;
  I.forward_done = true;
  return I.fwd;
}

template <class S>
const GradStats& OdeGradient<S>::backward(const S* gy1, S* gy0, S* gparams) {
  return backward(gy1, gy0, gparams, nullptr);
}

template <class S>
const GradStats& OdeGradient<S>::backward(const S* gy1, S* gy0, S* gparams, const S* gy_steps) {
  Impl& I = *impl_;
  I.require_same_memory("backward");
  if (!I.forward_done) throw Error("OdeGradient::backward called before forward");
  if (!I.fwd.ok()) throw Error("OdeGradient::backward: the forward solve failed: " + I.fwd.message);
  const int Gu = I.user.groups();
  const size_t nu = I.user.dim();
  if (gy_steps) {
    if (I.gopt.method == GradMethod::Adjoint)
      throw Error("OdeGradient::backward: cotangents at the steps need backprop or checkpoint, not the adjoint");
    if (I.reg || I.coupled)
      throw Error("OdeGradient::backward: cotangents at the steps need a plain per-sequence solve (no regularisers, "
                  "not batch-coupled)");
    if (I.opt.adaptive) throw Error("OdeGradient::backward: cotangents at the steps need a fixed-step solve");
    for (const auto& q : I.fwd.seq)
      if (q.accepted != I.fwd.accepted)
        throw Error("OdeGradient::backward: cotangents at the steps need every sequence to take the same steps");
  }
  S* gy = gy0;
  if (I.reg) {  // dL/d[y, E, Q](t1) = [gy1, kinetic / G, jacobian / G]
    I.gaug.resize(static_cast<size_t>(Gu) * (nu + 2));
    algebra::copy_rows(I.gaug.data(), nu + 2, gy1, nu, static_cast<size_t>(Gu), nu);
    for (int g = 0; g < Gu; ++g) {
      S* row = I.gaug.data() + static_cast<size_t>(g) * (nu + 2);
      row[nu] = static_cast<S>(I.gopt.kinetic / Gu);
      row[nu + 1] = static_cast<S>(I.gopt.jacobian / Gu);
    }
    gy = I.gaug.data();
  } else {
    I.mem->copy(gy0, gy1, static_cast<size_t>(Gu) * nu);
  }
  const int64_t nfe_before = I.st.nfe_backward;
  switch (I.gopt.method) {
    case GradMethod::Backprop: I.backprop(gy, gparams, gy_steps); break;
    case GradMethod::Checkpoint: I.checkpoint(gy, gparams, gy_steps); break;
    case GradMethod::Adjoint: I.adjoint(gy, gparams); break;
  }
  I.st.nfe_backward = nfe_before + (I.st.nfe_backward - nfe_before) * I.per_call;
  if (I.reg) algebra::copy_rows(gy0, nu, gy, nu + 2, static_cast<size_t>(Gu), nu);
  I.note_peak();
  return I.st;
}

template <class S>
const GradStats& OdeGradient<S>::stats() const {
  return impl_->st;
}

template class OdeGradient<float>;
template class OdeGradient<double>;

}  // namespace flowloop
