// cuda/nccl.cpp: gradient sums over ranks on the GPUs (NCCL's allreduce on the backend's
// stream); the host communicator (MPI) carries everything else and NCCL's set-up.
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <utility>

#include "check.cuh"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/train/dist.hpp"

#if defined(FLOWLOOP_HAVE_NCCL)
#include <nccl.h>
#endif

namespace flowloop::cuda {

#if defined(FLOWLOOP_HAVE_NCCL)
namespace {

void check_nccl(ncclResult_t r, const char* what) {
  if (r == ncclSuccess) return;
  throw Error(std::string("NCCL: ") + what + " failed: " + ncclGetErrorString(r));
}

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(std::shared_ptr<Communicator> host) : host_(std::move(host)) {
    // rank 0's id, with its status: a failure there stops every rank (not a wait)
    struct {
      ncclUniqueId id;
      int status;
    } start{};
    if (host_->rank() == 0) start.status = static_cast<int>(ncclGetUniqueId(&start.id));
    host_->broadcast(&start, sizeof start, 0);
    check_nccl(static_cast<ncclResult_t>(start.status), "ncclGetUniqueId (on rank 0)");
    const std::string where = "(rank " + std::to_string(host_->rank()) + " of " + std::to_string(host_->size()) +
                              " on GPU " + std::to_string(current_device()) + ")";
    check_nccl(ncclCommInitRank(&comm_, host_->size(), start.id, host_->rank()), ("ncclCommInitRank " + where).c_str());
    // NCCL connects at the first collective: one float now, before the model's arrays
    // fill the device (the backend's pool keeps what it takes)
    try {
      DeviceBuffer<float> one(1);
      check_nccl(ncclAllReduce(one.data(), one.data(), 1, ncclFloat, ncclSum, comm_, nullptr),
                 ("the first ncclAllReduce " + where).c_str());
      synchronize();
    } catch (...) {
      ncclCommAbort(comm_);
      throw;
    }
  }
  // Destroying is collective in NCCL: while an error unwinds (this rank alone), abort
  ~NcclCommunicator() override {
    if (std::uncaught_exceptions() > 0)
      ncclCommAbort(comm_);
    else
      ncclCommDestroy(comm_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  int local_rank() const override { return host_->local_rank(); }
  int local_size() const override { return host_->local_size(); }
  std::string name() const override { return host_->name() + "+nccl"; }
  bool sums_on_devices() const override { return true; }
  void sum(float* x, size_t n) override { host_->sum(x, n); }
  void sum(double* x, size_t n) override { host_->sum(x, n); }
  void max(double* x, size_t n) override { host_->max(x, n); }
  // Queued on the backend's stream, after the work that made x and before what reads it
  void sum_device(Backend<float>& be, float* x, size_t n) override {
    if (be.device() != Device::cuda) return Communicator::sum_device(be, x, n);
    check_nccl(ncclAllReduce(x, x, n, ncclFloat, ncclSum, comm_, detail::stream_of(be.native_stream())),
               "ncclAllReduce (the sum over ranks)");
  }
  void broadcast(void* bytes, size_t n, int root) override { host_->broadcast(bytes, n, root); }
  void barrier() override { host_->barrier(); }
  [[noreturn]] void abort(int code) override {
    ncclCommAbort(comm_);
    host_->abort(code);
    std::exit(code);  // (host_->abort does not return)
  }

 private:
  std::shared_ptr<Communicator> host_;
  ncclComm_t comm_ = nullptr;
};

}  // namespace

bool nccl_built() { return true; }

std::shared_ptr<Communicator> nccl_communicator(std::shared_ptr<Communicator> host) {
  if (!host) throw Error("nccl_communicator: no host communicator");
  return std::make_shared<NcclCommunicator>(std::move(host));
}

#else

bool nccl_built() { return false; }

std::shared_ptr<Communicator> nccl_communicator(std::shared_ptr<Communicator>) {
  throw Error("this flowloop was built without NCCL (FLOWLOOP_NCCL=OFF): device sums over ranks go through the host");
}

#endif

}  // namespace flowloop::cuda
