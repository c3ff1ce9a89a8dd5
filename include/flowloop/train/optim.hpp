// flowloop/train/optim.hpp: the optimiser: AdamW over a flat parameter buffer (or a range
// of it), on the host or on a backend, with its configuration and learning-rate schedule
// of its own (every trainer's: the language model's, flow matching's).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "flowloop/backend/backend.hpp"
#include "flowloop/nn/params.hpp"
#include "flowloop/train/dist.hpp"

namespace flowloop {

// AdamW's settings and the schedule: linear warm-up over `warmup` steps to lr, then
// cosine down to min_lr at step `steps`; weight decay on matrices; clip: the gradient's
// global norm (0: off).
struct OptimConfig {
  int steps = 1000, warmup = 100;
  double lr = 1e-3, min_lr = 1e-4, weight_decay = 0.1, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, clip = 1.0;
};

// Learning rate at step s: linear warm-up to lr, then cosine down to min_lr.
double learning_rate(const OptimConfig& c, int64_t step);

// AdamW over a flat parameter buffer, or over its range [begin, end) only (the rest
// stays as it is: no update, no decay); decay applies to matrices (2-D tensors) only.
class AdamW {
 public:
  AdamW(const ParamLayout& layout, const OptimConfig& c, size_t begin = 0, size_t end = SIZE_MAX);
  // params and grads: the whole buffer. The range's grads are clipped in place to
  // global norm c.clip (if > 0); returns their norm before.
  double step(float* params, float* grads, double lr);
  size_t begin() const { return begin_; }
  size_t end() const { return begin_ + m.size(); }
  // The update on a backend (a model on a device): the range's parameters, moments and
  // decays live there from the next step on; each step uploads the range's gradients
  // (adding device_grads()), takes their norm (the backend's row sum: equal to the
  // host's in-order sum to rounding), clips and updates there (kernels.hpp's
  // adamw_update, the CPU's body), and downloads the range's parameters. Null: the host
  // again. The caller's host gradients are clipped by the same factor.
  void set_backend(std::shared_ptr<Backend<float>> be);
  // m and v as the device has them (call before reading them: a checkpoint).
  void sync_host();
  // m, v, t or the parameters were set from outside (a resumed checkpoint, a new round):
  // the host's are the current ones, and the device takes them at the next step.
  void state_changed() { dev_fresh_ = false, host_stale_ = false, reduced_ = false; }
  // On a device: sends the host's state if the device lacks it (before a loss reads
  // device_params()). No-op on the host.
  void prepare(const float* params);
  // Data parallelism: this rank's gradient of the range times `scale`, summed over the
  // ranks of comm where the optimiser keeps it, for the next step() to apply. On the
  // host: grads (the whole buffer), with comm.sum. On a device: the range's gradient
  // there (grads uploaded, device_grads() added: what step() does first), with
  // comm.sum_device (NCCL on GPUs that have it, else through the host).
  void reduce(float* grads, float scale, Communicator& comm);
  // On a device (null on the host): the range's parameters there (current after prepare
  // and every step), and a gradient array there that step() adds to the uploaded
  // gradients, then clears: a model's field gradient can stay on the device.
  const float* device_params() const { return be_ ? pd_.data() : nullptr; }
  float* device_grads() { return be_ ? acc_.data() : nullptr; }
  Buffer<float> m, v;  // the range's moments (m[i] is parameter begin + i)
  int64_t t = 0;

 private:
  kernels::AdamWStep constants(double lr) const;  // after ++t
  size_t begin_;
  Buffer<float> wd_;  // decay per parameter: weight_decay on matrices, 0 elsewhere
  double b1_, b2_, eps_, clip_;
  std::shared_ptr<Backend<float>> be_;
  Array<float> pd_, md_, vd_, wdd_, gd_, acc_;  // on be_: parameters, moments, decays, gradients, device_grads
  Array<float, double> norm_;
  bool dev_fresh_ = false;  // the device holds the current parameters and moments
  bool host_stale_ = false; // m and v on the host lag the device's
  bool reduced_ = false;    // gd_ holds the summed gradient (reduce) for the next step
  void gather(const float* g);  // on a device: gd_ = the range's g + acc_, acc_ cleared
};

}  // namespace flowloop
