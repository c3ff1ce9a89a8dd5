// flowloop/core/memory.hpp: where arrays live. A Memory<S> allocates, copies and fills
// arrays in one memory space (the host's, a GPU's) and orders the work queued on it.
// Every other backend interface (the solvers' state algebra, ode/state_ops.hpp; the
// network ops, nn/ops.hpp; the optimiser's update, backend.hpp) extends it, so an array
// of this memory is what they all take.
//
// Conventions: row-major arrays; pointers are this memory's (host pointers only where a
// function says so).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "flowloop/core/tensor.hpp"

namespace flowloop {

enum class Device { cpu, cuda };

// "cpu" or "cuda"; anything else throws Error naming the accepted values.
Device parse_device(const std::string& name);
const char* device_name(Device d);
// Whether this build has the CUDA backend (FLOWLOOP_CUDA), and the GPUs it sees (0
// without the backend, a driver or a GPU; never throws).
bool cuda_built();
int cuda_device_count();
// cuda when the build has it and a GPU is visible, else cpu.
Device default_device();
// "auto", "cpu" or "cuda", checked with require_device: the device flag of every
// command. auto is the environment's FLOWLOOP_DEVICE when set (cpu, cuda), else
// default_device().
Device resolve_device(const std::string& name);
// Throws Error when `d` cannot run here: cuda without a CUDA build, or without a GPU.
void require_device(Device d);

// The bytes of n values of T; an n whose bytes overflow size_t is an Error naming it.
template <class T>
size_t array_bytes(size_t n) {
  if (n > std::numeric_limits<size_t>::max() / sizeof(T))
    throw Error("cannot allocate " + std::to_string(n) + " values of " + std::to_string(sizeof(T)) +
                " bytes: the size overflows");
  return n * sizeof(T);
}

template <class S>
class Memory {
 public:
  virtual ~Memory() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;  // "reference (host)", "cuda: NVIDIA H100 ..., 79.1 GiB"

  // Raw bytes (any element type: the solvers keep double step sizes and int row lists
  // beside the S states), and typed wrappers for S.
  virtual void* alloc_bytes(size_t bytes) = 0;  // throws Error naming the bytes asked (and free)
  virtual void free_bytes(void* p) noexcept = 0;
  virtual void upload_bytes(void* dst, const void* host, size_t bytes) = 0;    // returns when host may change
  virtual void download_bytes(void* host, const void* src, size_t bytes) = 0;  // waits for the queued work
  S* alloc(size_t n) { return static_cast<S*>(alloc_bytes(array_bytes<S>(n))); }
  void free(S* p) noexcept { free_bytes(p); }
  void upload(S* dst, const S* host, size_t n) { upload_bytes(dst, host, n * sizeof(S)); }
  void download(S* host, const S* src, size_t n) { download_bytes(host, src, n * sizeof(S)); }
  virtual void copy(S* dst, const S* src, size_t n) = 0;  // within this memory (overlap: the host's memmove, undefined on cuda)
  virtual void fill(S* x, S value, size_t n) = 0;
  virtual void synchronize() = 0;  // waits for the work queued so far
  // The stream the operations queue on (a cudaStream_t for cuda; null: the host's order),
  // for libraries that join it (NCCL's collectives).
  virtual void* native_stream() { return nullptr; }
};

// An owned array of n values of T in a memory (T is S unless said: the solvers' step
// sizes and row lists are Array<S, double> and Array<S, int>).
template <class S, class T = S>
class Array {
 public:
  Array() = default;
  Array(Memory<S>& mem, size_t n)
      : mem_(&mem), n_(n), p_(n ? static_cast<T*>(mem.alloc_bytes(array_bytes<T>(n))) : nullptr) {}
  ~Array() {
    if (p_) mem_->free_bytes(p_);
  }
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  Array(Array&& o) noexcept : mem_(o.mem_), n_(o.n_), p_(o.p_) { o.n_ = 0, o.p_ = nullptr; }
  Array& operator=(Array&& o) noexcept {
    std::swap(mem_, o.mem_);
    std::swap(n_, o.n_);
    std::swap(p_, o.p_);
    return *this;
  }
  // Allocates n values anew in `mem` (contents undefined) unless it holds n there already.
  void resize(Memory<S>& mem, size_t n) {
    if (mem_ == &mem && n_ == n) return;
    *this = Array(mem, n);
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  // The memory the array lives in (null for an array never allocated).
  Memory<S>* memory() const { return mem_; }
  void upload(const T* host, size_t n) {
    check(n, "upload");
    if (n) mem_->upload_bytes(p_, host, n * sizeof(T));
  }
  void download(T* host, size_t n) const {
    check(n, "download");
    if (n) mem_->download_bytes(host, p_, n * sizeof(T));
  }
  void zero() {
    if (!n_) return;
    if constexpr (std::is_same_v<T, S>) {
      mem_->fill(p_, S(0), n_);
    } else {
      const std::vector<T> z(n_, T(0));
      upload(z.data(), n_);
    }
  }

 private:
  void check(size_t n, const char* what) const {
    if (n > n_) throw Error("Array::" + std::string(what) + ": " + std::to_string(n) + " values, the array holds " +
                            std::to_string(n_));
  }
  Memory<S>* mem_ = nullptr;
  size_t n_ = 0;
  T* p_ = nullptr;
};

}  // namespace flowloop
