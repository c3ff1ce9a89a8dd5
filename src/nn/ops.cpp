// The composite network ops' defaults, written over the primitives (nn/ops.hpp): what the
// reference and CUDA backends run; the cpu backend overrides each with a fused version.
#include "flowloop/nn/ops.hpp"

#include <cmath>

namespace flowloop {

template <class S>
void NetOps<S>::linear_forward(S* out, const S* in, const S* W, const S* b, int N, int IN, int OUT, bool accumulate) {
  gemm(false, true, N, OUT, IN, S(1), in, IN, 0, W, IN, 0, accumulate ? S(1) : S(0), out, OUT, 0, 1);
  if (b) add_bias(out, b, N, OUT);
}

template <class S>
void NetOps<S>::linear_backward(S* din, S* dW, S* db, const S* dout, const S* in, const S* W, int B, int rows, int IN,
                                int OUT, size_t stride) {
  const int N = B * rows;
  if (din) gemm(false, false, N, IN, OUT, S(1), dout, OUT, 0, W, IN, 0, S(1), din, IN, 0, 1);
  if (stride == 0) {
    if (dW) gemm(true, false, OUT, IN, N, S(1), dout, OUT, 0, in, IN, 0, S(1), dW, IN, 0, 1);
    if (db) column_sums(db, dout, N, OUT);
    return;
  }
  // one product per sequence: batched, the sequences' gradients `stride` apart
  if (dW)
    gemm(true, false, OUT, IN, rows, S(1), dout, OUT, static_cast<int64_t>(rows) * OUT, in, IN,
         static_cast<int64_t>(rows) * IN, S(1), dW, IN, static_cast<int64_t>(stride), B);
  if (db)
    for (int s = 0; s < B; ++s)
      column_sums(db + static_cast<size_t>(s) * stride, dout + static_cast<size_t>(s) * rows * OUT, rows, OUT);
}

template <class S>
void NetOps<S>::vector_linear_forward(S* out, const S* in, const S* W, const S* b, int B, int IN, int OUT) {
  linear_forward(out, in, W, b, B, IN, OUT);
}

template <class S>
void NetOps<S>::vector_linear_backward(S* din, S* dW, S* db, const S* dout, const S* in, const S* W, int B, int IN,
                                       int OUT, size_t stride) {
  linear_backward(din, dW, db, dout, in, W, B, 1, IN, OUT, stride);
}

// Per sequence and key/value head, its group's query heads as one strided batch (the key and
// value read with stride 0); multi-head attention is one batch of NH heads a sequence.
// The key/value gradients add over the group's heads one head at a time (a batch could not
// write one output from several problems).
template <class S>
void NetOps<S>::attention_forward(S* y, S* att, const S* qkv, int B, int T, const AttnShape& a) {
  check_attn_shape(a);
  const int D = a.D, G = a.group(), W = static_cast<int>(a.width()), Y = static_cast<int>(a.q_width());
  const int64_t TT = static_cast<int64_t>(T) * T;
  const int64_t sk = G == 1 ? D : 0;  // multi-head: every head its own key; grouped: the group's one
  const int runs = G == 1 ? 1 : a.NKV, per = G == 1 ? a.NH : G;
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < runs; ++r) {
      const S* q = qkv + static_cast<size_t>(b) * T * W + static_cast<size_t>(r) * G * D;
      const S* k = qkv + static_cast<size_t>(b) * T * W + a.k_offset() + static_cast<size_t>(r) * D;
      S* A = att + (static_cast<size_t>(b) * a.NH + static_cast<size_t>(r) * G) * TT;
      gemm(false, true, T, T, D, S(1), q, W, D, k, W, sk, S(0), A, T, TT, per);
    }
  causal_softmax(att, B * a.NH, T, static_cast<S>(1.0 / std::sqrt(static_cast<double>(D))));
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < runs; ++r) {
      const S* v = qkv + static_cast<size_t>(b) * T * W + a.v_offset() + static_cast<size_t>(r) * D;
      const S* A = att + (static_cast<size_t>(b) * a.NH + static_cast<size_t>(r) * G) * TT;
      gemm(false, false, T, D, T, S(1), A, T, TT, v, W, sk, S(0),
           y + static_cast<size_t>(b) * T * Y + static_cast<size_t>(r) * G * D, Y, D, per);
    }
}

