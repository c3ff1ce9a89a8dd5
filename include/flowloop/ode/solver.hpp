// flowloop/ode/solver.hpp: explicit Runge-Kutta integration of dy/dt = f(t, y) for a
// batch of independent sequences, fixed-step or adaptive.
//
// Four small pieces joined by integrate():
//   - the method: a ButcherTableau (data, validated when built): a built-in one by name,
//     or the user's own (SolveOptions::use_tableau);
//   - the step-size controller: Hairer's PI controller, the plain I controller, or one
//     of the user's own (StepSizeController);
//   - what to save: the final state, every accepted step, or requested times
//     (dense output: Dormand-Prince's continuous extension, cubic Hermite else);
//   - the system: OdeSystem, which evaluates f for any subset of sequences.
// solvers/integrate.cpp keeps them apart: the tableau's coefficients
// (StageCoefficients), the controller (StepControl), the saves (Saver), and two
// more hooks of one job each, the terminal condition (terminal_reached) and the
// tape that backprop records (TapeRecorder); Driver::run only joins them.
// The solver carries no state between calls. Nothing has a hidden default
// tolerance: adaptive solves must give rtol and atol.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "flowloop/core/tensor.hpp"

namespace flowloop {

// ---------------------------------------------------------------- methods

struct ButcherTableau {
  std::string name;
  int order = 0;          // order of the propagated solution
  int error_order = 0;    // order of the embedded solution (0: no error estimate)
  std::vector<double> c;  // (s) nodes
  std::vector<double> a;  // (s, s) row-major, strictly lower triangular
  std::vector<double> b;  // (s) weights
  std::vector<double> e;  // (s) error weights, b - b_hat (empty: no estimate)
  std::vector<double> dense;  // Dormand-Prince continuous extension d_j (s), or empty
  bool fsal = false;      // derived: last stage is f(t + h, y1)
  std::string doc;

  int stages() const { return static_cast<int>(c.size()); }
  double A(int i, int j) const { return a[static_cast<size_t>(i) * c.size() + j]; }
  bool adaptive() const { return !e.empty(); }
  // Checks shapes, explicitness, row sums == c, sum b == 1, sum e == 0 (to 1e-12)
  // and derives fsal. Throws Error naming the tableau and the broken condition.
  void validate();
};

// Built-in methods: euler, midpoint, heun, rk4, rk38, bosh3, dopri5 (Hairer's
// error weights), dopri5-shampine (torchdiffeq's and diffrax's), tsit5.
const ButcherTableau& tableau(const std::string& name);
std::vector<std::string> tableau_names();

// ---------------------------------------------------------------- systems

// G independent sequences of n values each. eval() computes f for `count` of
// them whose states lie contiguously in y (count, n); ids[i] says which sequence
// row i is and t[i] its time.
//
// Where y and dydt live: host memory (backend() is null, the default), or the memory
// of backend(), any backend's state algebra (ode/state_ops.hpp: the cpu, reference or
// CUDA backend, or one of the user's own). integrate() then keeps the whole solve there:
// its y is that memory, every state and stage is allocated there, and the driver's
// arithmetic is the backend's state algebra. t and ids are host arrays.
template <class S>
class StateOps;

template <class S>
class OdeSystem {
 public:
  virtual ~OdeSystem() = default;
  virtual int groups() const = 0;
  virtual size_t dim() const = 0;
  virtual void eval(S* dydt, const S* y, const double* t, const int* ids, int count) = 0;
  virtual StateOps<S>* backend() { return nullptr; }
};

// ---------------------------------------------------------------- options and results

enum class Controller { PI, I };
enum class InitialStepNorm { Sum, RMS };  // Hairer's hinit (sums) or torchdiffeq's (RMS)
enum class SaveKind { Final, Steps, Times };

// A step-size controller of one's own (SolveOptions::use_controller), in place of the
// built-in PI and I controllers. After each attempted step of an adaptive solve whose
// error is finite, the driver calls decide() for that sequence g with the scaled error
// norm err (1 means the tolerance exactly), the step h just tried (signed: negative on a
// backward solve) and the tableau's embedded order. It returns whether to accept the step
// and sets h_next, with h's sign: the next step after an acceptance, the retry after a
// rejection. The driver keeps the rest: the first step (h0 or Hairer's hinit), hmax,
// max_steps, the step-size floor, and non-finite errors (always rejected, the step cut by
// fac_min; repeated max_nonfinite times, a failure). start(G) precedes every solve of G
// sequences, so a controller keeps per-sequence memory (a previous error, say) across
// its steps but not across solves.
class StepSizeController {
 public:
  virtual ~StepSizeController() = default;
  virtual void start(int G) { (void)G; }
  virtual bool decide(int g, double err, double h, int error_order, double& h_next) = 0;
};

enum class SolveStatus { Success = 0, Terminal = 1, MaxSteps = 2, StepTooSmall = 3, NonFinite = 4 };
const char* status_name(SolveStatus s);

struct SolveOptions {
  std::string method = "dopri5";
  double t0 = 0.0, t1 = 1.0;
  bool adaptive = false;
  // fixed steps: a count, or a step size dt (the last step is shortened to land on t1)
  int steps = 0;
  double dt = 0.0;
  // adaptive: tolerances are required (NaN until set)
  double rtol = std::numeric_limits<double>::quiet_NaN();
  double atol = std::numeric_limits<double>::quiet_NaN();
  Controller controller = Controller::PI;
  InitialStepNorm initial_norm = InitialStepNorm::Sum;
  double h0 = 0.0;    // first step; 0: automatic (Hairer's hinit)
  double hmax = 0.0;  // 0: |t1 - t0|
  double safety = 0.9, fac_min = 0.2, fac_max = 10.0, beta = 0.04;
  int64_t max_steps = 100000;
  int max_nonfinite = 10;   // consecutive non-finite rejections before failing
  bool batch_coupled = false;  // one shared step for all sequences (as torchdiffeq)
  // Terminal condition per sequence: stop when ||f(y)|| / ||y|| < threshold (0: off).
  double terminal_threshold = 0.0;
  // Error norm over part of each sequence's values only: element i counts when
  // i % norm_period < norm_dims (0: all). The adjoint's seminorm uses it.
  size_t norm_period = 0, norm_dims = 0;
  SaveKind save = SaveKind::Final;
  std::vector<double> save_times;  // for SaveKind::Times, sorted in the direction of t0 -> t1
  // Also record every accepted step's end time and size (step_times, step_h) when
  // save is not Steps (which records them anyway), e.g. beside dense output.
  bool record_steps = false;

