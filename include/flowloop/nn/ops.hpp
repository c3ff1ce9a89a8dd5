// flowloop/nn/ops.hpp: the network ops, the one interface that every block composition
// (nn/field.hpp) is written against. A backend implements each op once:
//   - "cpu" (cpu_backend()): host memory, the fused Eigen/OpenBLAS layers of layers.hpp;
//     the fast path, and every CPU command's;
//   - "reference" (host_backend(), make_backend(Device::cpu)): host memory, each op a loop
//     over the bodies of kernels.hpp (one row or one element at a time, the CUDA kernels'
//     own) and the library's GEMM: the CUDA backend's twin, which CI runs;
//   - "cuda" (FLOWLOOP_CUDA builds): device memory, the kernels of cuda/ and cuBLAS, every
//     op on the backend's stream.
// Two kinds of op:
//   - primitives (pure virtual): products, bias and column sums, activations, LayerNorm,
//     RMSNorm, rotary position embeddings, the causal softmax, adaLN's modulation and gates;
//   - composites (virtual, with a default written over the primitives): Linear layers,
//     per-sequence vector Linears, causal attention, the modulated LayerNorm's vjp. A
//     backend that has a fused version overrides one (the cpu backend overrides them all).
// A new layer (RMSNorm, rotary embeddings, grouped-query attention) is one more op here
// and one implementation per backend, never a new block.
//
// Gradient rule: every *_backward ACCUMULATES (+=) into its gradients, parameter and
// activation alike, except those marked (=): modulate_backward's and gate_backward's
// din are written, and attention_backward's datt is scratch. A null gradient pointer
// skips that gradient (rotary's transpose is the vjp, in place). Shapes use B, T, C, NH, D, F
// and N = B*T rows; row-major.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "flowloop/ode/state_ops.hpp"

