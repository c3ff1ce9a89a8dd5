// flowloop/nn/model.hpp: the looped model around the field: model-spec.md's GPT-2 model, or
// the general structure of model-families.md (a llama block, a prelude and a coda):
//
//   h(0) = prelude(wte[tokens] (+ wpe))   (embedding; the prelude's layers run once)
//   h_{k+1} = h_k + f(h_k, k),  k < K (`loop K`; Euler with dt = 1 on [0, K]:
//                                     loop k evaluates the field at t = k. It runs as
//                                     that solve, through integrate(), and its gradient
//                                     is the solve's backprop: no loop of its own)
//   logits = norm_f(coda(h_K)) head^T (the coda's layers run once; norm_f LayerNorm (gpt2) or
//                                     RMSNorm (llama); head wte (tied) or lm_head)
//   loss = mean cross-entropy over targets != -1
//
// Gradient rule: parameter gradients ACCUMULATE into the caller's buffer (same
// layout as the parameters); callers zero it first.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "flowloop/nn/config.hpp"
#include "flowloop/nn/field.hpp"
#include "flowloop/ode/grad.hpp"
#include "flowloop/nn/params.hpp"
#include "flowloop/ode/solver.hpp"

namespace flowloop {

// A batch of token rows of equal length: data is (B,T) row-major.
struct TokenBatch {
  int B = 0, T = 0;
  std::vector<int32_t> data;
  // Throws Error naming the row and column of the first token outside [0, V),
  // or T larger than the context. `what` names the source ("tokens", a file).
  void check(const ModelConfig& cfg, const std::string& what, bool allow_ignore = false) const;
};

// Reads {"tokens": [[...], ...]} (or another key, e.g. "targets") from a JSON
// file: B rows of equal length. Errors name the file, row and position.
TokenBatch read_token_file(const std::string& path, const std::string& key);
// The same from the file's text; `where` names it in errors.
TokenBatch parse_token_json(const std::string& text, const std::string& key, const std::string& where);

// Forward activations of the readout, kept for its backward.
template <class S>
struct ReadoutCache {
  Buffer<S> ln, mean, rstd;  // (N,C), (N), (N): the final norm's output and statistics
  Buffer<S> logits;          // (N,V)
  Buffer<S> dlogits, dln;    // (N,V), (N,C) scratch of the backward
  // a coda: its output (N,C), its activations and its vjp's scratch
  Buffer<S> hc, dhc;
  FieldCache<S> coda;
  FieldGradWork<S> coda_work;
  void resize(const ModelConfig& cfg, int N);
};

// The prelude's activations (a model with n_prelude > 0), kept for the embedding's backward.
template <class S>
struct EmbedCache {
  Buffer<S> e, de;  // (B,T,C): wte[tokens] (+ wpe), and dL/de
  FieldCache<S> prelude;
  FieldGradWork<S> work;
};

template <class S>
class FieldSystem;

// The field of a model as an ODE system: B sequences of T*C values each; row i
// of an evaluation is at its own time t[i] (a time-conditioned field reads it).
// params points at the field's parameters (Model::field_params()).
// With a device field (the same Field on a model's device backend: Device::cuda, or the
// reference backend of set_backend), every evaluation and vjp runs on its
// backend: the solver's state stays on the host and crosses per evaluation (y up, f
// down; for a vjp g up, dy and the parameter gradient down, added to the host's).
// The backend keeps its own copy of the parameters, taken at construction and at every
// set_params (call it again after changing the values behind the pointer).
// solve() keeps a whole solve on the device instead: the system turns resident for it
// (backend() is the device's, and eval takes and gives device arrays), so the states
// cross once each way, not per evaluation.
template <class S>
class FieldSystem : public DiffSystem<S> {
 public:
  FieldSystem(const Field<S>& field, const S* params, int B, int T, const Field<S>* device = nullptr);
  int T() const { return T_; }
  const Field<S>& field() const { return field_; }
  const Field<S>* device_field() const { return dev_; }
  void set_params(const S* params);
  // The parameters from an array of the device field's backend instead (a trainer's
  // optimiser keeps them there): read at every evaluation, never copied. set_params
  // returns to the system's own copy.
  void set_device_params(const S* params);
  // A step-conditioned field is told this step d at every evaluation (shortcut
  // sampling: d = the solver's step); 0, the default, is the instantaneous velocity.
  // Throws Error for a field without step conditioning.
  void set_step(double d);
  int groups() const override { return B_; }
  size_t dim() const override { return static_cast<size_t>(T_) * field_.config().d_model; }
  size_t num_params() const override { return field_.num_params(); }
  void eval(S* dydt, const S* y, const double* t, const int* ids, int count) override;
  void reserve_slots(int n) override;
  void eval_record(S* dydt, const S* y, const double* t, const int* ids, int count, int slot) override;
  void vjp(S* dy, S* dparams, size_t param_stride, const S* g, int slot) override;
  // While resident (a model on a device only), every call above takes and gives arrays
  // of the device field's backend, and backend() names it.
  StateOps<S>* backend() override { return resident_ ? &dev_->backend() : nullptr; }
  void set_resident(bool on);
  bool resident() const { return resident_; }
  // A resident run's scope: set_resident(true) now, false at its end, a throw included.
  class Resident {
   public:
    explicit Resident(FieldSystem& sys) : sys_(sys) { sys_.set_resident(true); }
    ~Resident() { sys_.set_resident(false); }
    Resident(const Resident&) = delete;
    Resident& operator=(const Resident&) = delete;

