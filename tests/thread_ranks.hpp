// Ranks that are threads of one process, with a communicator of their own: data
// parallelism tested without MPI (test_dist.cpp, test_flowmatch.cpp). Collectives combine
// the ranks' arrays in rank order, the same bits on every rank.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "flowloop/train/dist.hpp"

namespace flowloop::test {

// N ranks as N threads of this process. Every collective meets at a barrier: each rank
// shows its array, the ranks combine all of them in rank order (the same bits on every
// rank), and meet again before anyone writes its own.
class ThreadGroup {
 public:
  explicit ThreadGroup(int n) : slots_(static_cast<size_t>(n)), n_(n) {}
  int size() const { return n_; }
  // A rank that waits 120 s in vain breaks the group: every later collective throws.
  void meet() {
    std::unique_lock<std::mutex> lk(mu_);
    if (broken_) throw Error("the group is broken (a rank did not reach a collective)");
    const uint64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else if (!cv_.wait_for(lk, std::chrono::seconds(120), [&] { return gen_ != gen || broken_; }) || broken_) {
      broken_ = true;
      cv_.notify_all();
      throw Error("a rank did not reach the collective within 120 s");
    }
  }
  std::vector<const void*> slots_;

 private:
  int n_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t gen_ = 0;
  bool broken_ = false;
};

class ThreadRank final : public Communicator {
 public:
  ThreadRank(std::shared_ptr<ThreadGroup> g, int rank) : g_(std::move(g)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->size(); }
  int local_rank() const override { return rank_; }
  int local_size() const override { return g_->size(); }
  std::string name() const override { return "threads"; }
  void sum(float* x, size_t n) override { combine(x, n, false); }
  void sum(double* x, size_t n) override { combine(x, n, false); }
  void max(double* x, size_t n) override { combine(x, n, true); }
  void broadcast(void* bytes, size_t n, int root) override {
    g_->slots_[static_cast<size_t>(rank_)] = bytes;
    g_->meet();
    if (rank_ != root) std::memcpy(bytes, g_->slots_[static_cast<size_t>(root)], n);
    g_->meet();
  }
  void barrier() override { g_->meet(); }
  [[noreturn]] void abort(int code) override { throw Error("rank aborted with " + std::to_string(code)); }
  int device_sums = 0;  // sum_device calls (the device path's gradients)
  void sum_device(Backend<float>& be, float* x, size_t n) override {
    ++device_sums;
    Communicator::sum_device(be, x, n);
  }

 private:
  template <class T>
  void combine(T* x, size_t n, bool is_max) {
    g_->slots_[static_cast<size_t>(rank_)] = x;
    g_->meet();
    std::vector<T> r(static_cast<const T*>(g_->slots_[0]), static_cast<const T*>(g_->slots_[0]) + n);
    for (int k = 1; k < g_->size(); ++k) {
      const T* y = static_cast<const T*>(g_->slots_[static_cast<size_t>(k)]);
      for (size_t i = 0; i < n; ++i) r[i] = is_max ? std::max(r[i], y[i]) : r[i] + y[i];
    }
    g_->meet();  // every rank has read every array
    std::copy(r.begin(), r.end(), x);
  }
  std::shared_ptr<ThreadGroup> g_;
  int rank_;
};

// Runs job(rank, comm) on n ranks that are threads; returns each rank's error ("" if none).
inline std::vector<std::string> on_thread_ranks(int n, const std::function<void(int, std::shared_ptr<ThreadRank>)>& job) {
  auto group = std::make_shared<ThreadGroup>(n);
  std::vector<std::string> err(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        job(r, std::make_shared<ThreadRank>(group, r));
      } catch (const std::exception& e) {
        err[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return err;
}

}  // namespace flowloop::test
