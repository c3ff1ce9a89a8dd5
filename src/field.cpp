#include "flowloop/field.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include <Eigen/Core>

#include "flowloop/layers.hpp"
#include "flowloop/tensor.hpp"

namespace flowloop {

namespace {
template <class S>
void zero(Buffer<S>& v) {
  std::fill(v.begin(), v.end(), S(0));
}
template <class S>
void axpy_into(S* y, const S* x, size_t n) {  // y += x
  for (size_t i = 0; i < n; ++i) y[i] += x[i];
}
}  // namespace

template <class S>
void FieldCache<S>::resize(const ModelConfig& cfg, int capacity_, int T_) {
  const bool sized_tc = !time.e.empty(), sized_sc = !time.se.empty();
  if (capacity_ == capacity && T_ == T && blocks.size() == static_cast<size_t>(cfg.n_block) &&
      sized_tc == cfg.time_cond && sized_sc == cfg.step_cond)
    return;
  capacity = capacity_;
  B = capacity_;
  T = T_;
  const size_t N = static_cast<size_t>(capacity) * T, C = cfg.d_model, F = cfg.d_ff;
  const size_t tc = cfg.time_cond ? 1 : 0;  // time_cond buffers are empty otherwise
  blocks.resize(static_cast<size_t>(cfg.n_block));
  for (auto& c : blocks) {
    c.x.resize(N * C);
    c.ln1.resize(N * C);
    c.mean1.resize(N);
    c.rstd1.resize(N);
    c.qkv.resize(N * 3 * C);
    c.att.resize(static_cast<size_t>(capacity) * cfg.n_head * T * T);
    c.y.resize(N * C);
    c.x2.resize(N * C);
    c.ln2.resize(N * C);
    c.mean2.resize(N);
    c.rstd2.resize(N);
    c.z.resize(N * F);
    c.g.resize(N * F);
    c.ada.resize(tc * capacity * 6 * C);
    c.u1.resize(tc * N * C);
    c.ao.resize(tc * N * C);
    c.u2.resize(tc * N * C);
    c.mo.resize(tc * N * C);
  }
  time.e.resize(tc * capacity * static_cast<size_t>(cfg.time_freq));
  time.z1.resize(tc * capacity * C);
  time.a1.resize(tc * capacity * C);
  time.c.resize(tc * capacity * C);
  time.sc.resize(tc * capacity * C);
  const size_t sc = cfg.step_cond ? 1 : 0;
  time.se.resize(sc * capacity * static_cast<size_t>(cfg.time_freq));
  time.sz1.resize(sc * capacity * C);
  time.sa1.resize(sc * capacity * C);
  time.sc_step.resize(sc * capacity * C);
}

template <class S>
size_t FieldCache<S>::bytes() const {
  size_t n = time.e.size() + time.z1.size() + time.a1.size() + time.c.size() + time.sc.size() +
             time.se.size() + time.sz1.size() + time.sa1.size() + time.sc_step.size();
  for (const auto& c : blocks)
    n += c.x.size() + c.ln1.size() + c.mean1.size() + c.rstd1.size() + c.qkv.size() +
         c.att.size() + c.y.size() + c.x2.size() + c.ln2.size() + c.mean2.size() +
         c.rstd2.size() + c.z.size() + c.g.size() + c.ada.size() + c.u1.size() + c.ao.size() +
         c.u2.size() + c.mo.size();
  return n * sizeof(S);
}

template <class S>
void FieldGradWork<S>::resize(const ModelConfig& cfg, int B_, int T_) {
  if (B_ <= B && T_ == T && dada.empty() != cfg.time_cond) return;
  B = B_;
  T = T_;
  const size_t N = static_cast<size_t>(B) * T, C = cfg.d_model, F = cfg.d_ff;
  dx.resize(N * C);
  dx2.resize(N * C);
  dtmp.resize(N * C);
  dqkv.resize(N * 3 * C);
  datt.resize(static_cast<size_t>(B) * cfg.n_head * T * T);
  dz.resize(N * F);
  dg.resize(N * F);
  dcarry.resize(N * C);
  const size_t tc = cfg.time_cond ? 1 : 0, Bs = static_cast<size_t>(B);
  dgated.resize(tc * N * C);
  dada.resize(tc * Bs * 6 * C);
  dsc.resize(tc * Bs * C);
  dc.resize(tc * Bs * C);
  da1.resize(tc * Bs * C);
  dz1.resize(tc * Bs * C);
  de.resize(tc * Bs * static_cast<size_t>(cfg.time_freq));
}

void check_field_call(const char* who, const ModelConfig& cfg, int T, const double* t, const double* d) {
  if (T > cfg.context)
    throw Error(std::string(who) + ": T = " + std::to_string(T) + " exceeds the context " + std::to_string(cfg.context));
  if (cfg.time_cond && !t)
    throw Error(std::string(who) + ": a time-conditioned field needs the time of every sequence (t is null)");
  if (d && !cfg.step_cond)
    throw Error(std::string(who) + ": a step d was given but the field is not step-conditioned (config step_cond)");
}

FieldOffsets field_offsets(const ModelConfig& cfg, const ParamLayout& layout) {
  FieldOffsets o;
  const size_t f0 = layout.field_begin();
  o.num_params = layout.field_end() - f0;
  for (int i = 0; i < cfg.n_block; ++i) {
    BlockOffsets b = layout.block(i);
    for (size_t* p : {&b.ln1_w, &b.ln1_b, &b.attn_w, &b.attn_b, &b.aproj_w, &b.aproj_b, &b.ln2_w,
                      &b.ln2_b, &b.fc_w, &b.fc_b, &b.mproj_w, &b.mproj_b})
      *p -= f0;
    if (cfg.time_cond) {
      b.ada_w -= f0;
      b.ada_b -= f0;
    }
    o.blocks.push_back(b);
  }
  if (cfg.time_cond) {
    o.time = layout.time_embed();
    for (size_t* p : {&o.time.w1, &o.time.b1, &o.time.w2, &o.time.b2}) *p -= f0;
    if (cfg.step_cond) {
      o.step = layout.step_embed();
      for (size_t* p : {&o.step.w1, &o.step.b1, &o.step.w2, &o.step.b2}) *p -= f0;
    }
  }
  return o;
}

template <class S>
Field<S>::Field(const ModelConfig& cfg, const ParamLayout& layout) : cfg_(cfg) {
  FieldOffsets o = field_offsets(cfg, layout);
  blocks_ = std::move(o.blocks);
  time_ = o.time;
  step_ = o.step;
  num_params_ = o.num_params;
  if (cfg.time_cond) freq_ = sinusoid_frequencies(cfg.time_freq);
}

namespace {
// Parameter gradients of a Linear (and the input gradient, once for all rows):
// summed over the batch, or per sequence at dP + b * stride.
template <class S>
void linear_bwd(S* din, S* dP, size_t oW, size_t ob, const S* dout, const S* in, const S* W, int B,
                int T, int IN, int OUT, size_t stride) {
  const int N = B * T;
  if (stride == 0) {
    linear_backward(din, dP + oW, dP + ob, dout, in, W, N, IN, OUT);
    return;
  }
  if (din) gemm<S>(false, false, N, IN, OUT, S(1), dout, OUT, W, IN, S(1), din, IN);
  for (int b = 0; b < B; ++b) {
    S* d = dP + static_cast<size_t>(b) * stride;
    const size_t r = static_cast<size_t>(b) * T;
    linear_backward<S>(nullptr, d + oW, d + ob, dout + r * OUT, in + r * IN, W, T, IN, OUT);
  }
}

// The same for a Linear of one row per sequence (the time embedding, the modulation):
// W and its gradient stream through once (linear_backward_few).
template <class S>
void linear_bwd_few(S* din, S* dP, size_t oW, size_t ob, const S* dout, const S* in, const S* W, int B,
                    int IN, int OUT, size_t stride) {
  if (stride == 0) {
    linear_backward_few(din, dP + oW, dP + ob, dout, in, W, B, IN, OUT);
    return;
  }
  for (int b = 0; b < B; ++b) {
    S* d = dP + static_cast<size_t>(b) * stride;
    const size_t r = static_cast<size_t>(b);
    linear_backward_few<S>(din ? din + r * IN : nullptr, d + oW, d + ob, dout + r * OUT, in + r * IN, W, 1, IN,
                           OUT);
  }
}

// The same for a LayerNorm; with a modulation scale (B,C) of row stride ld, dout is
// the gradient of LN (1 + scale) + shift (layernorm_backward_scaled).
template <class S>
void layernorm_bwd(S* din, S* dP, size_t ow, size_t ob, const S* dout, const S* in, const S* w,
                   const S* mean, const S* rstd, int B, int T, int C, size_t stride, const S* scale = nullptr,
                   int ld = 0) {
  auto rows = [&](S* di, S* dw, S* db, size_t r, int bs, const S* sc) {
    if (sc)
      layernorm_backward_scaled(di, dw, db, dout + r * C, sc, T, ld, in + r * C, w, mean + r, rstd + r, bs * T, C);
    else
      layernorm_backward(di, dw, db, dout + r * C, in + r * C, w, mean + r, rstd + r, bs * T, C);
  };
  if (stride == 0) {
    rows(din, dP + ow, dP + ob, 0, B, scale);
    return;
  }
  rows(din, nullptr, nullptr, 0, B, scale);
  for (int b = 0; b < B; ++b) {
    S* d = dP + static_cast<size_t>(b) * stride;
    rows(nullptr, d + ow, d + ob, static_cast<size_t>(b) * T, 1, scale ? scale + static_cast<size_t>(b) * ld : nullptr);
  }
}
}  // namespace

template <class S>
double Field<S>::flops(int B, int T) const {
  const double C = cfg_.d_model, F = cfg_.d_ff, BT = static_cast<double>(B) * T;
  double fl = cfg_.n_block * (2.0 * BT * (3 * C * C + C * C + 2 * C * F) + 4.0 * B * T * T * C);
  if (cfg_.time_cond) fl += 2.0 * B * (cfg_.time_freq * C + C * C + cfg_.n_block * 6 * C * C);
  if (cfg_.step_cond) fl += 2.0 * B * (cfg_.time_freq * C + C * C);
  return fl;
}

// Block(x) = x + a + m,  a = Attn(LN1(x)),  m = MLP(LN2(x + a)).
template <class S>
void Field<S>::block_forward(S* out, const S* x, const S* P, const BlockOffsets& o, int B, int T,
                             BlockCache<S>& c) const {
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff, NH = cfg_.n_head;
  const size_t NC = static_cast<size_t>(N) * C;
  std::memcpy(c.x.data(), x, NC * sizeof(S));
  x = c.x.data();  // from here on `out` may alias the caller's input
  layernorm_forward(c.ln1.data(), c.mean1.data(), c.rstd1.data(), x, P + o.ln1_w, P + o.ln1_b, N,
                    C);
  linear_forward(c.qkv.data(), c.ln1.data(), P + o.attn_w, P + o.attn_b, N, C, 3 * C);
  attention_forward(c.y.data(), c.att.data(), c.qkv.data(), B, T, C, NH);
  // x2 = x + y Wp^T + bp
  linear_forward(c.x2.data(), c.y.data(), P + o.aproj_w, P + o.aproj_b, N, C, C);
  axpy_into(c.x2.data(), x, NC);
  layernorm_forward(c.ln2.data(), c.mean2.data(), c.rstd2.data(), c.x2.data(), P + o.ln2_w,
                    P + o.ln2_b, N, C);
  linear_forward(c.z.data(), c.ln2.data(), P + o.fc_w, P + o.fc_b, N, C, F);
  gelu_forward(c.g.data(), c.z.data(), static_cast<int64_t>(N) * F);
  // out = x2 + g Wm^T + bm
  std::memcpy(out, c.x2.data(), NC * sizeof(S));
  gemm<S>(false, true, N, C, F, S(1), c.g.data(), F, P + o.mproj_w, F, S(1), out, C);
  const S* bm = P + o.mproj_b;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * C >= kParallelMin)
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < C; ++i) out[static_cast<size_t>(n) * C + i] += bm[i];
}

