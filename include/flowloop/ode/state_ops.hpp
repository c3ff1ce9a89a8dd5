// flowloop/ode/state_ops.hpp: the solvers' state algebra on a memory: the row operations
// that integrate()'s driver and the gradient methods run on a batch of states, and
// nothing else. A system of the user's own runs on any backend that implements these
// (the host's, the CUDA one), with no network op in sight.
//
// States are (rows, n) arrays of the memory; h (double, one per row of the batch), rows
// (int, the listed rows) and out (double, one per listed row) are arrays of the memory
// too; the tableau's coefficients c, e and the array k of stage pointers are host arrays
// (k's pointers are the memory's). The host implementation runs algebra.hpp's own
// functions (the CPU solver's bits); the CUDA one Thrust (cuda/thrust_algebra.hpp).
// Results are written (=) unless said (+=).
#pragma once

#include "flowloop/core/memory.hpp"

namespace flowloop {

template <class S>
class StateOps : public virtual Memory<S> {
 public:
  //   y += a x
  virtual void axpy(S* y, S a, const S* x, size_t n) = 0;
  //   out[r] = y[r] + h[r] sum_j c[j] k[j][r]  for r in rows (out may alias y)
  virtual void rk_combine_rows(S* out, const S* y, const double* h, const double* c, const S* const* k, int m,
                               const int* rows, int nrows, size_t n) = 0;
  //   out[i] = sum over the values v of row r = rows[i] with v % period < dims (period 0: all) of
  //   ((h[r] sum_j e[j] k[j])_v / (atol + rtol max(|y0_v|, |y1_v|)))^2; NaN when y1's row is not finite
  virtual void error_sum_squares_rows(double* out, const double* h, const double* e, const S* const* k, int m,
                                      const S* y0, const S* y1, double rtol, double atol, size_t period,
                                      size_t dims, const int* rows, int nrows, size_t n) = 0;
  //   out[i] = sum_v x[rows[i]]_v^2 (rows null: row i; NaN or Inf when the row is not finite)
  virtual void sum_squares_rows(double* out, const S* x, const int* rows, int nrows, size_t n) = 0;
  //   out[r] = sum_v ((a_v - b_v) / (atol + rtol |y_v|))^2 for rows r < nrows, in double (b null: a_v alone)
  virtual void scaled_sum_squares_rows(double* out, const S* a, const S* b, const S* y, double rtol, double atol,
                                       int nrows, size_t n) = 0;
  //   out[r] = h[r] sum_j c[j] k[j][r]  for r in rows (m >= 1; the reverse pass's stage cotangents)
  virtual void scaled_sum_rows(S* out, const double* h, const double* c, const S* const* k, int m, const int* rows,
                               int nrows, size_t n) = 0;
  //   y[r] += k[0][r], then += k[1][r], ... += k[m-1][r]  for r in rows (in that order)
  virtual void accumulate_rows(S* y, const S* const* k, int m, const int* rows, int nrows, size_t n) = 0;
  //   dst[dst_rows[i]] = src[src_rows[i]] for i < nrows (a null list: row i); dst and src do not overlap
  virtual void move_rows(S* dst, const int* dst_rows, const S* src, const int* src_rows, int nrows, size_t n) = 0;
  //   dst[r*ldd + v] = alpha src[r*lds + v] for r < rows, v < n (packs and unpacks states that carry
  //   more per sequence); alpha 0 writes zeros without reading src; dst may be src (ldd == lds)
  virtual void strided_copy(S* dst, size_t ldd, const S* src, size_t lds, size_t rows, size_t n, S alpha) = 0;
  //   gather: dst[i] = src[rows[i]]; scatter: dst[rows[i]] = src[i]; copy: dst[r] = src[r] for r in rows
  void gather_rows(S* dst, const S* src, const int* rows, int nrows, size_t n) {
    move_rows(dst, nullptr, src, rows, nrows, n);
  }
  void scatter_rows(S* dst, const S* src, const int* rows, int nrows, size_t n) {
    move_rows(dst, rows, src, nullptr, nrows, n);
  }
  void copy_rows(S* dst, const S* src, const int* rows, int nrows, size_t n) { move_rows(dst, rows, src, rows, nrows, n); }
};

// Host memory's state algebra (the reference backend's, algebra.hpp's bits): where
// integrate() keeps the states of a system without a backend of its own.
template <class S>
StateOps<S>& host_state_ops();

}  // namespace flowloop
