// flowloop/backend/backend.hpp: a backend is a memory (core/memory.hpp) with the operations that
// run there, split by concern:
//   - StateOps (ode/state_ops.hpp): the solvers' state algebra. integrate() and the
//     gradient methods need nothing more: a system of the user's own runs on any backend.
//   - NetOps (nn/ops.hpp): the network ops the block composition (nn/field.hpp) is written
//     against, one implementation per backend.
//   - OptimOps (below): the optimiser's update.
// Backend<S> is all of them. The backends:
//   - "cpu" (cpu_backend()): host memory, the fused Eigen/OpenBLAS layers; every CPU path.
//   - "reference" (host_backend(), make_backend(Device::cpu)): host memory, each op a loop
//     over kernels.hpp's bodies (the CUDA kernels' own): CI runs the device paths on it.
//   - "cuda" (make_backend(Device::cuda), FLOWLOOP_CUDA builds): a GPU's memory, cuda/'s
//     kernels and cuBLAS on the backend's stream.
#pragma once

#include <memory>

#include "flowloop/core/memory.hpp"
#include "flowloop/backend/kernels.hpp"
#include "flowloop/nn/ops.hpp"
#include "flowloop/ode/state_ops.hpp"

namespace flowloop {

template <class S>
class OptimOps : public virtual Memory<S> {
 public:
  // AdamW over n parameters (kernels.hpp's adamw_update per value); wd is each one's decay.
  virtual void adamw(S* p, S* m, S* v, const S* g, const S* wd, size_t n, const kernels::AdamWStep& s) = 0;
};

template <class S>
class Backend : public NetOps<S>, public OptimOps<S> {};

// The process's reference backend (host memory): integrate() runs systems without a
// backend of their own on it.
template <class S>
Backend<S>& host_backend();

// The process's cpu backend (host memory, the fused layers): the CPU field's.
template <class S>
Backend<S>& cpu_backend();

// The backend of a device: the reference host backend for cpu, the CUDA one for cuda
// (require_device's errors otherwise).
template <class S>
std::unique_ptr<Backend<S>> make_backend(Device d);

}  // namespace flowloop
