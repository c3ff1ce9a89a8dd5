#include "flowloop/tensor.hpp"

#include <cblas.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <thread>

namespace flowloop {

namespace {
CBLAS_TRANSPOSE tr(bool t) { return t ? CblasTrans : CblasNoTrans; }
}  // namespace

template <>
void gemm<float>(bool transA, bool transB, int M, int N, int K, float alpha, const float* A,
                 int lda, const float* B, int ldb, float beta, float* Cm, int ldc) {
  cblas_sgemm(CblasRowMajor, tr(transA), tr(transB), M, N, K, alpha, A, lda, B, ldb, beta, Cm,
              ldc);
}

template <>
void gemm<double>(bool transA, bool transB, int M, int N, int K, double alpha, const double* A,
                  int lda, const double* B, int ldb, double beta, double* Cm, int ldc) {
  cblas_dgemm(CblasRowMajor, tr(transA), tr(transB), M, N, K, alpha, A, lda, B, ldb, beta, Cm,
              ldc);
}

namespace {
std::atomic<std::ptrdiff_t> g_current{0};
std::atomic<std::ptrdiff_t> g_peak{0};
}  // namespace

void MemoryStats::add(std::ptrdiff_t bytes) {
  const std::ptrdiff_t now = g_current.fetch_add(bytes) + bytes;
  std::ptrdiff_t p = g_peak.load();
  while (now > p && !g_peak.compare_exchange_weak(p, now)) {
  }
}
size_t MemoryStats::current() { return static_cast<size_t>(g_current.load()); }
size_t MemoryStats::peak() { return static_cast<size_t>(g_peak.load()); }
void MemoryStats::reset_peak() { g_peak.store(g_current.load()); }

void set_num_threads(int n) {
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  openblas_set_num_threads(n);
  omp_set_num_threads(n);
}

int num_threads() { return omp_get_max_threads(); }

double Rng::uniform() {
  // 53 random bits -> [0, 1)
  return static_cast<double>(gen_() >> 11) * (1.0 / 9007199254740992.0);
}

double Rng::normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  double u1 = uniform();
  while (u1 <= 0.0) u1 = uniform();
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double th = 2.0 * M_PI * u2;
  spare_ = r * std::sin(th);
  has_spare_ = true;
  return r * std::cos(th);
}

}  // namespace flowloop
