// cuda/thrust_algebra.hpp: algebra.hpp's state arithmetic over device memory, with
// Thrust (CCCL), for the CUDA backend. Every array is in device memory (raw pointers):
// the states, each sequence's step size h (double, indexed by row), the row lists and
// the per-row results, so that a step's control stays on the device; only the small
// tableau arrays (coefficients c, e and the stage pointers k) are host arrays, passed
// by value to the kernels. Nothing is allocated.
//
// nvcc compiles it for the GPU; CI, which has no GPU, compiles it with the host
// compiler against Thrust's OpenMP device system and checks it against the CPU algebra
// (tests [thrust]). The element-wise operations compute every value as algebra.cpp does
// (the same operations in the same order); the reductions are Thrust's, so their sums
// agree with the CPU's to rounding, not bit for bit.
#pragma once

#include <thrust/count.h>
#include <thrust/iterator/discard_iterator.h>
#include <thrust/execution_policy.h>
#include <thrust/fill.h>
#include <thrust/for_each.h>
#include <thrust/functional.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>
#include <thrust/reduce.h>
#include <thrust/transform_reduce.h>

#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "flowloop/ode/algebra.hpp"  // the declarations
#include "flowloop/backend/kernels.hpp"  // FLOWLOOP_HD
#include "flowloop/core/tensor.hpp"   // Error

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
#include <cuda_runtime.h>

#include "flowloop/backend/cuda.hpp"  // device_alloc_async
#endif

