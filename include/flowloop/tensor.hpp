// flowloop/tensor.hpp: plain-buffer numerics shared by every layer.
//
// The public API passes tensors as raw pointers plus sizes (row-major, C order),
// so the same signatures serve the CPU (Eigen + OpenBLAS inside src/) and a CUDA
// backend. Shapes are written in comments with the fixed letters
// B, T, C, NH, D, F, V (see model-spec.md).
#pragma once

#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>

namespace flowloop {

// Every error the library reports: the message names what is wrong and where.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Row-major GEMM through OpenBLAS:
//   Cm(M,N) = alpha * op(A) * op(B) + beta * Cm(M,N)
// op(A) is (M,K): A is (M,K) with leading dimension lda, or (K,M) if transA.
// op(B) is (K,N): B is (K,N) with leading dimension ldb, or (N,K) if transB.
template <class S>
void gemm(bool transA, bool transB, int M, int N, int K, S alpha, const S* A, int lda,
          const S* B, int ldb, S beta, S* Cm, int ldc);

// Threads used by GEMM (OpenBLAS) and by the element-wise and attention loops
// (OpenMP). n <= 0 means all hardware threads.
void set_num_threads(int n);
int num_threads();

// Deterministic random numbers: the same seed gives the same stream on every
// platform (mt19937_64 is fully specified; the normal transform is ours, not the
// library's implementation-defined one).
class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}
  double uniform();                       // [0, 1)
  double normal();                        // N(0, 1), Box-Muller
  uint64_t next() { return gen_(); }
  std::mt19937_64& engine() { return gen_; }

 private:
  std::mt19937_64 gen_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

}  // namespace flowloop