template <class S>
void Field<S>::block_vjp(S* dx, S* dP, const S* dout, const S* P, const BlockOffsets& o, int B,
                         int T, const BlockCache<S>& c, FieldGradWork<S>& w, size_t stride) const {
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff, NH = cfg_.n_head;
  const size_t NC = static_cast<size_t>(N) * C;
  // out = x2 + MLP(LN2(x2)):  dx2 = dout + LN2^T(MLP^T(dout))
  std::memcpy(w.dx2.data(), dout, NC * sizeof(S));
  zero(w.dg);
  linear_bwd(w.dg.data(), dP, o.mproj_w, o.mproj_b, dout, c.g.data(), P + o.mproj_w, B, T, F, C, stride);
  zero(w.dz);
  gelu_backward(w.dz.data(), w.dg.data(), c.z.data(), static_cast<int64_t>(N) * F);
  zero(w.dtmp);
  linear_bwd(w.dtmp.data(), dP, o.fc_w, o.fc_b, w.dz.data(), c.ln2.data(), P + o.fc_w, B, T, C, F, stride);
  layernorm_bwd(w.dx2.data(), dP, o.ln2_w, o.ln2_b, w.dtmp.data(), c.x2.data(), P + o.ln2_w,
                c.mean2.data(), c.rstd2.data(), B, T, C, stride);
  // x2 = x + Attn(LN1(x)):  dx += dx2 + LN1^T(Attn^T(dx2))
  axpy_into(dx, w.dx2.data(), NC);
  zero(w.dtmp);
  linear_bwd(w.dtmp.data(), dP, o.aproj_w, o.aproj_b, w.dx2.data(), c.y.data(), P + o.aproj_w, B, T,
             C, C, stride);
  zero(w.dqkv);
  attention_backward(w.dqkv.data(), w.datt.data(), w.dtmp.data(), c.qkv.data(), c.att.data(), B,
                     T, C, NH);
  zero(w.dtmp);
  linear_bwd(w.dtmp.data(), dP, o.attn_w, o.attn_b, w.dqkv.data(), c.ln1.data(), P + o.attn_w, B,
             T, C, 3 * C, stride);
  layernorm_bwd(dx, dP, o.ln1_w, o.ln1_b, w.dtmp.data(), c.x.data(), P + o.ln1_w, c.mean1.data(),
                c.rstd1.data(), B, T, C, stride);
}