namespace flowloop::algebra::device {

constexpr int kMaxStages = 32;  // as the CPU algebra

// Where the row-batched operations run: the CUDA backend's stream (null: the default
// stream), without a synchronisation after element-wise work; Thrust's device system
// elsewhere (OpenMP in CI).
#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA
// Thrust's temporary storage (the reductions' partial sums) from the device's pool on
// the same stream, so that a reduction allocates without synchronising the device.
// device_alloc_async releases the pool's cache and tries once more when an allocation
// does not fit, and names the bytes asked and free when it still does not.
struct StreamAllocator {
  using value_type = char;
  cudaStream_t stream;
  char* allocate(std::ptrdiff_t n) { return static_cast<char*>(cuda::device_alloc_async(static_cast<size_t>(n), stream)); }
  void deallocate(char* p, size_t) { cuda::device_free_async(p, stream); }
};
inline auto exec(void* stream) {
  const StreamAllocator alloc{static_cast<cudaStream_t>(stream)};
  return thrust::cuda::par_nosync(alloc).on(static_cast<cudaStream_t>(stream));
}
#else
inline auto exec(void*) { return thrust::device; }
#endif

// The stages of one combination, by value (a kernel's argument).
template <class S>
struct Stages {
  const S* k[kMaxStages];
  S c[kMaxStages];
  int m = 0;
};

template <class S>
Stages<S> make_stages(const double* c, const S* const* k, int m) {
  if (m < 0 || m > kMaxStages)
    throw Error("device algebra: " + std::to_string(m) + " stages (at most " + std::to_string(kMaxStages) + ")");
  Stages<S> s;
  s.m = m;
  for (int j = 0; j < m; ++j) {
    s.k[j] = k[j];
    s.c[j] = static_cast<S>(c[j]);
  }
  return s;
}

// sum_j c_j k_j[i], from the first term on (algebra.cpp's order)
template <class S>
FLOWLOOP_HD S stage_sum(const Stages<S>& st, size_t i) {
  S acc = st.c[0] * st.k[0][i];
  for (int j = 1; j < st.m; ++j) acc += st.c[j] * st.k[j][i];
  return acc;
}

template <class S>
struct CombineRows {
  S* out;
  const S* y;
  const double* h;   // (rows of the batch) each row's step
  const int* rows;   // (nrows) the listed rows
  Stages<S> st;
  size_t n;
  FLOWLOOP_HD void operator()(size_t g) const {
    const size_t r = static_cast<size_t>(rows[g / n]), idx = r * n + g % n;
    out[idx] = st.m == 0 ? y[idx] : y[idx] + static_cast<S>(h[r]) * stage_sum(st, idx);
  }
};

// For each listed row r = rows[i], i < nrows: out[r] = y[r] + h[r] sum_j c_j k_j[r], rows
// of n values (algebra::rk_combine_rows). out may alias y.
template <class S>
void rk_combine_rows(S* out, const S* y, const double* h, const double* c, const S* const* k, int m,
                     const int* rows, int nrows, size_t n, void* stream) {
  if (nrows <= 0 || n == 0) return;
  thrust::for_each_n(exec(stream), thrust::counting_iterator<size_t>(0), static_cast<size_t>(nrows) * n,
                     CombineRows<S>{out, y, h, rows, make_stages(c, k, m), n});
}

template <class S>
struct Combine {
  S* out;
  const S* y;
  S hs;
  Stages<S> st;
  FLOWLOOP_HD void operator()(size_t i) const { out[i] = st.m == 0 ? y[i] : y[i] + hs * stage_sum(st, i); }
};

// out = y + h sum_j c_j k_j, n values (one state, h a host value)
template <class S>
void rk_combine(S* out, const S* y, double h, const double* c, const S* const* k, int m, size_t n,
                void* stream) {
  thrust::for_each_n(exec(stream), thrust::counting_iterator<size_t>(0), n,
                     Combine<S>{out, y, static_cast<S>(h), make_stages(c, k, m)});
}

template <class S>
struct ScaledSum {
  S* out;
  S hs;
  Stages<S> st;
  FLOWLOOP_HD void operator()(size_t i) const { out[i] = hs * stage_sum(st, i); }
};

// out = h sum_j c_j k_j (m >= 1)
template <class S>
void scaled_sum(S* out, double h, const double* c, const S* const* k, int m, size_t n, void* stream) {
  if (m < 1) throw Error("device algebra: scaled_sum needs at least one stage, not " + std::to_string(m));
  thrust::for_each_n(exec(stream), thrust::counting_iterator<size_t>(0), n,
                     ScaledSum<S>{out, static_cast<S>(h), make_stages(c, k, m)});
}

// The squared scaled error of value i, in S then squared in double (algebra.cpp's
// error_sum_squares); a non-finite y1 gives NaN.
template <class S>
struct ErrorSquare {
  const S* y0;
  const S* y1;
  S hs, rt, at;
  Stages<S> st;  // the error weights e_j (zero ones left out) and their stages
  FLOWLOOP_HD double value(size_t i, S h) const {
    S acc = y1[i] - y1[i];
    for (int j = 0; j < st.m; ++j) acc += st.c[j] * st.k[j][i];
    const S a0 = y0[i] < S(0) ? -y0[i] : y0[i], a1 = y1[i] < S(0) ? -y1[i] : y1[i];
    const S r = h * acc / (at + rt * (a0 > a1 ? a0 : a1));
    return static_cast<double>(r) * static_cast<double>(r);
  }
  FLOWLOOP_HD double operator()(size_t i) const { return value(i, hs); }
};

template <class S>
ErrorSquare<S> error_square(double h, const double* e, const S* const* k, int m, const S* y0, const S* y1,
                            double rtol, double atol) {
  if (m < 0 || m > kMaxStages)
    throw Error("device algebra: " + std::to_string(m) + " stages (at most " + std::to_string(kMaxStages) + ")");
  ErrorSquare<S> f{y0, y1, static_cast<S>(h), static_cast<S>(rtol), static_cast<S>(atol), Stages<S>()};
  for (int j = 0; j < m; ++j)
    if (e[j] != 0.0) {
      f.st.k[f.st.m] = k[j];
      f.st.c[f.st.m++] = static_cast<S>(e[j]);
    }
  return f;
}

// sum_i ((h sum_j e_j k_j)_i / (atol + rtol max(|y0_i|, |y1_i|)))^2, in double
template <class S>
double error_sum_squares(double h, const double* e, const S* const* k, int m, const S* y0, const S* y1,
                         double rtol, double atol, size_t n, void* stream) {
  return thrust::transform_reduce(exec(stream), thrust::counting_iterator<size_t>(0),
                                  thrust::counting_iterator<size_t>(n), error_square(h, e, k, m, y0, y1, rtol, atol),
                                  0.0, thrust::plus<double>());
}

template <class S>
double error_norm(double h, const double* e, const S* const* k, int m, const S* y0, const S* y1, double rtol,
                  double atol, size_t n, void* stream) {
  return std::sqrt(error_sum_squares(h, e, k, m, y0, y1, rtol, atol, n, stream) / static_cast<double>(n));
}

struct RowOf {
  size_t n;
  FLOWLOOP_HD size_t operator()(size_t g) const { return g / n; }
};

template <class S>
struct RowErrorSquare {
  ErrorSquare<S> sq;
  const double* h;  // (rows of the batch) each row's step
  const int* rows;  // (nrows)
  size_t n, period, dims;  // period 0: every value counts
  FLOWLOOP_HD double operator()(size_t g) const {
    const size_t r = static_cast<size_t>(rows[g / n]), v = g % n;
    if (period != 0 && v % period >= dims) return 0.0;
    return sq.value(r * n + v, static_cast<S>(h[r]));
  }
};

// The per-row error sums of a batch in one pass (a row-batched error norm): out[i]
// (device, nrows) = error_sum_squares of row rows[i] with its own step h[rows[i]], over
// the values v with v % period < dims (period 0: all). The driver then copies these
// nrows doubles to the host once per step.
template <class S>
void error_sum_squares_rows(double* out, const double* h, const double* e, const S* const* k, int m, const S* y0,
                            const S* y1, double rtol, double atol, const int* rows, int nrows, size_t n,
                            size_t period, size_t dims, void* stream) {
  if (nrows <= 0) return;
  if (n == 0) {  // rows of nothing sum to 0
    thrust::fill_n(exec(stream), out, nrows, 0.0);
    return;
  }
  const RowErrorSquare<S> f{error_square(1.0, e, k, m, y0, y1, rtol, atol), h, rows, n, period, dims};
  auto keys = thrust::make_transform_iterator(thrust::counting_iterator<size_t>(0), RowOf{n});
  auto vals = thrust::make_transform_iterator(thrust::counting_iterator<size_t>(0), f);
  thrust::reduce_by_key(exec(stream), keys, keys + static_cast<std::ptrdiff_t>(static_cast<size_t>(nrows) * n), vals,
                        thrust::make_discard_iterator(), out);
}

// x's squared value g of the listed rows (a row-batched sum of squares)
template <class S>
struct RowSquare {
  const S* x;
  const int* rows;  // (nrows); null: rows 0, 1, ...
  size_t n;
  FLOWLOOP_HD double operator()(size_t g) const {
    const size_t r = rows ? static_cast<size_t>(rows[g / n]) : g / n;
    const double v = static_cast<double>(x[r * n + g % n]);
    return v * v;
  }
};

// out[i] = sum_v x[rows[i]]_v^2 in double (NaN or Inf for a row that is not finite)
template <class S>
void sum_squares_rows(double* out, const S* x, const int* rows, int nrows, size_t n, void* stream) {
  if (nrows <= 0) return;
  if (n == 0) {  // rows of nothing sum to 0
    thrust::fill_n(exec(stream), out, nrows, 0.0);
    return;
  }
  auto keys = thrust::make_transform_iterator(thrust::counting_iterator<size_t>(0), RowOf{n});
  auto vals = thrust::make_transform_iterator(thrust::counting_iterator<size_t>(0), RowSquare<S>{x, rows, n});
  thrust::reduce_by_key(exec(stream), keys, keys + static_cast<std::ptrdiff_t>(static_cast<size_t>(nrows) * n), vals,
                        thrust::make_discard_iterator(), out);
}

template <class S>
struct ScaledSquare {
  const S* a;
  const S* b;  // null: a alone
  const S* y;
  double rtol, atol;
  FLOWLOOP_HD double operator()(size_t i) const {
    const double yi = static_cast<double>(y[i]);
    const double r = (static_cast<double>(a[i]) - (b ? static_cast<double>(b[i]) : 0.0)) /
                     (atol + rtol * (yi < 0 ? -yi : yi));
    return r * r;
  }
};

// out[r] = sum_v ((a_v - b_v) / (atol + rtol |y_v|))^2 over rows r < nrows (b null: a alone),
// algebra.hpp's scaled_(diff_)sum_squares per row (the first step's norms)
template <class S>
void scaled_sum_squares_rows(double* out, const S* a, const S* b, const S* y, double rtol, double atol, int nrows,
                             size_t n, void* stream) {
  if (nrows <= 0) return;
  if (n == 0) {  // rows of nothing sum to 0
    thrust::fill_n(exec(stream), out, nrows, 0.0);
    return;
  }
  auto keys = thrust::make_transform_iterator(thrust::counting_iterator<size_t>(0), RowOf{n});
  auto vals = thrust::make_transform_iterator(thrust::counting_iterator<size_t>(0), ScaledSquare<S>{a, b, y, rtol, atol});
  thrust::reduce_by_key(exec(stream), keys, keys + static_cast<std::ptrdiff_t>(static_cast<size_t>(nrows) * n), vals,
                        thrust::make_discard_iterator(), out);
}

template <class S>
struct Square {
  FLOWLOOP_HD double operator()(S x) const { return static_cast<double>(x) * static_cast<double>(x); }
};

template <class S>
double sum_squares(const S* x, size_t n, void* stream) {
  return thrust::transform_reduce(exec(stream), x, x + n, Square<S>(), 0.0, thrust::plus<double>());
}

template <class S>
struct NotFinite {
  FLOWLOOP_HD bool operator()(S x) const { return !(x - x == S(0)); }  // NaN and Inf give NaN
};

// Whether every one of the n values is finite (the solver's NaN check).
template <class S>
bool all_finite(const S* x, size_t n, void* stream) {
  return thrust::count_if(exec(stream), x, x + n, NotFinite<S>()) == 0;
}

template <class S>
struct MoveRows {
  S* dst;
  const int* dst_rows;  // null: row i
  const S* src;
  const int* src_rows;  // null: row i
  size_t n;
  FLOWLOOP_HD void operator()(size_t g) const {
    const size_t i = g / n, j = g % n;
    const size_t d = dst_rows ? static_cast<size_t>(dst_rows[i]) : i, s = src_rows ? static_cast<size_t>(src_rows[i]) : i;
    dst[d * n + j] = src[s * n + j];
  }
};

// dst[dst_rows[i]] = src[src_rows[i]] for i < nrows (a null list: row i), rows of n values.
template <class S>
void move_rows(S* dst, const int* dst_rows, const S* src, const int* src_rows, int nrows, size_t n, void* stream) {
  if (nrows <= 0 || n == 0) return;
  thrust::for_each_n(exec(stream), thrust::counting_iterator<size_t>(0), static_cast<size_t>(nrows) * n,
                     MoveRows<S>{dst, dst_rows, src, src_rows, n});
}

// The active rows of a batch: gather packs rows rows[0..nrows) of src (rows of n values)
// into dst's first nrows rows; scatter puts them back; copy_rows copies the listed rows
// between two batches.
template <class S>
void gather_rows(S* dst, const S* src, const int* rows, int nrows, size_t n, void* stream) {
  move_rows(dst, static_cast<const int*>(nullptr), src, rows, nrows, n, stream);
}

template <class S>
void scatter_rows(S* dst, const S* src, const int* rows, int nrows, size_t n, void* stream) {
  move_rows(dst, rows, src, static_cast<const int*>(nullptr), nrows, n, stream);
}

template <class S>
void copy_rows(S* dst, const S* src, const int* rows, int nrows, size_t n, void* stream) {
  move_rows(dst, rows, src, rows, nrows, n, stream);
}

template <class S>
struct StridedCopy {
  S* dst;
  size_t ldd;
  const S* src;
  size_t lds, n;
  S alpha;
  FLOWLOOP_HD void operator()(size_t g) const {
    const size_t r = g / n, v = g % n;
    dst[r * ldd + v] = alpha == S(0) ? S(0) : alpha == S(1) ? src[r * lds + v] : alpha * src[r * lds + v];
  }
};

// dst[r*ldd + v] = alpha src[r*lds + v] (alpha 0: zeros, src unread), rows x n values
template <class S>
void strided_copy(S* dst, size_t ldd, const S* src, size_t lds, size_t rows, size_t n, S alpha, void* stream) {
  if (rows == 0 || n == 0) return;
  thrust::for_each_n(exec(stream), thrust::counting_iterator<size_t>(0), rows * n,
                     StridedCopy<S>{dst, ldd, src, lds, n, alpha});
}

template <class S>
struct ScaledSumRows {
  S* out;
  const double* h;  // (rows of the batch)
  const int* rows;
  Stages<S> st;
  size_t n;
  FLOWLOOP_HD void operator()(size_t g) const {
    const size_t r = static_cast<size_t>(rows[g / n]), idx = r * n + g % n;
    out[idx] = static_cast<S>(h[r]) * stage_sum(st, idx);
  }
};

// out[r] = h[r] sum_j c_j k_j[r] for the listed rows (m >= 1; algebra.hpp's scaled_sum per row)
template <class S>
void scaled_sum_rows(S* out, const double* h, const double* c, const S* const* k, int m, const int* rows, int nrows,
                     size_t n, void* stream) {
  if (m < 1) throw Error("device algebra: scaled_sum_rows needs at least one stage, not " + std::to_string(m));
  if (nrows <= 0 || n == 0) return;
  thrust::for_each_n(exec(stream), thrust::counting_iterator<size_t>(0), static_cast<size_t>(nrows) * n,
                     ScaledSumRows<S>{out, h, rows, make_stages(c, k, m), n});
}

template <class S>
struct AccumulateRows {
  S* y;
  const int* rows;
  Stages<S> st;  // the coefficients unused: y += k_0, then k_1, ...
  size_t n;
  FLOWLOOP_HD void operator()(size_t g) const {
    const size_t idx = static_cast<size_t>(rows[g / n]) * n + g % n;
    S acc = y[idx];
    for (int j = 0; j < st.m; ++j) acc += st.k[j][idx];
    y[idx] = acc;
  }
};

// y[r] += k_0[r], then += k_1[r], ..., in that order, for the listed rows
template <class S>
void accumulate_rows(S* y, const S* const* k, int m, const int* rows, int nrows, size_t n, void* stream) {
  if (nrows <= 0 || n == 0 || m == 0) return;
  const std::vector<double> ones(static_cast<size_t>(m), 1.0);
  thrust::for_each_n(exec(stream), thrust::counting_iterator<size_t>(0), static_cast<size_t>(nrows) * n,
                     AccumulateRows<S>{y, rows, make_stages(ones.data(), k, m), n});
}

}  // namespace flowloop::algebra::device
