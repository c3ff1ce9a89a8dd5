// cuda/algebra.cu: the device algebra (thrust_algebra.hpp) compiled for the GPU, float
// and double, so that every function is built by nvcc here and in CI.
#include "thrust_algebra.hpp"

namespace flowloop::algebra::device {

#define FLOWLOOP_DEVICE_ALGEBRA(S)                                                                             \
  template void rk_combine_rows<S>(S*, const S*, const double*, const double*, const S* const*, int, const int*, \
                                   int, size_t, void*);                                                        \
  template void rk_combine<S>(S*, const S*, double, const double*, const S* const*, int, size_t, void*);       \
  template void scaled_sum<S>(S*, double, const double*, const S* const*, int, size_t, void*);                 \
  template double error_sum_squares<S>(double, const double*, const S* const*, int, const S*, const S*, double, \
                                       double, size_t, void*);                                                 \
  template double error_norm<S>(double, const double*, const S* const*, int, const S*, const S*, double, double, \
                                size_t, void*);                                                                \
  template void error_sum_squares_rows<S>(double*, const double*, const double*, const S* const*, int, const S*, \
                                          const S*, double, double, const int*, int, size_t, size_t, size_t,    \
                                          void*);                                                              \
  template void sum_squares_rows<S>(double*, const S*, const int*, int, size_t, void*);                        \
  template void scaled_sum_squares_rows<S>(double*, const S*, const S*, const S*, double, double, int, size_t, \
                                           void*);                                                             \
  template double sum_squares<S>(const S*, size_t, void*);                                                     \
  template bool all_finite<S>(const S*, size_t, void*);                                                        \
  template void gather_rows<S>(S*, const S*, const int*, int, size_t, void*);                                  \
  template void scatter_rows<S>(S*, const S*, const int*, int, size_t, void*);                                 \
  template void copy_rows<S>(S*, const S*, const int*, int, size_t, void*);                                    \
  template void move_rows<S>(S*, const int*, const S*, const int*, int, size_t, void*);                        \
  template void scaled_sum_rows<S>(S*, const double*, const double*, const S* const*, int, const int*, int,    \
                                   size_t, void*);                                                             \
  template void accumulate_rows<S>(S*, const S* const*, int, const int*, int, size_t, void*);                  \
  template void strided_copy<S>(S*, size_t, const S*, size_t, size_t, size_t, S, void*);
FLOWLOOP_DEVICE_ALGEBRA(float)
FLOWLOOP_DEVICE_ALGEBRA(double)

}  // namespace flowloop::algebra::device
