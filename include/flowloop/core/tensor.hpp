// flowloop/core/tensor.hpp: plain-buffer numerics shared by every layer.
//
// The public API passes tensors as raw pointers plus sizes (row-major, C order),
// so the same signatures serve the CPU (Eigen + OpenBLAS inside src/) and a CUDA
// backend. Shapes are written in comments with the fixed letters
// B, T, C, NH, D, F, V (see model-spec.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <random>
#include <vector>
#include <stdexcept>
#include <string>

namespace flowloop {

// Every error the library reports: the message names what is wrong and where.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Bytes held in Buffers: now and the peak since the last reset (all threads).
struct MemoryStats {
  static void add(std::ptrdiff_t bytes);
  static size_t current();
  static size_t peak();
  static void reset_peak();  // peak := current
};

// Allocator for 64-byte aligned storage. Vectorised loops peel scalar iterations
// until the first aligned element, so the rounding of a result can depend on
// where a buffer starts; with every working buffer aligned the same way, results
// are a function of (weights, inputs, options, seed) alone, bit for bit.
template <class T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::size_t kAlign = 64;
  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    MemoryStats::add(static_cast<std::ptrdiff_t>(n * sizeof(T)));
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlign)));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    MemoryStats::add(-static_cast<std::ptrdiff_t>(n * sizeof(T)));
    ::operator delete(p, std::align_val_t(kAlign));
  }
  template <class U>
  bool operator==(const AlignedAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const AlignedAllocator<U>&) const noexcept { return false; }
};

// The library's working buffer: a std::vector with 64-byte aligned storage,
// counted in MemoryStats.
template <class S>
using Buffer = std::vector<S, AlignedAllocator<S>>;

// Row-major GEMM through OpenBLAS:
//   Cm(M,N) = alpha * op(A) * op(B) + beta * Cm(M,N)
// op(A) is (M,K): A is (M,K) with leading dimension lda, or (K,M) if transA.
// op(B) is (K,N): B is (K,N) with leading dimension ldb, or (N,K) if transB.
// Deterministic on every CPU whatever the thread count: the output is cut into at
// most kGemmMaxTiles tiles of rows (or of columns, when N > M) whose bounds are a
// function of (M, N, K) alone, and each tile is one single-threaded OpenBLAS call;
// the tiles run in parallel on the OpenMP threads. Products under kGemmTileMin
// multiply-adds are one call.
template <class S>
void gemm(bool transA, bool transB, int M, int N, int K, S alpha, const S* A, int lda,
          const S* B, int ldb, S beta, S* Cm, int ldc);

constexpr int64_t kGemmTileMin = int64_t{1} << 18;
constexpr int kGemmMaxTiles = 16;
constexpr int kGemmTileGranule = 32;
struct GemmTiling {
  int tiles = 1;     // number of tiles
  int size = 0;      // rows (or columns) per tile; the last may be shorter
  bool rows = true;  // tiles of rows of Cm (else of columns)
};
GemmTiling gemm_tiling(int M, int N, int K);

// Element-wise and attention loops over fewer elements than this run on one
// thread: waking the team would cost more than the work.
constexpr int64_t kParallelMin = int64_t{1} << 15;

// Threads used by GEMM tiles and by the element-wise and attention loops
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

 private:
  std::mt19937_64 gen_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

}  // namespace flowloop
