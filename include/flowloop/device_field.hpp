// flowloop/device_field.hpp: the field (field.hpp) composed from a Backend's operations,
// with its parameters, states, caches and gradients in the backend's memory.
//
// The same math as Field, term for term (model-spec.md), autonomous, time- and
// step-conditioned; the same interface, with device pointers for tensors and host
// pointers for the per-sequence times t, steps d and time gradients dt (a few values
// per call: the sinusoid of t is taken on the host, in double, with Field's own code).
// On the reference backend it runs in CI against Field; on the CUDA backend it is the
// GPU path. The values agree with Field's to rounding (the order of the sums differs),
// not bit for bit.
//
// Gradient rule as Field's: vjp ACCUMULATES into dh, dparams and dt; param_stride > 0
// puts sequence b's parameter gradient at dparams + b * param_stride.
#pragma once

#include <vector>

#include "flowloop/backend.hpp"
#include "flowloop/config.hpp"
#include "flowloop/params.hpp"

namespace flowloop {

template <class S>
struct DeviceBlockCache {
  Array<S> x, ln1, mean1, rstd1, qkv, att, y, x2, ln2, mean2, rstd2, z, g;
  Array<S> ada, u1, ao, u2, mo;  // time_cond only
};

template <class S>
struct DeviceFieldCache {
  int capacity = 0, T = 0, B = 0;
  bool time_cond = false, step_cond = false;
  std::vector<DeviceBlockCache<S>> blocks;
  Array<S> e, z1, a1, c, sc;       // time_cond: the time embedding (e also kept on the host)
  Array<S> se, sz1, sa1, sc_step;  // step_cond: the step embedding
  Buffer<S> e_host, se_host;       // the sinusoids, as uploaded (dt's vjp reads e on the host)
  void resize(Backend<S>& be, const ModelConfig& cfg, int capacity, int T);
  size_t bytes() const;
};

template <class S>
struct DeviceFieldWork {
  int B = 0, T = 0;
  bool time_cond = false;
  Array<S> dx, dx2, dtmp, dcarry, dqkv, datt, dz, dg;
  Array<S> dgated, dada, dsc, dc, da1, dz1, de;  // time_cond only
  Buffer<S> de_host;
  void resize(Backend<S>& be, const ModelConfig& cfg, int B, int T);
};

template <class S>
class DeviceField {
 public:
  DeviceField(Backend<S>& be, const ModelConfig& cfg, const ParamLayout& layout);

  // f = S_t(h) - h (device arrays (B,T,C)); t, d: host arrays (B) as in Field::forward.
  void forward(S* f, const S* h, const double* t, const S* params, int B, int T, DeviceFieldCache<S>& cache,
               const double* d = nullptr) const;
  // dh += (df/dh)^T gf, dparams += (df/dtheta)^T gf (device); dt (host, B) += d(gf . f)/dt_b.
  void vjp(S* dh, S* dparams, const S* gf, const S* params, const DeviceFieldCache<S>& cache,
           DeviceFieldWork<S>& work, size_t param_stride = 0, double* dt = nullptr) const;

  size_t num_params() const { return num_params_; }
  const ModelConfig& config() const { return cfg_; }
  Backend<S>& backend() const { return be_; }

 private:
  void block_forward(S* out, const S* x, const S* P, const BlockOffsets& o, int B, int T,
                     DeviceFieldCache<S>& cache, DeviceBlockCache<S>& c) const;
  void block_vjp(S* dx, S* dP, const S* dout, const S* P, const BlockOffsets& o, int B, int T,
                 const DeviceFieldCache<S>& cache, const DeviceBlockCache<S>& c, DeviceFieldWork<S>& w,
                 size_t stride) const;
  void embed_forward(S* e, Buffer<S>& e_host, S* z1, S* a1, S* out, const double* t, const TimeEmbedOffsets& o,
                     const S* P, int B) const;
  void embed_vjp(S* de, S* dP, const TimeEmbedOffsets& o, const S* P, int B, const S* e, const S* z1, const S* a1,
                 DeviceFieldWork<S>& w, size_t stride) const;
  // out = in W^T + b over N rows (b may be null).
  void linear_fwd(S* out, const S* in, const S* W, const S* b, int N, int IN, int OUT) const;
  // din += dout W (din may be null), dW += dout^T in, db += column sums of dout: summed over
  // the B sequences of `rows` rows each, or per sequence at dP + b stride.
  void linear_bwd(S* din, S* dP, size_t oW, size_t ob, const S* dout, const S* in, const S* W, int B, int rows,
                  int IN, int OUT, size_t stride) const;
  void layernorm_bwd(S* din, S* dP, size_t ow, size_t ob, const S* dout, const S* in, const S* w, const S* mean,
                     const S* rstd, int B, int T, size_t stride) const;
  void attention_fwd(S* y, S* att, const S* qkv, int B, int T) const;
  void attention_bwd(S* dqkv, S* datt, const S* dy, const S* qkv, const S* att, int B, int T) const;

  Backend<S>& be_;
  ModelConfig cfg_;
  std::vector<BlockOffsets> blocks_;  // relative to the field's first parameter
  TimeEmbedOffsets time_, step_;
  std::vector<double> freq_;
  size_t num_params_ = 0;
};

}  // namespace flowloop
