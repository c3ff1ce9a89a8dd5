#include "flowloop/backend.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "flowloop/kernels.hpp"
#if defined(FLOWLOOP_HAVE_CUDA)
#include "flowloop/cuda.hpp"
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

namespace {

// The reference backend: host memory; every operation is a loop over kernels.hpp's
// bodies (the CUDA kernels' own) or the library's GEMM, on one thread, in a fixed order.
template <class S>
class ReferenceBackend final : public Backend<S> {
 public:
  Device device() const override { return Device::cpu; }
  std::string name() const override { return "reference (host)"; }

  S* alloc(size_t n) override {  // (not counted in MemoryStats, which counts Buffers)
    return static_cast<S*>(::operator new(n * sizeof(S), std::align_val_t(64)));
  }
  void free(S* p) noexcept override {
    ::operator delete(p, std::align_val_t(64));
  }
  void upload(S* dst, const S* host, size_t n) override { std::memcpy(dst, host, n * sizeof(S)); }
  void download(S* host, const S* src, size_t n) override { std::memcpy(host, src, n * sizeof(S)); }
  void copy(S* dst, const S* src, size_t n) override { std::memmove(dst, src, n * sizeof(S)); }
  void fill(S* x, S value, size_t n) override { std::fill(x, x + n, value); }
  void synchronize() override {}

  void gemm(bool ta, bool tb, int M, int N, int K, S alpha, const S* A, int lda, int64_t sA, const S* B, int ldb,
            int64_t sB, S beta, S* C, int ldc, int64_t sC, int batch) override {
    for (int i = 0; i < batch; ++i)
      flowloop::gemm<S>(ta, tb, M, N, K, alpha, A + i * sA, lda, B + i * sB, ldb, beta, C + i * sC, ldc);
  }

  void axpy(S* y, S a, const S* x, size_t n) override {
    for (size_t i = 0; i < n; ++i) y[i] += a * x[i];
  }
  void add_bias(S* out, const S* b, int N, int OUT) override {
    for (int64_t n = 0; n < N; ++n)
      for (int o = 0; o < OUT; ++o) out[n * OUT + o] += b[o];
  }
  void column_sums(S* out, const S* x, int N, int OUT) override {
    for (int o = 0; o < OUT; ++o) out[o] += kernels::column_sum(x, N, OUT, o);
  }
  void gelu_forward(S* out, const S* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) out[i] = kernels::gelu(in[i]);
  }
  void gelu_backward(S* din, const S* dout, const S* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) din[i] += kernels::gelu_grad(in[i]) * dout[i];
  }
  void silu_forward(S* out, const S* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) out[i] = kernels::silu(in[i]);
  }
  void silu_backward(S* din, const S* dout, const S* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) din[i] += kernels::silu_grad(in[i]) * dout[i];
  }
  void layernorm_forward(S* out, S* mean, S* rstd, const S* in, const S* w, const S* b, int N, int C) override {
    for (int64_t n = 0; n < N; ++n) kernels::layernorm_row(out + n * C, mean + n, rstd + n, in + n * C, w, b, C);
  }
  void layernorm_backward(S* din, S* dw, S* db, const S* dout, const S* in, const S* w, const S* mean,
                          const S* rstd, int N, int C) override {
    if (din)
      for (int64_t n = 0; n < N; ++n)
        kernels::layernorm_row_backward(din + n * C, dout + n * C, in + n * C, w, mean[n], rstd[n], C);
    if (dw || db)
      for (int i = 0; i < C; ++i) kernels::layernorm_column_grads(dw, db, dout, in, mean, rstd, N, C, i);
  }
  void causal_softmax(S* att, int BH, int T, S scale) override {
    for (int64_t r = 0; r < static_cast<int64_t>(BH) * T; ++r)
      kernels::causal_softmax_row(att + r * T, static_cast<int>(r % T), T, scale);
  }
  void causal_softmax_backward(S* datt, const S* att, int BH, int T, S scale) override {
    for (int64_t r = 0; r < static_cast<int64_t>(BH) * T; ++r)
      kernels::causal_softmax_row_backward(datt + r * T, att + r * T, static_cast<int>(r % T), T, scale);
  }
  void modulate_forward(S* out, const S* in, const S* shift, const S* scale, int B, int T, int C,
                        int ld) override {
    for (int64_t bt = 0; bt < static_cast<int64_t>(B) * T; ++bt) {
      const int64_t v = (bt / T) * ld;
      for (int i = 0; i < C; ++i) out[bt * C + i] = kernels::modulate(in[bt * C + i], shift[v + i], scale[v + i]);
    }
  }
  void modulate_backward(S* din, S* dshift, S* dscale, const S* dout, const S* in, const S* scale, int B, int T,
                         int C, int ld) override {
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < C; ++i) kernels::broadcast_backward(din, dshift, dscale, dout, in, scale, T, C, ld, b, i);
  }
  void gate_forward(S* out, const S* res, const S* in, const S* gate, int B, int T, int C, int ld) override {
    for (int64_t bt = 0; bt < static_cast<int64_t>(B) * T; ++bt) {
      const int64_t v = (bt / T) * ld;
      for (int i = 0; i < C; ++i) out[bt * C + i] = kernels::gated(res[bt * C + i], in[bt * C + i], gate[v + i]);
    }
  }
  void gate_backward(S* din, S* dgate, const S* dout, const S* in, const S* gate, int B, int T, int C,
                     int ld) override {
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < C; ++i)
        kernels::broadcast_backward(din, static_cast<S*>(nullptr), dgate, dout, in, gate, T, C, ld, b, i);
  }
};

}  // namespace

template <class S>
std::unique_ptr<Backend<S>> make_backend(Device d) {
  require_device(d);
#if defined(FLOWLOOP_HAVE_CUDA)
  if (d == Device::cuda) return cuda::make_backend<S>();
#endif
  return std::make_unique<ReferenceBackend<S>>();
}

template std::unique_ptr<Backend<float>> make_backend<float>(Device);
template std::unique_ptr<Backend<double>> make_backend<double>(Device);

}  // namespace flowloop
