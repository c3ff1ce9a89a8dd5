// The CUDA backend's state algebra (cuda/thrust_algebra.hpp), built here against
// Thrust's OpenMP device system (CI has no GPU), against the CPU algebra.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <thrust/device_vector.h>
#include <thrust/host_vector.h>
#include <vector>

#include "check.hpp"
#include "flowloop/algebra.hpp"
#include "flowloop/tensor.hpp"
#include "thrust_algebra.hpp"

using namespace flowloop;
using namespace flowloop::test;
namespace dev = flowloop::algebra::device;

namespace {
template <class S>
std::vector<S> to_host(const thrust::device_vector<S>& d) {
  thrust::host_vector<S> h = d;
  return std::vector<S>(h.begin(), h.end());
}
template <class S>
std::vector<S> head(const thrust::device_vector<S>& d, size_t n) {
  std::vector<S> v = to_host(d);
  v.resize(n);
  return v;
}
// m random stages of `size` values, on the host and on the device, with their pointers
template <class S>
struct RandomStages {
  std::vector<std::vector<S>> host;
  std::vector<thrust::device_vector<S>> dev;
  std::vector<const S*> hp, dp;
  RandomStages(int m, size_t size, Rng& rng) {
    for (int j = 0; j < m; ++j) {
      host.push_back(random_values<S>(size, rng));
      dev.emplace_back(host.back().begin(), host.back().end());
    }
    for (int j = 0; j < m; ++j) {
      hp.push_back(host[static_cast<size_t>(j)].data());
      dp.push_back(thrust::raw_pointer_cast(dev[static_cast<size_t>(j)].data()));
    }
  }
};
template <class S>
double rel(const std::vector<S>& a, const std::vector<S>& b) {
  return rel_error_of(a, b);
}
template <class S>
constexpr double tol() {
  return backend_tol<S>();
}
}  // namespace

TEMPLATE_TEST_CASE("device algebra: Runge-Kutta combinations as the CPU's", "[thrust][algebra]", float, double) {
  using S = TestType;
  const int G = 5, m = 7;
  const size_t n = 1031;  // not a multiple of the CPU's blocks
  Rng rng(11);
  const auto y = random_values<S>(G * n, rng);
  RandomStages<S> stages(m, G * n, rng);
  const std::vector<const S*>&kp = stages.hp, &dkp = stages.dp;
  const std::vector<double> c = {0.1, -0.3, 0.25, 0.0, 1.5, -0.05, 0.2};
  thrust::device_vector<S> dy(y.begin(), y.end()), dout(G * n);
  // one state
  std::vector<S> out(n);
  algebra::rk_combine(out.data(), y.data(), 0.37, c.data(), kp.data(), m, n);
  dev::rk_combine(thrust::raw_pointer_cast(dout.data()), thrust::raw_pointer_cast(dy.data()), 0.37, c.data(), dkp.data(),
                  m, n);
  CHECK(rel(head(dout, n), out) < tol<S>());
  // listed rows of a batch, each with its step (the other rows untouched)
  const std::vector<double> h = {0.1, 0.2, 0.3, 0.4, 0.5};
  const std::vector<int> rows = {3, 0, 4};
  std::vector<S> bout = random_values<S>(G * n, rng);
  thrust::device_vector<S> dbout(bout.begin(), bout.end());
  thrust::device_vector<double> dh(h.begin(), h.end());
  thrust::device_vector<int> drows(rows.begin(), rows.end());
  algebra::rk_combine_rows(bout.data(), y.data(), h.data(), c.data(), kp.data(), m, rows.data(), 3, n);
  dev::rk_combine_rows(thrust::raw_pointer_cast(dbout.data()), thrust::raw_pointer_cast(dy.data()),
                       thrust::raw_pointer_cast(dh.data()), c.data(), dkp.data(), m, thrust::raw_pointer_cast(drows.data()),
                       3, n);
  CHECK(rel(to_host(dbout), bout) < tol<S>());
  // no stages: a copy of y
  dev::rk_combine(thrust::raw_pointer_cast(dout.data()), thrust::raw_pointer_cast(dy.data()), 0.5, c.data(), dkp.data(),
                  0, n);
  CHECK(head(dout, n) ==
        std::vector<S>(y.begin(), y.begin() + static_cast<long>(n)));
  // scaled sums
  algebra::scaled_sum(out.data(), 0.7, c.data(), kp.data(), m, n);
  dev::scaled_sum(thrust::raw_pointer_cast(dout.data()), 0.7, c.data(), dkp.data(), m, n);
  CHECK(rel(head(dout, n), out) < tol<S>());
  // more stages than a kernel argument holds is an error
  std::vector<double> many(40, 0.0);
  std::vector<const S*> mk(40, dkp[0]);
  CHECK_THROWS_WITH(dev::scaled_sum(thrust::raw_pointer_cast(dout.data()), 0.7, many.data(), mk.data(), 40, n),
                    Catch::Contains("40 stages (at most 32)"));
  CHECK_THROWS_WITH(dev::scaled_sum(thrust::raw_pointer_cast(dout.data()), 0.7, c.data(), dkp.data(), 0, n),
                    Catch::Contains("at least one stage"));
}

