// cuda/blas.cu: the products on cuBLAS. flowloop's arrays are row-major and cuBLAS's
// column-major: a row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T,
// so each call swaps the operands and the dimensions M and N. cuBLAS's default math
// mode is kept (FP32 products in FP32, no TF32), so float agrees with the CPU to 1e-5.
#include <cublas_v2.h>

#include "check.cuh"
#include "flowloop/backend/cuda.hpp"

namespace flowloop::cuda {
namespace {
void check_blas(cublasStatus_t s, const char* op, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw Error(std::string("cuBLAS error in ") + op + " (" + file + ":" + std::to_string(line) +
              "): " + cublasGetStatusName(s) + ": " + cublasGetStatusString(s));
}
#define FLOWLOOP_CUBLAS_CHECK(call) check_blas((call), #call, __FILE__, __LINE__)

cublasOperation_t op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }
}  // namespace

void* blas_create(void* stream) {
  cublasHandle_t h = nullptr;
  FLOWLOOP_CUBLAS_CHECK(cublasCreate(&h));
  const cublasStatus_t s = cublasSetStream(h, detail::stream_of(stream));
  if (s != CUBLAS_STATUS_SUCCESS) cublasDestroy(h);
  FLOWLOOP_CUBLAS_CHECK(s);
  return h;
}

void blas_destroy(void* handle) noexcept {
  if (handle) cublasDestroy(static_cast<cublasHandle_t>(handle));
}

namespace {
cublasStatus_t gemm_batched(cublasHandle_t h, cublasOperation_t oa, cublasOperation_t ob, int m, int n, int k,
                            const float* alpha, const float* A, int lda, int64_t sA, const float* B, int ldb,
                            int64_t sB, const float* beta, float* C, int ldc, int64_t sC, int batch) {
  return cublasSgemmStridedBatched(h, oa, ob, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch);
}
cublasStatus_t gemm_batched(cublasHandle_t h, cublasOperation_t oa, cublasOperation_t ob, int m, int n, int k,
                            const double* alpha, const double* A, int lda, int64_t sA, const double* B, int ldb,
                            int64_t sB, const double* beta, double* C, int ldc, int64_t sC, int batch) {
  return cublasDgemmStridedBatched(h, oa, ob, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch);
}
}  // namespace

template <class S>
void gemm(void* handle, bool ta, bool tb, int M, int N, int K, S alpha, const S* A, int lda, int64_t sA, const S* B,
          int ldb, int64_t sB, S beta, S* C, int ldc, int64_t sC, int batch) {
  if (M <= 0 || N <= 0 || batch <= 0) return;
  // row-major C (M,N) = op(A) op(B)  <=>  column-major C^T (N,M) = op(B)^T op(A)^T
  FLOWLOOP_CUBLAS_CHECK(gemm_batched(static_cast<cublasHandle_t>(handle), op(tb), op(ta), N, M, K, &alpha, B, ldb, sB,
                                     A, lda, sA, &beta, C, ldc, sC, batch));
}

template void gemm<float>(void*, bool, bool, int, int, int, float, const float*, int, int64_t, const float*, int,
                          int64_t, float, float*, int, int64_t, int);
template void gemm<double>(void*, bool, bool, int, int, int, double, const double*, int, int64_t, const double*, int,
                           int64_t, double, double*, int, int64_t, int);

}  // namespace flowloop::cuda