// One sinusoidal embedding MLP (time_embed or step_embed) of the B values t:
//   e_b = [cos(tau freq), sin(tau freq)], tau = t_b time_scale;  out_b = W2 silu(W1 e_b + b1) + b2.
template <class S>
void sinusoid_embedding(S* e, const double* t, int B, int E, double time_scale, const double* freq) {
  const int half = E / 2;
  for (int b = 0; b < B; ++b) {
    const double tau = (t ? t[b] : 0.0) * time_scale;  // phases in double: tau reaches 1000 and more
    S* eb = e + static_cast<size_t>(b) * E;
    if constexpr (std::is_same_v<S, float>) {
      // the phase reduced to [-pi, pi] in double, then cos and sin vectorised in float
      // (within 2 ulp of the rounded double values). Whole aligned chunks of 64, zero
      // padded: every value takes Eigen's packet path, never the scalar tail or the
      // alignment peel, whose split would differ between AVX2 and AVX-512 machines.
      constexpr double two_pi = 6.283185307179586476925286766559;
      constexpr int kPhaseChunk = 64;
      alignas(64) float ph[kPhaseChunk], cs[kPhaseChunk], sn[kPhaseChunk];
      for (int k0 = 0; k0 < half; k0 += kPhaseChunk) {
        const int len = std::min(kPhaseChunk, half - k0);
        for (int k = 0; k < kPhaseChunk; ++k) {
          const double p = k < len ? tau * freq[k0 + k] : 0.0;
          ph[k] = static_cast<float>(p - two_pi * std::nearbyint(p / two_pi));
        }
        using Chunk = Eigen::Map<Eigen::Array<float, kPhaseChunk, 1>, Eigen::Aligned64>;
        const Chunk phase(ph);
        Chunk cos_out(cs), sin_out(sn);
        cos_out = phase.cos();
        sin_out = phase.sin();
        std::copy_n(cs, len, eb + k0);
        std::copy_n(sn, len, eb + half + k0);
      }
    } else {
      for (int k = 0; k < half; ++k) {
        const double ph = tau * freq[k];
        eb[k] = static_cast<S>(std::cos(ph));
        eb[half + k] = static_cast<S>(std::sin(ph));
      }
    }
  }
}

