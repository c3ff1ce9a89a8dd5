// flowloop/nn/layers.hpp: the GPT-2 layers of model-spec.md, each forward followed
// by its vector-Jacobian product (vjp): the fused host implementations behind the cpu
// backend's network ops (nn/ops.hpp), which the block composition calls.
//
// Argument order: outputs, then inputs, then sizes. All tensors are row-major
// plain buffers; shapes in comments use B, T, C, NH, D, F, V and N = B*T rows.
//
// Gradient rule, for every *_backward here: gradients ACCUMULATE (+=), both
// parameter gradients (dw, db, dW, dwte, ...) and activation gradients (din,
// dqkv, ...), except modulate_backward's and gate_backward's din, which are written
// (=), and attention_backward's datt, which is scratch. Callers zero a gradient buffer
// before its first contribution.
// A null pointer for an activation gradient skips that part of the work (and for
// LayerNorm, null dw and db skip the parameter gradients).
//
// Forward caches (LayerNorm's mean and 1/std, attention probabilities) are
// written by the forward into caller-owned buffers and read by the backward:
// layers hold no state.
#pragma once

#include <cstdint>

#include "flowloop/nn/ops.hpp"

namespace flowloop {

// out[b,t,:] = wte[tokens[b,t], :] + wpe[t, :] (wpe null: no learned positions; dwpe likewise).
// Tokens must be in [0, V).
template <class S>
void embedding_forward(S* out /*(B,T,C)*/, const int32_t* tokens /*(B,T)*/,
                       const S* wte /*(V,C)*/, const S* wpe /*(Tmax,C)*/, int B, int T, int C);
template <class S>
void embedding_backward(S* dwte /*(V,C)*/, S* dwpe /*(Tmax,C)*/, const S* dout /*(B,T,C)*/,
                        const int32_t* tokens /*(B,T)*/, int B, int T, int C);

// LN(u) = (u - mean) / sqrt(var + 1e-5) * w + b, biased variance over C.
template <class S>
void layernorm_forward(S* out /*(N,C)*/, S* mean /*(N)*/, S* rstd /*(N)*/, const S* in /*(N,C)*/,
                       const S* w /*(C)*/, const S* b /*(C)*/, int N, int C);
template <class S>
void layernorm_backward(S* din /*(N,C)*/, S* dw /*(C)*/, S* db /*(C)*/, const S* dout /*(N,C)*/,
                        const S* in /*(N,C)*/, const S* w /*(C)*/, const S* mean /*(N)*/,
                        const S* rstd /*(N)*/, int N, int C);
// The same where LN's output was modulated, u = LN (1 + scale) + shift: dout is
// dL/du and row n's dL/dLN is dout (1 + scale of sequence n / T), formed on the fly
// (scale (B,C) with row stride ld). A zero scale gives layernorm_backward's bits.
template <class S>
void layernorm_backward_scaled(S* din /*(N,C)*/, S* dw /*(C)*/, S* db /*(C)*/, const S* dout /*(N,C)*/,
                               const S* scale, int T, int ld, const S* in /*(N,C)*/, const S* w /*(C)*/,
                               const S* mean /*(N)*/, const S* rstd /*(N)*/, int N, int C);

// out = in W^T + b (torch.nn.Linear; W stored (OUT, IN)); b may be null.
template <class S>
void linear_forward(S* out /*(N,OUT)*/, const S* in /*(N,IN)*/, const S* W /*(OUT,IN)*/,
                    const S* b /*(OUT)*/, int N, int IN, int OUT);
template <class S>
void linear_backward(S* din /*(N,IN)*/, S* dW /*(OUT,IN)*/, S* db /*(OUT)*/,
                     const S* dout /*(N,OUT)*/, const S* in /*(N,IN)*/, const S* W /*(OUT,IN)*/,
                     int N, int IN, int OUT);
// db[o] += sum over n of dout[n, o], each column summed in n order (the same bits
// whatever the buffers' alignment): a Linear's bias gradient.
template <class S>
void column_sums(S* db /*(OUT)*/, const S* dout /*(N,OUT)*/, int N, int OUT);
// The same product for a few rows N (per-sequence vectors such as the time
// embedding and the adaLN modulation): W is read once and not packed. Results
// agree with linear_forward to rounding, not bit for bit.
template <class S>
void linear_forward_few(S* out /*(N,OUT)*/, const S* in /*(N,IN)*/, const S* W /*(OUT,IN)*/,
                        const S* b /*(OUT)*/, int N, int IN, int OUT);
// Its backward (linear_backward's accumulation: din += dout W, dW += dout^T in,
// db += column sums of dout; null din or db skips it), W and dW read once.
template <class S>
void linear_backward_few(S* din /*(N,IN)*/, S* dW /*(OUT,IN)*/, S* db /*(OUT)*/, const S* dout /*(N,OUT)*/,
                         const S* in /*(N,IN)*/, const S* W /*(OUT,IN)*/, int N, int IN, int OUT);

// Causal self-attention core (no projections) with the heads of an AttnShape (grouped-query
// when NKV < NH): qkv rows [q | k | v] of a.width(), out rows of a.q_width().
template <class S>
void attention_forward(S* out, S* att /*(B,NH,T,T)*/, const S* qkv, int B, int T, const AttnShape& a);
template <class S>
void attention_backward(S* dqkv, S* datt, const S* dout, const S* qkv, const S* att, int B, int T, const AttnShape& a);
// Causal multi-head self-attention core (no projections), AttnShape::mha(C, NH):
//   q, k, v = split(qkv) viewed (B,NH,T,D); att = softmax(q k^T / sqrt(D) + mask);
//   out = att v viewed back to (B,T,C).
// att receives the probabilities (upper triangle zero) and is the backward's cache.
template <class S>
void attention_forward(S* out /*(B,T,C)*/, S* att /*(B,NH,T,T)*/, const S* qkv /*(B,T,3C)*/,
                       int B, int T, int C, int NH);
// datt is scratch of the same shape as att (overwritten, not a gradient output).
template <class S>
void attention_backward(S* dqkv /*(B,T,3C)*/, S* datt /*(B,NH,T,T)*/, const S* dout /*(B,T,C)*/,
                        const S* qkv /*(B,T,3C)*/, const S* att /*(B,NH,T,T)*/, int B, int T,
                        int C, int NH);

// gelu_tanh(z) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), element-wise.
template <class S>
void gelu_forward(S* out /*(N)*/, const S* in /*(N)*/, int64_t N);
template <class S>
void gelu_backward(S* din /*(N)*/, const S* dout /*(N)*/, const S* in /*(N)*/, int64_t N);

// silu(z) = z sigmoid(z), element-wise.
template <class S>
void silu_forward(S* out /*(N)*/, const S* in /*(N)*/, int64_t N);
template <class S>
void silu_backward(S* din /*(N)*/, const S* dout /*(N)*/, const S* in /*(N)*/, int64_t N);

// adaLN modulation (model-spec.md, time-conditioned field), with per-sequence
// vectors broadcast over T. shift, scale and gate are (B,C) with row stride ld
// (views into the (B,6C) modulation rows).
//   modulate:  out = in (1 + scale) + shift
template <class S>
void modulate_forward(S* out /*(B,T,C)*/, const S* in /*(B,T,C)*/, const S* shift, const S* scale,
                      int B, int T, int C, int ld);
// din = dout (1 + scale) (written, not added);  dshift += sum_t dout;
// dscale += sum_t dout in. Null din skips the input gradient.
template <class S>
void modulate_backward(S* din /*(B,T,C)*/, S* dshift, S* dscale, const S* dout /*(B,T,C)*/,
                       const S* in /*(B,T,C)*/, const S* scale, int B, int T, int C, int ld);
//   gated residual:  out = res + (1 + gate) in
// (with gate = 0 this is res + in, rounded once, whatever the order)
template <class S>
void gate_forward(S* out /*(B,T,C)*/, const S* res /*(B,T,C)*/, const S* in /*(B,T,C)*/,
                  const S* gate, int B, int T, int C, int ld);
// din = dout (1 + gate) (written, not added);  dgate += sum_t dout in. (The
// residual's gradient is dout itself, left to the caller.)
template <class S>
void gate_backward(S* din /*(B,T,C)*/, S* dgate, const S* dout /*(B,T,C)*/, const S* in /*(B,T,C)*/,
                   const S* gate, int B, int T, int C, int ld);

// Mean cross-entropy of softmax(logits) against targets over the rows whose
// target is not -1 (targets must be -1 or in [0, V)). Returns the mean loss
// (0 when no row counts) and, if dlogits is non-null, adds its gradient.
template <class S>
S crossentropy_forward_backward(S* dlogits /*(N,V)*/, const S* logits /*(N,V)*/,
                                const int32_t* targets /*(N)*/, int N, int V);

}  // namespace flowloop
