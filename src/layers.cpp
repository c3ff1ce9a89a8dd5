#include "flowloop/nn/layers.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "flowloop/core/tensor.hpp"

namespace flowloop {

namespace {
template <class S>
using RowMat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using MapM = Eigen::Map<RowMat<S>>;
template <class S>
using CMapM = Eigen::Map<const RowMat<S>>;
template <class S>
using MapS = Eigen::Map<RowMat<S>, 0, Eigen::OuterStride<>>;  // strided rows
template <class S>
using CMapS = Eigen::Map<const RowMat<S>, 0, Eigen::OuterStride<>>;
template <class S>
using MapV = Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>>;
template <class S>
using CMapV = Eigen::Map<const Eigen::Array<S, 1, Eigen::Dynamic>>;
}  // namespace


// ---------------------------------------------------------------- embedding

template <class S>
void embedding_forward(S* out, const int32_t* tokens, const S* wte, const S* wpe, int B, int T,
                       int C) {
#pragma omp parallel for schedule(static) if(static_cast<int64_t>(B) * T * C >= kParallelMin)
  for (int bt = 0; bt < B * T; ++bt) {
    const int t = bt % T;
    if (wpe)
      MapV<S>(out + static_cast<int64_t>(bt) * C, C) =
          CMapV<S>(wte + static_cast<int64_t>(tokens[bt]) * C, C) + CMapV<S>(wpe + static_cast<int64_t>(t) * C, C);
    else
      MapV<S>(out + static_cast<int64_t>(bt) * C, C) = CMapV<S>(wte + static_cast<int64_t>(tokens[bt]) * C, C);
  }
}

template <class S>
void embedding_backward(S* dwte, S* dwpe, const S* dout, const int32_t* tokens, int B, int T,
                        int C) {
  // Serial: several rows may share a token; the cost is tiny next to the field.
  for (int bt = 0; bt < B * T; ++bt) {
    const int t = bt % T;
    CMapV<S> g(dout + static_cast<int64_t>(bt) * C, C);
    MapV<S>(dwte + static_cast<int64_t>(tokens[bt]) * C, C) += g;
    if (dwpe) MapV<S>(dwpe + static_cast<int64_t>(t) * C, C) += g;
  }
}

// ---------------------------------------------------------------- layernorm

template <class S>
void layernorm_forward(S* out, S* mean, S* rstd, const S* in, const S* w, const S* b, int N,
                       int C) {
  CMapV<S> wv(w, C), bv(b, C);
#pragma omp parallel for schedule(static) if(static_cast<int64_t>(N) * C >= kParallelMin)
  for (int n = 0; n < N; ++n) {
    CMapV<S> x(in + static_cast<int64_t>(n) * C, C);
    const S m = x.mean();
    const S var = (x - m).square().mean();
    const S rs = S(1) / std::sqrt(var + S(1e-5));
    MapV<S>(out + static_cast<int64_t>(n) * C, C) = (x - m) * rs * wv + bv;
    mean[n] = m;
    rstd[n] = rs;
  }
}

namespace {
// grad(n) is row n of dL/dLN (an Eigen expression of length C).
template <class S, class Grad>
void layernorm_backward_rows(S* din, S* dw, S* db, Grad grad, const S* in, const S* w, const S* mean,
                             const S* rstd, int N, int C) {
  CMapV<S> wv(w, C);
  if (din) {
#pragma omp parallel for schedule(static) if(static_cast<int64_t>(N) * C >= kParallelMin)
    for (int n = 0; n < N; ++n) {
      CMapV<S> x(in + static_cast<int64_t>(n) * C, C);
      const auto g = grad(n);
      // expression templates only: nothing is allocated per row
      const S m = mean[n], rs = rstd[n];
      const S mean_d = (g * wv).mean();
      const S mean_dx = (g * wv * (x - m)).mean() * rs;
      MapV<S>(din + static_cast<int64_t>(n) * C, C) += (g * wv - mean_d - (x - m) * (rs * mean_dx)) * rs;
    }
  }
  if (!dw) return;
  MapV<S> dwv(dw, C), dbv(db, C);
  for (int n = 0; n < N; ++n) {
    CMapV<S> x(in + static_cast<int64_t>(n) * C, C);
    const auto g = grad(n);
    dwv += g * (x - mean[n]) * rstd[n];
    dbv += g;
  }
}
}  // namespace

template <class S>
void layernorm_backward(S* din, S* dw, S* db, const S* dout, const S* in, const S* w,
                        const S* mean, const S* rstd, int N, int C) {
  layernorm_backward_rows(
      din, dw, db, [&](int n) { return CMapV<S>(dout + static_cast<int64_t>(n) * C, C); }, in, w, mean, rstd, N,
      C);
}

template <class S>
void layernorm_backward_scaled(S* din, S* dw, S* db, const S* dout, const S* scale, int T, int ld, const S* in,
                               const S* w, const S* mean, const S* rstd, int N, int C) {
  layernorm_backward_rows(
      din, dw, db,
      [&](int n) {
        return CMapV<S>(dout + static_cast<int64_t>(n) * C, C) *
               (S(1) + CMapV<S>(scale + static_cast<int64_t>(n / T) * ld, C));
      },
      in, w, mean, rstd, N, C);
}

// ---------------------------------------------------------------- linear

template <class S>
void linear_forward(S* out, const S* in, const S* W, const S* b, int N, int IN, int OUT) {
  S beta = S(0);
  if (b) {
    CMapV<S> bv(b, OUT);
#pragma omp parallel for schedule(static) if(static_cast<int64_t>(N) * OUT >= kParallelMin)
    for (int n = 0; n < N; ++n) MapV<S>(out + static_cast<int64_t>(n) * OUT, OUT) = bv;
    beta = S(1);
  }
  gemm<S>(false, true, N, OUT, IN, S(1), in, IN, W, IN, beta, out, OUT);
}

// Each column summed in n order in a band of 64 lanes: the same bits whatever the
// buffers' alignment (Eigen's column reductions are not).
template <class S>
void column_sums(S* db, const S* dout, int N, int OUT) {
  constexpr int kBand = 64;
  for (int o0 = 0; o0 < OUT; o0 += kBand) {
    const int w = std::min(kBand, OUT - o0);
    S acc[kBand] = {};
    for (int n = 0; n < N; ++n) {
      const S* row = dout + static_cast<int64_t>(n) * OUT + o0;
#pragma omp simd
      for (int j = 0; j < w; ++j) acc[j] += row[j];
    }
    for (int j = 0; j < w; ++j) db[o0 + j] += acc[j];
  }
}

template <class S>
void linear_backward(S* din, S* dW, S* db, const S* dout, const S* in, const S* W, int N, int IN,
                     int OUT) {
  if (din) gemm<S>(false, false, N, IN, OUT, S(1), dout, OUT, W, IN, S(1), din, IN);
  gemm<S>(true, false, OUT, IN, N, S(1), dout, OUT, in, IN, S(1), dW, IN);
  if (db) column_sums(db, dout, N, OUT);
}

// Few rows (per-sequence vectors: the time embedding, the adaLN modulation). A
// packed GEMM would copy W for a handful of rows; here W streams through once.
// Each output is one dot product, so the bits do not depend on the thread count.
namespace {
bool few_parallel(int N, int IN, int OUT) {
  return static_cast<int64_t>(N) * IN * OUT >= 4 * kParallelMin;
}
}  // namespace

template <class S>
void linear_forward_few(S* out, const S* in, const S* W, const S* b, int N, int IN, int OUT) {
  CMapM<S> x(in, N, IN);
#pragma omp parallel for schedule(static) if (few_parallel(N, IN, OUT))
  for (int o = 0; o < OUT; ++o) {
    const auto w = CMapM<S>(W + static_cast<int64_t>(o) * IN, 1, IN).row(0);
    const S bo = b ? b[o] : S(0);
    for (int n = 0; n < N; ++n) out[static_cast<int64_t>(n) * OUT + o] = x.row(n).dot(w) + bo;
  }
}

// The backward of the same few-row product: up to kFewGroup rows at a time, W and dW
// streamed once per group, a row of W at a time. A job owns a band of kFewCols input
// columns of din and dW (din's partial sums stay in a local array). Sums run in o order
// (din) and n order (dW) whatever the thread count. Beyond kFewMaxRows rows, where W
// would stream once per group, it is linear_backward's GEMMs.
namespace {
constexpr int kFewCols = 128;
constexpr int kFewGroup = 4;
constexpr int kFewMaxRows = 8;

template <int R, bool WITH_DIN, class S>
void few_backward_group(S* din, S* part, S* dW, const S* dout, const S* in, const S* W, int IN, int OUT, int o0,
                        int o1, int j0, int w) {
  S acc[R * kFewCols];
  if (WITH_DIN)
    for (int k = 0; k < R * kFewCols; ++k) acc[k] = S(0);
  const S* __restrict x = in + j0;
  for (int o = o0; o < o1; ++o) {
    S d[R];
    for (int r = 0; r < R; ++r) d[r] = dout[static_cast<int64_t>(r) * OUT + o];
    const S* __restrict wr = W + static_cast<int64_t>(o) * IN + j0;
    S* __restrict dwr = dW + static_cast<int64_t>(o) * IN + j0;
#pragma omp simd
    for (int j = 0; j < w; ++j) {
      S g = d[0] * x[j];
      for (int r = 1; r < R; ++r) g += d[r] * x[static_cast<int64_t>(r) * IN + j];
      dwr[j] += g;
      if (WITH_DIN) {
        const S wj = wr[j];
        for (int r = 0; r < R; ++r) acc[r * kFewCols + j] += d[r] * wj;
      }
    }
  }
  if (!WITH_DIN) return;
  if (part) {  // this part's sums, added by the caller in part order
    std::copy_n(acc, R * kFewCols, part);
    return;
  }
  for (int r = 0; r < R; ++r) {
    S* dr = din + static_cast<int64_t>(r) * IN + j0;
    for (int j = 0; j < w; ++j) dr[j] += acc[r * kFewCols + j];
  }
}

// Rows n0 .. N - 1 in groups of kFewGroup, outputs [o0, o1), the band [j0, j0 + w).
template <class S>
void few_backward_band(S* din, S* part, S* dW, const S* dout, const S* in, const S* W, int N, int IN, int OUT,
                       int o0, int o1, int j0, int w) {
  for (int n0 = 0; n0 < N; n0 += kFewGroup) {
    const int R = std::min(kFewGroup, N - n0);
    const S* g = dout + static_cast<int64_t>(n0) * OUT;
    const S* x = in + static_cast<int64_t>(n0) * IN;
    S* dn = din ? din + static_cast<int64_t>(n0) * IN : nullptr;
    S* pn = part ? part + static_cast<int64_t>(n0) * kFewCols : nullptr;
#define FLOWLOOP_FEW_GROUP(RR)                                                                             \
  if (din)                                                                                                 \
    few_backward_group<RR, true>(dn, pn, dW, g, x, W, IN, OUT, o0, o1, j0, w);                             \
  else                                                                                                     \
    few_backward_group<RR, false>(dn, pn, dW, g, x, W, IN, OUT, o0, o1, j0, w);
    switch (R) {
      case 4: FLOWLOOP_FEW_GROUP(4) break;
      case 3: FLOWLOOP_FEW_GROUP(3) break;
      case 2: FLOWLOOP_FEW_GROUP(2) break;
      default: FLOWLOOP_FEW_GROUP(1) break;
    }
#undef FLOWLOOP_FEW_GROUP
  }
}
}  // namespace

template <class S>
void linear_backward_few(S* din, S* dW, S* db, const S* dout, const S* in, const S* W, int N, int IN, int OUT) {
  if (N <= 0) return;
  if (N > kFewMaxRows) {
    linear_backward(din, dW, db, dout, in, W, N, IN, OUT);
    return;
  }
  // Large products split the outputs in two fixed halves, each its own job with its own
  // partial sums of din, added in half order: a split by shape, so the bits are the same
  // on one thread or two.
  const bool halves = few_parallel(N, IN, OUT) && OUT >= kFewCols;
  for (int j0 = 0; j0 < IN; j0 += kFewCols) {
    const int w = std::min(kFewCols, IN - j0);
    if (!halves) {
      few_backward_band<S>(din, nullptr, dW, dout, in, W, N, IN, OUT, 0, OUT, j0, w);
      continue;
    }
    S part[2][kFewMaxRows * kFewCols];
    const int mid = OUT / 2;
#pragma omp parallel for schedule(static)
    for (int h = 0; h < 2; ++h)
      few_backward_band<S>(din, din ? part[h] : nullptr, dW, dout, in, W, N, IN, OUT, h ? mid : 0, h ? OUT : mid, j0, w);
    if (din)
      for (int n = 0; n < N; ++n) {
        S* dr = din + static_cast<int64_t>(n) * IN + j0;
        const S* p0 = part[0] + static_cast<int64_t>(n) * kFewCols;
        const S* p1 = part[1] + static_cast<int64_t>(n) * kFewCols;
        for (int j = 0; j < w; ++j) dr[j] += p0[j] + p1[j];
      }
  }
  if (db) column_sums(db, dout, N, OUT);
}

// ---------------------------------------------------------------- attention

namespace {
// Where head h of batch row b lives (bh = b NH + h): q, k and v are (T,D) blocks of qkv with
// row stride W (AttnShape: k at k_offset, v at v_offset, query head h reading key/value head
// h / G); its output is a (T,D) block of y with row stride NH D; its probabilities are the
// (T,T) block bh of att.
struct Heads {
  int T, NH, G, D;
  int64_t W, Y, ko, vo;
  Heads(int T_, const AttnShape& a)
      : T(T_), NH(a.NH), G(a.group()), D(a.D), W(a.width()), Y(a.q_width()), ko(a.k_offset()), vo(a.v_offset()) {}
  int64_t row(int bh) const { return static_cast<int64_t>(bh / NH) * T * W; }
  int64_t q(int bh) const { return row(bh) + static_cast<int64_t>(bh % NH) * D; }
  int64_t k(int bh) const { return row(bh) + ko + static_cast<int64_t>((bh % NH) / G) * D; }
  int64_t v(int bh) const { return row(bh) + vo + static_cast<int64_t>((bh % NH) / G) * D; }
  int64_t y(int bh) const { return static_cast<int64_t>(bh / NH) * T * Y + static_cast<int64_t>(bh % NH) * D; }
  int64_t att(int bh) const { return static_cast<int64_t>(bh) * T * T; }
  template <class S>
  S scale() const { return S(1) / std::sqrt(static_cast<S>(D)); }
  template <class P>  // P is S or const S
  auto block(P* p, int64_t stride) const {
    using Map = Eigen::Map<std::conditional_t<std::is_const_v<P>, const RowMat<std::remove_const_t<P>>,
                                              RowMat<P>>, 0, Eigen::OuterStride<>>;
    return Map(p, T, D, Eigen::OuterStride<>(stride));
  }
};
}  // namespace

template <class S>
void attention_forward(S* out, S* att, const S* qkv, int B, int T, const AttnShape& a) {
  check_attn_shape(a);
  const Heads hd(T, a);
  const S scale = hd.scale<S>();
#pragma omp parallel for schedule(static) if(static_cast<int64_t>(B) * T * T * a.q_width() >= kParallelMin)
  for (int bh = 0; bh < B * a.NH; ++bh) {
    const auto q = hd.block(qkv + hd.q(bh), hd.W), k = hd.block(qkv + hd.k(bh), hd.W),
               v = hd.block(qkv + hd.v(bh), hd.W);
    MapM<S> A(att + hd.att(bh), T, T);
    // Only the causal (lower) triangle of q k^T is computed.
    // (a pure product here: scaling it would make Eigen allocate a temporary)
    A.template triangularView<Eigen::Lower>() = q * k.transpose();
    for (int t = 0; t < T; ++t) {
      auto row = A.row(t).head(t + 1).array();
      const S mx = row.maxCoeff();
      row = ((row - mx) * scale).exp();  // softmax(s * x) = softmax(s * (x - max x)), s > 0
      row /= row.sum();
      A.row(t).tail(T - t - 1).setZero();
    }
    auto y = hd.block(out + hd.y(bh), hd.Y);
    y.noalias() = A.template triangularView<Eigen::Lower>() * v;
  }
}

// One task per (sequence, key/value head): the group's query heads in order, so that a key or
// value gradient is summed by one thread in a fixed order (multi-head: one head a task).
template <class S>
void attention_backward(S* dqkv, S* datt, const S* dout, const S* qkv, const S* att, int B, int T,
                        const AttnShape& a) {
  check_attn_shape(a);
  const Heads hd(T, a);
  const S scale = hd.scale<S>();
  const int G = a.group();
#pragma omp parallel for schedule(static) if(static_cast<int64_t>(B) * T * T * a.q_width() >= kParallelMin)
  for (int bg = 0; bg < B * a.NKV; ++bg)
    for (int bh = bg * G; bh < (bg + 1) * G; ++bh) {
      const auto q = hd.block(qkv + hd.q(bh), hd.W), k = hd.block(qkv + hd.k(bh), hd.W),
                 v = hd.block(qkv + hd.v(bh), hd.W);
      auto dq = hd.block(dqkv + hd.q(bh), hd.W), dk = hd.block(dqkv + hd.k(bh), hd.W),
           dv = hd.block(dqkv + hd.v(bh), hd.W);
      const auto dy = hd.block(dout + hd.y(bh), hd.Y);
      CMapM<S> A(att + hd.att(bh), T, T);
      MapM<S> dA(datt + hd.att(bh), T, T);
      // y = A v
      dv.noalias() += A.transpose().template triangularView<Eigen::Upper>() * dy;
      dA.template triangularView<Eigen::Lower>() = dy * v.transpose();
      // softmax: dS = A .* (dA - rowsum(dA .* A)), then the 1/sqrt(D) scale
      for (int t = 0; t < T; ++t) {
        auto ar = A.row(t).head(t + 1).array();
        auto d = dA.row(t).head(t + 1).array();
        const S dot = (ar * d).sum();
        d = ar * (d - dot) * scale;
        dA.row(t).tail(T - t - 1).setZero();
      }
      dq.noalias() += dA.template triangularView<Eigen::Lower>() * k;
      dk.noalias() += dA.transpose().template triangularView<Eigen::Upper>() * q;
    }
}

template <class S>
void attention_forward(S* out, S* att, const S* qkv, int B, int T, int C, int NH) {
  attention_forward(out, att, qkv, B, T, AttnShape::mha(C, NH));
}
template <class S>
void attention_backward(S* dqkv, S* datt, const S* dout, const S* qkv, const S* att, int B, int T, int C, int NH) {
  attention_backward(dqkv, datt, dout, qkv, att, B, T, AttnShape::mha(C, NH));
}

// ---------------------------------------------------------------- gelu

namespace {
template <class S>
constexpr S kGeluC = static_cast<S>(0.7978845608028654);  // sqrt(2/pi)
constexpr int64_t kChunk = 1024;

// fn(lo, n) over [0, N) in chunks of kChunk, in parallel when N is large.
template <class Fn>
void for_chunks(int64_t N, Fn fn) {
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (N >= kParallelMin)
  for (int64_t c = 0; c < nchunks; ++c) fn(c * kChunk, std::min(kChunk, N - c * kChunk));
}
}  // namespace

template <class S>
void gelu_forward(S* out, const S* in, int64_t N) {
  for_chunks(N, [&](int64_t lo, int64_t n) {
    CMapV<S> z(in + lo, n);
    MapV<S>(out + lo, n) = S(0.5) * z * (S(1) + (kGeluC<S> * (z + S(0.044715) * z.cube())).tanh());
  });
}

template <class S>
void gelu_backward(S* din, const S* dout, const S* in, int64_t N) {
  for_chunks(N, [&](int64_t lo, int64_t n) {
    CMapV<S> z(in + lo, n);
    CMapV<S> g(dout + lo, n);
    // bounded size: lives on the stack, no allocation per chunk
    Eigen::Array<S, 1, Eigen::Dynamic, Eigen::RowMajor, 1, kChunk> th(1, n);
    th = (kGeluC<S> * (z + S(0.044715) * z.cube())).tanh();
    MapV<S>(din + lo, n) +=
        g * (S(0.5) * (S(1) + th) +
             S(0.5) * z * (S(1) - th.square()) * kGeluC<S> * (S(1) + S(3 * 0.044715) * z.square()));
  });
}

// ---------------------------------------------------------------- silu

template <class S>
void silu_forward(S* out, const S* in, int64_t N) {
  for_chunks(N, [&](int64_t lo, int64_t n) {
    CMapV<S> z(in + lo, n);
    MapV<S>(out + lo, n) = z / (S(1) + (-z).exp());
  });
}

template <class S>
void silu_backward(S* din, const S* dout, const S* in, int64_t N) {
  for_chunks(N, [&](int64_t lo, int64_t n) {
    CMapV<S> z(in + lo, n);
    CMapV<S> g(dout + lo, n);
    Eigen::Array<S, 1, Eigen::Dynamic, Eigen::RowMajor, 1, kChunk> sg(1, n);
    sg = S(1) / (S(1) + (-z).exp());
    // d/dz z s(z) = s (1 + z (1 - s))
    MapV<S>(din + lo, n) += g * sg * (S(1) + z * (S(1) - sg));
  });
}

// ---------------------------------------------------------------- adaLN modulation

template <class S>
void modulate_forward(S* out, const S* in, const S* shift, const S* scale, int B, int T, int C, int ld) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(B) * T * C >= kParallelMin)
  for (int bt = 0; bt < B * T; ++bt) {
    const int64_t b = bt / T;
    CMapV<S> sh(shift + b * ld, C), sc(scale + b * ld, C);
    MapV<S>(out + static_cast<int64_t>(bt) * C, C) = CMapV<S>(in + static_cast<int64_t>(bt) * C, C) * (S(1) + sc) + sh;
  }
}