template <class S>
void sinusoid_time_grad(double* dt, const S* e, const S* de, int B, int E, double time_scale, const double* freq) {
  const int half = E / 2;
  for (int b = 0; b < B; ++b) {
    const S* eb = e + static_cast<size_t>(b) * E;
    const S* g = de + static_cast<size_t>(b) * E;
    double s = 0.0;
    for (int k = 0; k < half; ++k)
      s += freq[k] * (static_cast<double>(g[half + k]) * eb[k] - static_cast<double>(g[k]) * eb[half + k]);
    dt[b] += time_scale * s;
  }
}

std::vector<double> sinusoid_frequencies(int E) {
  std::vector<double> freq;
  const int half = E / 2;
  for (int k = 0; k < half; ++k) freq.push_back(std::exp(-std::log(10000.0) * k / half));
  return freq;
}

template void sinusoid_embedding<float>(float*, const double*, int, int, double, const double*);
template void sinusoid_embedding<double>(double*, const double*, int, int, double, const double*);
template void sinusoid_time_grad<float>(double*, const float*, const float*, int, int, double, const double*);
template void sinusoid_time_grad<double>(double*, const double*, const double*, int, int, double, const double*);

template <class S>
void Field<S>::embed_forward(S* e, S* z1, S* a1, S* out, const double* t, const TimeEmbedOffsets& o,
                             const S* P, int B) const {
  const int C = cfg_.d_model, E = cfg_.time_freq;
  sinusoid_embedding(e, t, B, E, cfg_.time_scale, freq_.data());
  linear_forward_few(z1, e, P + o.w1, P + o.b1, B, E, C);
  silu_forward(a1, z1, static_cast<int64_t>(B) * C);
  linear_forward_few(out, a1, P + o.w2, P + o.b2, B, C, C);
}

