// flowloop/train/dist.hpp: data parallelism over processes (MPI).
//
// N processes train one model: each takes a deterministic shard of every global batch
// (shard_rows), computes its shard's loss and gradient, and the gradients are summed over
// the processes (Communicator::sum, MPI_Allreduce), so that every rank applies the same
// update to the same parameters. A global batch is a function of (data, seed, step)
// alone, whatever N is: a run resumed with another N sees the same batches. On a device
// the gradient is summed where it lives (Communicator::sum_device): with NCCL on the
// GPUs where the build has it and every rank has a GPU of its own, else through the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "flowloop/backend/backend.hpp"
#include "flowloop/nn/model.hpp"

namespace flowloop {

// The processes that work together: this one is rank() of size(). Every collective call
// must be made by every rank, in the same order.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // This rank among the ranks of its machine, and how many they are (a rank's GPU is
  // its local rank modulo the GPUs it sees).
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  virtual std::string name() const = 0;  // "single", "mpi", "mpi+nccl"
  // Whether sum_device runs on the GPUs themselves (NCCL) rather than through the host.
  virtual bool sums_on_devices() const { return false; }
  // In place, element-wise over the ranks: the sum (MPI_Allreduce; for a given number of
  // ranks, Open MPI reduces in a fixed order, so a run repeats its bits), the maximum.
  virtual void sum(float* x, size_t n) = 0;
  virtual void sum(double* x, size_t n) = 0;
  virtual void max(double* x, size_t n) = 0;
  // The sum of n floats in a backend's memory, in place, every rank's result the same
  // bits. This version stages them through the host (download, sum, upload); a
  // communicator of GPUs (NCCL) sums them on the devices, on the backend's stream.
  virtual void sum_device(Backend<float>& be, float* x, size_t n);
  // Rank `root`'s n bytes to every rank.
  virtual void broadcast(void* bytes, size_t n, int root) = 0;
  virtual void barrier() = 0;
  // Ends every rank (an error on one rank would leave the others waiting in a collective).
  [[noreturn]] virtual void abort(int code) = 0;
};

// One process: the collectives are the identity.
std::shared_ptr<Communicator> single_process();

// Whether the library was built with MPI (FLOWLOOP_MPI).
bool mpi_built();

// The processes this one was started with: MPI's world when the launcher (mpirun, or a
// PMI/PMIx launcher) started it and the library has MPI, else single_process().
// Initialises MPI on the first call (finalised at exit). Throws Error when started by a
// launcher with several ranks and the library has no MPI.
std::shared_ptr<Communicator> world();

// The rows [begin, end) of a global batch of B rows that rank `rank` of `size` takes:
// contiguous, in rank order, the first B % size ranks one row more. Throws Error unless
// 0 <= rank < size <= B.
std::pair<int, int> shard_rows(int B, int rank, int size);

// The communicator for training on device d: on cuda with several ranks, this rank's GPU
// is selected (its local rank modulo the GPUs it sees), and the device sums run on NCCL
// when the build has it and the machine's ranks have a GPU each; otherwise `comm` itself
// (device sums through the host). One process: comm. Collective: every rank calls it,
// and a failure on one rank (no GPU there, another device) throws on every rank.
std::shared_ptr<Communicator> communicator_for(std::shared_ptr<Communicator> comm, Device d);

// Collective: whether every rank holds the same values (exactly; one maximum over the
// ranks of the values and their negatives). Every rank gets the same answer.
bool same_on_every_rank(Communicator& comm, const std::vector<double>& values);

// Collective: throws Error on every rank unless all ranks train on the same device.
void require_same_device(Communicator& comm, Device d);

// Rows [begin, end) of a batch (B, T).
TokenBatch slice_rows(const TokenBatch& b, int begin, int end);

// The number of scored targets (>= 0) of a batch: the denominator of its mean loss.
int64_t scored_count(const TokenBatch& targets);

// How a rank's shard enters the global batch's loss. A rank computes its shard's mean
// loss and gradient, with the kinetic regulariser's weight times kinetic_factor, and
// multiplies the gradient by `scale`; the sum over the ranks is then the global batch's
// gradient of (mean cross-entropy over all scored targets + kinetic * mean over all
// sequences of R_K), and sum_r share_r * loss_r its mean loss.
struct ShardWeights {
  int begin = 0, end = 0;   // the rank's rows (shard_rows)
  double share = 1;         // its scored targets over the global batch's (0: none)
  double row_share = 1;     // its rows over the global batch's
  double scale = 1;         // share, or 1 when it has no scored target (no cross-entropy gradient)
  double kinetic_factor = 1;  // row_share / scale
};
ShardWeights shard_weights(const TokenBatch& global_targets, int rank, int size);

}  // namespace flowloop
