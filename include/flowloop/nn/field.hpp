// flowloop/nn/field.hpp: the looped unit as a vector field,
//   S(h) = Block_L(...Block_1(h)),   f(h, t) = S(h) - h        (model-spec.md)
// with its exact vjp with respect to h and to the parameters.
//
// With config time_cond the blocks are modulated by adaLN from a sinusoidal
// embedding of each sequence's time t_b (model-spec.md, "The time-conditioned
// field"):
//   e_b = [cos(tau_b freq), sin(tau_b freq)],  tau_b = t_b time_scale        (B,E)
//   c_b = W_t2 silu(W_t1 e_b + b_t1) + b_t2                                  (B,C)
//   [s1, c1, g1, s2, c2, g2] = split6(W_ada silu(c_b) + b_ada)   per block   (B,6C)
//   a = (1 + g1) Attn(LN1(x) (1 + c1) + s1),  m = (1 + g2) MLP(LN2(x + a) (1 + c2) + s2)
// With zero ada and time_embed tensors it computes, bit for bit, the autonomous field.
// With step_cond the step d_b of each sequence is embedded as t_b is and added:
//   c_b = TE(t_b) + SE(d_b),  SE = step_embed's MLP of the same sinusoid of d_b time_scale
// (shortcut models); zero step_embed tensors give the time-conditioned field's values.
//
// The field is one composition of network ops (nn/ops.hpp), written once with its vjp
// beside it: a Field runs on the backend it is built on, the cpu backend (the fused
// Eigen/OpenBLAS layers) unless told. Tensors (h, f, params, caches) are arrays of that
// backend's memory; the per-sequence times t, steps d and time gradients dt are host
// arrays (a few values per call: the sinusoid of t is taken on the host, in double).
// `params` and `dparams` point at the field's own parameters: the range [field_begin,
// field_end) of the model's flat buffer (ParamLayout), num_params() values (time_embed and
// ada included).
//
// Gradient rule: vjp ACCUMULATES: dh += (df/dh)^T g, dparams += (df/dtheta)^T g,
// and, when asked, dt[b] += d(g . f)/dt_b (zero for the autonomous field).
// With param_stride > 0 the parameter gradient of sequence b goes to
// dparams + b * param_stride instead of the sum over the batch (the per-sequence
// parameter adjoints of a per-sequence adaptive solve).
//
// Workspaces are sized once per (B, T) by resize() and reused: nothing is
// allocated inside forward() or vjp().
#pragma once

#include <string>
#include <vector>

#include "flowloop/backend/backend.hpp"
#include "flowloop/nn/config.hpp"
#include "flowloop/nn/params.hpp"
#include "flowloop/core/tensor.hpp"