// Given w.dc = dL/d(out) (B,C): the MLP's parameter gradients, and de = dL/de when
// de is non-null (overwritten). Uses w.da1 and w.dz1.
template <class S>
void Field<S>::embed_vjp(S* de, S* dP, const TimeEmbedOffsets& o, const S* P, int B, const S* e, const S* z1,
                         const S* a1, FieldGradWork<S>& w, size_t stride) const {
  const int C = cfg_.d_model, E = cfg_.time_freq;
  zero(w.da1);
  linear_bwd_few(w.da1.data(), dP, o.w2, o.b2, w.dc.data(), a1, P + o.w2, B, C, C, stride);
  zero(w.dz1);
  silu_backward(w.dz1.data(), w.da1.data(), z1, static_cast<int64_t>(B) * C);
  if (de) std::fill(de, de + static_cast<size_t>(B) * E, S(0));
  linear_bwd_few(de, dP, o.w1, o.b1, w.dz1.data(), e, P + o.w1, B, E, C, stride);
}

// c_b = TE(t_b) (+ SE(d_b) with step_cond), then silu(c_b).
template <class S>
void Field<S>::time_forward(const double* t, const double* d, const S* P, int B, TimeCache<S>& tc) const {
  embed_forward(tc.e.data(), tc.z1.data(), tc.a1.data(), tc.c.data(), t, time_, P, B);
  if (cfg_.step_cond) {
    embed_forward(tc.se.data(), tc.sz1.data(), tc.sa1.data(), tc.sc_step.data(), d, step_, P, B);
    axpy_into(tc.c.data(), tc.sc_step.data(), static_cast<size_t>(B) * cfg_.d_model);
  }
  silu_forward(tc.sc.data(), tc.c.data(), static_cast<int64_t>(B) * cfg_.d_model);
}

