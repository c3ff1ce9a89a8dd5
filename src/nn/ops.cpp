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

// Per sequence, the NH heads' products as one strided batch.
template <class S>
void NetOps<S>::attention_forward(S* y, S* att, const S* qkv, int B, int T, int C, int NH) {
  const int D = C / NH, C3 = 3 * C;
  const int64_t TT = static_cast<int64_t>(T) * T;
  for (int b = 0; b < B; ++b) {
    const S* q = qkv + static_cast<size_t>(b) * T * C3;
    S* A = att + static_cast<size_t>(b) * NH * TT;
    gemm(false, true, T, T, D, S(1), q, C3, D, q + C, C3, D, S(0), A, T, TT, NH);
  }
  causal_softmax(att, B * NH, T, static_cast<S>(1.0 / std::sqrt(static_cast<double>(D))));
  for (int b = 0; b < B; ++b) {
    const S* v = qkv + static_cast<size_t>(b) * T * C3 + 2 * C;
    const S* A = att + static_cast<size_t>(b) * NH * TT;
    gemm(false, false, T, D, T, S(1), A, T, TT, v, C3, D, S(0), y + static_cast<size_t>(b) * T * C, C, D, NH);
  }
}

template <class S>
void NetOps<S>::attention_backward(S* dqkv, S* datt, const S* dy, const S* qkv, const S* att, int B, int T, int C,
                                   int NH) {
  const int D = C / NH, C3 = 3 * C;
  const int64_t TT = static_cast<int64_t>(T) * T;
  for (int b = 0; b < B; ++b) {
    const size_t r3 = static_cast<size_t>(b) * T * C3;
    const S* dyb = dy + static_cast<size_t>(b) * T * C;
    const S* A = att + static_cast<size_t>(b) * NH * TT;
    S* dA = datt + static_cast<size_t>(b) * NH * TT;
    // y = A v:  dv += A^T dy,  dA = dy v^T
    gemm(true, false, T, D, T, S(1), A, T, TT, dyb, C, D, S(1), dqkv + r3 + 2 * C, C3, D, NH);
    gemm(false, true, T, T, D, S(1), dyb, C, D, qkv + r3 + 2 * C, C3, D, S(0), dA, T, TT, NH);
  }
  causal_softmax_backward(datt, att, B * NH, T, static_cast<S>(1.0 / std::sqrt(static_cast<double>(D))));
  for (int b = 0; b < B; ++b) {
    const size_t r3 = static_cast<size_t>(b) * T * C3;
    const S* dA = datt + static_cast<size_t>(b) * NH * TT;
    // scores = q k^T:  dq += dS k,  dk += dS^T q
    gemm(false, false, T, D, T, S(1), dA, T, TT, qkv + r3 + C, C3, D, S(1), dqkv + r3, C3, D, NH);
    gemm(true, false, T, D, T, S(1), dA, T, TT, qkv + r3, C3, D, S(1), dqkv + r3 + C, C3, D, NH);
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
