#include "flowloop/algebra.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "flowloop/tensor.hpp"

namespace flowloop::algebra {

namespace {
constexpr size_t kBlock = 512;  // a block's partial sums stay in L1
}

template <class S>
void rk_combine(S* out, const S* y, double h, const double* c, const S* const* k, int m, size_t n) {
  const S hs = static_cast<S>(h);
  const int64_t nblocks = static_cast<int64_t>((n + kBlock - 1) / kBlock);
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(n) * m >= 4 * kParallelMin)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const size_t lo = static_cast<size_t>(blk) * kBlock, len = std::min(kBlock, n - lo);
    S acc[kBlock];
    if (m == 0) {
      for (size_t i = 0; i < len; ++i) out[lo + i] = y[lo + i];
      continue;
    }
    const S c0 = static_cast<S>(c[0]);
    const S* k0 = k[0] + lo;
    for (size_t i = 0; i < len; ++i) acc[i] = c0 * k0[i];
    for (int j = 1; j < m; ++j) {
      const S cj = static_cast<S>(c[j]);
      const S* kj = k[j] + lo;
      for (size_t i = 0; i < len; ++i) acc[i] += cj * kj[i];
    }
    for (size_t i = 0; i < len; ++i) out[lo + i] = y[lo + i] + hs * acc[i];
  }
}

template <class S>
double error_norm(double h, const double* e, const S* const* k, int m, const S* y0, const S* y1,
                  double rtol, double atol, size_t n) {
  double total = 0.0;
  double acc[kBlock];
  for (size_t lo = 0; lo < n; lo += kBlock) {
    const size_t len = std::min(kBlock, n - lo);
    for (size_t i = 0; i < len; ++i) acc[i] = 0.0;
    for (int j = 0; j < m; ++j) {
      if (e[j] == 0.0) continue;
      const S* kj = k[j] + lo;
      for (size_t i = 0; i < len; ++i) acc[i] += e[j] * static_cast<double>(kj[i]);
    }
    for (size_t i = 0; i < len; ++i) {
      const double sk = atol + rtol * std::max(std::fabs(static_cast<double>(y0[lo + i])),
                                               std::fabs(static_cast<double>(y1[lo + i])));
      const double r = h * acc[i] / sk;
      total += r * r;
    }
  }
  return std::sqrt(total / static_cast<double>(n));
}

template <class S>
double sum_squares(const S* x, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return s;
}

template <class S>
double scaled_sum_squares(const S* x, const S* y, double rtol, double atol, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double r = static_cast<double>(x[i]) / (atol + rtol * std::fabs(static_cast<double>(y[i])));
    s += r * r;
  }
  return s;
}

template <class S>
double scaled_diff_sum_squares(const S* a, const S* b, const S* y, double rtol, double atol,
                               size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double r = (static_cast<double>(a[i]) - static_cast<double>(b[i])) /
                     (atol + rtol * std::fabs(static_cast<double>(y[i])));
    s += r * r;
  }
  return s;
}

#define FLOWLOOP_ALGEBRA(S)                                                                     \
  template void rk_combine<S>(S*, const S*, double, const double*, const S* const*, int, size_t); \
  template double error_norm<S>(double, const double*, const S* const*, int, const S*, const S*, \
                                double, double, size_t);                                        \
  template double sum_squares<S>(const S*, size_t);                                             \
  template double scaled_sum_squares<S>(const S*, const S*, double, double, size_t);            \
  template double scaled_diff_sum_squares<S>(const S*, const S*, const S*, double, double, size_t);

FLOWLOOP_ALGEBRA(float)
FLOWLOOP_ALGEBRA(double)

}  // namespace flowloop::algebra