namespace {
// Per-sequence sums over T (the gradients of broadcast vectors) run as jobs of one
// sequence and kModCols channels: each sum stays in t order whatever the thread
// count, and a single sequence still spreads over the threads.
constexpr int kModCols = 64;
template <class Fn>
void for_sequence_columns(int B, int T, int C, Fn fn) {
  const int nb = (C + kModCols - 1) / kModCols;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(B) * T * C >= kParallelMin)
  for (int job = 0; job < B * nb; ++job) {
    const int c0 = (job % nb) * kModCols;
    fn(job / nb, c0, std::min(kModCols, C - c0));
  }
}
}  // namespace

template <class S>
void modulate_backward(S* din, S* dshift, S* dscale, const S* dout, const S* in, const S* scale, int B, int T,
                       int C, int ld) {
  for_sequence_columns(B, T, C, [&](int b, int c0, int w) {
    const int64_t v = static_cast<int64_t>(b) * ld + c0;
    const S* sc = scale + v;
    S* dsh = dshift + v;
    S* dsc = dscale + v;
    for (int t = 0; t < T; ++t) {
      const int64_t r = (static_cast<int64_t>(b) * T + t) * C + c0;
      const S* g = dout + r;
      const S* x = in + r;
#pragma omp simd
      for (int j = 0; j < w; ++j) {
        dsh[j] += g[j];
        dsc[j] += g[j] * x[j];
      }
      if (!din) continue;
      S* d = din + r;
#pragma omp simd
      for (int j = 0; j < w; ++j) d[j] = g[j] * (S(1) + sc[j]);
    }
  });
}

