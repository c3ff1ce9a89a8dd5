#include "flowloop/train/dist.hpp"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#if defined(FLOWLOOP_HAVE_CUDA)
#include "flowloop/backend/cuda.hpp"
#endif

#if defined(FLOWLOOP_HAVE_MPI)
#include <mpi.h>
#endif

namespace flowloop {

namespace {

class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  std::string name() const override { return "single"; }
  void sum(float*, size_t) override {}
  void sum(double*, size_t) override {}
  void max(double*, size_t) override {}
  void sum_device(Backend<float>&, float*, size_t) override {}
  void broadcast(void*, size_t, int) override {}
  void barrier() override {}
  [[noreturn]] void abort(int code) override { std::exit(code); }
};

// The launcher's rank count, from its environment (0: not started by one).
int launcher_size() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const char* v = std::getenv(var)) return std::max(1, std::atoi(v));
  return std::getenv("PMIX_RANK") ? 1 : 0;
}

#if defined(FLOWLOOP_HAVE_MPI)
void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw Error(std::string("MPI: ") + what + " failed: " + std::string(text, static_cast<size_t>(len)));
}

// Counts above INT_MAX go in pieces (MPI's counts are int): call(offset, count) for each.
template <class F>
void in_pieces(size_t n, F call) {
  constexpr size_t kPiece = size_t{1} << 30;
  for (size_t at = 0; at < n; at += kPiece) call(at, static_cast<int>(std::min(kPiece, n - at)));
}

template <class T>
void allreduce(T* x, size_t n, MPI_Datatype type, MPI_Op op, const char* what) {
  in_pieces(n, [&](size_t at, int count) {
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, x + at, count, type, op, MPI_COMM_WORLD), what);
  });
}

class MpiWorld final : public Communicator {
 public:
  MpiWorld() {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      // flowloop's OpenMP threads never call MPI: only the main thread does
      check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      owner_ = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    // the ranks that share this machine's memory: their order is the local rank
    MPI_Comm local = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local),
              "MPI_Comm_split_type (the ranks of this machine)");
    MPI_Comm_rank(local, &local_rank_);
    MPI_Comm_size(local, &local_size_);
    MPI_Comm_free(&local);
  }
  ~MpiWorld() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owner_ && !finalized) MPI_Finalize();
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  std::string name() const override { return "mpi"; }
  void sum(float* x, size_t n) override { allreduce(x, n, MPI_FLOAT, MPI_SUM, "the sum over ranks (float)"); }
  void sum(double* x, size_t n) override { allreduce(x, n, MPI_DOUBLE, MPI_SUM, "the sum over ranks (double)"); }
  void max(double* x, size_t n) override { allreduce(x, n, MPI_DOUBLE, MPI_MAX, "the maximum over ranks"); }
  void broadcast(void* bytes, size_t n, int root) override {
    in_pieces(n, [&](size_t at, int count) {
      check_mpi(MPI_Bcast(static_cast<char*>(bytes) + at, count, MPI_BYTE, root, MPI_COMM_WORLD), "MPI_Bcast");
    });
  }
  void barrier() override { check_mpi(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier"); }
  [[noreturn]] void abort(int code) override {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::exit(code);
  }

 private:
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  bool owner_ = false;
};
#endif

}  // namespace

void Communicator::sum_device(Backend<float>& be, float* x, size_t n) {
  std::vector<float> host(n);
  be.download(host.data(), x, n);
  sum(host.data(), n);
  be.upload(x, host.data(), n);
}

std::shared_ptr<Communicator> single_process() { return std::make_shared<SingleProcess>(); }

bool same_on_every_rank(Communicator& comm, const std::vector<double>& values) {
  std::vector<double> v(values);  // the values, then their negatives: max(-x) = -min(x)
  for (double x : values) v.push_back(-x);
  comm.max(v.data(), v.size());
  for (size_t i = 0; i < values.size(); ++i)
    if (v[i] != -v[values.size() + i]) return false;
  return true;
}

void require_same_device(Communicator& comm, Device d) {
  if (comm.size() == 1) return;
  // one device for all: a rank on the CPU would not join the GPUs' collectives
  if (!same_on_every_rank(comm, {d == Device::cuda ? 1.0 : 0.0}))
    throw Error("the ranks train on different devices (some on cuda, some on cpu): give every rank the same --device");
}

