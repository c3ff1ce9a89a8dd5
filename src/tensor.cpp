#include "flowloop/core/tensor.hpp"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <thread>

namespace flowloop {

namespace {
CBLAS_TRANSPOSE tr(bool t) { return t ? CblasTrans : CblasNoTrans; }
}  // namespace

namespace {
void gemm_call(bool transA, bool transB, int M, int N, int K, float alpha, const float* A, int lda,
               const float* B, int ldb, float beta, float* Cm, int ldc) {
  cblas_sgemm(CblasRowMajor, tr(transA), tr(transB), M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc);
}
void gemm_call(bool transA, bool transB, int M, int N, int K, double alpha, const double* A, int lda,
               const double* B, int ldb, double beta, double* Cm, int ldc) {
  cblas_dgemm(CblasRowMajor, tr(transA), tr(transB), M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc);
}
}  // namespace

GemmTiling gemm_tiling(int M, int N, int K) {
  GemmTiling g;
  const bool rows = M >= N;
  const int dim = rows ? M : N;
  if (static_cast<int64_t>(M) * N * K >= kGemmTileMin && dim >= 2 * kGemmTileGranule) {
    const int per = (dim + kGemmMaxTiles - 1) / kGemmMaxTiles;  // ceil(dim / max tiles)
    const int size = std::max(kGemmTileGranule, (per + 15) / 16 * 16);
    g.tiles = (dim + size - 1) / size;
    g.size = size;
    g.rows = rows;
  } else {
    g.tiles = 1;
    g.size = dim;
    g.rows = rows;
  }
  return g;
}

// OpenBLAS runs single-threaded (set_num_threads keeps its own count at 1, and a
// call inside a parallel region is serial anyway); the parallelism is ours: the
// output is cut into tiles whose bounds depend on (M, N, K) only, and each tile is
// one serial product. A tile's bits therefore do not depend on how many threads
// share the tiles, nor on which thread computes it.
template <class S>
void gemm(bool transA, bool transB, int M, int N, int K, S alpha, const S* A, int lda, const S* B,
          int ldb, S beta, S* Cm, int ldc) {
  if (M <= 0 || N <= 0) return;
  const GemmTiling g = gemm_tiling(M, N, K);
  if (g.tiles == 1) {
    gemm_call(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int i = 0; i < g.tiles; ++i) {
    const int lo = i * g.size, n = std::min(g.size, (g.rows ? M : N) - lo);
    const int64_t o = lo;
    if (g.rows) {  // rows lo..lo+n of op(A) and of Cm
      const S* Ai = transA ? A + o : A + o * lda;
      gemm_call(transA, transB, n, N, K, alpha, Ai, lda, B, ldb, beta, Cm + o * ldc, ldc);
    } else {  // columns lo..lo+n of op(B) and of Cm
      const S* Bi = transB ? B + o * ldb : B + o;
      gemm_call(transA, transB, M, n, K, alpha, A, lda, Bi, ldb, beta, Cm + o, ldc);
    }
  }
}

template void gemm<float>(bool, bool, int, int, int, float, const float*, int, const float*, int, float,
                          float*, int);
template void gemm<double>(bool, bool, int, int, int, double, const double*, int, const double*, int,
                           double, double*, int);

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

namespace {
// From the start, OpenBLAS runs serial and OpenMP keeps its own count (see gemm).
const bool g_serial_blas = [] {
  const int n = omp_get_max_threads();
  openblas_set_num_threads(1);
  omp_set_num_threads(n);
  return true;
}();
}  // namespace

void set_num_threads(int n) {
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  // OpenBLAS's OpenMP build sets the OpenMP count too: set it to 1 first, then ours.
  openblas_set_num_threads(1);
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