// Given dsc = dL/dsilu(c) (B,C) in w.dsc: the time (and step) embedding's parameter
// gradients and, if dt is non-null, dt[b] += dL/dt_b through tau = t time_scale.
template <class S>
void Field<S>::time_vjp(S* dP, const S* P, int B, const TimeCache<S>& tc, FieldGradWork<S>& w, size_t stride,
                        double* dt) const {
  const int E = cfg_.time_freq;
  zero(w.dc);
  silu_backward(w.dc.data(), w.dsc.data(), tc.c.data(), static_cast<int64_t>(B) * cfg_.d_model);
  if (cfg_.step_cond)  // the step is an input, never differentiated
    embed_vjp(nullptr, dP, step_, P, B, tc.se.data(), tc.sz1.data(), tc.sa1.data(), w, stride);
  embed_vjp(dt ? w.de.data() : nullptr, dP, time_, P, B, tc.e.data(), tc.z1.data(), tc.a1.data(), w, stride);
  if (!dt) return;
  // e = [cos(tau freq), sin(tau freq)]:  de/dtau = [-freq sin, freq cos]
  sinusoid_time_grad(dt, tc.e.data(), w.de.data(), B, E, cfg_.time_scale, freq_.data());
}

// The time-conditioned block (adaLN):
//   [s1, c1, g1, s2, c2, g2] = split6(W_ada silu(c) + b_ada)
//   x2 = x + (1 + g1) Attn(LN1(x) (1 + c1) + s1),  out = x2 + (1 + g2) MLP(LN2(x2) (1 + c2) + s2)
// Every operation that the autonomous block performs is performed here in the same
// order on the same values when the modulation is zero, so that zero ada weights
// give the autonomous block's bits.
template <class S>
void Field<S>::block_forward_tc(S* out, const S* x, const S* P, const BlockOffsets& o, int B, int T,
                                const TimeCache<S>& tc, BlockCache<S>& c) const {
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff, NH = cfg_.n_head, ld = 6 * C;
  const size_t NC = static_cast<size_t>(N) * C;
  std::memcpy(c.x.data(), x, NC * sizeof(S));
  x = c.x.data();  // from here on `out` may alias the caller's input
  linear_forward_few(c.ada.data(), tc.sc.data(), P + o.ada_w, P + o.ada_b, B, C, 6 * C);
  const S* s1 = c.ada.data();
  const S *c1 = s1 + C, *g1 = s1 + 2 * C, *s2 = s1 + 3 * C, *c2 = s1 + 4 * C, *g2 = s1 + 5 * C;
  layernorm_forward(c.ln1.data(), c.mean1.data(), c.rstd1.data(), x, P + o.ln1_w, P + o.ln1_b, N,
                    C);
  modulate_forward(c.u1.data(), c.ln1.data(), s1, c1, B, T, C, ld);
  linear_forward(c.qkv.data(), c.u1.data(), P + o.attn_w, P + o.attn_b, N, C, 3 * C);
  attention_forward(c.y.data(), c.att.data(), c.qkv.data(), B, T, C, NH);
  // x2 = x + (1 + g1) (y Wp^T + bp)
  linear_forward(c.ao.data(), c.y.data(), P + o.aproj_w, P + o.aproj_b, N, C, C);
  gate_forward(c.x2.data(), x, c.ao.data(), g1, B, T, C, ld);
  layernorm_forward(c.ln2.data(), c.mean2.data(), c.rstd2.data(), c.x2.data(), P + o.ln2_w,
                    P + o.ln2_b, N, C);
  modulate_forward(c.u2.data(), c.ln2.data(), s2, c2, B, T, C, ld);
  linear_forward(c.z.data(), c.u2.data(), P + o.fc_w, P + o.fc_b, N, C, F);
  gelu_forward(c.g.data(), c.z.data(), static_cast<int64_t>(N) * F);
  // out = x2 + (1 + g2) m,  m = g Wm^T + bm. x2 + m is summed as the autonomous block
  // sums it (the product accumulates onto x2); m is then read back as (x2 + m) - x2,
  // within one rounding of x2 + m, and the gate adds g2 m: zero gates add exactly 0.
  std::memcpy(out, c.x2.data(), NC * sizeof(S));
  gemm<S>(false, true, N, C, F, S(1), c.g.data(), F, P + o.mproj_w, F, S(1), out, C);
  const S* bm = P + o.mproj_b;
  S* mo = c.mo.data();
  const S* x2 = c.x2.data();
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * C >= kParallelMin)
  for (int n = 0; n < N; ++n) {
    const S* gate = g2 + static_cast<size_t>(n / T) * ld;
    S* on = out + static_cast<size_t>(n) * C;
    S* mn = mo + static_cast<size_t>(n) * C;
    const S* xn = x2 + static_cast<size_t>(n) * C;
    for (int i = 0; i < C; ++i) {
      on[i] += bm[i];
      mn[i] = on[i] - xn[i];
      on[i] += gate[i] * mn[i];
    }
  }
}

