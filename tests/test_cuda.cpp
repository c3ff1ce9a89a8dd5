// The CUDA backend against the CPU: every device operation on the same inputs as its
// layer (or the CPU algebra), in double (rel < 1e-12) and float (rel < 1e-5). Runs only
// where a GPU is visible (main_cuda.cpp skips otherwise).
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "check.hpp"
#include "device_field_check.hpp"
#include "driver_check.hpp"
#include "flowloop/backend/backend.hpp"
#include "flowloop/ode/algebra.hpp"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/nn/layers.hpp"
#include "flowloop/core/tensor.hpp"

using namespace flowloop;
using namespace flowloop::test;

namespace {
template <class S>
std::vector<S> down(const cuda::DeviceBuffer<S>& d) {
  std::vector<S> h(d.size());
  d.download(h.data(), h.size());
  return h;
}
template <class S>
double rel(const std::vector<S>& a, const std::vector<S>& b) {
  return rel_error_of(a, b);
}
template <class S>
constexpr double tol() {
  return backend_tol<S>(1e-5, 1e-12);  // the device's exp and tanh are not glibc's
}
}  // namespace

TEMPLATE_TEST_CASE("cuda: GELU and LayerNorm against the CPU layers", "[cuda]", float, double) {
  using S = TestType;
  Rng rng(1);
  const int N = 300, C = 96;
  const size_t NC = static_cast<size_t>(N) * C;
  const auto x = random_values<S>(NC, rng, 2.0), g = random_values<S>(NC, rng), w = random_values<S>(C, rng),
             b = random_values<S>(C, rng), din0 = random_values<S>(NC, rng);
  std::vector<S> y(NC), dz = din0, ln(NC), mean(N), rstd(N), dln = din0;
  gelu_forward(y.data(), x.data(), static_cast<int64_t>(NC));
  gelu_backward(dz.data(), g.data(), x.data(), static_cast<int64_t>(NC));
  layernorm_forward(ln.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C);
  layernorm_backward<S>(dln.data(), nullptr, nullptr, g.data(), x.data(), w.data(), mean.data(), rstd.data(), N, C);
  cuda::DeviceBuffer<S> dx(x.data(), NC), dg(g.data(), NC), dw(w.data(), C), db(b.data(), C), dy(NC), ddz(din0.data(), NC),
      dln_(NC), dmean(N), drstd(N), ddln(din0.data(), NC);
  cuda::gelu_forward(dy.data(), dx.data(), static_cast<int64_t>(NC));
  cuda::gelu_backward(ddz.data(), dg.data(), dx.data(), static_cast<int64_t>(NC));
  cuda::layernorm_forward(dln_.data(), dmean.data(), drstd.data(), dx.data(), dw.data(), db.data(), N, C);
  cuda::layernorm_backward_input(ddln.data(), dg.data(), dx.data(), dw.data(), dmean.data(), drstd.data(), N, C);
  cuda::synchronize();
  CHECK(rel(down(dy), y) < tol<S>());
  CHECK(rel(down(ddz), dz) < tol<S>());
  CHECK(rel(down(dln_), ln) < tol<S>());
  CHECK(rel(down(dmean), mean) < tol<S>());
  CHECK(rel(down(drstd), rstd) < tol<S>());
  CHECK(rel(down(ddln), dln) < tol<S>());
}