namespace flowloop {

// What rotary asks of its shape, every backend alike: an Error naming the value otherwise.
inline void check_rotary_shape(int H, int D, int rot, double theta) {
  if (H < 1 || D < 1 || rot < 2 || rot > D || rot % 2 != 0)
    throw Error("rotary: the rotated dims (" + std::to_string(rot) + ") must be even, at least 2 and at most the head's " +
                std::to_string(D));
  if (!(theta > 1.0) || !std::isfinite(theta)) throw Error("rotary: theta must be finite and above 1, not " + std::to_string(theta));
}

// The heads of a causal self-attention: NH query heads and NKV key/value heads (NKV divides
// NH; query head h reads key/value head h / (NH / NKV): grouped-query attention, multi-head
// when NKV = NH), each of D values. A row of qkv is [q (NH D) | k (NKV D) | v (NKV D)]; a row
// of the output y is NH D values. The GPT-2 block's is {NH, NH, C / NH}: rows [q | k | v] of 3C.
struct AttnShape {
  int NH = 1, NKV = 1, D = 1;
  int group() const { return NH / NKV; }
  int64_t q_width() const { return int64_t{NH} * D; }                // also y's row
  int64_t kv_width() const { return int64_t{NKV} * D; }
  int64_t width() const { return q_width() + 2 * kv_width(); }      // a row of qkv
  int64_t k_offset() const { return q_width(); }
  int64_t v_offset() const { return q_width() + kv_width(); }
  static AttnShape mha(int C, int NH) { return {NH, NH, C / NH}; }
};
// What attention asks of its heads: an Error naming the values otherwise.
inline void check_attn_shape(const AttnShape& a) {
  if (a.NH < 1 || a.NKV < 1 || a.D < 1 || a.NH % a.NKV != 0)
    throw Error("attention: " + std::to_string(a.NKV) + " key/value heads must divide " + std::to_string(a.NH) +
                " query heads (of " + std::to_string(a.D) + " values each, all positive)");
}

template <class S>
class NetOps : public virtual StateOps<S> {
 public:
  // ---- primitives
  // For each of `batch` problems i: C_i(M,N) = alpha op(A_i) op(B_i) + beta C_i, with
  // A_i = A + i sA, B_i = B + i sB, C_i = C + i sC and tensor.hpp's gemm conventions
  // (op(A) is (M,K): A is (M,K), or (K,M) if ta).
  virtual void gemm(bool ta, bool tb, int M, int N, int K, S alpha, const S* A, int lda, int64_t sA, const S* B,
                    int ldb, int64_t sB, S beta, S* C, int ldc, int64_t sC, int batch) = 0;
  virtual void add_bias(S* out /*(N,OUT)*/, const S* b /*(OUT)*/, int N, int OUT) = 0;     // out[n] += b
  virtual void column_sums(S* out /*(OUT)*/, const S* x /*(N,OUT)*/, int N, int OUT) = 0;  // out += sum_n x[n]
  virtual void gelu_forward(S* out, const S* in, int64_t n) = 0;                  // tanh approximation
  virtual void gelu_backward(S* din, const S* dout, const S* in, int64_t n) = 0;  // din += gelu'(in) dout
  virtual void silu_forward(S* out, const S* in, int64_t n) = 0;
  virtual void silu_backward(S* din, const S* dout, const S* in, int64_t n) = 0;  // din += silu'(in) dout
  // LN(u) = (u - mean) / sqrt(var + 1e-5) w + b over C (biased variance); mean, rstd (N) cached.
  virtual void layernorm_forward(S* out, S* mean, S* rstd, const S* in, const S* w, const S* b, int N, int C) = 0;
  // din += LN^T dout; dw += sum_n dout xhat, db += sum_n dout.
  virtual void layernorm_backward(S* din, S* dw, S* db, const S* dout, const S* in, const S* w, const S* mean,
                                  const S* rstd, int N, int C) = 0;
  // SwiGLU's product (the Llama MLP's): out[n] = silu(gate[n]) up[n], F values a row; gate and
  // up rows ld apart (a fused [gate | up] product: ld 2F, up = gate + F), out (N,F).
  virtual void swiglu_forward(S* out, const S* gate, const S* up, int N, int F, int64_t ld) = 0;
  // dgate += dout up silu'(gate), dup += dout silu(gate) (rows ld apart; either may be null).
  virtual void swiglu_backward(S* dgate, S* dup, const S* dout, const S* gate, const S* up, int N, int F,
                               int64_t ld) = 0;
  // RMSNorm over C (the Llama family's): out = x / sqrt(mean(x^2) + eps) w, the mean of squares
  // in double, the weight applied after normalising; rstd (N) cached.
  virtual void rmsnorm_forward(S* out, S* rstd, const S* in, const S* w, int N, int C, double eps) = 0;
  // din += RMSNorm^T dout; dw += sum_n dout x rstd (either may be null).
  virtual void rmsnorm_backward(S* din, S* dw, const S* dout, const S* in, const S* w, const S* rstd, int N,
                                int C) = 0;
  // Rotary position embeddings, in place on x: B sequences of T positions, each position's row
  // (ld values apart) H heads of D values; position t's heads turned on their first rot dims
  // (kernels.hpp's rotary_head: rotate-half or interleaved pairs, angle t theta^(-2i/rot)).
  // transpose: the inverse turn, which is the vjp (a gradient in place, =).
  virtual void rotary(S* x, int B, int T, int H, int D, int64_t ld, int rot, double theta, bool interleaved,
                      bool transpose) = 0;
  // In place on BH (T,T) score matrices: the causal softmax of scale * scores; its vjp in place on datt.
  virtual void causal_softmax(S* att, int BH, int T, S scale) = 0;
  virtual void causal_softmax_backward(S* datt, const S* att, int BH, int T, S scale) = 0;
  // adaLN, per-sequence vectors broadcast over T (shift, scale, gate: (B, .) rows ld apart):
  //   modulate: out = in (1 + scale) + shift        gate: out = res + (1 + gate) in    (B,T,C)
  virtual void modulate_forward(S* out, const S* in, const S* shift, const S* scale, int B, int T, int C,
                                int ld) = 0;
  // din = dout (1 + scale) (=); dshift += sum_t dout; dscale += sum_t dout in
  virtual void modulate_backward(S* din, S* dshift, S* dscale, const S* dout, const S* in, const S* scale, int B,
                                 int T, int C, int ld) = 0;
  virtual void gate_forward(S* out, const S* res, const S* in, const S* gate, int B, int T, int C, int ld) = 0;
  // din = (1 + gate) dout (=); dgate += sum_t dout in (the residual's gradient is dout itself)
  virtual void gate_backward(S* din, S* dgate, const S* dout, const S* in, const S* gate, int B, int T, int C,
                             int ld) = 0;
  // The gate of a branch already summed onto its residual: on entry out = res + m (rounded
  // once); writes mo = out - res (m, within one rounding) and then out += gate mo. A zero
  // gate leaves out's bits, so a zero modulation gives the ungated block's bits.
  virtual void gate_sum_forward(S* out, S* mo, const S* res, const S* gate, int B, int T, int C, int ld) = 0;