template <class S>
void gate_forward(S* out, const S* res, const S* in, const S* gate, int B, int T, int C, int ld) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(B) * T * C >= kParallelMin)
  for (int bt = 0; bt < B * T; ++bt) {
    const int64_t r = static_cast<int64_t>(bt) * C;
    CMapV<S> g(gate + static_cast<int64_t>(bt / T) * ld, C);
    MapV<S>(out + r, C) = CMapV<S>(in + r, C) * (S(1) + g) + CMapV<S>(res + r, C);
  }
}

template <class S>
void gate_backward(S* din, S* dgate, const S* dout, const S* in, const S* gate, int B, int T, int C, int ld) {
  for_sequence_columns(B, T, C, [&](int b, int c0, int w) {
    const int64_t v = static_cast<int64_t>(b) * ld + c0;
    const S* g = gate + v;
    S* dg = dgate + v;
    for (int t = 0; t < T; ++t) {
      const int64_t r = (static_cast<int64_t>(b) * T + t) * C + c0;
      const S* d = dout + r;
      const S* x = in + r;
#pragma omp simd
      for (int j = 0; j < w; ++j) dg[j] += d[j] * x[j];
      if (!din) continue;
      S* di = din + r;
#pragma omp simd
      for (int j = 0; j < w; ++j) di[j] = d[j] * (S(1) + g[j]);
    }
  });
}

