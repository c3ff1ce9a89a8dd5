#include "flowloop/device_field.hpp"

#include <cmath>
#include <string>

#include "flowloop/field.hpp"

namespace flowloop {

template <class S>
void DeviceFieldCache<S>::resize(Backend<S>& be, const ModelConfig& cfg, int capacity_, int T_) {
  if (capacity_ == capacity && T_ == T && blocks.size() == static_cast<size_t>(cfg.n_block) &&
      time_cond == cfg.time_cond && step_cond == cfg.step_cond)
    return;
  capacity = capacity_;
  B = capacity_;
  T = T_;
  time_cond = cfg.time_cond;
  step_cond = cfg.step_cond;
  const size_t N = static_cast<size_t>(capacity) * T, C = cfg.d_model, F = cfg.d_ff, Bs = capacity;
  const size_t tc = cfg.time_cond ? 1 : 0, sc_ = cfg.step_cond ? 1 : 0, E = static_cast<size_t>(cfg.time_freq);
  blocks.resize(static_cast<size_t>(cfg.n_block));
  for (auto& bc : blocks) {
    for (Array<S>* a : {&bc.x, &bc.ln1, &bc.y, &bc.x2, &bc.ln2}) a->resize(be, N * C);
    for (Array<S>* a : {&bc.mean1, &bc.rstd1, &bc.mean2, &bc.rstd2}) a->resize(be, N);
    bc.qkv.resize(be, N * 3 * C);
    bc.att.resize(be, Bs * cfg.n_head * T * T);
    bc.z.resize(be, N * F);
    bc.g.resize(be, N * F);
    bc.ada.resize(be, tc * Bs * 6 * C);
    for (Array<S>* a : {&bc.u1, &bc.ao, &bc.u2, &bc.mo}) a->resize(be, tc * N * C);
  }
  e.resize(be, tc * Bs * E);
  for (Array<S>* a : {&z1, &a1, &c, &sc}) a->resize(be, tc * Bs * C);
  se.resize(be, sc_ * Bs * E);
  for (Array<S>* a : {&sz1, &sa1, &sc_step}) a->resize(be, sc_ * Bs * C);
  e_host.assign(tc * Bs * E, S(0));
  se_host.assign(sc_ * Bs * E, S(0));
}

template <class S>
size_t DeviceFieldCache<S>::bytes() const {
  size_t n = e.size() + z1.size() + a1.size() + c.size() + sc.size() + se.size() + sz1.size() + sa1.size() +
             sc_step.size();
  for (const auto& b : blocks)
    for (const Array<S>* a : {&b.x, &b.ln1, &b.mean1, &b.rstd1, &b.qkv, &b.att, &b.y, &b.x2, &b.ln2, &b.mean2,
                              &b.rstd2, &b.z, &b.g, &b.ada, &b.u1, &b.ao, &b.u2, &b.mo})
      n += a->size();
  return n * sizeof(S);
}

template <class S>
void DeviceFieldWork<S>::resize(Backend<S>& be, const ModelConfig& cfg, int B_, int T_) {
  if (B_ <= B && T_ == T && time_cond == cfg.time_cond) return;
  B = B_;
  T = T_;
  time_cond = cfg.time_cond;
  const size_t N = static_cast<size_t>(B) * T, C = cfg.d_model, F = cfg.d_ff, Bs = B;
  const size_t tc = cfg.time_cond ? 1 : 0;
  for (Array<S>* a : {&dx, &dx2, &dtmp, &dcarry}) a->resize(be, N * C);
  dqkv.resize(be, N * 3 * C);
  datt.resize(be, Bs * cfg.n_head * T * T);
  dz.resize(be, N * F);
  dg.resize(be, N * F);
  dgated.resize(be, tc * N * C);
  dada.resize(be, tc * Bs * 6 * C);
  for (Array<S>* a : {&dsc, &dc, &da1, &dz1}) a->resize(be, tc * Bs * C);
  de.resize(be, tc * Bs * static_cast<size_t>(cfg.time_freq));
  de_host.assign(tc * Bs * static_cast<size_t>(cfg.time_freq), S(0));
}

template <class S>
DeviceField<S>::DeviceField(Backend<S>& be, const ModelConfig& cfg, const ParamLayout& layout) : be_(be), cfg_(cfg) {
  FieldOffsets o = field_offsets(cfg, layout);
  blocks_ = std::move(o.blocks);
  time_ = o.time;
  step_ = o.step;
  num_params_ = o.num_params;
  if (cfg.time_cond) freq_ = sinusoid_frequencies(cfg.time_freq);
}

// ---------------------------------------------------------------- composites

template <class S>
void DeviceField<S>::linear_fwd(S* out, const S* in, const S* W, const S* b, int N, int IN, int OUT) const {
  be_.gemm(false, true, N, OUT, IN, S(1), in, IN, 0, W, IN, 0, S(0), out, OUT, 0, 1);
  if (b) be_.add_bias(out, b, N, OUT);
}

template <class S>
void DeviceField<S>::linear_bwd(S* din, S* dP, size_t oW, size_t ob, const S* dout, const S* in, const S* W, int B,
                                int rows, int IN, int OUT, size_t stride) const {
  const int N = B * rows;
  if (din) be_.gemm(false, false, N, IN, OUT, S(1), dout, OUT, 0, W, IN, 0, S(1), din, IN, 0, 1);
  if (stride == 0) {
    be_.gemm(true, false, OUT, IN, N, S(1), dout, OUT, 0, in, IN, 0, S(1), dP + oW, IN, 0, 1);
    be_.column_sums(dP + ob, dout, N, OUT);
    return;
  }
  // one product per sequence: batched, the sequences' gradients `stride` apart
  be_.gemm(true, false, OUT, IN, rows, S(1), dout, OUT, static_cast<int64_t>(rows) * OUT, in, IN,
           static_cast<int64_t>(rows) * IN, S(1), dP + oW, IN, static_cast<int64_t>(stride), B);
  for (int b = 0; b < B; ++b)
    be_.column_sums(dP + static_cast<size_t>(b) * stride + ob, dout + static_cast<size_t>(b) * rows * OUT, rows,
                    OUT);
}

template <class S>
void DeviceField<S>::layernorm_bwd(S* din, S* dP, size_t ow, size_t ob, const S* dout, const S* in, const S* w,
                                   const S* mean, const S* rstd, int B, int T, size_t stride) const {
  const int C = cfg_.d_model;
  if (stride == 0) {
    be_.layernorm_backward(din, dP + ow, dP + ob, dout, in, w, mean, rstd, B * T, C);
    return;
  }
  be_.layernorm_backward(din, nullptr, nullptr, dout, in, w, mean, rstd, B * T, C);
  for (int b = 0; b < B; ++b) {
    S* d = dP + static_cast<size_t>(b) * stride;
    const size_t r = static_cast<size_t>(b) * T;
    be_.layernorm_backward(nullptr, d + ow, d + ob, dout + r * C, in + r * C, w, mean + r, rstd + r, T, C);
  }
}

// Causal self-attention of qkv (B,T,3C) into y (B,T,C), probabilities in att (B,NH,T,T):
// per sequence, the NH heads' products as one strided batch.
template <class S>
void DeviceField<S>::attention_fwd(S* y, S* att, const S* qkv, int B, int T) const {
  const int C = cfg_.d_model, NH = cfg_.n_head, D = C / NH, C3 = 3 * C;
  const int64_t TT = static_cast<int64_t>(T) * T;
  for (int b = 0; b < B; ++b) {
    const S* q = qkv + static_cast<size_t>(b) * T * C3;
    S* A = att + static_cast<size_t>(b) * NH * TT;
    be_.gemm(false, true, T, T, D, S(1), q, C3, D, q + C, C3, D, S(0), A, T, TT, NH);
  }
  be_.causal_softmax(att, B * NH, T, static_cast<S>(1.0 / std::sqrt(static_cast<double>(D))));
  for (int b = 0; b < B; ++b) {
    const S* v = qkv + static_cast<size_t>(b) * T * C3 + 2 * C;
    const S* A = att + static_cast<size_t>(b) * NH * TT;
    be_.gemm(false, false, T, D, T, S(1), A, T, TT, v, C3, D, S(0), y + static_cast<size_t>(b) * T * C, C, D, NH);
  }
}

template <class S>
void DeviceField<S>::attention_bwd(S* dqkv, S* datt, const S* dy, const S* qkv, const S* att, int B, int T) const {
  const int C = cfg_.d_model, NH = cfg_.n_head, D = C / NH, C3 = 3 * C;
  const int64_t TT = static_cast<int64_t>(T) * T;
  for (int b = 0; b < B; ++b) {
    const size_t r3 = static_cast<size_t>(b) * T * C3;
    const S* dyb = dy + static_cast<size_t>(b) * T * C;
    const S* A = att + static_cast<size_t>(b) * NH * TT;
    S* dA = datt + static_cast<size_t>(b) * NH * TT;
    // y = A v:  dv += A^T dy,  dA = dy v^T
    be_.gemm(true, false, T, D, T, S(1), A, T, TT, dyb, C, D, S(1), dqkv + r3 + 2 * C, C3, D, NH);
    be_.gemm(false, true, T, T, D, S(1), dyb, C, D, qkv + r3 + 2 * C, C3, D, S(0), dA, T, TT, NH);
  }
  be_.causal_softmax_backward(datt, att, B * NH, T, static_cast<S>(1.0 / std::sqrt(static_cast<double>(D))));
  for (int b = 0; b < B; ++b) {
    const size_t r3 = static_cast<size_t>(b) * T * C3;
    const S* dA = datt + static_cast<size_t>(b) * NH * TT;
    // scores = q k^T:  dq += dS k,  dk += dS^T q
    be_.gemm(false, false, T, D, T, S(1), dA, T, TT, qkv + r3 + C, C3, D, S(1), dqkv + r3, C3, D, NH);
    be_.gemm(true, false, T, D, T, S(1), dA, T, TT, qkv + r3, C3, D, S(1), dqkv + r3 + C, C3, D, NH);
  }
}

// ---------------------------------------------------------------- the block

// Autonomous: out = x2 + MLP(LN2(x2)), x2 = x + Attn(LN1(x)).
// Time-conditioned (adaLN): x2 = x + (1 + g1) Attn(LN1(x) (1 + c1) + s1),
//                           out = x2 + (1 + g2) MLP(LN2(x2) (1 + c2) + s2).
template <class S>
void DeviceField<S>::block_forward(S* out, const S* x, const S* P, const BlockOffsets& o, int B, int T,
                                   DeviceFieldCache<S>& cache, DeviceBlockCache<S>& c) const {
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff, ld = 6 * C;
  const size_t NC = static_cast<size_t>(N) * C;
  const bool tc = cfg_.time_cond;
  be_.copy(c.x.data(), x, NC);
  x = c.x.data();  // `out` may alias the caller's input
  const S* ada = c.ada.data();
  if (tc) linear_fwd(c.ada.data(), cache.sc.data(), P + o.ada_w, P + o.ada_b, B, C, 6 * C);
  be_.layernorm_forward(c.ln1.data(), c.mean1.data(), c.rstd1.data(), x, P + o.ln1_w, P + o.ln1_b, N, C);
  if (tc) be_.modulate_forward(c.u1.data(), c.ln1.data(), ada, ada + C, B, T, C, ld);
  linear_fwd(c.qkv.data(), tc ? c.u1.data() : c.ln1.data(), P + o.attn_w, P + o.attn_b, N, C, 3 * C);
  attention_fwd(c.y.data(), c.att.data(), c.qkv.data(), B, T);
  if (tc) {
    linear_fwd(c.ao.data(), c.y.data(), P + o.aproj_w, P + o.aproj_b, N, C, C);
    be_.gate_forward(c.x2.data(), x, c.ao.data(), ada + 2 * C, B, T, C, ld);
  } else {
    linear_fwd(c.x2.data(), c.y.data(), P + o.aproj_w, P + o.aproj_b, N, C, C);
    be_.axpy(c.x2.data(), S(1), x, NC);
  }
  be_.layernorm_forward(c.ln2.data(), c.mean2.data(), c.rstd2.data(), c.x2.data(), P + o.ln2_w, P + o.ln2_b, N, C);
  if (tc) be_.modulate_forward(c.u2.data(), c.ln2.data(), ada + 3 * C, ada + 4 * C, B, T, C, ld);
  linear_fwd(c.z.data(), tc ? c.u2.data() : c.ln2.data(), P + o.fc_w, P + o.fc_b, N, C, F);
  be_.gelu_forward(c.g.data(), c.z.data(), static_cast<int64_t>(N) * F);
  if (tc) {
    linear_fwd(c.mo.data(), c.g.data(), P + o.mproj_w, P + o.mproj_b, N, F, C);
    be_.gate_forward(out, c.x2.data(), c.mo.data(), ada + 5 * C, B, T, C, ld);
  } else {
    be_.copy(out, c.x2.data(), NC);
    be_.gemm(false, true, N, C, F, S(1), c.g.data(), F, 0, P + o.mproj_w, F, 0, S(1), out, C, 0, 1);
    be_.add_bias(out, P + o.mproj_b, N, C);
  }
}

template <class S>
void DeviceField<S>::block_vjp(S* dx, S* dP, const S* dout, const S* P, const BlockOffsets& o, int B, int T,
                               const DeviceFieldCache<S>& cache, const DeviceBlockCache<S>& c, DeviceFieldWork<S>& w,
                               size_t stride) const {
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff, ld = 6 * C;
  const size_t NC = static_cast<size_t>(N) * C;
  const bool tc = cfg_.time_cond;
  const S* ada = c.ada.data();
  S* dada = w.dada.data();  // this block's [ds1, dc1, dg1, ds2, dc2, dg2]
  if (tc) be_.fill(dada, S(0), static_cast<size_t>(B) * ld);
  // the MLP branch: dx2 = dout + LN2^T(mod2^T(MLP^T((1 + g2) dout)))
  be_.copy(w.dx2.data(), dout, NC);
  const S* dm = dout;
  if (tc) {
    be_.gate_backward(w.dgated.data(), dada + 5 * C, dout, c.mo.data(), ada + 5 * C, B, T, C, ld);
    dm = w.dgated.data();
  }
  w.dg.zero();
  linear_bwd(w.dg.data(), dP, o.mproj_w, o.mproj_b, dm, c.g.data(), P + o.mproj_w, B, T, F, C, stride);
  w.dz.zero();
  be_.gelu_backward(w.dz.data(), w.dg.data(), c.z.data(), static_cast<int64_t>(N) * F);
  w.dtmp.zero();
  linear_bwd(w.dtmp.data(), dP, o.fc_w, o.fc_b, w.dz.data(), tc ? c.u2.data() : c.ln2.data(), P + o.fc_w, B, T, C,
             F, stride);
  const S* dln = w.dtmp.data();
  if (tc) {  // u2 = LN2 (1 + c2) + s2 (dgated is free again)
    be_.modulate_backward(w.dgated.data(), dada + 3 * C, dada + 4 * C, w.dtmp.data(), c.ln2.data(), ada + 4 * C, B,
                          T, C, ld);
    dln = w.dgated.data();
  }
  layernorm_bwd(w.dx2.data(), dP, o.ln2_w, o.ln2_b, dln, c.x2.data(), P + o.ln2_w, c.mean2.data(), c.rstd2.data(), B,
                T, stride);
  // the attention branch: dx += dx2 + LN1^T(mod1^T(Attn^T((1 + g1) dx2)))
  be_.axpy(dx, S(1), w.dx2.data(), NC);
  const S* da = w.dx2.data();
  if (tc) {
    be_.gate_backward(w.dgated.data(), dada + 2 * C, w.dx2.data(), c.ao.data(), ada + 2 * C, B, T, C, ld);
    da = w.dgated.data();
  }
  w.dtmp.zero();
  linear_bwd(w.dtmp.data(), dP, o.aproj_w, o.aproj_b, da, c.y.data(), P + o.aproj_w, B, T, C, C, stride);
  w.dqkv.zero();
  attention_bwd(w.dqkv.data(), w.datt.data(), w.dtmp.data(), c.qkv.data(), c.att.data(), B, T);
  w.dtmp.zero();
  linear_bwd(w.dtmp.data(), dP, o.attn_w, o.attn_b, w.dqkv.data(), tc ? c.u1.data() : c.ln1.data(), P + o.attn_w, B,
             T, C, 3 * C, stride);
  dln = w.dtmp.data();
  if (tc) {
    be_.modulate_backward(w.dgated.data(), dada, dada + C, w.dtmp.data(), c.ln1.data(), ada + C, B, T, C, ld);
    dln = w.dgated.data();
  }
  layernorm_bwd(dx, dP, o.ln1_w, o.ln1_b, dln, c.x.data(), P + o.ln1_w, c.mean1.data(), c.rstd1.data(), B, T, stride);
  // ada = W_ada silu(c) + b_ada: its parameters, and dsilu(c) += dada W_ada
  if (tc) linear_bwd(w.dsc.data(), dP, o.ada_w, o.ada_b, dada, cache.sc.data(), P + o.ada_w, B, 1, C, 6 * C, stride);
}

// ---------------------------------------------------------------- the embeddings

template <class S>
void DeviceField<S>::embed_forward(S* e, Buffer<S>& e_host, S* z1, S* a1, S* out, const double* t,
                                   const TimeEmbedOffsets& o, const S* P, int B) const {
  const int C = cfg_.d_model, E = cfg_.time_freq;
  sinusoid_embedding(e_host.data(), t, B, E, cfg_.time_scale, freq_.data());
  be_.upload(e, e_host.data(), static_cast<size_t>(B) * E);
  linear_fwd(z1, e, P + o.w1, P + o.b1, B, E, C);
  be_.silu_forward(a1, z1, static_cast<int64_t>(B) * C);
  linear_fwd(out, a1, P + o.w2, P + o.b2, B, C, C);
}

template <class S>
void DeviceField<S>::embed_vjp(S* de, S* dP, const TimeEmbedOffsets& o, const S* P, int B, const S* e, const S* z1,
                               const S* a1, DeviceFieldWork<S>& w, size_t stride) const {
  const int C = cfg_.d_model, E = cfg_.time_freq;
  w.da1.zero();
  linear_bwd(w.da1.data(), dP, o.w2, o.b2, w.dc.data(), a1, P + o.w2, B, 1, C, C, stride);
  w.dz1.zero();
  be_.silu_backward(w.dz1.data(), w.da1.data(), z1, static_cast<int64_t>(B) * C);
  if (de) be_.fill(de, S(0), static_cast<size_t>(B) * E);
  linear_bwd(de, dP, o.w1, o.b1, w.dz1.data(), e, P + o.w1, B, 1, E, C, stride);
}

// ---------------------------------------------------------------- forward, vjp

template <class S>
void DeviceField<S>::forward(S* f, const S* h, const double* t, const S* params, int B, int T,
                             DeviceFieldCache<S>& cache, const double* d) const {
  if (B > cache.capacity || cache.T != T || cache.blocks.size() != blocks_.size() ||
      cache.time_cond != cfg_.time_cond || cache.step_cond != cfg_.step_cond)
    throw Error("DeviceField::forward: cache sized for (B=" + std::to_string(cache.capacity) +
                ", T=" + std::to_string(cache.T) + ") of another configuration, called with (B=" + std::to_string(B) +
                ", T=" + std::to_string(T) + ")");
  check_field_call("DeviceField::forward", cfg_, T, t, d);
  cache.B = B;
  const int C = cfg_.d_model;
  const size_t NC = static_cast<size_t>(B) * T * C;
  if (cfg_.time_cond) {
    embed_forward(cache.e.data(), cache.e_host, cache.z1.data(), cache.a1.data(), cache.c.data(), t, time_, params, B);
    if (cfg_.step_cond) {
      embed_forward(cache.se.data(), cache.se_host, cache.sz1.data(), cache.sa1.data(), cache.sc_step.data(), d,
                    step_, params, B);
      be_.axpy(cache.c.data(), S(1), cache.sc_step.data(), static_cast<size_t>(B) * C);
    }
    be_.silu_forward(cache.sc.data(), cache.c.data(), static_cast<int64_t>(B) * C);
  }
  const S* x = h;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    block_forward(f, x, params, blocks_[i], B, T, cache, cache.blocks[i]);
    x = f;
  }
  be_.axpy(f, S(-1), h, NC);
}

