// flowloop/backend/kernels.hpp: the bodies of the CUDA kernels, one element or one row each,
// as __host__ __device__ functions. The launchers in cuda/ run them one thread per
// element or one block per row; CI, which has no GPU, runs the same bodies on the CPU
// and checks them against the layers of layers.hpp (tests tagged [kernels]).
//
// The formulas are model-spec.md's, as layers.hpp implements them:
//   GELU (tanh form), SiLU, LayerNorm (biased variance, eps 1e-5), RMSNorm and rotary
//   position embeddings (the Llama family's, model-families.md), the causal softmax of
//   one attention row with its 1/sqrt(D) scale, and the cross-entropy of one row of
//   logits. Gradient rule as in layers.hpp: gradients ACCUMULATE (+=), except where a
//   function says it overwrites (the softmax rows, in place).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FLOWLOOP_HD __host__ __device__ inline
#else
#define FLOWLOOP_HD inline
#endif

namespace flowloop::kernels {

// gelu(z) = z/2 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
template <class S>
FLOWLOOP_HD S gelu(S z) {
  const S c = static_cast<S>(0.7978845608028654);  // sqrt(2/pi)
  return S(0.5) * z * (S(1) + std::tanh(c * (z + S(0.044715) * z * z * z)));
}

// d gelu / dz
template <class S>
FLOWLOOP_HD S gelu_grad(S z) {
  const S c = static_cast<S>(0.7978845608028654);
  const S th = std::tanh(c * (z + S(0.044715) * z * z * z));
  return S(0.5) * (S(1) + th) + S(0.5) * z * (S(1) - th * th) * c * (S(1) + S(3 * 0.044715) * z * z);
}

// silu(z) = z sigmoid(z), and its derivative s (1 + z (1 - s))
template <class S>
FLOWLOOP_HD S silu(S z) {
  return z / (S(1) + std::exp(-z));
}
template <class S>
FLOWLOOP_HD S silu_grad(S z) {
  const S s = S(1) / (S(1) + std::exp(-z));
  return s * (S(1) + z * (S(1) - s));
}

// SwiGLU's product of one value (the Llama MLP's gate): silu(g) u; its vjp adds
// d u silu'(g) to dg and d silu(g) to du.
template <class S>
FLOWLOOP_HD S swiglu(S g, S u) {
  return silu(g) * u;
}
template <class S>
FLOWLOOP_HD void swiglu_grad(S* dg, S* du, S d, S g, S u) {
  if (dg) *dg += d * u * silu_grad(g);
  if (du) *du += d * silu(g);
}

// One row x (C) of LayerNorm: out = (x - mean) rstd w + b, rstd = 1 / sqrt(var + 1e-5)
// (out overwritten; mean and rstd returned through the pointers, the vjp's cache).
template <class S>
FLOWLOOP_HD void layernorm_row(S* out, S* mean, S* rstd, const S* x, const S* w, const S* b, int C) {
  S m = S(0);
  for (int i = 0; i < C; ++i) m += x[i];
  m /= static_cast<S>(C);
  S var = S(0);
  for (int i = 0; i < C; ++i) var += (x[i] - m) * (x[i] - m);
  var /= static_cast<S>(C);
  const S rs = S(1) / std::sqrt(var + static_cast<S>(1e-5));
  for (int i = 0; i < C; ++i) out[i] = (x[i] - m) * rs * w[i] + b[i];
  *mean = m;
  *rstd = rs;
}

// Its vjp for one row, given g = dL/dLN (C): din += (g w - mean(g w) - xhat mean(g w xhat)) rstd,
// xhat = (x - mean) rstd. (The parameters' gradients dw += g xhat and db += g are column
// sums over the rows, a reduction of their own.)
template <class S>
FLOWLOOP_HD void layernorm_row_backward(S* din, const S* g, const S* x, const S* w, S mean, S rstd, int C) {
  S mean_d = S(0), mean_dx = S(0);
  for (int i = 0; i < C; ++i) {
    const S gw = g[i] * w[i];
    mean_d += gw;
    mean_dx += gw * (x[i] - mean);
  }
  mean_d /= static_cast<S>(C);
  mean_dx = mean_dx / static_cast<S>(C) * rstd;
  for (int i = 0; i < C; ++i) din[i] += (g[i] * w[i] - mean_d - (x[i] - mean) * (rstd * mean_dx)) * rstd;
}

// One row x (C) of RMSNorm (Llama's): out = x rstd w, rstd = 1 / sqrt(mean(x^2) + eps), the
// mean of squares summed in double, the weight applied after normalising (out overwritten;
// rstd returned, the vjp's cache).
template <class S>
FLOWLOOP_HD void rmsnorm_row(S* out, S* rstd, const S* x, const S* w, int C, double eps) {
  double ss = 0.0;
  for (int i = 0; i < C; ++i) ss += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  const S rs = static_cast<S>(1.0 / std::sqrt(ss / C + eps));
  for (int i = 0; i < C; ++i) out[i] = (x[i] * rs) * w[i];
  *rstd = rs;
}

// Its vjp for one row, given g = dL/dout (C): with y_i = w_i x_i r and
// dr/dx_j = -r^3 x_j / C, din_j += r (g_j w_j - x_j r^2 mean_i(g_i w_i x_i)) (the dot in double).
template <class S>
FLOWLOOP_HD void rmsnorm_row_backward(S* din, const S* g, const S* x, const S* w, S rstd, int C) {
  double dot = 0.0;
  for (int i = 0; i < C; ++i) dot += static_cast<double>(g[i]) * static_cast<double>(w[i]) * static_cast<double>(x[i]);
  const S c = static_cast<S>(dot / C * static_cast<double>(rstd) * static_cast<double>(rstd));
  for (int i = 0; i < C; ++i) din[i] += rstd * (g[i] * w[i] - x[i] * c);
}

// Column i of RMSNorm's weight gradient over N rows: dw[i] += sum_n g[n,i] x[n,i] rstd[n],
// summed in row order.
template <class S>
FLOWLOOP_HD void rmsnorm_column_grads(S* dw, const S* g, const S* x, const S* rstd, int N, int C, int i) {
  S sw = S(0);
  for (int n = 0; n < N; ++n) sw += g[static_cast<long long>(n) * C + i] * (x[static_cast<long long>(n) * C + i] * rstd[n]);
  dw[i] += sw;
}

// Rotary position embedding of one head (D values) at position pos, in place on its first
// rot dims (rot even, the rest untouched): pair i < rot/2 is (i, i + rot/2) (rotate-half:
// Llama, Qwen, Ouro) or (2i, 2i + 1) (interleaved: Huginn), turned by the angle
// pos theta^(-2i/rot) (taken in double): (a, b) -> (a cos - b sin, b cos + a sin).
// transpose: the inverse turn, the rotation's vjp.
// Its pieces: pair i's cosine and (signed) sine at pos, and the turn of pair i of one head.
template <class S>
FLOWLOOP_HD void rotary_angle(S* c, S* s, int pos, int i, int rot, double theta, bool transpose) {
  const double angle = static_cast<double>(pos) * std::pow(theta, -2.0 * i / rot);
  *c = static_cast<S>(std::cos(angle));
  *s = static_cast<S>(transpose ? -std::sin(angle) : std::sin(angle));
}
template <class S>
FLOWLOOP_HD void rotary_pair(S* x, int i, int rot, bool interleaved, S c, S s) {
  const int p = interleaved ? 2 * i : i, q = interleaved ? 2 * i + 1 : i + rot / 2;
  const S a = x[p], b = x[q];
  x[p] = a * c - b * s;
  x[q] = b * c + a * s;
}
template <class S>
FLOWLOOP_HD void rotary_head(S* x, int pos, int rot, double theta, bool interleaved, bool transpose) {
  for (int i = 0; i < rot / 2; ++i) {
    S c, s;
    rotary_angle(&c, &s, pos, i, rot, theta, transpose);
    rotary_pair(x, i, rot, interleaved, c, s);
  }
}

// Column i of LayerNorm's parameter gradients over N rows of g = dL/dLN (rows C apart):
// dw[i] += sum_n g[n,i] xhat[n,i], db[i] += sum_n g[n,i], summed in row order.
template <class S>
FLOWLOOP_HD void layernorm_column_grads(S* dw, S* db, const S* g, const S* x, const S* mean, const S* rstd, int N,
                                        int C, int i) {
  S sw = S(0), sb = S(0);
  for (int n = 0; n < N; ++n) {
    const S gi = g[static_cast<long long>(n) * C + i];
    sw += gi * ((x[static_cast<long long>(n) * C + i] - mean[n]) * rstd[n]);
    sb += gi;
  }
  if (dw) dw[i] += sw;
  if (db) db[i] += sb;
}

// Column i of x (N rows, ld apart) summed in row order.
template <class S>
FLOWLOOP_HD S column_sum(const S* x, int N, long long ld, int i) {
  S s = S(0);
  for (int n = 0; n < N; ++n) s += x[n * ld + i];
  return s;
}

// adaLN, one element: the modulation in (1 + scale) + shift, and the gated residual
// res + (1 + gate) in (layers.hpp's modulate_forward and gate_forward).
template <class S>
FLOWLOOP_HD S modulate(S in, S shift, S scale) {
  return in * (S(1) + scale) + shift;
}
template <class S>
FLOWLOOP_HD S gated(S res, S in, S gate) {
  return in * (S(1) + gate) + res;
}

// The gate of a branch already summed onto its residual (NetOps::gate_sum_forward): on
// entry out = res + m; mo = out - res, then out += gate mo (a zero gate adds exactly 0).
template <class S>
FLOWLOOP_HD void gate_sum(S& out, S& mo, S res, S gate) {
  mo = out - res;
  out += gate * mo;
}

// The vjp of a per-sequence vector broadcast over T, for sequence b and channel i (rows of
// (B,T,C) values; the vectors' rows are ld apart): da[b,i] += sum_t dout, db[b,i] +=
// sum_t dout x, summed in t order, and din = dout (1 + f[b,i]) (written). adaLN's
// modulation: a = shift, b = scale, f = scale; its gate: no a, b = f = gate. Null
// pointers are skipped.
template <class S>
FLOWLOOP_HD void broadcast_backward(S* din, S* da, S* db, const S* dout, const S* x, const S* f, int T, int C,
                                    long long ld, int b, int i) {
  const long long v = b * ld + i;
  const S scale = S(1) + f[v];
  S sa = S(0), sb = S(0);
  for (int t = 0; t < T; ++t) {
    const long long r = (static_cast<long long>(b) * T + t) * C + i;
    sa += dout[r];
    sb += dout[r] * x[r];
    if (din) din[r] = dout[r] * scale;
  }
  if (da) da[v] += sa;
  if (db) db[v] += sb;
}

// Row t of causal attention probabilities: the t + 1 scores row[0..t] (q_t . k_j)
// become softmax(scale row); the rest of the row (T values) is set to 0. Overwrites.
template <class S>
FLOWLOOP_HD void causal_softmax_row(S* row, int t, int T, S scale) {
  S mx = row[0];
  for (int j = 1; j <= t; ++j) mx = row[j] > mx ? row[j] : mx;
  S sum = S(0);
  for (int j = 0; j <= t; ++j) {
    row[j] = std::exp((row[j] - mx) * scale);
    sum += row[j];
  }
  for (int j = 0; j <= t; ++j) row[j] /= sum;
  for (int j = t + 1; j < T; ++j) row[j] = S(0);
}

// Its vjp: given a (the probabilities of row t) and d = dL/da in place, d becomes
// dL/dscores = a (d - sum(a d)) scale on [0, t], and 0 beyond. Overwrites.
template <class S>
FLOWLOOP_HD void causal_softmax_row_backward(S* d, const S* a, int t, int T, S scale) {
  S dot = S(0);
  for (int j = 0; j <= t; ++j) dot += a[j] * d[j];
  for (int j = 0; j <= t; ++j) d[j] = a[j] * (d[j] - dot) * scale;
  for (int j = t + 1; j < T; ++j) d[j] = S(0);
}

// Cross-entropy of one row of V logits against target in [0, V): returns
// -log softmax(logits)[target] and adds (softmax - onehot) dscale to dlogits (dscale:
// 1 / the number of scored rows, for a mean). A target of -1 scores nothing: 0, and
// dlogits is left alone.
template <class S>
FLOWLOOP_HD S crossentropy_row(S* dlogits, const S* logits, int target, int V, S dscale) {
  if (target < 0) return S(0);
  S mx = logits[0];
  for (int v = 1; v < V; ++v) mx = logits[v] > mx ? logits[v] : mx;
  S sum = S(0);
  for (int v = 0; v < V; ++v) sum += std::exp(logits[v] - mx);
  const S lse = mx + std::log(sum);
  if (dlogits)
    for (int v = 0; v < V; ++v) dlogits[v] += (std::exp(logits[v] - lse) - (v == target ? S(1) : S(0))) * dscale;
  return lse - logits[target];
}

// AdamW's constants for one step: the betas, their complements, the folded bias
// corrections ic1 = 1 / (1 - b1^t) and isc2 = 1 / sqrt(1 - b2^t), the rate and eps.
struct AdamWStep {
  float b1, b2, ob1, ob2, ic1, isc2, lr, eps;
};

// One parameter's AdamW update from its gradient g (wd: its decay):
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
//   p -= lr (m ic1 / (sqrt(v) isc2 + eps) + wd p)
template <class S>
FLOWLOOP_HD void adamw_update(S& p, S& m, S& v, S g, S wd, const AdamWStep& s) {
  m = static_cast<S>(s.b1) * m + static_cast<S>(s.ob1) * g;
  v = static_cast<S>(s.b2) * v + static_cast<S>(s.ob2) * g * g;
  p -= static_cast<S>(s.lr) *
       ((m * static_cast<S>(s.ic1)) / (std::sqrt(v) * static_cast<S>(s.isc2) + static_cast<S>(s.eps)) + wd * p);
}

}  // namespace flowloop::kernels
