// The reference backend (host memory, kernels.hpp's bodies one row or element at a time:
// the CUDA backend's twin) and the device policy: which devices this build and machine
// can run, and the backend of each.
#include "reference.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "flowloop/ode/algebra.hpp"
#include "flowloop/backend/kernels.hpp"
#if defined(FLOWLOOP_HAVE_CUDA)
#include "flowloop/backend/cuda.hpp"
#endif

namespace flowloop {

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device::cpu;
  if (name == "cuda") return Device::cuda;
  throw Error("unknown device '" + name + "' (expected cpu or cuda)");
}

const char* device_name(Device d) { return d == Device::cuda ? "cuda" : "cpu"; }

bool cuda_built() {
#if defined(FLOWLOOP_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#if defined(FLOWLOOP_HAVE_CUDA)
  return cuda::device_count();
#else
  return 0;
#endif
}

Device default_device() { return cuda_device_count() > 0 ? Device::cuda : Device::cpu; }

void require_device(Device d) {
  if (d == Device::cpu) return;
  if (!cuda_built())
    throw Error("--device cuda: this build has no CUDA backend (configure with -DFLOWLOOP_CUDA=ON where nvcc is found)");
  if (cuda_device_count() == 0)
    throw Error("--device cuda: no GPU is visible to this process (the CUDA runtime reports none)");
}

Device resolve_device(const std::string& name) {
  if (name == "auto") {
    const char* env = std::getenv("FLOWLOOP_DEVICE");  // the default's override (tests pin cpu)
    if (!env || std::string(env).empty() || std::string(env) == "auto") return default_device();
    return resolve_device(env);
  }
  if (name != "cpu" && name != "cuda") throw Error("unknown device '" + name + "' (expected auto, cpu or cuda)");
  const Device d = parse_device(name);
  require_device(d);
  return d;
}

template <class S>
Backend<S>& host_backend() {
  static detail::ReferenceBackend<S> be;
  return be;
}

template <class S>
std::unique_ptr<Backend<S>> make_backend(Device d) {
  require_device(d);
#if defined(FLOWLOOP_HAVE_CUDA)
  if (d == Device::cuda) return cuda::make_backend<S>();
#endif
  return std::make_unique<detail::ReferenceBackend<S>>();
}

template <class S>
StateOps<S>& host_state_ops() {
  return host_backend<S>();
}

template StateOps<float>& host_state_ops<float>();
template StateOps<double>& host_state_ops<double>();
template std::unique_ptr<Backend<float>> make_backend<float>(Device);
template std::unique_ptr<Backend<double>> make_backend<double>(Device);
template Backend<float>& host_backend<float>();
template Backend<double>& host_backend<double>();

}  // namespace flowloop