template <class S>
void NetOps<S>::attention_backward(S* dqkv, S* datt, const S* dy, const S* qkv, const S* att, int B, int T,
                                   const AttnShape& a) {
  check_attn_shape(a);
  const int D = a.D, G = a.group(), W = static_cast<int>(a.width()), Y = static_cast<int>(a.q_width());
  const int64_t TT = static_cast<int64_t>(T) * T;
  const int64_t sk = G == 1 ? D : 0;
  const int runs = G == 1 ? 1 : a.NKV, per = G == 1 ? a.NH : G;
  // head h's (its key/value head's) offsets from the sequence's row 0
  auto qo = [&](int h) { return static_cast<size_t>(h) * D; };
  auto ko = [&](int h) { return static_cast<size_t>(a.k_offset()) + static_cast<size_t>(h / G) * D; };
  auto vo = [&](int h) { return static_cast<size_t>(a.v_offset()) + static_cast<size_t>(h / G) * D; };
  for (int b = 0; b < B; ++b) {
    const size_t rq = static_cast<size_t>(b) * T * W;
    const S* dyb = dy + static_cast<size_t>(b) * T * Y;
    const S* A = att + static_cast<size_t>(b) * a.NH * TT;
    S* dA = datt + static_cast<size_t>(b) * a.NH * TT;
    // y = A v:  dv += A^T dy,  dA = dy v^T
    if (G == 1)
      gemm(true, false, T, D, T, S(1), A, T, TT, dyb, Y, D, S(1), dqkv + rq + vo(0), W, D, a.NH);
    else
      for (int h = 0; h < a.NH; ++h)
        gemm(true, false, T, D, T, S(1), A + h * TT, T, TT, dyb + qo(h), Y, D, S(1), dqkv + rq + vo(h), W, D, 1);
    for (int r = 0; r < runs; ++r)
      gemm(false, true, T, T, D, S(1), dyb + qo(r * G), Y, D, qkv + rq + vo(r * G), W, sk, S(0), dA + r * G * TT, T,
           TT, per);
  }
  causal_softmax_backward(datt, att, B * a.NH, T, static_cast<S>(1.0 / std::sqrt(static_cast<double>(D))));
  for (int b = 0; b < B; ++b) {
    const size_t rq = static_cast<size_t>(b) * T * W;
    const S* dA = datt + static_cast<size_t>(b) * a.NH * TT;
    // scores = q k^T:  dq += dS k,  dk += dS^T q
    for (int r = 0; r < runs; ++r)
      gemm(false, false, T, D, T, S(1), dA + r * G * TT, T, TT, qkv + rq + ko(r * G), W, sk, S(1),
           dqkv + rq + qo(r * G), W, D, per);
    if (G == 1)
      gemm(true, false, T, D, T, S(1), dA, T, TT, qkv + rq, W, D, S(1), dqkv + rq + ko(0), W, D, a.NH);
    else
      for (int h = 0; h < a.NH; ++h)
        gemm(true, false, T, D, T, S(1), dA + h * TT, T, TT, qkv + rq + qo(h), W, D, S(1), dqkv + rq + ko(h), W, D, 1);
  }
}

template <class S>
void NetOps<S>::layernorm_backward_scaled(S* din, S* dw, S* db, const S* dout, const S* scale, int T, int ld,
                                          const S* in, const S* w, const S* mean, const S* rstd, int N, int C,
                                          S* scratch) {
  // scratch = dout (1 + scale): the modulation's input gradient (its shift and scale gradients skipped)
  modulate_backward(scratch, nullptr, nullptr, dout, dout, scale, N / T, T, C, ld);
  layernorm_backward(din, dw, db, scratch, in, w, mean, rstd, N, C);
}

template class NetOps<float>;
template class NetOps<double>;

}  // namespace flowloop