TEMPLATE_TEST_CASE("device algebra: error norms, per row, and NaN", "[thrust][algebra]", float, double) {
  using S = TestType;
  const int G = 4, m = 7;
  const size_t n = 777;
  Rng rng(12);
  const auto y0 = random_values<S>(G * n, rng), y1 = random_values<S>(G * n, rng);
  RandomStages<S> stages(m, G * n, rng);
  const std::vector<const S*>&kp = stages.hp, &dkp = stages.dp;
  const std::vector<double> e = {0.01, 0.0, -0.02, 0.03, 0.0, 0.005, -0.01};  // zero weights skipped
  thrust::device_vector<S> dy0(y0.begin(), y0.end()), dy1(y1.begin(), y1.end());
  const double cpu = algebra::error_sum_squares(0.3, e.data(), kp.data(), m, y0.data(), y1.data(), 1e-3, 1e-6, G * n);
  const double gpu = dev::error_sum_squares(0.3, e.data(), dkp.data(), m, thrust::raw_pointer_cast(dy0.data()),
                                            thrust::raw_pointer_cast(dy1.data()), 1e-3, 1e-6, G * n);
  CHECK(gpu == Approx(cpu).epsilon(1e-12));
  CHECK(dev::error_norm(0.3, e.data(), dkp.data(), m, thrust::raw_pointer_cast(dy0.data()),
                        thrust::raw_pointer_cast(dy1.data()), 1e-3, 1e-6, G * n) ==
        Approx(algebra::error_norm(0.3, e.data(), kp.data(), m, y0.data(), y1.data(), 1e-3, 1e-6, G * n)).epsilon(1e-12));
  // per row, each with its step: the rows' sums in one pass
  const std::vector<double> h = {0.1, 0.2, 0.3, 0.4};
  const std::vector<int> rows = {2, 0, 3};
  thrust::device_vector<double> dh(h.begin(), h.end()), dsums(3);
  thrust::device_vector<int> drows(rows.begin(), rows.end());
  dev::error_sum_squares_rows(thrust::raw_pointer_cast(dsums.data()), thrust::raw_pointer_cast(dh.data()), e.data(),
                              dkp.data(), m, thrust::raw_pointer_cast(dy0.data()), thrust::raw_pointer_cast(dy1.data()),
                              1e-3, 1e-6, thrust::raw_pointer_cast(drows.data()), 3, n);
  const auto sums = to_host(dsums);
  for (int i = 0; i < 3; ++i) {
    const size_t off = static_cast<size_t>(rows[static_cast<size_t>(i)]) * n;
    std::vector<const S*> kr;
    for (const S* p : kp) kr.push_back(p + off);
    const double want = algebra::error_sum_squares(h[static_cast<size_t>(rows[static_cast<size_t>(i)])], e.data(),
                                                   kr.data(), m, y0.data() + off, y1.data() + off, 1e-3, 1e-6, n);
    CHECK(sums[static_cast<size_t>(i)] == Approx(want).epsilon(1e-12));
  }
  // sum of squares, and a non-finite state poisons the norm and fails all_finite
  CHECK(dev::sum_squares(thrust::raw_pointer_cast(dy1.data()), G * n) ==
        Approx(algebra::sum_squares(y1.data(), G * n)).epsilon(1e-12));
  CHECK(dev::all_finite(thrust::raw_pointer_cast(dy1.data()), G * n));
  for (const S bad : {std::numeric_limits<S>::quiet_NaN(), std::numeric_limits<S>::infinity()}) {
    thrust::device_vector<S> poisoned = dy1;
    poisoned[500] = bad;
    CHECK_FALSE(dev::all_finite(thrust::raw_pointer_cast(poisoned.data()), G * n));
    CHECK(std::isnan(dev::error_sum_squares(0.3, e.data(), dkp.data(), m, thrust::raw_pointer_cast(dy0.data()),
                                            thrust::raw_pointer_cast(poisoned.data()), 1e-3, 1e-6, G * n)));
  }
}

TEST_CASE("device algebra: gathering and scattering the active rows", "[thrust][algebra]") {
  const int G = 6;
  const size_t n = 33;
  Rng rng(13);
  const auto src = random_values<double>(G * n, rng);
  const std::vector<int> rows = {4, 1, 5};
  thrust::device_vector<double> dsrc(src.begin(), src.end()), packed(3 * n), back(G * n, 0.0);
  thrust::device_vector<int> drows(rows.begin(), rows.end());
  dev::gather_rows(thrust::raw_pointer_cast(packed.data()), thrust::raw_pointer_cast(dsrc.data()),
                   thrust::raw_pointer_cast(drows.data()), 3, n);
  const auto p = to_host(packed);
  for (size_t i = 0; i < 3; ++i)
    for (size_t j = 0; j < n; ++j) CHECK(p[i * n + j] == src[static_cast<size_t>(rows[i]) * n + j]);
  dev::scatter_rows(thrust::raw_pointer_cast(back.data()), thrust::raw_pointer_cast(packed.data()),
                    thrust::raw_pointer_cast(drows.data()), 3, n);
  const auto b = to_host(back);
  for (int r = 0; r < G; ++r) {
    const bool listed = r == 1 || r == 4 || r == 5;
    for (size_t j = 0; j < n; ++j)
      CHECK(b[static_cast<size_t>(r) * n + j] == (listed ? src[static_cast<size_t>(r) * n + j] : 0.0));
  }
}
