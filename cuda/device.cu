// cuda/device.cu: the device, its memory, and checked copies.
#include "check.cuh"
#include "flowloop/backend/cuda.hpp"

namespace flowloop::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error, report none
    return 0;
  }
  return n;
}

int current_device() {
  int d = 0;
  FLOWLOOP_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

void select_device(int device) {
  const int n = device_count();
  if (device < 0 || device >= n)
    throw Error("no CUDA device " + std::to_string(device) + " (" + std::to_string(n) + " visible)");
  FLOWLOOP_CUDA_CHECK(cudaSetDevice(device));
}

std::string device_description(int device) {
  if (device_count() <= device)
    throw Error("no CUDA device " + std::to_string(device) + " (" + std::to_string(device_count()) + " visible)");
  cudaDeviceProp p{};
  FLOWLOOP_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  return std::string(p.name) + ", " + std::to_string(p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0)).substr(0, 5) +
         " GiB, compute capability " + std::to_string(p.major) + "." + std::to_string(p.minor);
}

std::pair<size_t, size_t> memory_info() {
  size_t free_b = 0, total = 0;
  FLOWLOOP_CUDA_CHECK(cudaMemGetInfo(&free_b, &total));
  return {free_b, total};
}

void synchronize() { FLOWLOOP_CUDA_CHECK(cudaDeviceSynchronize()); }

namespace {
// Gives the pool's cached free blocks back to the device (after the queued frees), so
// that an allocation that did not fit can try again.
bool release_pool() {
  int device = 0;
  cudaMemPool_t pool = nullptr;
  if (cudaDeviceSynchronize() != cudaSuccess || cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetDefaultMemPool(&pool, device) != cudaSuccess || cudaMemPoolTrimTo(pool, 0) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}
}  // namespace

void* device_alloc(size_t bytes) {
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {  // perhaps held by the pool's cache: release it, try once more
    cudaGetLastError();
    if (release_pool()) e = cudaMalloc(&p, bytes);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total = 0;
    cudaMemGetInfo(&free_b, &total);
    throw Error("CUDA: cannot allocate " + std::to_string(bytes) + " bytes on the device (" +
                std::to_string(free_b) + " free of " + std::to_string(total) + "): " + cudaGetErrorString(e));
  }
  return p;
}

void device_free(void* p) noexcept {
  if (p) cudaFree(p);
}

void keep_pool_memory() {
  int device = 0;
  FLOWLOOP_CUDA_CHECK(cudaGetDevice(&device));
  cudaMemPool_t pool = nullptr;
  FLOWLOOP_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t keep = UINT64_MAX;  // freed blocks stay in the pool for the next allocation
  FLOWLOOP_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
}

void* device_alloc_async(size_t bytes, void* stream) {
  void* p = nullptr;
  cudaError_t e = cudaMallocAsync(&p, bytes, static_cast<cudaStream_t>(stream));
  if (e != cudaSuccess) {  // the pool's cache released, once more
    cudaGetLastError();
    if (release_pool()) e = cudaMallocAsync(&p, bytes, static_cast<cudaStream_t>(stream));
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total = 0;
    cudaMemGetInfo(&free_b, &total);
    throw Error("CUDA: cannot allocate " + std::to_string(bytes) + " bytes on the device (" + std::to_string(free_b) +
                " free of " + std::to_string(total) + "): " + cudaGetErrorString(e));
  }
  return p;
}

void device_free_async(void* p, void* stream) noexcept {
  if (p) cudaFreeAsync(p, static_cast<cudaStream_t>(stream));
}

void copy_to_device(void* dst, const void* src, size_t bytes) {
  FLOWLOOP_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  FLOWLOOP_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

}  // namespace flowloop::cuda