TEMPLATE_TEST_CASE("cuda: RMSNorm, rotary embeddings and SwiGLU against the reference backend", "[cuda]", float, double) {
  using S = TestType;
  Rng rng(3);
  const int N = 300, C = 96, B = 3, T = 40, H = 4, D = 24;
  const size_t NC = static_cast<size_t>(N) * C;
  const auto x = random_values<S>(NC, rng, 2.0), g = random_values<S>(NC, rng), w = random_values<S>(C, rng),
             din0 = random_values<S>(NC, rng), dw0 = random_values<S>(C, rng);
  auto ref = make_backend<S>(Device::cpu);
  std::vector<S> y(NC), rstd(N), din = din0, dw = dw0;
  ref->rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, C, 1e-6);
  ref->rmsnorm_backward(din.data(), dw.data(), g.data(), x.data(), w.data(), rstd.data(), N, C);
  cuda::DeviceBuffer<S> dx(x.data(), NC), dg(g.data(), NC), dwt(w.data(), C), dy(NC), drstd(N), ddin(din0.data(), NC),
      ddw(dw0.data(), C);
  cuda::rmsnorm_forward(dy.data(), drstd.data(), dx.data(), dwt.data(), N, C, 1e-6);
  cuda::rmsnorm_backward(ddin.data(), ddw.data(), dg.data(), dx.data(), dwt.data(), drstd.data(), N, C);
  // rotary on q's heads inside qkv rows (ld 3 H D), both conventions, forward then transpose
  const size_t nq = static_cast<size_t>(B) * T * 3 * H * D;
  const auto q = random_values<S>(nq, rng);
  for (const bool interleaved : {false, true}) {
    std::vector<S> r = q;
    ref->rotary(r.data(), B, T, H, D, 3 * H * D, 16, 10000.0, interleaved, false);
    cuda::DeviceBuffer<S> dq(q.data(), nq);
    cuda::rotary(dq.data(), B, T, H, D, 3 * H * D, 16, 10000.0, interleaved, false);
    cuda::synchronize();
    CHECK(rel(down(dq), r) < tol<S>());
    cuda::rotary(dq.data(), B, T, H, D, 3 * H * D, 16, 10000.0, interleaved, true);
    cuda::synchronize();
    CHECK(rel(down(dq), q) < tol<S>());
  }
  // SwiGLU on a fused [gate | up] row (ld 2F)
  const int F = 48;
  const auto gu = random_values<S>(static_cast<size_t>(N) * 2 * F, rng, 2.0), gs = random_values<S>(static_cast<size_t>(N) * F, rng);
  std::vector<S> sy(static_cast<size_t>(N) * F), dgu(gu.size(), S(0));
  ref->swiglu_forward(sy.data(), gu.data(), gu.data() + F, N, F, 2 * F);
  ref->swiglu_backward(dgu.data(), dgu.data() + F, gs.data(), gu.data(), gu.data() + F, N, F, 2 * F);
  cuda::DeviceBuffer<S> dgu_in(gu.data(), gu.size()), dgs(gs.data(), gs.size()), dsy(sy.size()), ddgu(gu.size());
  cuda::fill(ddgu.data(), S(0), static_cast<int64_t>(gu.size()));
  cuda::swiglu_forward(dsy.data(), dgu_in.data(), dgu_in.data() + F, N, F, 2 * F);
  cuda::swiglu_backward(ddgu.data(), ddgu.data() + F, dgs.data(), dgu_in.data(), dgu_in.data() + F, N, F, 2 * F);
  cuda::synchronize();
  CHECK(rel(down(dsy), sy) < tol<S>());
  CHECK(rel(down(ddgu), dgu) < tol<S>());
  CHECK(rel(down(dy), y) < tol<S>());
  CHECK(rel(down(drstd), rstd) < tol<S>());
  CHECK(rel(down(ddin), din) < tol<S>());
  CHECK(rel(down(ddw), dw) < tol<S>());
}