   private:
    FieldSystem& sys_;
  };
  // integrate() of the host states y (B, T*C) in place: on a device, a resident solve
  // (y uploaded once and downloaded once); on the CPU, integrate() itself. `through`: a
  // system wrapping this one (timing it, say), integrated in its place.
  SolveResult<S> solve(S* y, const SolveOptions& opt, OdeSystem<S>* through = nullptr);

 private:
  void device_forward(S* dydt, const S* y, const double* t, int count, FieldCache<S>& cache);
  const Field<S>& field_;
  const S* params_;
  int B_, T_;
  FieldCache<S> cache_;
  std::vector<FieldCache<S>> slots_;
  FieldGradWork<S> work_;
  std::vector<double> step_;  // (B) the step told to the field; empty: none
  // the device path (dev_ non-null)
  const Field<S>* dev_ = nullptr;
  Array<S> dparams_, dy_, dx_, dgrad_;  // parameters; state in; field out / cotangent; parameter gradient
  Array<S> dstate_;                     // solve(): the states
  const S* dparams_ext_ = nullptr;      // set_device_params: the parameters, not ours
  const S* device_params() const { return dparams_ext_ ? dparams_ext_ : dparams_.data(); }
  bool resident_ = false;
  FieldCache<S> dcache_;
  std::vector<FieldCache<S>> dslots_;
  FieldGradWork<S> dwork_;
  Buffer<S> host_;  // a download before it is added to the caller's gradient
};

// What the ODE-depth loss keeps between calls, so that a training loop sizes its
// field caches and buffers once (they are rebuilt only when B or T changes).
template <class S>
struct OdeWork {
  std::shared_ptr<Backend<S>> backend;  // a model on a device: its backend, alive while the arrays are
  std::unique_ptr<FieldSystem<S>> sys;
  std::unique_ptr<OdeGradient<S>> grad;  // the last differentiated solve, between its forward and backward
  Buffer<S> h, gy1, gy0;    // h(0), then h(t1); dL/dh(t1); dL/dh(0)
  EmbedCache<S> embed;      // the prelude's activations, between the forward and the backward
  Array<S> dev_h, dev_gy1, dev_gy0, dev_grad, dev_steps;  // a resident solve on a device: the same there
  Buffer<S> grad_host;                         // its parameter gradient, downloaded
  void use_backend(const std::shared_ptr<Backend<S>>& be);  // frees what lives on another one
  ReadoutCache<S> readout;  // after a call: readout.logits (B*T, V) of h(t1)
  // device_params: read the parameters from that device array instead (set_device_params).
  FieldSystem<S>& system(const Field<S>& field, const S* params, int B, int T,
                         const Field<S>* device = nullptr, const S* device_params = nullptr);
};

// What `loop K` keeps between calls. Loop K is Euler with K steps of dt = 1 on [0, K]
// through integrate(), the one driver (its solve and gradient in `ode`).
template <class S>
struct LoopWork {
  int B = 0, T = 0, K = 0;
  Buffer<S> h;                  // (K+1, B,T,C) states h_0..h_K (after a loss without the gate: h_0 and h_K)
  Buffer<S> dh;                 // (B,T,C) dL/dh_0 after a loss
  ReadoutCache<S> readout;      // the readout of h_K
  std::vector<ReadoutCache<S>> per_loop;  // exit gate: the readout at every loop
  Buffer<S> gate;                         // exit gate: (K, N) lambda
  OdeWork<S> ode;                         // the solve
  void resize(const ModelConfig& cfg, int B, int T, int K);
};

template <class S>
class Model {
 public:
  explicit Model(const ModelConfig& cfg);  // zero parameters; see init()

