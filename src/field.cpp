#include "flowloop/nn/field.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include <Eigen/Core>

namespace flowloop {

namespace {
// Row widths of a block's activations: qkv (3C, or (NH + 2 NKV) D), the attention's output
// (C, or NH D), the MLP's first product (F, or [gate | up] 2F).
struct Widths {
  size_t qkv, y, z;
};
Widths widths(const ModelConfig& cfg) {
  if (!cfg.llama()) return {3 * static_cast<size_t>(cfg.d_model), static_cast<size_t>(cfg.d_model),
                            static_cast<size_t>(cfg.d_ff)};
  const AttnShape a = attn_shape(cfg);
  return {static_cast<size_t>(a.width()), static_cast<size_t>(a.q_width()), 2 * static_cast<size_t>(cfg.d_ff)};
}
}  // namespace

AttnShape attn_shape(const ModelConfig& cfg) {
  if (!cfg.llama()) return AttnShape::mha(cfg.d_model, cfg.n_head);
  return {cfg.n_head, cfg.kv_heads(), cfg.head_dim()};
}

ModelConfig part_config(const ModelConfig& cfg, FieldPart part) {
  if (part == FieldPart::core) return cfg;
  ModelConfig c = cfg;
  c.n_block = part == FieldPart::prelude ? cfg.n_prelude : cfg.n_coda;
  c.time_cond = c.step_cond = c.exit_gate = c.core_norm = false;
  return c;
}

template <class S>
void FieldCache<S>::resize(Memory<S>& mem, const ModelConfig& cfg, int capacity_, int T_) {
  if (memory == &mem && capacity_ == capacity && T_ == T && blocks.size() == static_cast<size_t>(cfg.n_block) &&
      time_cond == cfg.time_cond && step_cond == cfg.step_cond && arch == cfg.arch && core_norm == cfg.core_norm)
    return;
  arch = cfg.arch;
  core_norm = cfg.core_norm;
  memory = &mem;
  capacity = capacity_;
  B = capacity_;
  T = T_;
  time_cond = cfg.time_cond;
  step_cond = cfg.step_cond;
  const size_t N = static_cast<size_t>(capacity) * T, C = cfg.d_model, F = cfg.d_ff, Bs = capacity;
  const size_t tc = cfg.time_cond ? 1 : 0, sc_ = cfg.step_cond ? 1 : 0, E = static_cast<size_t>(cfg.time_freq);
  const Widths wd = widths(cfg);
  blocks.resize(static_cast<size_t>(cfg.n_block));
  for (auto& bc : blocks) {
    for (Array<S>* a : {&bc.x, &bc.ln1, &bc.x2, &bc.ln2}) a->resize(mem, N * C);
    bc.y.resize(mem, N * wd.y);
    for (Array<S>* a : {&bc.rstd1, &bc.rstd2}) a->resize(mem, N);
    for (Array<S>* a : {&bc.mean1, &bc.mean2}) a->resize(mem, cfg.llama() ? 0 : N);
    bc.qkv.resize(mem, N * wd.qkv);
    bc.att.resize(mem, Bs * cfg.n_head * T * T);
    bc.z.resize(mem, N * wd.z);
    bc.g.resize(mem, N * F);
    bc.ada.resize(mem, tc * Bs * 6 * C);
    for (Array<S>* a : {&bc.u1, &bc.ao, &bc.u2, &bc.mo}) a->resize(mem, tc * N * C);
  }
  e.resize(mem, tc * Bs * E);
  for (Array<S>* a : {&z1, &a1, &c, &sc}) a->resize(mem, tc * Bs * C);
  se.resize(mem, sc_ * Bs * E);
  for (Array<S>* a : {&sz1, &sa1, &sc_step}) a->resize(mem, sc_ * Bs * C);
  e_host.assign(tc * Bs * E, S(0));
  se_host.assign(sc_ * Bs * E, S(0));
  pre_norm.resize(mem, cfg.core_norm ? N * C : 0);
  norm_rstd.resize(mem, cfg.core_norm ? N : 0);
}

template <class S>
size_t FieldCache<S>::bytes() const {
  size_t n = e.size() + z1.size() + a1.size() + c.size() + sc.size() + se.size() + sz1.size() + sa1.size() +
             sc_step.size() + pre_norm.size() + norm_rstd.size();
  for (const auto& b : blocks)
    for (const Array<S>* a : {&b.x, &b.ln1, &b.mean1, &b.rstd1, &b.qkv, &b.att, &b.y, &b.x2, &b.ln2, &b.mean2,
                              &b.rstd2, &b.z, &b.g, &b.ada, &b.u1, &b.ao, &b.u2, &b.mo})
      n += a->size();
  return n * sizeof(S);
}

template <class S>
void FieldGradWork<S>::resize(Memory<S>& mem, const ModelConfig& cfg, int B_, int T_) {
  if (memory == &mem && B_ <= B && T_ == T && time_cond == cfg.time_cond && arch == cfg.arch &&
      (dnorm.size() > 0) == cfg.core_norm)
    return;
  arch = cfg.arch;
  memory = &mem;
  B = B_;
  T = T_;
  time_cond = cfg.time_cond;
  const size_t N = static_cast<size_t>(B) * T, C = cfg.d_model, F = cfg.d_ff, Bs = B;
  const size_t tc = cfg.time_cond ? 1 : 0;
  const Widths wd = widths(cfg);
  for (Array<S>* a : {&dx, &dx2, &dcarry}) a->resize(mem, N * C);
  dnorm.resize(mem, cfg.core_norm ? N * C : 0);
  dtmp.resize(mem, N * std::max(C, wd.y));
  dqkv.resize(mem, N * wd.qkv);
  datt.resize(mem, Bs * cfg.n_head * T * T);
  dz.resize(mem, N * wd.z);
  dg.resize(mem, N * F);
  dgated.resize(mem, tc * N * C);
  dada.resize(mem, tc * Bs * 6 * C);
  for (Array<S>* a : {&dsc, &dc, &da1, &dz1}) a->resize(mem, tc * Bs * C);
  de.resize(mem, tc * Bs * static_cast<size_t>(cfg.time_freq));
  de_host.assign(tc * Bs * static_cast<size_t>(cfg.time_freq), S(0));
}

void check_field_call(const char* who, const ModelConfig& cfg, int T, const double* t, const double* d) {
  if (T > cfg.context)
    throw Error(std::string(who) + ": T = " + std::to_string(T) + " exceeds the context " + std::to_string(cfg.context));
  if (cfg.time_cond && !t)
    throw Error(std::string(who) + ": a time-conditioned field needs the time of every sequence (t is null)");
  if (d && !cfg.step_cond)
    throw Error(std::string(who) + ": a step d was given but the field is not step-conditioned (config step_cond)");
}

FieldOffsets field_offsets(const ModelConfig& cfg, const ParamLayout& layout, FieldPart part) {
  FieldOffsets o;
  const size_t f0 = layout.part_begin(part);
  o.num_params = layout.part_end(part) - f0;
  for (BlockOffsets b : layout.blocks(part)) {
    // (an absent tensor's offset stays 0: nothing reads it)
    for (size_t* p : {&b.ln1_w, &b.ln1_b, &b.attn_w, &b.attn_b, &b.aproj_w, &b.aproj_b, &b.ln2_w, &b.ln2_b, &b.fc_w,
                      &b.fc_b, &b.mproj_w, &b.mproj_b, &b.ada_w, &b.ada_b})
      if (*p) *p -= f0;
    o.blocks.push_back(b);
  }
  if (part == FieldPart::core && cfg.core_norm) o.norm = layout.core_norm() - f0;
  if (part == FieldPart::core && cfg.time_cond) {
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
Field<S>::Field(NetOps<S>& ops, const ModelConfig& cfg, const ParamLayout& layout, FieldPart part)
    : ops_(ops), cfg_(part_config(cfg, part)), part_(part) {
  FieldOffsets o = field_offsets(cfg, layout, part);
  blocks_ = std::move(o.blocks);
  time_ = o.time;
  step_ = o.step;
  num_params_ = o.num_params;
  norm_ = o.norm;
  if (cfg_.time_cond) freq_ = sinusoid_frequencies(cfg_.time_freq);
}

template <class S>
double Field<S>::flops(int B, int T) const {
  const double C = cfg_.d_model, F = cfg_.d_ff, BT = static_cast<double>(B) * T;
  const AttnShape a = attn_shape(cfg_);
  const double Wq = static_cast<double>(a.width()), Y = static_cast<double>(a.q_width());
  const double mlp = cfg_.llama() ? 3 * C * F : 2 * C * F;
  double fl = cfg_.n_block * (2.0 * BT * (Wq * C + Y * C + mlp) + 4.0 * B * T * T * Y);
  if (cfg_.time_cond) fl += 2.0 * B * (cfg_.time_freq * C + C * C + cfg_.n_block * 6 * C * C);
  if (cfg_.step_cond) fl += 2.0 * B * (cfg_.time_freq * C + C * C);
  return fl;
}

template <class S>
void Field<S>::norm_bwd(S* din, S* dP, size_t ow, size_t ob, const S* dout, const S* in, const S* w,
                             const S* mean, const S* rstd, int B, int T, size_t stride, const S* scale,
                             S* scratch) const {
  const int C = cfg_.d_model, ld = 6 * C;
  auto rows = [&](S* di, S* dw, S* db, size_t r, int bs, const S* sc) {
    if (cfg_.llama())  // RMSNorm: no bias, no mean, no modulation
      ops_.rmsnorm_backward(di, dw, dout + r * C, in + r * C, w, rstd + r, bs * T, C);
    else if (sc)
      ops_.layernorm_backward_scaled(di, dw, db, dout + r * C, sc, T, ld, in + r * C, w, mean + r, rstd + r, bs * T,
                                     C, scratch);
    else
      ops_.layernorm_backward(di, dw, db, dout + r * C, in + r * C, w, mean + r, rstd + r, bs * T, C);
  };
  if (stride == 0) {
    rows(din, dP + ow, cfg_.llama() ? nullptr : dP + ob, 0, B, scale);
    return;
  }
  rows(din, nullptr, nullptr, 0, B, scale);
  for (int b = 0; b < B; ++b) {
    S* d = dP + static_cast<size_t>(b) * stride;
    rows(nullptr, d + ow, cfg_.llama() ? nullptr : d + ob, static_cast<size_t>(b) * T, 1,
         scale ? scale + static_cast<size_t>(b) * ld : nullptr);
  }
}

// ---------------------------------------------------------------- the block

// Autonomous: x2 = x + Attn(LN1(x)),  out = x2 + MLP(LN2(x2)).
// Time-conditioned (adaLN), [s1, c1, g1, s2, c2, g2] = split6(W_ada silu(c) + b_ada):
//   x2 = x + (1 + g1) Attn(LN1(x) (1 + c1) + s1),  out = x2 + (1 + g2) MLP(LN2(x2) (1 + c2) + s2).
// Every operation of the autonomous block is performed in the same order on the same values
// when the modulation is zero, so that zero ada weights give the autonomous block's bits:
// the MLP's product accumulates onto x2 in both, and its gate then reads m back as
// (x2 + m) - x2 (gate_sum_forward), adding exactly 0 for a zero gate.
template <class S>
void Field<S>::block_forward(S* out, const S* x, const S* P, const BlockOffsets& o, int B, int T,
                             FieldCache<S>& cache, BlockCache<S>& c) const {
  if (cfg_.llama()) return llama_forward(out, x, P, o, B, T, c);
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff, NH = cfg_.n_head, ld = 6 * C;
  const size_t NC = static_cast<size_t>(N) * C;
  const bool tc = cfg_.time_cond;
  ops_.copy(c.x.data(), x, NC);
  x = c.x.data();  // from here on `out` may alias the caller's input
  const S* ada = c.ada.data();
  if (tc) ops_.vector_linear_forward(c.ada.data(), cache.sc.data(), P + o.ada_w, P + o.ada_b, B, C, 6 * C);
  ops_.layernorm_forward(c.ln1.data(), c.mean1.data(), c.rstd1.data(), x, P + o.ln1_w, P + o.ln1_b, N, C);
  if (tc) ops_.modulate_forward(c.u1.data(), c.ln1.data(), ada, ada + C, B, T, C, ld);
  ops_.linear_forward(c.qkv.data(), tc ? c.u1.data() : c.ln1.data(), P + o.attn_w, P + o.attn_b, N, C, 3 * C);
  ops_.attention_forward(c.y.data(), c.att.data(), c.qkv.data(), B, T, AttnShape::mha(C, NH));
  if (tc) {  // x2 = x + (1 + g1) (y Wp^T + bp)
    ops_.linear_forward(c.ao.data(), c.y.data(), P + o.aproj_w, P + o.aproj_b, N, C, C);
    ops_.gate_forward(c.x2.data(), x, c.ao.data(), ada + 2 * C, B, T, C, ld);
  } else {  // x2 = (y Wp^T + bp) + x
    ops_.linear_forward(c.x2.data(), c.y.data(), P + o.aproj_w, P + o.aproj_b, N, C, C);
    ops_.axpy(c.x2.data(), S(1), x, NC);
  }
  ops_.layernorm_forward(c.ln2.data(), c.mean2.data(), c.rstd2.data(), c.x2.data(), P + o.ln2_w, P + o.ln2_b, N, C);
  if (tc) ops_.modulate_forward(c.u2.data(), c.ln2.data(), ada + 3 * C, ada + 4 * C, B, T, C, ld);
  ops_.linear_forward(c.z.data(), tc ? c.u2.data() : c.ln2.data(), P + o.fc_w, P + o.fc_b, N, C, F);
  ops_.gelu_forward(c.g.data(), c.z.data(), static_cast<int64_t>(N) * F);
  // out = x2 + g Wm^T + bm, then (1 + g2) on the MLP's part
  ops_.copy(out, c.x2.data(), NC);
  ops_.linear_forward(out, c.g.data(), P + o.mproj_w, P + o.mproj_b, N, F, C, /*accumulate=*/true);
  if (tc) ops_.gate_sum_forward(out, c.mo.data(), c.x2.data(), ada + 5 * C, B, T, C, ld);
}

template <class S>
void Field<S>::block_vjp(S* dx, S* dP, const S* dout, const S* P, const BlockOffsets& o, int B, int T,
                         const FieldCache<S>& cache, const BlockCache<S>& c, FieldGradWork<S>& w,
                         size_t stride) const {
  if (cfg_.llama()) return llama_vjp(dx, dP, dout, P, o, B, T, c, w, stride);
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff, NH = cfg_.n_head, ld = 6 * C;
  const size_t NC = static_cast<size_t>(N) * C;
  const bool tc = cfg_.time_cond;
  const S* ada = c.ada.data();
  S* dada = w.dada.data();  // this block's [ds1, dc1, dg1, ds2, dc2, dg2]
  if (tc) ops_.fill(dada, S(0), static_cast<size_t>(B) * ld);
  // the MLP branch: dx2 = dout + LN2^T(mod2^T(MLP^T((1 + g2) dout)))
  // (mod^T, the factor 1 + c2, is applied inside the LayerNorm's vjp)
  ops_.copy(w.dx2.data(), dout, NC);
  const S* dm = dout;
  if (tc) {
    ops_.gate_backward(w.dgated.data(), dada + 5 * C, dout, c.mo.data(), ada + 5 * C, B, T, C, ld);
    dm = w.dgated.data();
  }
  w.dg.zero();
  ops_.linear_backward(w.dg.data(), dP + o.mproj_w, dP + o.mproj_b, dm, c.g.data(), P + o.mproj_w, B, T, F, C, stride);
  w.dz.zero();
  ops_.gelu_backward(w.dz.data(), w.dg.data(), c.z.data(), static_cast<int64_t>(N) * F);
  w.dtmp.zero();
  ops_.linear_backward(w.dtmp.data(), dP + o.fc_w, dP + o.fc_b, w.dz.data(), tc ? c.u2.data() : c.ln2.data(),
                       P + o.fc_w, B, T, C, F, stride);
  if (tc) ops_.modulate_backward(nullptr, dada + 3 * C, dada + 4 * C, w.dtmp.data(), c.ln2.data(), ada + 4 * C, B, T, C, ld);
  norm_bwd(w.dx2.data(), dP, o.ln2_w, o.ln2_b, w.dtmp.data(), c.x2.data(), P + o.ln2_w, c.mean2.data(),
                c.rstd2.data(), B, T, stride, tc ? ada + 4 * C : nullptr, w.dgated.data());
  // the attention branch: dx += dx2 + LN1^T(mod1^T(Attn^T((1 + g1) dx2)))
  ops_.axpy(dx, S(1), w.dx2.data(), NC);
  const S* da = w.dx2.data();
  if (tc) {
    ops_.gate_backward(w.dgated.data(), dada + 2 * C, w.dx2.data(), c.ao.data(), ada + 2 * C, B, T, C, ld);
    da = w.dgated.data();
  }
  w.dtmp.zero();
  ops_.linear_backward(w.dtmp.data(), dP + o.aproj_w, dP + o.aproj_b, da, c.y.data(), P + o.aproj_w, B, T, C, C,
                       stride);
  w.dqkv.zero();
  ops_.attention_backward(w.dqkv.data(), w.datt.data(), w.dtmp.data(), c.qkv.data(), c.att.data(), B, T,
                           AttnShape::mha(C, NH));
  w.dtmp.zero();
  ops_.linear_backward(w.dtmp.data(), dP + o.attn_w, dP + o.attn_b, w.dqkv.data(), tc ? c.u1.data() : c.ln1.data(),
                       P + o.attn_w, B, T, C, 3 * C, stride);
  if (tc) ops_.modulate_backward(nullptr, dada, dada + C, w.dtmp.data(), c.ln1.data(), ada + C, B, T, C, ld);
  norm_bwd(dx, dP, o.ln1_w, o.ln1_b, w.dtmp.data(), c.x.data(), P + o.ln1_w, c.mean1.data(), c.rstd1.data(), B, T,
                stride, tc ? ada + C : nullptr, w.dgated.data());
  // ada = W_ada silu(c) + b_ada: its parameters, and dsilu(c) += dada W_ada (all blocks add up)
  if (tc)
    ops_.vector_linear_backward(w.dsc.data(), dP + o.ada_w, dP + o.ada_b, dada, cache.sc.data(), P + o.ada_w, B, C,
                                6 * C, stride);
}

// ---------------------------------------------------------------- the llama block

// x2 = x + o(Attn(rope(q), rope(k), v)),  [q | k | v] = RMS1(x) Wqkv^T (+ b);
// out = x2 + down(silu(gate) up),  [gate | up] = RMS2(x2) Wgu^T (+ b).
// The residual sums are taken as the gpt2 block's: the branch's product first, then + x.
template <class S>
void Field<S>::llama_forward(S* out, const S* x, const S* P, const BlockOffsets& o, int B, int T,
                             BlockCache<S>& c) const {
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff;
  const size_t NC = static_cast<size_t>(N) * C;
  const AttnShape a = attn_shape(cfg_);
  const int W = static_cast<int>(a.width()), Y = static_cast<int>(a.q_width()), rot = cfg_.rotary_dims();
  ops_.copy(c.x.data(), x, NC);
  x = c.x.data();  // from here on `out` may alias the caller's input
  ops_.rmsnorm_forward(c.ln1.data(), c.rstd1.data(), x, P + o.ln1_w, N, C, cfg_.norm_eps);
  ops_.linear_forward(c.qkv.data(), c.ln1.data(), P + o.attn_w, cfg_.qkv_bias ? P + o.attn_b : nullptr, N, C, W);
  ops_.rotary(c.qkv.data(), B, T, a.NH, a.D, W, rot, cfg_.rope_theta, cfg_.rope_interleaved, false);
  ops_.rotary(c.qkv.data() + a.k_offset(), B, T, a.NKV, a.D, W, rot, cfg_.rope_theta, cfg_.rope_interleaved, false);
  ops_.attention_forward(c.y.data(), c.att.data(), c.qkv.data(), B, T, a);
  ops_.linear_forward(c.x2.data(), c.y.data(), P + o.aproj_w, cfg_.o_bias ? P + o.aproj_b : nullptr, N, Y, C);
  ops_.axpy(c.x2.data(), S(1), x, NC);
  ops_.rmsnorm_forward(c.ln2.data(), c.rstd2.data(), c.x2.data(), P + o.ln2_w, N, C, cfg_.norm_eps);
  ops_.linear_forward(c.z.data(), c.ln2.data(), P + o.fc_w, cfg_.mlp_bias ? P + o.fc_b : nullptr, N, C, 2 * F);
  ops_.swiglu_forward(c.g.data(), c.z.data(), c.z.data() + F, N, F, 2 * F);
  ops_.copy(out, c.x2.data(), NC);
  ops_.linear_forward(out, c.g.data(), P + o.mproj_w, cfg_.mlp_bias ? P + o.mproj_b : nullptr, N, F, C,
                      /*accumulate=*/true);
}

template <class S>
void Field<S>::llama_vjp(S* dx, S* dP, const S* dout, const S* P, const BlockOffsets& o, int B, int T,
                         const BlockCache<S>& c, FieldGradWork<S>& w, size_t stride) const {
  const int N = B * T, C = cfg_.d_model, F = cfg_.d_ff;
  const size_t NC = static_cast<size_t>(N) * C;
  const AttnShape a = attn_shape(cfg_);
  const int W = static_cast<int>(a.width()), Y = static_cast<int>(a.q_width()), rot = cfg_.rotary_dims();
  auto bias = [&](size_t off, bool has) { return has ? dP + off : nullptr; };
  // the MLP branch: dx2 = dout + RMS2^T(Wgu^T(swiglu^T(down^T dout)))
  ops_.copy(w.dx2.data(), dout, NC);
  w.dg.zero();
  ops_.linear_backward(w.dg.data(), dP + o.mproj_w, bias(o.mproj_b, cfg_.mlp_bias), dout, c.g.data(), P + o.mproj_w,
                       B, T, F, C, stride);
  w.dz.zero();
  ops_.swiglu_backward(w.dz.data(), w.dz.data() + F, w.dg.data(), c.z.data(), c.z.data() + F, N, F, 2 * F);
  w.dtmp.zero();
  ops_.linear_backward(w.dtmp.data(), dP + o.fc_w, bias(o.fc_b, cfg_.mlp_bias), w.dz.data(), c.ln2.data(),
                       P + o.fc_w, B, T, C, 2 * F, stride);
  norm_bwd(w.dx2.data(), dP, o.ln2_w, 0, w.dtmp.data(), c.x2.data(), P + o.ln2_w, nullptr, c.rstd2.data(), B, T,
                stride, nullptr, nullptr);
  // the attention branch: dx += dx2 + RMS1^T(Wqkv^T(rope^T(Attn^T(o^T dx2))))
  ops_.axpy(dx, S(1), w.dx2.data(), NC);
  w.dtmp.zero();
  ops_.linear_backward(w.dtmp.data(), dP + o.aproj_w, bias(o.aproj_b, cfg_.o_bias), w.dx2.data(), c.y.data(),
                       P + o.aproj_w, B, T, Y, C, stride);
  w.dqkv.zero();
  ops_.attention_backward(w.dqkv.data(), w.datt.data(), w.dtmp.data(), c.qkv.data(), c.att.data(), B, T, a);
  ops_.rotary(w.dqkv.data(), B, T, a.NH, a.D, W, rot, cfg_.rope_theta, cfg_.rope_interleaved, true);
  ops_.rotary(w.dqkv.data() + a.k_offset(), B, T, a.NKV, a.D, W, rot, cfg_.rope_theta, cfg_.rope_interleaved, true);
  w.dtmp.zero();
  ops_.linear_backward(w.dtmp.data(), dP + o.attn_w, bias(o.attn_b, cfg_.qkv_bias), w.dqkv.data(), c.ln1.data(),
                       P + o.attn_w, B, T, C, W, stride);
  norm_bwd(dx, dP, o.ln1_w, 0, w.dtmp.data(), c.x.data(), P + o.ln1_w, nullptr, c.rstd1.data(), B, T, stride,
                nullptr, nullptr);
}

// ---------------------------------------------------------------- the embeddings

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

// One sinusoidal embedding MLP (time_embed or step_embed) of the B values t:
//   out_b = W2 silu(W1 e_b + b1) + b2, e_b the sinusoid (taken on the host, then uploaded).
template <class S>
void Field<S>::embed_forward(S* e, Buffer<S>& e_host, S* z1, S* a1, S* out, const double* t,
                             const TimeEmbedOffsets& o, const S* P, int B) const {
  const int C = cfg_.d_model, E = cfg_.time_freq;
  sinusoid_embedding(e_host.data(), t, B, E, cfg_.time_scale, freq_.data());
  ops_.upload(e, e_host.data(), static_cast<size_t>(B) * E);
  ops_.vector_linear_forward(z1, e, P + o.w1, P + o.b1, B, E, C);
  ops_.silu_forward(a1, z1, static_cast<int64_t>(B) * C);
  ops_.vector_linear_forward(out, a1, P + o.w2, P + o.b2, B, C, C);
}

// Given w.dc = dL/d(out) (B,C): the MLP's parameter gradients, and de = dL/de when
// de is non-null (overwritten). Uses w.da1 and w.dz1.
template <class S>
void Field<S>::embed_vjp(S* de, S* dP, const TimeEmbedOffsets& o, const S* P, int B, const S* e, const S* z1,
                         const S* a1, FieldGradWork<S>& w, size_t stride) const {
  const int C = cfg_.d_model, E = cfg_.time_freq;
  w.da1.zero();
  ops_.vector_linear_backward(w.da1.data(), dP + o.w2, dP + o.b2, w.dc.data(), a1, P + o.w2, B, C, C, stride);
  w.dz1.zero();
  ops_.silu_backward(w.dz1.data(), w.da1.data(), z1, static_cast<int64_t>(B) * C);
  if (de) ops_.fill(de, S(0), static_cast<size_t>(B) * E);
  ops_.vector_linear_backward(de, dP + o.w1, dP + o.b1, w.dz1.data(), e, P + o.w1, B, E, C, stride);
}

// ---------------------------------------------------------------- forward, vjp

template <class S>
void Field<S>::forward(S* f, const S* h, const double* t, const S* params, int B, int T, FieldCache<S>& cache,
                       const double* d) const {
  if (B > cache.capacity || cache.T != T || cache.blocks.size() != blocks_.size())
    throw Error("Field::forward: cache sized for (B=" + std::to_string(cache.capacity) +
                ", T=" + std::to_string(cache.T) + ") but called with (B=" + std::to_string(B) +
                ", T=" + std::to_string(T) + ")");
  if (cache.time_cond != cfg_.time_cond)
    throw Error(std::string("Field::forward: cache sized for ") + (cfg_.time_cond ? "an autonomous" : "a time-conditioned") +
                " field but the field is " + (cfg_.time_cond ? "time-conditioned" : "autonomous"));
  if (cache.step_cond != cfg_.step_cond)
    throw Error(std::string("Field::forward: cache sized for a field ") + (cfg_.step_cond ? "without" : "with") +
                " step conditioning but the field " + (cfg_.step_cond ? "has it" : "has none"));
  if (cache.memory != static_cast<Memory<S>*>(&ops_))
    throw Error("Field::forward: the cache lives in another backend's memory (" +
                (cache.memory ? cache.memory->name() : std::string("none")) + ") than the field's (" + ops_.name() + ")");
  check_field_call("Field::forward", cfg_, T, t, d);
  cache.B = B;  // the vjp differentiates this many sequences
  const int C = cfg_.d_model;
  const size_t NC = static_cast<size_t>(B) * T * C;
  if (cfg_.time_cond) {  // c_b = TE(t_b) (+ SE(d_b) with step_cond), then silu(c_b)
    embed_forward(cache.e.data(), cache.e_host, cache.z1.data(), cache.a1.data(), cache.c.data(), t, time_, params, B);
    if (cfg_.step_cond) {
      embed_forward(cache.se.data(), cache.se_host, cache.sz1.data(), cache.sa1.data(), cache.sc_step.data(), d,
                    step_, params, B);
      ops_.axpy(cache.c.data(), S(1), cache.sc_step.data(), static_cast<size_t>(B) * C);
    }
    ops_.silu_forward(cache.sc.data(), cache.c.data(), static_cast<int64_t>(B) * C);
  }
  // Block i reads its input from its cache copy, so f serves as input and output.
  const S* x = h;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    block_forward(f, x, params, blocks_[i], B, T, cache, cache.blocks[i]);
    x = f;
  }
  if (cfg_.core_norm) {  // F(h) = norm(core(h))
    ops_.copy(cache.pre_norm.data(), f, NC);
    ops_.rmsnorm_forward(f, cache.norm_rstd.data(), cache.pre_norm.data(), params + norm_, B * T, C, cfg_.norm_eps);
  }
  ops_.axpy(f, S(-1), h, NC);
}

template <class S>
void Field<S>::vjp(S* dh, S* dparams, const S* gf, const S* params, const FieldCache<S>& cache,
                   FieldGradWork<S>& work, size_t param_stride, double* dt) const {
  const int B = cache.B, T = cache.T, C = cfg_.d_model, E = cfg_.time_freq;
  work.resize(ops_, cfg_, B, T);
  const size_t NC = static_cast<size_t>(B) * T * C;
  ops_.axpy(dh, S(-1), gf, NC);  // f = S(h) - h: dh += S'(h)^T gf - gf
  if (cfg_.time_cond) work.dsc.zero();  // every block's modulation adds to dL/dsilu(c)
  // Blocks in reverse; block 0 accumulates straight into dh, the others hand their
  // input gradient to the block below through work.dcarry.
  const S* g = gf;
  if (cfg_.core_norm) {  // through F = norm(core(h)) first: g = RMS^T gf
    work.dnorm.zero();
    norm_bwd(work.dnorm.data(), dparams, norm_, 0, gf, cache.pre_norm.data(), params + norm_, nullptr,
                  cache.norm_rstd.data(), B, T, param_stride, nullptr, nullptr);
    g = work.dnorm.data();
  }
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
  // the time (and step) embedding, given dL/dsilu(c) in work.dsc
  work.dc.zero();
  ops_.silu_backward(work.dc.data(), work.dsc.data(), cache.c.data(), static_cast<int64_t>(B) * C);
  if (cfg_.step_cond)  // the step is an input, never differentiated
    embed_vjp(nullptr, dparams, step_, params, B, cache.se.data(), cache.sz1.data(), cache.sa1.data(), work,
              param_stride);
  embed_vjp(dt ? work.de.data() : nullptr, dparams, time_, params, B, cache.e.data(), cache.z1.data(),
            cache.a1.data(), work, param_stride);
  if (!dt) return;
  // e = [cos(tau freq), sin(tau freq)]:  de/dtau = [-freq sin, freq cos]
  ops_.download(work.de_host.data(), work.de.data(), static_cast<size_t>(B) * E);
  sinusoid_time_grad(dt, cache.e_host.data(), work.de_host.data(), B, E, cfg_.time_scale, freq_.data());
}

template struct FieldCache<float>;
template struct FieldCache<double>;
template struct FieldGradWork<float>;
template struct FieldGradWork<double>;
template class Field<float>;
template class Field<double>;

}  // namespace flowloop