TEMPLATE_TEST_CASE("cuda: causal softmax and cross-entropy against the CPU", "[cuda]", float, double) {
  using S = TestType;
  Rng rng(2);
  const int B = 3, T = 17, C = 8, NH = 2;
  const auto qkv = random_values<S>(static_cast<size_t>(B) * T * 3 * C, rng), dy = random_values<S>(static_cast<size_t>(B) * T * C, rng);
  std::vector<S> y(static_cast<size_t>(B) * T * C), att(static_cast<size_t>(B) * NH * T * T), dqkv(qkv.size(), S(0)),
      datt(att.size(), S(0));
  attention_forward(y.data(), att.data(), qkv.data(), B, T, C, NH);
  attention_backward(dqkv.data(), datt.data(), dy.data(), qkv.data(), att.data(), B, T, C, NH);
  // the scores q k^T (the product cuBLAS will do), then the softmax on the device
  const int D = C / NH;
  std::vector<S> scores(att.size(), S(0)), dprob(att.size(), S(0));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < T; ++j) {
          S s = 0, dp = 0;
          for (int i = 0; i < D; ++i) {
            s += qkv[(static_cast<size_t>(b) * T + t) * 3 * C + h * D + i] * qkv[(static_cast<size_t>(b) * T + j) * 3 * C + C + h * D + i];
            dp += dy[(static_cast<size_t>(b) * T + t) * C + h * D + i] * qkv[(static_cast<size_t>(b) * T + j) * 3 * C + 2 * C + h * D + i];
          }
          const size_t o = ((static_cast<size_t>(b) * NH + h) * T + t) * T + j;
          scores[o] = j <= t ? s : S(0);
          dprob[o] = j <= t ? dp : S(0);
        }
  cuda::DeviceBuffer<S> datt_(scores.data(), scores.size()), dd(dprob.data(), dprob.size());
  const S scale = S(1) / std::sqrt(static_cast<S>(D));
  cuda::causal_softmax(datt_.data(), B * NH, T, scale);
  cuda::causal_softmax_backward(dd.data(), datt_.data(), B * NH, T, scale);
  cuda::synchronize();
  CHECK(rel(down(datt_), att) < tol<S>());
  CHECK(rel(down(dd), datt) < 10 * tol<S>());
  // cross-entropy with an unscored row
  const int N = 9, V = 13;
  const auto logits = random_values<S>(static_cast<size_t>(N) * V, rng, 3.0);
  std::vector<int32_t> targets = {1, 4, -1, 12, 0, 7, 7, 3, 11};
  std::vector<S> dl(logits.size(), S(0));
  const S loss = crossentropy_forward_backward(dl.data(), logits.data(), targets.data(), N, V);
  cuda::DeviceBuffer<S> dlog(logits.data(), logits.size()), ddl(logits.size());
  std::vector<S> zeros(logits.size(), S(0));
  ddl.upload(zeros.data(), zeros.size());
  cuda::DeviceBuffer<int32_t> dt(targets.data(), targets.size());
  const S dloss = cuda::crossentropy_forward_backward(ddl.data(), dlog.data(), dt.data(), N, V);
  CHECK(dloss == Approx(loss).epsilon(tol<S>()));
  CHECK(rel(down(ddl), dl) < tol<S>());
}

TEMPLATE_TEST_CASE("cuda: the device algebra against the CPU's", "[cuda]", float, double) {
  using S = TestType;
  Rng rng(3);
  const int G = 4, m = 7;
  const size_t n = 5000;
  const auto y0 = random_values<S>(G * n, rng), y1 = random_values<S>(G * n, rng);
  std::vector<std::vector<S>> k;
  std::vector<cuda::DeviceBuffer<S>> dk;
  std::vector<const S*> kp, dkp;
  for (int j = 0; j < m; ++j) {
    k.push_back(random_values<S>(G * n, rng));
    dk.emplace_back(k.back().data(), k.back().size());
  }
  for (int j = 0; j < m; ++j) {
    kp.push_back(k[static_cast<size_t>(j)].data());
    dkp.push_back(dk[static_cast<size_t>(j)].data());
  }
  const std::vector<double> c = {0.1, -0.3, 0.25, 0.0, 1.5, -0.05, 0.2}, h = {0.1, 0.2, 0.3, 0.4};
  const std::vector<int> rows = {3, 1};
  cuda::DeviceBuffer<S> dy0(y0.data(), y0.size()), dy1(y1.data(), y1.size()), dout(y1.data(), y1.size());
  cuda::DeviceBuffer<double> dh(h.data(), h.size()), dsums(2);
  cuda::DeviceBuffer<int> drows(rows.data(), rows.size());
  std::vector<S> out = y1;
  algebra::rk_combine_rows(out.data(), y0.data(), h.data(), c.data(), kp.data(), m, rows.data(), 2, n);
  algebra::device::rk_combine_rows(dout.data(), dy0.data(), dh.data(), c.data(), dkp.data(), m, drows.data(), 2, n);
  CHECK(rel(down(dout), out) < tol<S>());
  const double cpu = algebra::error_sum_squares(0.3, c.data(), kp.data(), m, y0.data(), y1.data(), 1e-3, 1e-6, G * n);
  CHECK(algebra::device::error_sum_squares(0.3, c.data(), dkp.data(), m, dy0.data(), dy1.data(), 1e-3, 1e-6, G * n) ==
        Approx(cpu).epsilon(1e-10));
  algebra::device::error_sum_squares_rows(dsums.data(), dh.data(), c.data(), dkp.data(), m, dy0.data(), dy1.data(), 1e-3,
                                          1e-6, drows.data(), 2, n);
  const auto sums = down(dsums);
  for (int i = 0; i < 2; ++i) {
    const size_t off = static_cast<size_t>(rows[static_cast<size_t>(i)]) * n;
    std::vector<const S*> kr;
    for (const S* p : kp) kr.push_back(p + off);
    CHECK(sums[static_cast<size_t>(i)] ==
          Approx(algebra::error_sum_squares(h[static_cast<size_t>(rows[static_cast<size_t>(i)])], c.data(), kr.data(), m,
                                            y0.data() + off, y1.data() + off, 1e-3, 1e-6, n))
              .epsilon(1e-10));
  }
  CHECK(algebra::device::all_finite(dy1.data(), G * n));
}