  void init(uint64_t seed) { init_gpt2(params.data(), layout, cfg, seed); }

  // The field's parameters: [field_begin, field_end) of the flat buffer.
  const S* field_params() const { return params.data() + layout.field_begin(); }

  // h0 = prelude(wte[tokens] (+ wpe)). Tokens are checked against the vocabulary and context.
  // With a cache, the prelude's activations stay there for embed_backward.
  void embed(S* h0 /*(B,T,C)*/, const TokenBatch& tokens) const;
  void embed(S* h0 /*(B,T,C)*/, const TokenBatch& tokens, EmbedCache<S>& cache) const;
  // dparams += the embedding's (and the prelude's) gradients given dh0 = dL/dh0, for the
  // forward recorded in cache (the same tokens).
  void embed_backward(S* dparams, const S* dh0 /*(B,T,C)*/, const TokenBatch& tokens, EmbedCache<S>& cache) const;

  // logits = norm_f(coda(h)) head^T, into rc.logits (N = B*T rows).
  void readout(const S* h /*(B,T,C)*/, int B, int T, ReadoutCache<S>& rc) const;
  // The same for N rows of any grouping: a model without a coda only (its readout is per row).
  void readout(const S* h /*(N,C)*/, int N, ReadoutCache<S>& rc) const;

  // Given dlogits in rc.dlogits: dparams += readout's parameter gradients,
  // dh += dL/dh (B,T,C). head_backward is its first half (rc.dln = dL/d norm_f's output,
  // overwritten; the head's gradient added), norm_backward the rest (from rc.dln).
  void readout_backward(S* dh, S* dparams, const S* h, int B, int T, ReadoutCache<S>& rc) const;
  void readout_backward(S* dh, S* dparams, const S* h, int N, ReadoutCache<S>& rc) const;  // no coda
  void head_backward(S* dparams, int N, ReadoutCache<S>& rc) const;
  void norm_backward(S* dh, S* dparams, const S* h, int B, int T, ReadoutCache<S>& rc) const;

  // Loop K's options: Euler, K steps on [0, K] (loop k at t = k), every state saved or not.
  static SolveOptions loop_options(int K, bool save_states);

  // `loop K` forward: fills w.h with h_0..h_K and w.readout.logits (B*T, V).
  // Returns the number of field evaluations (K).
  int loop_forward(const TokenBatch& tokens, int K, LoopWork<S>& w) const;

  // The same from a given h(0) (B,T,C) instead of tokens (used by checks and by
  // callers that build h(0) themselves).
  int loop_forward_from(const S* h0, int B, int T, int K, LoopWork<S>& w) const;

  // Forward, mean cross-entropy against targets (B,T; -1 ignored) and the exact
  // gradient through the K loops: grads (flat, model layout) += dL/dtheta.
  // If dh0 is non-null it receives dL/dh(0) (B,T,C), overwritten.
  // truncate > 0: backpropagate through the last `truncate` loops only (Huginn's
  // truncated backprop); the earlier loops and the embedding's path get no gradient.
  S loop_loss_and_grad(const TokenBatch& tokens, const TokenBatch& targets, int K, S* grads,
                       LoopWork<S>& w, S* dh0 = nullptr, int truncate = 0) const;

  // The same from a given h(0); embedding gradients are not formed, dh0
  // (if non-null) receives dL/dh(0).
  S loop_loss_and_grad_from(const S* h0, const TokenBatch& targets, int K, S* grads,
                            LoopWork<S>& w, S* dh0, int truncate = 0) const;

  // Depth as an ODE: h(0) = embedding, dh/dt = f(h, t) on [opt.t0, opt.t1],
  // logits = readout(h(t1)) into rc.logits. h receives h(t1) (B,T,C).
  SolveResult<S> ode_forward(const TokenBatch& tokens, const SolveOptions& opt, Buffer<S>& h,
                             ReadoutCache<S>& rc) const;