template <class S>
void Field<S>::block_vjp_tc(S* dx, S* dP, const S* dout, const S* P, const BlockOffsets& o, int B, int T,
                            const TimeCache<S>& tc, const BlockCache<S>& c, FieldGradWork<S>& w,
                            size_t stride) const {
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff, NH = cfg_.n_head, ld = 6 * C;
  const size_t NC = static_cast<size_t>(N) * C;
  const S* ada = c.ada.data();
  S* dada = w.dada.data();  // this block's [ds1, dc1, dg1, ds2, dc2, dg2]
  zero(w.dada);
  // out = x2 + (1 + g2) MLP(u2):  dx2 = dout + LN2^T(mod2^T(MLP^T((1 + g2) dout)))
  // (mod^T, the factor 1 + c, is applied inside the LayerNorm's backward)
  std::memcpy(w.dx2.data(), dout, NC * sizeof(S));
  gate_backward(w.dgated.data(), dada + 5 * C, dout, c.mo.data(), ada + 5 * C, B, T, C, ld);
  zero(w.dg);
  linear_bwd(w.dg.data(), dP, o.mproj_w, o.mproj_b, w.dgated.data(), c.g.data(), P + o.mproj_w, B, T, F, C,
             stride);
  zero(w.dz);
  gelu_backward(w.dz.data(), w.dg.data(), c.z.data(), static_cast<int64_t>(N) * F);
  zero(w.dtmp);
  linear_bwd(w.dtmp.data(), dP, o.fc_w, o.fc_b, w.dz.data(), c.u2.data(), P + o.fc_w, B, T, C, F, stride);
  modulate_backward<S>(nullptr, dada + 3 * C, dada + 4 * C, w.dtmp.data(), c.ln2.data(), ada + 4 * C, B, T, C,
                       ld);
  layernorm_bwd(w.dx2.data(), dP, o.ln2_w, o.ln2_b, w.dtmp.data(), c.x2.data(), P + o.ln2_w,
                c.mean2.data(), c.rstd2.data(), B, T, C, stride, ada + 4 * C, ld);
  // x2 = x + (1 + g1) Attn(u1):  dx += dx2 + LN1^T(mod1^T(Attn^T((1 + g1) dx2)))
  axpy_into(dx, w.dx2.data(), NC);
  gate_backward(w.dgated.data(), dada + 2 * C, w.dx2.data(), c.ao.data(), ada + 2 * C, B, T, C, ld);
  zero(w.dtmp);
  linear_bwd(w.dtmp.data(), dP, o.aproj_w, o.aproj_b, w.dgated.data(), c.y.data(), P + o.aproj_w, B, T, C, C,
             stride);
  zero(w.dqkv);
  attention_backward(w.dqkv.data(), w.datt.data(), w.dtmp.data(), c.qkv.data(), c.att.data(), B,
                     T, C, NH);
  zero(w.dtmp);
  linear_bwd(w.dtmp.data(), dP, o.attn_w, o.attn_b, w.dqkv.data(), c.u1.data(), P + o.attn_w, B,
             T, C, 3 * C, stride);
  modulate_backward<S>(nullptr, dada, dada + C, w.dtmp.data(), c.ln1.data(), ada + C, B, T, C, ld);
  layernorm_bwd(dx, dP, o.ln1_w, o.ln1_b, w.dtmp.data(), c.x.data(), P + o.ln1_w, c.mean1.data(),
                c.rstd1.data(), B, T, C, stride, ada + C, ld);
  // ada = W_ada silu(c) + b_ada: its parameters, and dsilu(c) += dada W_ada (all blocks add up)
  linear_bwd_few(w.dsc.data(), dP, o.ada_w, o.ada_b, dada, tc.sc.data(), P + o.ada_w, B, C, 6 * C, stride);
}