// ---------------------------------------------------------------- cross-entropy

template <class S>
S crossentropy_forward_backward(S* dlogits, const S* logits, const int32_t* targets, int N, int V) {
  int count = 0;
  for (int n = 0; n < N; ++n) count += targets[n] >= 0 ? 1 : 0;
  if (count == 0) return S(0);
  const S inv = S(1) / static_cast<S>(count);
  // per-row losses summed in row order: the result does not depend on the thread count
  std::vector<double> row_loss(static_cast<size_t>(N), 0.0);
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * V >= kParallelMin)
  for (int n = 0; n < N; ++n) {
    const int tgt = targets[n];
    if (tgt < 0) continue;
    CMapV<S> x(logits + static_cast<int64_t>(n) * V, V);
    const S mx = x.maxCoeff();
    const S lse = mx + std::log((x - mx).exp().sum());
    row_loss[static_cast<size_t>(n)] = static_cast<double>(lse - x[tgt]);
    if (dlogits) {
      MapV<S> d(dlogits + static_cast<int64_t>(n) * V, V);
      d += (x - lse).exp() * inv;
      d[tgt] -= inv;
    }
  }
  double total = 0.0;
  for (double l : row_loss) total += l;
  return static_cast<S>(total / count);
}

// ---------------------------------------------------------------- instantiations