  // The same solve, differentiated: the mean cross-entropy of readout(h(t1))
  // against targets, grads (model layout) += dL/dtheta by the chosen method.
  // Returns the loss (NaN if the forward solve failed: see stats.status).
  // With regularisers in gopt (kinetic, jacobian) the gradient is that of
  // loss + kinetic * R_K + jacobian * R_J; R_K and R_J are in stats.
  // The logits are left in w.readout.logits (B*T, V).
  // dh0, if non-null, receives dL/dh(0) (B,T,C).
  S ode_loss_and_grad(const TokenBatch& tokens, const TokenBatch& targets, const SolveOptions& opt,
                      const GradOptions& gopt, S* grads, GradStats& stats, OdeWork<S>& w,
                      S* dh0 = nullptr) const;
  // From a given h(0); no embedding gradient.
  S ode_loss_and_grad_from(const S* h0, const TokenBatch& targets, const SolveOptions& opt,
                           const GradOptions& gopt, S* grads, GradStats& stats, OdeWork<S>& w,
                           S* dh0 = nullptr) const;

  // Ouro's learned exit gate on `loop K` (the config must have exit_gate):
  // lambda_t = sigmoid(w . LN_f(h_t) + b) per token for t < K;
  // p(t) = lambda_t prod_{j<t} (1 - lambda_j), p(K) = prod_{j<K} (1 - lambda_j);
  // loss = mean over scored tokens of sum_t p(t) L_t - beta H(p), L_t the token's
  // cross-entropy at loop t. grads += its exact gradient. Also returns, per call,
  // the mean expected exit depth sum_t t p(t) in *mean_depth if non-null.
  S loop_gate_loss_and_grad(const TokenBatch& tokens, const TokenBatch& targets, int K, double beta, S* grads,
                            LoopWork<S>& w, double* mean_depth = nullptr) const;

  // Per-token early exit on `loop K`: each token takes its logits at its exit loop.
  // rule "q": the first t where the gate's cumulative exit probability reaches
  // threshold; rule "delta": the first t where ||h_t - h_{t-1}|| < threshold
  // (K if never). logits (B*T, V), depth (B*T) in 1..K.
  void loop_exit(const TokenBatch& tokens, int K, const std::string& rule, double threshold, Buffer<S>& logits,
                 std::vector<int>& depth, LoopWork<S>& w) const;

  // Where the ODE-depth paths (ode_forward, ode_loss_and_grad and the FieldSystems
  // they build) evaluate the field: cpu (the Field on the cpu backend) or cuda (the Field on the CUDA
  // backend). Throws Error when the device cannot run here (require_device).
  void set_device(Device d);
  Device device() const { return device_; }
  // The device field (null on cpu), for FieldSystems built outside the model.
  const Field<S>* device_field() const { return device_field_.get(); }
  // set_device with the reference backend: the Field on its ops, on the host (the CI's stand-in
  // for a GPU, and a check of the device path against the CPU one).
  void set_backend(std::shared_ptr<Backend<S>> backend);
  // The backend of the device field (null on cpu).
  const std::shared_ptr<Backend<S>>& backend() const { return backend_; }
  // Training on a device: the field's parameters as the optimiser keeps them there
  // (`device_params`: field_params()'s values, current whenever a loss runs), and where
  // the gradients that stay on the device are added (`device_grads`: the field's range of
  // the optimiser's gradient). The ODE and loop losses then neither upload the parameters
  // nor download the field's gradient (the regularisers' path still adds to the host's).
  // Null: off. Set again after set_device or set_backend, which turn it off.
  void set_device_training(const S* device_params, S* device_grads);

  ModelConfig cfg;
  ParamLayout layout;
  Field<S> field;            // the recurrent core
  Field<S> prelude, coda;    // the layers run once before and after it (on the cpu backend)
  Buffer<S> params;

 private:
  // The solve of w.h (B,T,C) in place under opt, differentiated by gopt (w.grad keeps it
  // for grad_backward); on a device, resident: the states cross once each way. Returns the
  // forward's result (with the step states when opt saves them).
  const SolveResult<S>& grad_forward(int B, int T, const SolveOptions& opt, const GradOptions& gopt,
                                     OdeWork<S>& w) const;
  // Its backward: w.gy1 = dL/dh(t1) and, for a fixed-step solve, steps (N+1, B,T,C; host;
  // may be null) dL/dh at every state in; w.gy0 = dL/dh(t0) out; the field's gradient added
  // to field_grads (host), or to the trainer's device gradient.
  const GradStats& grad_backward(OdeWork<S>& w, const S* steps, S* field_grads) const;

  Device device_ = Device::cpu;
  std::shared_ptr<Backend<S>> backend_;
  std::shared_ptr<Field<S>> device_field_;
  const S* train_params_ = nullptr;  // set_device_training
  S* train_grads_ = nullptr;
};

}  // namespace flowloop
