// The optimiser: the learning-rate schedule and AdamW, on the host or on a backend.
#include "flowloop/train/optim.hpp"

#include <algorithm>
#include <cmath>

namespace flowloop {

double learning_rate(const OptimConfig& c, int64_t step) {
  if (step < c.warmup) return c.lr * static_cast<double>(step + 1) / c.warmup;
  const double span = static_cast<double>(std::max(1, c.steps - c.warmup));
  const double prog = std::min(1.0, static_cast<double>(step - c.warmup) / span);
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + std::cos(M_PI * prog));
}

// ---------------------------------------------------------------- AdamW

AdamW::AdamW(const ParamLayout& layout, const OptimConfig& c, size_t begin, size_t end)
    : begin_(begin), b1_(c.beta1), b2_(c.beta2), eps_(c.eps), clip_(c.clip) {
  end = std::min(end, layout.size());
  if (begin >= end) throw Error("AdamW: an empty parameter range");
  m.assign(end - begin, 0.0f);
  v.assign(end - begin, 0.0f);
  wd_.assign(end - begin, 0.0f);
  for (const auto& ti : layout.tensors()) {
    if (ti.shape.size() != 2) continue;
    const size_t lo = std::max(begin, ti.offset), hi = std::min(end, ti.offset + ti.numel);
    if (lo < hi)
      std::fill(wd_.begin() + static_cast<long>(lo - begin), wd_.begin() + static_cast<long>(hi - begin),
                static_cast<float>(c.weight_decay));
  }
}

kernels::AdamWStep AdamW::constants(double lr) const {
  // p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p), with the bias corrections folded into constants
  const double c1 = 1 - std::pow(b1_, static_cast<double>(t)), c2 = 1 - std::pow(b2_, static_cast<double>(t));
  kernels::AdamWStep s{};
  s.b1 = static_cast<float>(b1_);
  s.b2 = static_cast<float>(b2_);
  s.ob1 = 1 - s.b1;
  s.ob2 = 1 - s.b2;
  s.ic1 = static_cast<float>(1 / c1);
  s.isc2 = static_cast<float>(1 / std::sqrt(c2));
  s.lr = static_cast<float>(lr);
  s.eps = static_cast<float>(eps_);
  return s;
}

double AdamW::step(float* params, float* grads, double lr) {
  const size_t n = m.size();
  float* p = params + begin_;
  float* g = grads + begin_;
  if (be_) {  // on the device: the gradients go up, the parameters come down
    prepare(params);
    if (!reduced_) gather(g);
    reduced_ = false;
    double ss = 0;
    be_->sum_squares_rows(norm_.data(), gd_.data(), nullptr, 1, n);
    norm_.download(&ss, 1);
    const double norm = std::sqrt(ss);
    if (clip_ > 0 && norm > clip_) {
      const float sc = static_cast<float>(clip_ / norm);
      be_->strided_copy(gd_.data(), n, gd_.data(), n, 1, n, sc);
      for (size_t i = 0; i < n; ++i) g[i] *= sc;  // the caller's gradients are clipped too
    }
    ++t;
    be_->adamw(pd_.data(), md_.data(), vd_.data(), gd_.data(), wdd_.data(), n, constants(lr));
    pd_.download(p, n);
    host_stale_ = true;
    return norm;
  }
  double ss = 0;  // in order (the CPU's bits as before the device path)
  for (size_t i = 0; i < n; ++i) ss += static_cast<double>(g[i]) * g[i];
  const double norm = std::sqrt(ss);
  if (clip_ > 0 && norm > clip_) {
    const float sc = static_cast<float>(clip_ / norm);
    for (size_t i = 0; i < n; ++i) g[i] *= sc;
  }
  ++t;
  const kernels::AdamWStep st = constants(lr);
  float* mm = m.data();
  float* vv = v.data();
  const float* wd = wd_.data();
#pragma omp parallel for schedule(static) if (n >= static_cast<size_t>(kParallelMin) * 4)
  for (size_t i = 0; i < n; ++i) kernels::adamw_update(p[i], mm[i], vv[i], g[i], wd[i], st);
  return norm;
}

void AdamW::gather(const float* g) {
  const size_t n = m.size();
  gd_.upload(g, n);
  be_->axpy(gd_.data(), 1.0f, acc_.data(), n);  // what stayed on the device (1 x: the same bits)
  acc_.zero();
}

void AdamW::reduce(float* grads, float scale, Communicator& comm) {
  const size_t n = m.size();
  float* g = grads + begin_;
  if (!be_) {
    if (scale != 1.0f)
      for (size_t i = 0; i < n; ++i) g[i] *= scale;
    comm.sum(g, n);
    return;
  }
  gather(g);
  if (scale != 1.0f) be_->strided_copy(gd_.data(), n, gd_.data(), n, 1, n, scale);
  comm.sum_device(*be_, gd_.data(), n);
  reduced_ = true;
}

void AdamW::set_backend(std::shared_ptr<Backend<float>> be) {
  sync_host();
  for (Array<float>* a : {&pd_, &md_, &vd_, &wdd_, &gd_, &acc_}) *a = Array<float>();  // freed by their backend,
  norm_ = Array<float, double>();                                                   // still alive here
  be_ = std::move(be);
  dev_fresh_ = false;
  reduced_ = false;
  if (!be_) return;
  const size_t n = m.size();
  for (Array<float>* a : {&pd_, &md_, &vd_, &wdd_, &gd_, &acc_}) a->resize(*be_, n);
  acc_.zero();
  norm_.resize(*be_, 1);
}

void AdamW::prepare(const float* params) {
  if (!be_ || dev_fresh_) return;
  const size_t n = m.size();
  pd_.upload(params + begin_, n);
  md_.upload(m.data(), n);
  vd_.upload(v.data(), n);
  wdd_.upload(wd_.data(), n);
  dev_fresh_ = true;
}

void AdamW::sync_host() {
  if (!be_ || !host_stale_) return;
  md_.download(m.data(), m.size());
  vd_.download(v.data(), v.size());
  host_stale_ = false;
}

}  // namespace flowloop