TEST_CASE("cuda: errors name the operation, and device memory what it lacks", "[cuda]") {
  CHECK_THROWS_WITH(cuda::device_alloc(size_t{1} << 62), Catch::Contains("cannot allocate") && Catch::Contains("free of"));
  cuda::DeviceBuffer<float> a(4);
  std::vector<float> h(8);
  CHECK_THROWS_WITH(a.upload(h.data(), 8), Catch::Contains("8 values into 4"));
  const auto [free_b, total] = cuda::memory_info();
  CHECK(free_b > 0);
  CHECK(total >= free_b);
}

TEMPLATE_TEST_CASE("cuda: the backend's strided batched products against the CPU gemm", "[cuda]", float, double) {
  using S = TestType;
  auto be = make_backend<S>(Device::cuda);
  Rng rng(5);
  const int M = 37, N = 29, K = 41, batch = 3;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      const int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 1;
      const int64_t sA = static_cast<int64_t>(ta ? K : M) * lda, sB = static_cast<int64_t>(tb ? N : K) * ldb,
                    sC = static_cast<int64_t>(M) * ldc;
      const auto A = random_values<S>(sA * batch, rng), B = random_values<S>(sB * batch, rng),
                 C0 = random_values<S>(sC * batch, rng);
      std::vector<S> C = C0;
      for (int i = 0; i < batch; ++i)
        gemm<S>(ta, tb, M, N, K, S(0.7), A.data() + i * sA, lda, B.data() + i * sB, ldb, S(0.3), C.data() + i * sC, ldc);
      auto dA = device_upload(*be, A), dB = device_upload(*be, B), dC = device_upload(*be, C0);
      be->gemm(ta, tb, M, N, K, S(0.7), dA.data(), lda, sA, dB.data(), ldb, sB, S(0.3), dC.data(), ldc, sC, batch);
      INFO("ta " << ta << " tb " << tb);
      CHECK(rel(device_download(*be, dC), C) < tol<S>());
    }
}

TEMPLATE_TEST_CASE("cuda: the field and its vjp on the CUDA backend against the CPU", "[cuda]", float, double) {
  using S = TestType;
  auto be = make_backend<S>(Device::cuda);
  REQUIRE(be->device() == Device::cuda);
  for (const char* kind : {"autonomous", "time", "step", "llama"}) check_device_field<S>(*be, kind, tol<S>());
}

TEST_CASE("cuda: a model too large for the device names the bytes", "[cuda]") {
  auto be = make_backend<float>(Device::cuda);
  const auto mem = cuda::memory_info();
  CHECK_THROWS_WITH(Array<float>(*be, mem.second), Catch::Contains("cannot allocate") && Catch::Contains("free of"));
}

TEMPLATE_TEST_CASE("cuda: solves and gradients of a model on the GPU against the CPU (double: the same step counts)",
                   "[cuda]", float, double) {
  using S = TestType;
  std::shared_ptr<Backend<S>> be = make_backend<S>(Device::cuda);
  for (const char* kind : {"autonomous", "time", "llama"}) check_device_solves<S>(be, kind, tol<S>());
}

TEST_CASE("cuda: the driver on device memory against the host driver (the same step counts)", "[cuda][solvers]") {
  auto be = make_backend<double>(Device::cuda);
  check_backend_driver(*be, /*exact=*/false);
}
