// flowloop/ode/algebra.hpp: the state arithmetic of the solvers on plain buffers.
//
// Steppers never loop over elements themselves; they call these. The CPU
// implementation is here; a CUDA backend provides the same operations over
// device buffers (Thrust). Every operation fixes its order of floating-point
// operations, so results do not depend on thread count or alignment.
#pragma once

#include <cstddef>

namespace flowloop::algebra {

// out = y + h * (c[0] * k[0] + c[1] * k[1] + ... + c[m-1] * k[m-1]), n values.
// The sum starts from its first term (so one term with c = 1 and h = 1 gives
// exactly y + k). out may alias y.
template <class S>
void rk_combine(S* out, const S* y, double h, const double* c, const S* const* k, int m, size_t n);

// The same for several rows of a (G, n) batch at once, each with its own h:
// for each i < nrows, r = rows[i]:
//   out[r] = y[r] + h[r] * sum_j c[j] * k[j][r]   (rows of n values)
// One parallel pass over all the rows' blocks.
template <class S>
void rk_combine_rows(S* out, const S* y, const double* h, const double* c, const S* const* k, int m,
                     const int* rows, int nrows, size_t n);

// Scaled RMS norm of an error estimate err = h * sum_j e_j k_j:
//   sqrt(mean_i (err_i / (atol + rtol * max(|y0_i|, |y1_i|)))^2)
// Element-wise in S, summed in double; NaN or Inf anywhere (y1 included) gives NaN.
template <class S>
double error_norm(double h, const double* e, const S* const* k, int m, const S* y0, const S* y1,
                  double rtol, double atol, size_t n);

// The sum of squares under error_norm's square root (not divided by n).
template <class S>
double error_sum_squares(double h, const double* e, const S* const* k, int m, const S* y0,
                         const S* y1, double rtol, double atol, size_t n);

// out = h * (c[0] * k[0] + ... + c[m-1] * k[m-1]), n values (m >= 1).
template <class S>
void scaled_sum(S* out, double h, const double* c, const S* const* k, int m, size_t n);

// rows x n values from src (rows src_stride apart) to dst (rows dst_stride apart):
// packs and unpacks states that carry extra values per sequence.
template <class S>
void copy_rows(S* dst, size_t dst_stride, const S* src, size_t src_stride, size_t rows, size_t n);

// sum_i x_i^2 in double.
template <class S>
double sum_squares(const S* x, size_t n);

// sum_i (x_i / (atol + rtol * |y_i|))^2 in double.
template <class S>
double scaled_sum_squares(const S* x, const S* y, double rtol, double atol, size_t n);

// sum_i ((a_i - b_i) / (atol + rtol * |y_i|))^2 in double.
template <class S>
double scaled_diff_sum_squares(const S* a, const S* b, const S* y, double rtol, double atol,
                               size_t n);

}  // namespace flowloop::algebra

// The same over device memory, for the CUDA backend (library flowloop_cuda; defined with
// Thrust in cuda/thrust_algebra.hpp). Every array is a device array, the states as
// the per-row step sizes h (indexed by row), the row lists and the per-row results,
// so that a step's control stays on the device; only the tableau's coefficients
// (c, e) and the array of stage pointers k are host arrays. Element-wise results are
// computed as above; the reductions are Thrust's (equal to the CPU's to rounding).
namespace flowloop::algebra::device {
template <class S>
void rk_combine(S* out, const S* y, double h, const double* c, const S* const* k, int m, size_t n,
                void* stream = nullptr);
template <class S>
void rk_combine_rows(S* out, const S* y, const double* h, const double* c, const S* const* k, int m,
                     const int* rows, int nrows, size_t n, void* stream = nullptr);
template <class S>
void scaled_sum(S* out, double h, const double* c, const S* const* k, int m, size_t n, void* stream = nullptr);
template <class S>
double error_sum_squares(double h, const double* e, const S* const* k, int m, const S* y0, const S* y1,
                         double rtol, double atol, size_t n, void* stream = nullptr);
template <class S>
double error_norm(double h, const double* e, const S* const* k, int m, const S* y0, const S* y1, double rtol,
                  double atol, size_t n, void* stream = nullptr);
// out[i] (device, nrows) = error_sum_squares of row rows[i] with its own step h[rows[i]],
// over the values v with v % period < dims (period 0: all): a batch's per-row error sums
// in one pass (the driver copies them to the host once).
template <class S>
void error_sum_squares_rows(double* out, const double* h, const double* e, const S* const* k, int m, const S* y0,
                            const S* y1, double rtol, double atol, const int* rows, int nrows, size_t n,
                            size_t period = 0, size_t dims = 0, void* stream = nullptr);
// out[i] = sum of squares of row rows[i] (rows null: row i), in double.
template <class S>
void sum_squares_rows(double* out, const S* x, const int* rows, int nrows, size_t n, void* stream = nullptr);
// out[r] = scaled_(diff_)sum_squares of row r < nrows (b null: a alone).
template <class S>
void scaled_sum_squares_rows(double* out, const S* a, const S* b, const S* y, double rtol, double atol, int nrows,
                             size_t n, void* stream = nullptr);
template <class S>
double sum_squares(const S* x, size_t n, void* stream = nullptr);
// Whether all n values are finite (the solver's NaN check).
template <class S>
bool all_finite(const S* x, size_t n, void* stream = nullptr);
// The active rows: gather packs rows rows[0..nrows) of src (rows of n values) into dst's
// first nrows rows; scatter puts them back; copy_rows copies the listed rows from src to dst.
// `stream` (a cudaStream_t; null: the default stream) orders the row-batched operations.
template <class S>
void gather_rows(S* dst, const S* src, const int* rows, int nrows, size_t n, void* stream = nullptr);
template <class S>
void scatter_rows(S* dst, const S* src, const int* rows, int nrows, size_t n, void* stream = nullptr);
template <class S>
void copy_rows(S* dst, const S* src, const int* rows, int nrows, size_t n, void* stream = nullptr);
// dst[dst_rows[i]] = src[src_rows[i]] for i < nrows (a null list: row i).
template <class S>
void move_rows(S* dst, const int* dst_rows, const S* src, const int* src_rows, int nrows, size_t n,
               void* stream = nullptr);
// dst[r*ldd + v] = alpha src[r*lds + v] for r < rows, v < n (alpha 0: zeros, src unread).
template <class S>
void strided_copy(S* dst, size_t ldd, const S* src, size_t lds, size_t rows, size_t n, S alpha,
                  void* stream = nullptr);
// out[r] = h[r] sum_j c_j k_j[r] for the listed rows (m >= 1).
template <class S>
void scaled_sum_rows(S* out, const double* h, const double* c, const S* const* k, int m, const int* rows, int nrows,
                     size_t n, void* stream = nullptr);
// y[r] += k_0[r], then += k_1[r], ..., for the listed rows.
template <class S>
void accumulate_rows(S* y, const S* const* k, int m, const int* rows, int nrows, size_t n, void* stream = nullptr);
}  // namespace flowloop::algebra::device