  // A method and a controller of one's own, in place of `method` and `controller`:
  // use_tableau validates a copy (ButcherTableau::validate(): explicit, row sums = c, sum
  // b = 1, sum e = 0; fsal derived) and names the method after it; use_controller installs
  // a StepSizeController for adaptive solves (shared by copies of these options).
  void use_tableau(ButcherTableau tab);
  void use_controller(std::shared_ptr<StepSizeController> ctrl);
  // The method the solve runs: the tableau given to use_tableau while `method` still
  // names it, else the built-in named by `method` (tableau()'s Error for an unknown name).
  const ButcherTableau& method_tableau() const;
  const std::shared_ptr<const ButcherTableau>& own_tableau() const { return own_tableau_; }
  StepSizeController* step_controller() const { return own_controller_.get(); }

  void validate() const;  // throws Error naming the bad option

 private:
  std::shared_ptr<const ButcherTableau> own_tableau_;
  std::shared_ptr<StepSizeController> own_controller_;
};

struct SequenceStats {
  int64_t nfe = 0;        // evaluations of f this sequence took part in
  int64_t steps = 0;      // attempted steps (Hairer's nstep)
  int64_t accepted = 0;
  int64_t rejected = 0;   // rejections after the first accepted step (Hairer's nrejct)
  SolveStatus status = SolveStatus::Success;
  double t = 0.0;         // where the sequence ended (t1, its stopping depth, or the failure)
  double h = 0.0;         // the last step size attempted
  std::string message;    // for failures: what happened, where
};

template <class S>
struct SolveResult {
  SolveStatus status = SolveStatus::Success;  // the worst over sequences
  std::string message;                        // first failure's message, if any
  int64_t calls = 0;        // calls of OdeSystem::eval (batched field evaluations)
  int64_t nfe = 0;          // max over sequences of their nfe (the depth in evaluations)
  int64_t seq_evals = 0;    // sum over sequences of their nfe (work)
  int64_t steps = 0, accepted = 0, rejected = 0;  // max over sequences (equal when coupled)
  int64_t steps_total = 0;  // sum over sequences of their attempted steps
  std::vector<SequenceStats> seq;
  // SaveKind::Times: (ntimes, G, n); SaveKind::Steps: per sequence, its accepted times
  // (starting with t0) and states.
  Buffer<S> saved;
  std::vector<std::vector<double>> step_times;
  std::vector<Buffer<S>> step_states;
  std::vector<std::vector<double>> step_h;  // the step sizes taken (exactly)
  bool ok() const { return status == SolveStatus::Success || status == SolveStatus::Terminal; }
};

// Integrates every sequence of y (G, n; in the system's memory) from t0 to t1 in place. Never throws
// for numerical failures: they are reported in the result's status (and the
// failed sequence keeps its last accepted state). Throws Error for bad options.
template <class S>
SolveResult<S> integrate(OdeSystem<S>& sys, S* y, const SolveOptions& opt);

}  // namespace flowloop