template <class S>
void Field<S>::forward(S* f, const S* h, const double* t, const S* params, int B, int T,
                       FieldCache<S>& cache, const double* d) const {
  if (B > cache.capacity || cache.T != T || cache.blocks.size() != blocks_.size())
    throw Error("Field::forward: cache sized for (B=" + std::to_string(cache.capacity) +
                ", T=" + std::to_string(cache.T) + ") but called with (B=" + std::to_string(B) +
                ", T=" + std::to_string(T) + ")");
  if (cache.time.e.empty() == cfg_.time_cond)
    throw Error(std::string("Field::forward: cache sized for ") + (cfg_.time_cond ? "an autonomous" : "a time-conditioned") +
                " field but the field is " + (cfg_.time_cond ? "time-conditioned" : "autonomous"));
  check_field_call("Field::forward", cfg_, T, t, d);
  if (cache.time.se.empty() == cfg_.step_cond)
    throw Error(std::string("Field::forward: cache sized for a field ") + (cfg_.step_cond ? "without" : "with") +
                " step conditioning but the field " + (cfg_.step_cond ? "has it" : "has none"));
  cache.B = B;  // the vjp differentiates this many sequences
  const size_t NC = static_cast<size_t>(B) * T * cfg_.d_model;
  if (cfg_.time_cond) time_forward(t, d, params, B, cache.time);
  // Block i reads its input from its cache copy, so f serves as input and output.
  const S* x = h;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (cfg_.time_cond)
      block_forward_tc(f, x, params, blocks_[i], B, T, cache.time, cache.blocks[i]);
    else
      block_forward(f, x, params, blocks_[i], B, T, cache.blocks[i]);
    x = f;
  }
  for (size_t k = 0; k < NC; ++k) f[k] -= h[k];
}

template <class S>
void Field<S>::vjp(S* dh, S* dparams, const S* gf, const S* params, const FieldCache<S>& cache,
                   FieldGradWork<S>& work, size_t param_stride, double* dt) const {
  const int B = cache.B, T = cache.T;
  work.resize(cfg_, B, T);
  const size_t NC = static_cast<size_t>(B) * T * cfg_.d_model;
  // f = S(h) - h: dh += S'(h)^T gf - gf
  for (size_t k = 0; k < NC; ++k) dh[k] -= gf[k];
  if (cfg_.time_cond) zero(work.dsc);  // every block's modulation adds to dL/dsilu(c)
  auto block = [&](S* dx, size_t i, const S* g) {
    if (cfg_.time_cond)
      block_vjp_tc(dx, dparams, g, params, blocks_[i], B, T, cache.time, cache.blocks[i], work, param_stride);
    else
      block_vjp(dx, dparams, g, params, blocks_[i], B, T, cache.blocks[i], work, param_stride);
  };
  // Blocks in reverse; block 0 accumulates straight into dh, the others hand their
  // input gradient to the block below through work.dcarry.
  const S* g = gf;
  for (size_t i = blocks_.size(); i-- > 0;) {
    if (i == 0) {
      block(dh, i, g);
    } else {
      zero(work.dx);
      block(work.dx.data(), i, g);
      std::swap(work.dx, work.dcarry);
      g = work.dcarry.data();
    }
  }
  if (cfg_.time_cond) time_vjp(dparams, params, B, cache.time, work, param_stride, dt);
}

template class Field<float>;
template class Field<double>;
template struct FieldCache<float>;
template struct FieldCache<double>;
template struct FieldGradWork<float>;
template struct FieldGradWork<double>;

}  // namespace flowloop