std::shared_ptr<Communicator> communicator_for(std::shared_ptr<Communicator> comm, Device d) {
  if (!comm || comm->size() == 1) return comm;
  require_same_device(*comm, d);
  if (d != Device::cuda) return comm;
  // every rank takes its GPU; a rank that cannot says so, and every rank stops (the
  // others would wait for it in the next collective)
  std::string failed;
  int gpus = 1;
  try {
    require_device(d);
#if defined(FLOWLOOP_HAVE_CUDA)
    gpus = cuda::device_count();
    cuda::select_device(comm->local_rank() % gpus);
#endif
  } catch (const Error& e) {
    failed = e.what();
  }
  // NCCL needs a GPU per rank; ranks that share one sum through the host. Every rank of
  // a machine sees the same local size, and all machines are asked alike: the choice is
  // one over the ranks.
  std::array<double, 2> flags{failed.empty() ? 0.0 : 1.0, comm->local_size() > gpus ? 1.0 : 0.0};
  comm->max(flags.data(), flags.size());
  if (flags[0] > 0)
    throw Error(failed.empty() ? "another rank cannot train on cuda (its error is in its own output)" : failed);
#if defined(FLOWLOOP_HAVE_CUDA)
  if (cuda::nccl_built() && flags[1] == 0 && !comm->sums_on_devices())
    return cuda::nccl_communicator(std::move(comm));
#endif
  return comm;
}

bool mpi_built() {
#if defined(FLOWLOOP_HAVE_MPI)
  return true;
#else
  return false;
#endif
}

std::shared_ptr<Communicator> world() {
  static std::shared_ptr<Communicator> w;
  if (w) return w;
  const int n = launcher_size();
#if defined(FLOWLOOP_HAVE_MPI)
  if (n > 0) return w = std::make_shared<MpiWorld>();
#else
  if (n > 1)
    throw Error("started by an MPI launcher with " + std::to_string(n) +
                " ranks, but this flowloop was built without MPI (install libopenmpi-dev and build again)");
#endif
  return w = single_process();
}

std::pair<int, int> shard_rows(int B, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size)
    throw Error("rank " + std::to_string(rank) + " of " + std::to_string(size) + " ranks does not exist");
  if (B < size)
    throw Error("a global batch of " + std::to_string(B) + " rows cannot be shared by " + std::to_string(size) +
                " ranks: every rank needs a row (--batch at least the number of ranks)");
  const int base = B / size, extra = B % size;
  const int begin = rank * base + std::min(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

TokenBatch slice_rows(const TokenBatch& b, int begin, int end) {
  if (begin < 0 || end > b.B || begin > end)
    throw Error("rows [" + std::to_string(begin) + ", " + std::to_string(end) + ") of a batch of " +
                std::to_string(b.B) + " rows");
  TokenBatch s;
  s.B = end - begin;
  s.T = b.T;
  const size_t T = static_cast<size_t>(b.T);
  s.data.assign(b.data.begin() + static_cast<std::ptrdiff_t>(begin * T),
                b.data.begin() + static_cast<std::ptrdiff_t>(end * T));
  return s;
}

int64_t scored_count(const TokenBatch& targets) {
  return std::count_if(targets.data.begin(), targets.data.end(), [](int32_t v) { return v >= 0; });
}

ShardWeights shard_weights(const TokenBatch& global_targets, int rank, int size) {
  ShardWeights w;
  std::tie(w.begin, w.end) = shard_rows(global_targets.B, rank, size);
  if (size == 1) return w;  // the whole batch: every weight exactly 1
  const auto total = static_cast<double>(scored_count(global_targets));
  const auto mine = static_cast<double>(scored_count(slice_rows(global_targets, w.begin, w.end)));
  w.share = total > 0 ? mine / total : 0.0;
  w.row_share = static_cast<double>(w.end - w.begin) / global_targets.B;
  w.scale = w.share > 0 ? w.share : 1.0;
  w.kinetic_factor = w.row_share / w.scale;
  return w;
}

}  // namespace flowloop