  // ---- composites (defaults over the primitives; fused overrides where a backend has them)
  // out = in W^T + b (torch.nn.Linear, W stored (OUT,IN); b may be null); accumulate: out += in W^T + b.
  virtual void linear_forward(S* out /*(N,OUT)*/, const S* in /*(N,IN)*/, const S* W /*(OUT,IN)*/,
                              const S* b /*(OUT)*/, int N, int IN, int OUT, bool accumulate = false);
  // din += dout W; dW += dout^T in, db += column sums of dout: over all B * rows rows, or
  // (stride > 0) sequence b's rows [b rows, (b+1) rows) into dW + b stride and db + b stride.
  virtual void linear_backward(S* din /*(B*rows,IN)*/, S* dW /*(OUT,IN)*/, S* db /*(OUT)*/,
                               const S* dout /*(B*rows,OUT)*/, const S* in /*(B*rows,IN)*/, const S* W, int B,
                               int rows, int IN, int OUT, size_t stride = 0);
  // The same Linear for one row per sequence (the time embedding, the adaLN modulation):
  // a backend may stream W once instead of packing it. Values agree with linear_forward's
  // to rounding.
  virtual void vector_linear_forward(S* out /*(B,OUT)*/, const S* in /*(B,IN)*/, const S* W, const S* b, int B,
                                     int IN, int OUT);
  virtual void vector_linear_backward(S* din /*(B,IN)*/, S* dW, S* db, const S* dout /*(B,OUT)*/,
                                      const S* in /*(B,IN)*/, const S* W, int B, int IN, int OUT,
                                      size_t stride = 0);
  // Causal self-attention (no projections), heads as AttnShape says: q, k, v = split(qkv)
  // viewed (B,NH,T,D) and (B,NKV,T,D), att = softmax(q k^T / sqrt(D) + mask) (the vjp's cache,
  // upper triangle zero), y = att v viewed (B,T,NH D).
  virtual void attention_forward(S* y /*(B,T,NH D)*/, S* att /*(B,NH,T,T)*/, const S* qkv /*(B,T,width)*/, int B,
                                 int T, const AttnShape& a);
  // dqkv += the vjp of y (a key/value head's gradient sums over its group); datt is scratch
  // of att's shape (=).
  virtual void attention_backward(S* dqkv /*(B,T,width)*/, S* datt, const S* dy /*(B,T,NH D)*/, const S* qkv,
                                  const S* att, int B, int T, const AttnShape& a);
  // layernorm_backward where LN's output was modulated, u = LN (1 + scale) + shift: dout is
  // dL/du, and row n's dL/dLN is dout (1 + scale of sequence n / T) (scale (B,C) rows ld
  // apart). scratch (N,C) may be used for that product (=). A zero scale gives
  // layernorm_backward's bits.
  virtual void layernorm_backward_scaled(S* din, S* dw, S* db, const S* dout, const S* scale, int T, int ld,
                                         const S* in, const S* w, const S* mean, const S* rstd, int N, int C,
                                         S* scratch);
};

}  // namespace flowloop
