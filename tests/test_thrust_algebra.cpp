// The CUDA backend's state algebra (cuda/thrust_algebra.hpp), built here against
// Thrust's OpenMP device system (CI has no GPU), against the CPU algebra.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <thrust/device_vector.h>
#include <thrust/host_vector.h>
#include <vector>

#include "check.hpp"
#include "flowloop/ode/algebra.hpp"
#include "flowloop/core/tensor.hpp"
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
  // The stages' error combination in S: the compiler may contract its products and sums
  // into FMAs differently in the CPU's loop and in the functor (it does on AMD's AVX2
  // builds), so float values differ by an ulp or so; double agrees to rounding of the sums.
  const double err_tol = backend_tol<S>(1e-6, 1e-12);
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
  CHECK(gpu == Approx(cpu).epsilon(err_tol));
  CHECK(dev::error_norm(0.3, e.data(), dkp.data(), m, thrust::raw_pointer_cast(dy0.data()),
                        thrust::raw_pointer_cast(dy1.data()), 1e-3, 1e-6, G * n) ==
        Approx(algebra::error_norm(0.3, e.data(), kp.data(), m, y0.data(), y1.data(), 1e-3, 1e-6, G * n)).epsilon(err_tol));
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
    CHECK(sums[static_cast<size_t>(i)] == Approx(want).epsilon(err_tol));
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

TEMPLATE_TEST_CASE("device algebra: the driver's row-batched norms and row copies", "[thrust][algebra]", float,
                   double) {
  using S = TestType;
  // The stages' error combination in S: the compiler may contract its products and sums
  // into FMAs differently in the CPU's loop and in the functor (it does on AMD's AVX2
  // builds), so float values differ by an ulp or so; double agrees to rounding of the sums.
  const double err_tol = backend_tol<S>(1e-6, 1e-12);
  const int G = 5, m = 7;
  const size_t n = 301, period = 100, dims = 37;  // the last period is short
  Rng rng(14);
  const auto y0 = random_values<S>(G * n, rng), y1 = random_values<S>(G * n, rng), a = random_values<S>(G * n, rng);
  RandomStages<S> stages(m, G * n, rng);
  const std::vector<double> e = {0.01, 0.0, -0.02, 0.03, 0.0, 0.005, -0.01};
  const std::vector<double> h = {0.1, 0.2, 0.3, 0.4, 0.5};
  const std::vector<int> rows = {4, 1, 2};
  thrust::device_vector<S> dy0(y0.begin(), y0.end()), dy1(y1.begin(), y1.end()), da(a.begin(), a.end());
  thrust::device_vector<double> dh(h.begin(), h.end()), dsums(G);
  thrust::device_vector<int> drows(rows.begin(), rows.end());
  auto raw = [](auto& v) { return thrust::raw_pointer_cast(v.data()); };
  // error sums over the first dims of every period values, per row: the CPU's sum of its periods
  dev::error_sum_squares_rows(raw(dsums), raw(dh), e.data(), stages.dp.data(), m, raw(dy0), raw(dy1), 1e-3, 1e-6,
                              raw(drows), 3, n, period, dims);
  auto sums = to_host(dsums);
  for (size_t i = 0; i < rows.size(); ++i) {
    const size_t base = static_cast<size_t>(rows[i]) * n;
    double want = 0.0;
    for (size_t off = 0; off < n; off += period) {
      std::vector<const S*> kc;
      for (const S* p : stages.hp) kc.push_back(p + base + off);
      want += algebra::error_sum_squares(h[static_cast<size_t>(rows[i])], e.data(), kc.data(), m, y0.data() + base + off,
                                         y1.data() + base + off, 1e-3, 1e-6, std::min(dims, n - off));
    }
    CHECK(sums[i] == Approx(want).epsilon(err_tol));
  }
  // sums of squares of listed rows, and of the first rows (rows null); a NaN poisons its row only
  dev::sum_squares_rows(raw(dsums), raw(dy1), raw(drows), 3, n);
  sums = to_host(dsums);
  for (size_t i = 0; i < rows.size(); ++i)
    CHECK(sums[i] == Approx(algebra::sum_squares(y1.data() + static_cast<size_t>(rows[i]) * n, n)).epsilon(1e-12));
  thrust::device_vector<S> poisoned = dy1;
  poisoned[2 * n + 7] = std::numeric_limits<S>::quiet_NaN();
  dev::sum_squares_rows(raw(dsums), raw(poisoned), static_cast<const int*>(nullptr), G, n);
  sums = to_host(dsums);
  for (int r = 0; r < G; ++r) {
    if (r == 2)
      CHECK(std::isnan(sums[2]));
    else
      CHECK(sums[static_cast<size_t>(r)] ==
            Approx(algebra::sum_squares(y1.data() + static_cast<size_t>(r) * n, n)).epsilon(1e-12));
  }
  // the first step's scaled norms, of one array and of a difference
  dev::scaled_sum_squares_rows(raw(dsums), raw(da), static_cast<const S*>(nullptr), raw(dy0), 1e-3, 1e-6, G, n);
  sums = to_host(dsums);
  for (int r = 0; r < G; ++r) {
    const size_t base = static_cast<size_t>(r) * n;
    CHECK(sums[static_cast<size_t>(r)] ==
          Approx(algebra::scaled_sum_squares(a.data() + base, y0.data() + base, 1e-3, 1e-6, n)).epsilon(1e-12));
  }
  dev::scaled_sum_squares_rows(raw(dsums), raw(da), raw(dy1), raw(dy0), 1e-3, 1e-6, G, n);
  sums = to_host(dsums);
  for (int r = 0; r < G; ++r) {
    const size_t base = static_cast<size_t>(r) * n;
    CHECK(sums[static_cast<size_t>(r)] ==
          Approx(algebra::scaled_diff_sum_squares(a.data() + base, y1.data() + base, y0.data() + base, 1e-3, 1e-6, n))
              .epsilon(1e-12));
  }
  // copying the listed rows between two batches leaves the others
  thrust::device_vector<S> dst = dy0;
  dev::copy_rows(raw(dst), raw(dy1), raw(drows), 3, n);
  const auto got = to_host(dst);
  for (int r = 0; r < G; ++r) {
    const bool listed = r == 4 || r == 1 || r == 2;
    const size_t base = static_cast<size_t>(r) * n;
    CHECK(std::equal(got.begin() + static_cast<long>(base), got.begin() + static_cast<long>(base + n),
                     (listed ? y1 : y0).begin() + static_cast<long>(base)));
  }
}