namespace flowloop {

// Activations of one block, written by the forward and read by the vjp. A llama block keeps
// RMSNorm's outputs in ln1, ln2 (no mean), q and k after their rotation in qkv (B,T,W), the
// attention's output in y (B,T,NH D), [gate | up] in z (B,T,2F) and silu(gate) up in g.
template <class S>
struct BlockCache {
  Array<S> x;             // (B,T,C)  block input
  Array<S> ln1;           // (B,T,C)
  Array<S> mean1, rstd1;  // (B,T)
  Array<S> qkv;           // (B,T,3C)
  Array<S> att;           // (B,NH,T,T) attention probabilities
  Array<S> y;             // (B,T,C)  attention output before c_proj
  Array<S> x2;            // (B,T,C)  x + a
  Array<S> ln2;           // (B,T,C)
  Array<S> mean2, rstd2;  // (B,T)
  Array<S> z;             // (B,T,F)  c_fc output (GELU input)
  Array<S> g;             // (B,T,F)  GELU output
  // time_cond only (empty otherwise):
  Array<S> ada;           // (B,6C)   [s1, c1, g1, s2, c2, g2] per sequence
  Array<S> u1;            // (B,T,C)  LN1(x) (1 + c1) + s1, the attention's input
  Array<S> ao;            // (B,T,C)  attention branch before its gate
  Array<S> u2;            // (B,T,C)  LN2(x2) (1 + c2) + s2, the MLP's input
  Array<S> mo;            // (B,T,C)  MLP branch before its gate
};

// Everything one field evaluation leaves behind for its vjp, in one backend's memory.
// Sized for up to `capacity` sequences of length T; a forward on fewer sequences (the
// active ones of a per-sequence adaptive solve) uses a prefix.
template <class S>
struct FieldCache {
  int capacity = 0, T = 0;
  std::string arch;  // the block the arrays are sized for
  bool core_norm = false;
  Array<S> pre_norm, norm_rstd;  // core_norm: the core's output before its norm (B,T,C), 1/rms (B,T)
  int B = 0;  // sequences in the last forward
  bool time_cond = false, step_cond = false;
  Memory<S>* memory = nullptr;        // where the arrays live
  std::vector<BlockCache<S>> blocks;  // L
  // time_cond: the time embedding's sinusoid e (B,E), W_t1 e + b_t1 and its silu (B,C),
  // c_b and silu(c_b) (B,C, the input of every ada); e also kept on the host as uploaded
  Array<S> e, z1, a1, c, sc;
  // step_cond: the step embedding's sinusoid, W_s1 e + b_s1, its silu, and its output
  Array<S> se, sz1, sa1, sc_step;
  Buffer<S> e_host, se_host;
  // Sizes the arrays in `mem` (the field's backend); without it, the cpu backend's.
  void resize(Memory<S>& mem, const ModelConfig& cfg, int cap, int len);
  void resize(const ModelConfig& cfg, int cap, int len) { resize(cpu_backend<S>(), cfg, cap, len); }
  size_t bytes() const;
};

// Scratch of the vjp (one per thread of control, reused across calls), sized by the vjp.
template <class S>
struct FieldGradWork {
  int B = 0, T = 0;
  std::string arch;
  Array<S> dnorm;  // core_norm: dL/d(the core's output before its norm)
  bool time_cond = false;
  Memory<S>* memory = nullptr;
  Array<S> dx, dx2, dtmp, dcarry, dqkv, datt, dz, dg;
  // time_cond only: a gated branch's gradient before its gate (B,T,C), one block's
  // modulation gradient (B,6C), those of silu(c), c, silu(z1), z1 (B,C) and of e (B,E)
  Array<S> dgated, dada, dsc, dc, da1, dz1, de;
  Buffer<S> de_host;
  void resize(Memory<S>& mem, const ModelConfig& cfg, int rows, int len);
  void resize(const ModelConfig& cfg, int rows, int len) { resize(cpu_backend<S>(), cfg, rows, len); }
};

// The field's tensors as offsets from its first parameter (layout.field_begin()), and
// how many parameters it has.
struct FieldOffsets {
  std::vector<BlockOffsets> blocks;   // n_block
  size_t norm = 0;                    // core_norm's weight
  TimeEmbedOffsets time, step;        // time_cond, step_cond
  size_t num_params = 0;
};
FieldOffsets field_offsets(const ModelConfig& cfg, const ParamLayout& layout, FieldPart part = FieldPart::core);
// The config of one stack of blocks: the model's for the core; for the prelude and the coda,
// n_block their count and no time or step conditioning (they run once, at no time).
ModelConfig part_config(const ModelConfig& cfg, FieldPart part);
// The attention heads of a config's blocks.
AttnShape attn_shape(const ModelConfig& cfg);
// The checks every forward makes of its call (`who` names it in the Error): T within the
// context, t given to a time-conditioned field, d only to a step-conditioned one.
void check_field_call(const char* who, const ModelConfig& cfg, int T, const double* t, const double* d);

// The time embedding's sinusoid, shared by every backend (computed on the host):
//   e_b = [cos(tau_b freq), sin(tau_b freq)],  tau_b = t_b time_scale  (t null: t = 0)
// freq = sinusoid_frequencies(E) = exp(-ln(10000) k / (E/2)), k < E/2. Phases in double;
// in float, reduced to [-pi, pi] in double and then taken in float, vectorised, with the
// same bits on every x86 machine.
std::vector<double> sinusoid_frequencies(int E);
template <class S>
void sinusoid_embedding(S* e /*(B,E)*/, const double* t /*(B)*/, int B, int E, double time_scale,
                        const double* freq);
// dt[b] += d(de . e_b)/dt_b given de = dL/de (B,E): de/dtau = [-freq sin, freq cos].
template <class S>
void sinusoid_time_grad(double* dt, const S* e /*(B,E)*/, const S* de /*(B,E)*/, int B, int E, double time_scale,
                        const double* freq);

template <class S>
class Field {
 public:
  // On the cpu backend, or on `ops` (which must outlive the field).
  // `part` picks the stack of blocks (the core, the field proper, unless told): a prelude or
  // coda Field computes f(h) = stack(h) - h likewise, its params the part's range.
  Field(const ModelConfig& cfg, const ParamLayout& layout, FieldPart part = FieldPart::core)
      : Field(cpu_backend<S>(), cfg, layout, part) {}
  Field(NetOps<S>& ops, const ModelConfig& cfg, const ParamLayout& layout, FieldPart part = FieldPart::core);

