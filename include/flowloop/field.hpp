// flowloop/field.hpp: the looped unit as a vector field,
//   S(h) = Block_L(...Block_1(h)),   f(h, t) = S(h) - h        (model-spec.md)
// with its exact vjp with respect to h and to the parameters.
//
// The interface is backend-neutral: plain pointers and sizes. `params` and
// `dparams` point at the field's own parameters: the range [field_begin,
// field_end) of the model's flat buffer (ParamLayout), num_params() values.
//
// Gradient rule: vjp ACCUMULATES: dh += (df/dh)^T g, dparams += (df/dtheta)^T g.
// With param_stride > 0 the parameter gradient of sequence b goes to
// dparams + b * param_stride instead of the sum over the batch (the per-sequence
// parameter adjoints of a per-sequence adaptive solve).
//
// Workspaces are sized once per (B, T) by resize() and reused: nothing is
// allocated inside forward() or vjp().
#pragma once

#include <vector>

#include "flowloop/config.hpp"
#include "flowloop/params.hpp"
#include "flowloop/tensor.hpp"

namespace flowloop {

// Activations of one block, written by the forward and read by the vjp.
template <class S>
struct BlockCache {
  Buffer<S> x;            // (B,T,C)  block input
  Buffer<S> ln1;          // (B,T,C)
  Buffer<S> mean1, rstd1; // (B,T)
  Buffer<S> qkv;          // (B,T,3C)
  Buffer<S> att;          // (B,NH,T,T) attention probabilities
  Buffer<S> y;            // (B,T,C)  attention output before c_proj
  Buffer<S> x2;           // (B,T,C)  x + a
  Buffer<S> ln2;          // (B,T,C)
  Buffer<S> mean2, rstd2; // (B,T)
  Buffer<S> z;            // (B,T,F)  c_fc output (GELU input)
  Buffer<S> g;            // (B,T,F)  GELU output
};

// Everything one field evaluation leaves behind for its vjp.
// Sized for up to `capacity` sequences of length T; a forward on fewer
// sequences (the active ones of a per-sequence adaptive solve) uses a prefix.
template <class S>
struct FieldCache {
  int capacity = 0, T = 0;
  int B = 0;                          // sequences in the last forward
  std::vector<BlockCache<S>> blocks;  // L
  void resize(const ModelConfig& cfg, int capacity, int T);
  size_t bytes() const;
};

// Scratch of the vjp (one per thread of control, reused across calls).
template <class S>
struct FieldGradWork {
  int B = 0, T = 0;
  Buffer<S> dx, dx2, dtmp, dcarry, dqkv, datt, dz, dg;
  void resize(const ModelConfig& cfg, int B, int T);
};

template <class S>
class Field {
 public:
  Field(const ModelConfig& cfg, const ParamLayout& layout);

  // f = S(h) - h at time t (the default field is autonomous and ignores t).
  // h and f may not alias. cache must be sized for T and at least B sequences.
  void forward(S* f /*(B,T,C)*/, const S* h /*(B,T,C)*/, double t, const S* params, int B, int T,
               FieldCache<S>& cache) const;

  // dh += (df/dh)^T gf;  dparams += (df/dtheta)^T gf, for the evaluation recorded
  // in `cache` (its forward must have used the same params).
  void vjp(S* dh /*(B,T,C)*/, S* dparams, const S* gf /*(B,T,C)*/, const S* params,
           const FieldCache<S>& cache, FieldGradWork<S>& work, size_t param_stride = 0) const;

  size_t num_params() const { return num_params_; }

  // FLOPs of one evaluation, counted as model-spec.md says.
  double flops(int B, int T) const;

  const ModelConfig& config() const { return cfg_; }

 private:
  void block_forward(S* out, const S* x, const S* params, const BlockOffsets& o, int B, int T,
                     BlockCache<S>& c) const;
  void block_vjp(S* dx, S* dparams, const S* dout, const S* params, const BlockOffsets& o, int B,
                 int T, const BlockCache<S>& c, FieldGradWork<S>& w, size_t stride) const;
  ModelConfig cfg_;
  std::vector<BlockOffsets> blocks_;  // relative to the field's first parameter
  size_t num_params_ = 0;
};

}  // namespace flowloop
