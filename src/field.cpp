#include "flowloop/field.hpp"

#include <algorithm>
#include <cstring>

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
  if (capacity_ == capacity && T_ == T && blocks.size() == static_cast<size_t>(cfg.n_block)) return;
  capacity = capacity_;
  B = capacity_;
  T = T_;
  const size_t N = static_cast<size_t>(capacity) * T, C = cfg.d_model, F = cfg.d_ff;
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
  }
}

template <class S>
size_t FieldCache<S>::bytes() const {
  size_t n = 0;
  for (const auto& c : blocks)
    n += c.x.size() + c.ln1.size() + c.mean1.size() + c.rstd1.size() + c.qkv.size() +
         c.att.size() + c.y.size() + c.x2.size() + c.ln2.size() + c.mean2.size() +
         c.rstd2.size() + c.z.size() + c.g.size();
  return n * sizeof(S);
}

template <class S>
void FieldGradWork<S>::resize(const ModelConfig& cfg, int B_, int T_) {
  if (B_ <= B && T_ == T) return;
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
}

template <class S>
Field<S>::Field(const ModelConfig& cfg, const ParamLayout& layout)
    : cfg_(cfg), num_params_(layout.field_end() - layout.field_begin()) {
  const size_t f0 = layout.field_begin();
  for (int i = 0; i < cfg.n_block; ++i) {
    BlockOffsets b = layout.block(i);
    for (size_t* p : {&b.ln1_w, &b.ln1_b, &b.attn_w, &b.attn_b, &b.aproj_w, &b.aproj_b, &b.ln2_w,
                      &b.ln2_b, &b.fc_w, &b.fc_b, &b.mproj_w, &b.mproj_b})
      *p -= f0;
    blocks_.push_back(b);
  }
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

// The same for a LayerNorm.
template <class S>
void layernorm_bwd(S* din, S* dP, size_t ow, size_t ob, const S* dout, const S* in, const S* w,
                   const S* mean, const S* rstd, int B, int T, int C, size_t stride) {
  if (stride == 0) {
    layernorm_backward(din, dP + ow, dP + ob, dout, in, w, mean, rstd, B * T, C);
    return;
  }
  layernorm_backward<S>(din, nullptr, nullptr, dout, in, w, mean, rstd, B * T, C);
  for (int b = 0; b < B; ++b) {
    S* d = dP + static_cast<size_t>(b) * stride;
    const size_t r = static_cast<size_t>(b) * T;
    layernorm_backward<S>(nullptr, d + ow, d + ob, dout + r * C, in + r * C, w, mean + r, rstd + r, T, C);
  }
}
}  // namespace

template <class S>
double Field<S>::flops(int B, int T) const {
  const double C = cfg_.d_model, F = cfg_.d_ff, BT = static_cast<double>(B) * T;
  return cfg_.n_block * (2.0 * BT * (3 * C * C + C * C + 2 * C * F) + 4.0 * B * T * T * C);
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

template <class S>
void Field<S>::forward(S* f, const S* h, double /*t*/, const S* params, int B, int T,
                       FieldCache<S>& cache) const {
  if (B > cache.capacity || cache.T != T || cache.blocks.size() != blocks_.size())
    throw Error("Field::forward: cache sized for (B=" + std::to_string(cache.capacity) +
                ", T=" + std::to_string(cache.T) + ") but called with (B=" + std::to_string(B) +
                ", T=" + std::to_string(T) + ")");
  if (T > cfg_.context)
    throw Error("Field::forward: T = " + std::to_string(T) + " exceeds the context " +
                std::to_string(cfg_.context));
  cache.B = B;  // the vjp differentiates this many sequences
  const size_t NC = static_cast<size_t>(B) * T * cfg_.d_model;
  // Block i reads its input from its cache copy, so f serves as input and output.
  const S* x = h;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    block_forward(f, x, params, blocks_[i], B, T, cache.blocks[i]);
    x = f;
  }
  for (size_t k = 0; k < NC; ++k) f[k] -= h[k];
}

template <class S>
void Field<S>::vjp(S* dh, S* dparams, const S* gf, const S* params, const FieldCache<S>& cache,
                   FieldGradWork<S>& work, size_t param_stride) const {
  const int B = cache.B, T = cache.T;
  work.resize(cfg_, B, T);
  const size_t NC = static_cast<size_t>(B) * T * cfg_.d_model;
  // f = S(h) - h: dh += S'(h)^T gf - gf
  for (size_t k = 0; k < NC; ++k) dh[k] -= gf[k];
  // Blocks in reverse; block 0 accumulates straight into dh, the others hand their
  // input gradient to the block below through work.dcarry.
  const S* g = gf;
  for (size_t i = blocks_.size(); i-- > 0;) {
    if (i == 0) {
      block_vjp(dh, dparams, g, params, blocks_[i], B, T, cache.blocks[i], work, param_stride);
    } else {
      zero(work.dx);
      block_vjp(work.dx.data(), dparams, g, params, blocks_[i], B, T, cache.blocks[i], work, param_stride);
      std::swap(work.dx, work.dcarry);
      g = work.dcarry.data();
    }
  }
}

template class Field<float>;
template class Field<double>;
template struct FieldCache<float>;
template struct FieldCache<double>;
template struct FieldGradWork<float>;
template struct FieldGradWork<double>;

}  // namespace flowloop