  // f = S_t(h) - h, sequence b at time t[b]. The autonomous field ignores t
  // (which may then be null); a time-conditioned one needs it. A step-conditioned
  // field takes sequence b's step d[b] (null: every d is 0, the instantaneous
  // velocity); other fields refuse a non-null d.
  // h and f may not alias. cache must be sized, in this field's memory, for T and at
  // least B sequences.
  void forward(S* f /*(B,T,C)*/, const S* h /*(B,T,C)*/, const double* t /*(B), host*/, const S* params,
               int B, int T, FieldCache<S>& cache, const double* d /*(B), host*/ = nullptr) const;

  // dh += (df/dh)^T gf;  dparams += (df/dtheta)^T gf;  if dt (host) is non-null,
  // dt[b] += d(gf . f)/dt_b; for the evaluation recorded in `cache` (its forward
  // must have used the same params).
  void vjp(S* dh /*(B,T,C)*/, S* dparams, const S* gf /*(B,T,C)*/, const S* params,
           const FieldCache<S>& cache, FieldGradWork<S>& work, size_t param_stride = 0,
           double* dt /*(B), host*/ = nullptr) const;

  size_t num_params() const { return num_params_; }

  // FLOPs of one evaluation, counted as model-spec.md says.
  // The time embedding's and the modulations' products count; the modulation's
  // element-wise work is free.
  double flops(int B, int T) const;

  // The stack's config (part_config of the model's): size caches with it.
  const ModelConfig& config() const { return cfg_; }
  FieldPart part() const { return part_; }
  // The ops (and memory) the field runs on.
  NetOps<S>& backend() const { return ops_; }

 private:
  void block_forward(S* out, const S* x, const S* P, const BlockOffsets& o, int B, int T, FieldCache<S>& cache,
                     BlockCache<S>& c) const;
  void block_vjp(S* dx, S* dP, const S* dout, const S* P, const BlockOffsets& o, int B, int T,
                 const FieldCache<S>& cache, const BlockCache<S>& c, FieldGradWork<S>& w, size_t stride) const;
  void llama_forward(S* out, const S* x, const S* P, const BlockOffsets& o, int B, int T, BlockCache<S>& c) const;
  void llama_vjp(S* dx, S* dP, const S* dout, const S* P, const BlockOffsets& o, int B, int T,
                 const BlockCache<S>& c, FieldGradWork<S>& w, size_t stride) const;
  void embed_forward(S* e, Buffer<S>& e_host, S* z1, S* a1, S* out, const double* t, const TimeEmbedOffsets& o,
                     const S* P, int B) const;
  void embed_vjp(S* de, S* dP, const TimeEmbedOffsets& o, const S* P, int B, const S* e, const S* z1, const S* a1,
                 FieldGradWork<S>& w, size_t stride) const;
  // The block's norm's vjp, LayerNorm (gpt2) or RMSNorm (llama: no bias, no mean): its input
  // gradient once, its parameters' summed or per sequence; with a modulation scale (B,C) of
  // row stride ld (gpt2), dout is the gradient of LN (1 + scale) + shift.
  void norm_bwd(S* din, S* dP, size_t ow, size_t ob, const S* dout, const S* in, const S* w, const S* mean,
                     const S* rstd, int B, int T, size_t stride, const S* scale, S* scratch) const;

  NetOps<S>& ops_;
  ModelConfig cfg_;
  FieldPart part_ = FieldPart::core;
  size_t norm_ = 0;  // core_norm's weight, relative to the field's first parameter
  std::vector<BlockOffsets> blocks_;  // relative to the field's first parameter
  TimeEmbedOffsets time_;             // relative to the field's first parameter (time_cond)
  TimeEmbedOffsets step_;             // the same for step_embed (step_cond)
  std::vector<double> freq_;          // (E/2) exp(-ln(10000) k / (E/2))
  size_t num_params_ = 0;
};

}  // namespace flowloop
