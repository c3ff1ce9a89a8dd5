// flowloop/ode/grad.hpp: gradients through an ODE solve.
//
// Three methods behind one interface, chosen by name:
//   backprop    the exact gradient of the discrete solve: every stage's field
//               evaluation is kept during the forward, and the vjp of every
//               stage runs in reverse. Step sizes are constants (as diffrax).
//   checkpoint  keeps only the accepted states (t_n, h_n, y_n); the backward
//               recomputes each step's stages and runs their vjp. The same
//               gradient as backprop to rounding, one state per step of memory.
//   adjoint     the continuous adjoint (backsolve): [y, a_y, a_theta] integrated
//               backward from t1 to t0 with a chosen solver and tolerance;
//               memory independent of the number of steps. Approximate: it
//               converges to the discrete gradient as tolerances tighten.
// Per-sequence adaptive solves are differentiated per sequence.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "flowloop/ode/solver.hpp"

namespace flowloop {

// An OdeSystem that can also record an evaluation and run its vector-Jacobian
// product. Gradient rule: vjp ACCUMULATES into dy and dparams.
template <class S>
class DiffSystem : public OdeSystem<S> {
 public:
  virtual size_t num_params() const = 0;
  // Make slots 0..n-1 available for eval_record (existing ones keep their records).
  virtual void reserve_slots(int n) = 0;
  // Like eval(), and keeps what vjp needs in `slot`.
  virtual void eval_record(S* dydt, const S* y, const double* t, const int* ids, int count, int slot) = 0;
  // For the `count` rows recorded in `slot`: dy (count, n) += J^T g, and
  // dparams += (df/dtheta)^T g summed over the rows, or, with param_stride > 0,
  // row i's part at dparams + i * param_stride.
  virtual void vjp(S* dy, S* dparams, size_t param_stride, const S* g, int slot) = 0;
};

enum class GradMethod { Backprop, Checkpoint, Adjoint };
GradMethod grad_method(const std::string& name);  // "backprop", "checkpoint", "adjoint"
const char* grad_method_name(GradMethod m);

struct GradOptions {
  GradMethod method = GradMethod::Backprop;
  // adjoint only: the backward solve's method and tolerances (default: the forward's)
  std::string adjoint_method;
  double adjoint_rtol = std::numeric_limits<double>::quiet_NaN();
  double adjoint_atol = std::numeric_limits<double>::quiet_NaN();
  bool seminorm = false;  // leave the parameter adjoint out of the backward error norm
  // backprop and checkpoint: differentiate through each sequence's last `truncate` accepted
  // steps only (0: all), as if the earlier steps ran without gradient: a truncated
  // sequence's dL/dy(t0) is 0 (Huginn's truncated backpropagation through its recurrence).
  int truncate = 0;
  // Regularisers of the solve (RNODE), added to the differentiated loss:
  //   kinetic  * R_K,  R_K = mean over sequences of (1/n) int_t0^t1 ||f(y, t)||^2 dt
  //   jacobian * R_J,  R_J = mean over sequences of (1/n) int_t0^t1 ||J(y, t) e||^2 dt
  // R_J is Hutchinson's estimate of the Jacobian's squared Frobenius norm with one
  // Rademacher vector e per sequence and solve (drawn from noise_seed), and the
  // product J e by a forward difference of step jacobian_fd: (f(y + d e) - f(y)) / d
  // (0: sqrt of the machine epsilon of S). Both integrals ride along the solve as
  // extra state (outside the error norm), so every gradient method covers them:
  // the gradient is exactly that of the discretised regularisers. Cost: R_J doubles
  // the field evaluations.
  double kinetic = 0.0, jacobian = 0.0;
  double jacobian_fd = 0.0;
  uint64_t noise_seed = 0;
  bool regularized() const { return kinetic != 0.0 || jacobian != 0.0; }
};

struct GradStats {
  SolveStatus status = SolveStatus::Success;
  std::string message;
  int64_t nfe_forward = 0;    // field evaluations of the forward solve (max over sequences)
  int64_t nfe_backward = 0;   // field evaluations of the backward pass (vjps and recomputations)
  int64_t vjp_calls = 0;      // batched vjp calls
  int64_t recompute_calls = 0;  // batched forward evaluations repeated by the backward pass
  size_t peak_bytes = 0;      // most Buffer bytes held at once by the solve and its gradient
  double kinetic = 0.0, jacobian = 0.0;  // R_K and R_J of the forward solve (unweighted; 0 when off)
  SolveResult<double> forward_stats;  // the forward solve's statistics (states not kept)
  bool ok() const { return status == SolveStatus::Success || status == SolveStatus::Terminal; }
};

// Solve forward, then differentiate a loss of y(t1).
//   y      (G, n): y(t0) in, y(t1) out
//   after forward(): backward(gy1, gy0, gparams) with gy1 = dL/dy(t1) (G, n);
//   gy0 (G, n) receives dL/dy(t0) (overwritten), gparams (P) += dL/dtheta.
// With a system whose states are a device's (backend() non-null; without
// regularisers), y, gy1, gy0 and gparams are arrays of that backend, and the forward
// solve, the tape or the recomputed steps, and the reverse pass or the adjoint's
// backsolve stay there (checkpoint keeps its saved steps on the host).
template <class S>
class OdeGradient {
 public:
  OdeGradient(DiffSystem<S>& sys, const SolveOptions& opt, const GradOptions& gopt);
  ~OdeGradient();
  OdeGradient(const OdeGradient&) = delete;
  OdeGradient& operator=(const OdeGradient&) = delete;

  const SolveResult<S>& forward(S* y);
  const GradStats& backward(const S* gy1, S* gy0, S* gparams);
  // The same for a loss that also reads the states between t0 and t1 (a looped model's
  // readout at every loop: Ouro's exit gate). For a fixed-step solve, whose every sequence
  // takes the same N steps, gy_steps (N+1, G, n; in the system's memory) holds dL/dy_k at
  // the state after step k: row k (1 <= k < N) joins the cotangent as the reverse pass
  // reaches that state (row N is gy1's, row 0 is never read). Backprop and checkpoint.
  const GradStats& backward(const S* gy1, S* gy0, S* gparams, const S* gy_steps);
  const GradStats& stats() const;

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace flowloop