#define FLOWLOOP_LAYERS(S)                                                                      \
  template void embedding_forward<S>(S*, const int32_t*, const S*, const S*, int, int, int);   \
  template void embedding_backward<S>(S*, S*, const S*, const int32_t*, int, int, int);         \
  template void layernorm_forward<S>(S*, S*, S*, const S*, const S*, const S*, int, int);       \
  template void layernorm_backward<S>(S*, S*, S*, const S*, const S*, const S*, const S*,       \
                                      const S*, int, int);                                      \
  template void layernorm_backward_scaled<S>(S*, S*, S*, const S*, const S*, int, int, const S*, const S*, \
                                             const S*, const S*, int, int);                      \
  template void linear_forward<S>(S*, const S*, const S*, const S*, int, int, int);             \
  template void column_sums<S>(S*, const S*, int, int);                                         \
  template void linear_backward<S>(S*, S*, S*, const S*, const S*, const S*, int, int, int);    \
  template void linear_forward_few<S>(S*, const S*, const S*, const S*, int, int, int);         \
  template void linear_backward_few<S>(S*, S*, S*, const S*, const S*, const S*, int, int, int); \
  template void attention_forward<S>(S*, S*, const S*, int, int, int, int);                     \
  template void attention_backward<S>(S*, S*, const S*, const S*, const S*, int, int, int, int); \
  template void attention_forward<S>(S*, S*, const S*, int, int, const AttnShape&);            \
  template void attention_backward<S>(S*, S*, const S*, const S*, const S*, int, int, const AttnShape&); \
  template void gelu_forward<S>(S*, const S*, int64_t);                                         \
  template void gelu_backward<S>(S*, const S*, const S*, int64_t);                              \
  template void silu_forward<S>(S*, const S*, int64_t);                                         \
  template void silu_backward<S>(S*, const S*, const S*, int64_t);                              \
  template void modulate_forward<S>(S*, const S*, const S*, const S*, int, int, int, int);      \
  template void modulate_backward<S>(S*, S*, S*, const S*, const S*, const S*, int, int, int, int); \
  template void gate_forward<S>(S*, const S*, const S*, const S*, int, int, int, int);          \
  template void gate_backward<S>(S*, S*, const S*, const S*, const S*, int, int, int, int);     \
  template S crossentropy_forward_backward<S>(S*, const S*, const int32_t*, int, int);

FLOWLOOP_LAYERS(float)
FLOWLOOP_LAYERS(double)

}  // namespace flowloop
