#include "flowloop/ode/algebra.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>

#include "flowloop/core/tensor.hpp"

namespace flowloop::algebra {

namespace {
constexpr size_t kBlock = 512;  // a block's partial sums stay in L1
}

namespace {
// out = y + h * sum_j c[j] k[j] over one block of len <= kBlock values at offset lo.
template <class S>
inline void combine_block(S* out, const S* y, S hs, const double* c, const S* const* k, int m,
                          size_t lo, size_t len) {
  if (m == 0) {
    for (size_t i = 0; i < len; ++i) out[lo + i] = y[lo + i];
    return;
  }
  S acc[kBlock];
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
}  // namespace

template <class S>
void rk_combine(S* out, const S* y, double h, const double* c, const S* const* k, int m, size_t n) {
  const int row = 0;
  rk_combine_rows(out, y, &h, c, k, m, &row, 1, n);
}

template <class S>
void rk_combine_rows(S* out, const S* y, const double* h, const double* c, const S* const* k, int m,
                     const int* rows, int nrows, size_t n) {
  if (m > 32) throw Error("rk_combine_rows: at most 32 stages");
  const int64_t per_row = static_cast<int64_t>((n + kBlock - 1) / kBlock);
  const int64_t nblocks = per_row * nrows;
  const bool parallel = static_cast<int64_t>(n) * nrows * (m + 2) >= 2 * kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int r = rows[blk / per_row];
    const size_t base = static_cast<size_t>(r) * n;
    const size_t lo = static_cast<size_t>(blk % per_row) * kBlock, len = std::min(kBlock, n - lo);
    const S* kk[32];
    for (int j = 0; j < m; ++j) kk[j] = k[j] + base;
    combine_block(out + base, y + base, static_cast<S>(h[r]), c, kk, m, lo, len);
  }
}

namespace {
// Sum of v[0, len) with 8 interleaved partial sums, combined in a fixed order:
// vectorisable, and the same bits on every run.
inline double sum8(const double* v, size_t len) {
  double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int j = 0; j < 8; ++j) p[j] += v[i + j];
  for (; i < len; ++i) p[i % 8] += v[i];
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}
}  // namespace

template <class S>
double error_norm(double h, const double* e, const S* const* k, int m, const S* y0, const S* y1,
                  double rtol, double atol, size_t n) {
  return std::sqrt(error_sum_squares(h, e, k, m, y0, y1, rtol, atol, n) / static_cast<double>(n));
}

template <class S>
void scaled_sum(S* out, double h, const double* c, const S* const* k, int m, size_t n) {
  const S hs = static_cast<S>(h);
  for (size_t lo = 0; lo < n; lo += kBlock) {
    const size_t len = std::min(kBlock, n - lo);
    S acc[kBlock];
    const S c0 = static_cast<S>(c[0]);
    for (size_t i = 0; i < len; ++i) acc[i] = c0 * k[0][lo + i];
    for (int j = 1; j < m; ++j) {
      const S cj = static_cast<S>(c[j]);
      for (size_t i = 0; i < len; ++i) acc[i] += cj * k[j][lo + i];
    }
    for (size_t i = 0; i < len; ++i) out[lo + i] = hs * acc[i];
  }
}

template <class S>
double error_sum_squares(double h, const double* e, const S* const* k, int m, const S* y0,
                         const S* y1, double rtol, double atol, size_t n) {
  // per element in S (an error estimate needs a few digits), the sum in double
  double total = 0.0;
  S acc[kBlock];
  double sq[kBlock];
  const S hs = static_cast<S>(h), rt = static_cast<S>(rtol), at = static_cast<S>(atol);
  for (size_t lo = 0; lo < n; lo += kBlock) {
    const size_t len = std::min(kBlock, n - lo);
    // y1 - y1 is 0 for finite values and NaN otherwise: a non-finite state poisons the norm
    for (size_t i = 0; i < len; ++i) acc[i] = y1[lo + i] - y1[lo + i];
    for (int j = 0; j < m; ++j) {
      if (e[j] == 0.0) continue;
      const S ej = static_cast<S>(e[j]);
      const S* kj = k[j] + lo;
      for (size_t i = 0; i < len; ++i) acc[i] += ej * kj[i];
    }
    for (size_t i = 0; i < len; ++i) {
      const S a0 = std::fabs(y0[lo + i]), a1 = std::fabs(y1[lo + i]);
      const S r = hs * acc[i] / (at + rt * (a0 > a1 ? a0 : a1));
      sq[i] = static_cast<double>(r) * static_cast<double>(r);
    }
    total += sum8(sq, len);
  }
  return total;
}

template <class S>
void copy_rows(S* dst, size_t dst_stride, const S* src, size_t src_stride, size_t rows, size_t n) {
  for (size_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_stride, src + r * src_stride, n * sizeof(S));
}

template <class S>
double sum_squares(const S* x, size_t n) {
  double total = 0.0;
  double sq[kBlock];
  for (size_t lo = 0; lo < n; lo += kBlock) {
    const size_t len = std::min(kBlock, n - lo);
    for (size_t i = 0; i < len; ++i) sq[i] = static_cast<double>(x[lo + i]) * static_cast<double>(x[lo + i]);
    total += sum8(sq, len);
  }
  return total;
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
  template void rk_combine_rows<S>(S*, const S*, const double*, const double*, const S* const*, int, \
                                   const int*, int, size_t);                                    \
  template double error_norm<S>(double, const double*, const S* const*, int, const S*, const S*, \
                                double, double, size_t);                                        \
  template double sum_squares<S>(const S*, size_t);                                             \
  template void copy_rows<S>(S*, size_t, const S*, size_t, size_t, size_t);                     \
  template double error_sum_squares<S>(double, const double*, const S* const*, int, const S*,    \
                                       const S*, double, double, size_t);                       \
  template void scaled_sum<S>(S*, double, const double*, const S* const*, int, size_t);        \
  template double scaled_sum_squares<S>(const S*, const S*, double, double, size_t);            \
  template double scaled_diff_sum_squares<S>(const S*, const S*, const S*, double, double, size_t);

FLOWLOOP_ALGEBRA(float)
FLOWLOOP_ALGEBRA(double)

}  // namespace flowloop::algebra