template <class S>
void DeviceField<S>::vjp(S* dh, S* dparams, const S* gf, const S* params, const DeviceFieldCache<S>& cache,
                         DeviceFieldWork<S>& work, size_t param_stride, double* dt) const {
  const int B = cache.B, T = cache.T, C = cfg_.d_model, E = cfg_.time_freq;
  work.resize(be_, cfg_, B, T);
  const size_t NC = static_cast<size_t>(B) * T * C;
  be_.axpy(dh, S(-1), gf, NC);  // f = S(h) - h
  if (cfg_.time_cond) work.dsc.zero();
  const S* g = gf;
  for (size_t i = blocks_.size(); i-- > 0;) {
    if (i == 0) {
      block_vjp(dh, dparams, g, params, blocks_[i], B, T, cache, cache.blocks[i], work, param_stride);
    } else {
      work.dx.zero();
      block_vjp(work.dx.data(), dparams, g, params, blocks_[i], B, T, cache, cache.blocks[i], work, param_stride);
      std::swap(work.dx, work.dcarry);
      g = work.dcarry.data();
    }
  }
  if (!cfg_.time_cond) return;
  work.dc.zero();
  be_.silu_backward(work.dc.data(), work.dsc.data(), cache.c.data(), static_cast<int64_t>(B) * C);
  if (cfg_.step_cond)  // the step is an input, never differentiated
    embed_vjp(nullptr, dparams, step_, params, B, cache.se.data(), cache.sz1.data(), cache.sa1.data(), work,
              param_stride);
  embed_vjp(dt ? work.de.data() : nullptr, dparams, time_, params, B, cache.e.data(), cache.z1.data(),
            cache.a1.data(), work, param_stride);
  if (!dt) return;
  be_.download(work.de_host.data(), work.de.data(), static_cast<size_t>(B) * E);
  sinusoid_time_grad(dt, cache.e_host.data(), work.de_host.data(), B, E, cfg_.time_scale, freq_.data());
}

template struct DeviceFieldCache<float>;
template struct DeviceFieldCache<double>;
template struct DeviceFieldWork<float>;
template struct DeviceFieldWork<double>;
template class DeviceField<float>;
template class DeviceField<double>;

}  // namespace flowloop
