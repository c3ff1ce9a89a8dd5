// Data parallelism without MPI: the shards of a batch; the ranks' weighted gradients
// summed equal the whole batch's gradient in double; training on ranks that are threads
// of this process (a communicator of their own), on the CPU and on the reference
// backend (the device path: the gradient summed in the backend's memory). The MPI runs
// themselves: tests/mpi_check.sh.
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "thread_ranks.hpp"
#include "train_check.hpp"
#include "flowloop/train/dist.hpp"
#include "flowloop/ode/grad.hpp"
#include "flowloop/nn/model.hpp"
#include "flowloop/train/train.hpp"

using namespace flowloop;
using namespace flowloop::test;

TEST_CASE("data parallel: every row of a batch in one shard, in rank order", "[dist]") {
  for (int B = 1; B <= 11; ++B)
    for (int n = 1; n <= B; ++n) {
      int next = 0, least = B, most = 0;
      for (int r = 0; r < n; ++r) {
        const auto [b, e] = shard_rows(B, r, n);
        CHECK(b == next);
        next = e;
        least = std::min(least, e - b);
        most = std::max(most, e - b);
      }
      CHECK(next == B);
      CHECK(least >= 1);
      CHECK(most - least <= 1);
    }
  CHECK_THROWS_WITH(shard_rows(3, 0, 4), Catch::Contains("every rank needs a row") && Catch::Contains("3 rows"));
  CHECK_THROWS_WITH(shard_rows(8, 2, 2), Catch::Contains("rank 2 of 2"));
  TokenBatch b;
  b.B = 3;
  b.T = 2;
  b.data = {0, 1, 2, 3, 4, 5};
  const TokenBatch s = slice_rows(b, 1, 3);
  CHECK(s.B == 2);
  CHECK(s.data == std::vector<int32_t>{2, 3, 4, 5});
  CHECK_THROWS_WITH(slice_rows(b, 2, 4), Catch::Contains("rows [2, 4)"));
  auto one = single_process();
  CHECK(one->rank() == 0);
  CHECK(one->size() == 1);
  std::vector<float> x = {1.5f, -2.0f};
  one->sum(x.data(), x.size());
  CHECK(x == std::vector<float>{1.5f, -2.0f});
  const ShardWeights w = shard_weights(b, 0, 1);
  CHECK((w.begin == 0 && w.end == 3 && w.share == 1.0 && w.scale == 1.0 && w.kinetic_factor == 1.0));
}

namespace {
// A batch whose rows score different numbers of targets (row 4 none), so that the
// ranks' shares of the loss differ from their shares of the rows.
void make_batch(TokenBatch& tok, TokenBatch& tgt, int B, int T, int V) {
  tok.B = tgt.B = B;
  tok.T = tgt.T = T;
  tok.data.resize(static_cast<size_t>(B) * T);
  tgt.data.resize(tok.data.size());
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      const size_t i = static_cast<size_t>(b) * T + t;
      tok.data[i] = (b * 5 + t * 3 + 1) % V;
      tgt.data[i] = (b != 4 && t >= b % T) ? (b * 7 + t) % V : -1;
    }
}
}  // namespace

TEST_CASE("data parallel: the ranks' weighted shards sum to the whole batch's loss and gradient (double)",
          "[dist]") {
  const ModelConfig cfg = make_config(11, 6, 8, 2, 16, 1, 2);
  Model<double> model(cfg);
  model.init(5);
  const int B = 7, T = 5;
  TokenBatch tok, tgt;
  make_batch(tok, tgt, B, T, cfg.vocab_size);
  SolveOptions ode = adaptive_opts("dopri5", 2.0, 1e-6, 1e-8);
  GradOptions reg;
  reg.kinetic = 0.3;
  // each mode: loss and gradient of a batch into g, with the kinetic weight factor k
  auto run = [&](const std::string& mode, const TokenBatch& tk, const TokenBatch& tg, double k, std::vector<double>& g) {
    g.assign(model.params.size(), 0.0);
    if (mode == "loop") {
      LoopWork<double> w;
      return static_cast<double>(model.loop_loss_and_grad(tk, tg, 3, g.data(), w));
    }
    GradOptions go = reg;
    go.kinetic *= k;
    GradStats st;
    OdeWork<double> w;
    const double loss = model.ode_loss_and_grad(tk, tg, ode, go, g.data(), st, w);
    REQUIRE(st.ok());
    return loss + go.kinetic * st.kinetic;  // the regularised objective the gradient is of
  };
  for (const std::string mode : {"loop", "ode"}) {
    std::vector<double> whole_g;
    const double whole = run(mode, tok, tgt, 1.0, whole_g);
    for (int ranks : {2, 3, 7}) {
      INFO(mode << " on " << ranks << " ranks");
      double loss = 0;
      std::vector<double> g(model.params.size(), 0.0), gr;
      double rows = 0;
      for (int r = 0; r < ranks; ++r) {
        const ShardWeights w = shard_weights(tgt, r, ranks);
        rows += w.row_share;
        const double lr = run(mode, slice_rows(tok, w.begin, w.end), slice_rows(tgt, w.begin, w.end),
                              w.kinetic_factor, gr);
        // scale * (the shard's mean cross-entropy + kinetic * kinetic_factor * R_K) is
        // share * cross-entropy + row share * kinetic * R_K (a shard without targets: CE 0)
        loss += w.scale * lr;
        for (size_t i = 0; i < g.size(); ++i) g[i] += w.scale * gr[i];
      }
      CHECK(rows == Approx(1.0).epsilon(1e-15));
      CHECK(loss == Approx(whole).epsilon(1e-12));
      CHECK(rel_error(g, whole_g) < 1e-12);
    }
  }
}

namespace {

// Trains configs[r] on rank r of a thread group (on the reference backend when on_device);
// returns each rank's final parameters, and rethrows the first rank's error.
std::vector<Buffer<float>> train_ranks(const std::vector<TrainConfig>& configs, bool on_device,
                                       std::vector<std::string>* errors = nullptr, int* device_sums = nullptr) {
  const int n = static_cast<int>(configs.size());
  auto group = std::make_shared<ThreadGroup>(n);
  std::vector<Buffer<float>> params(static_cast<size_t>(n));
  std::vector<std::string> err(static_cast<size_t>(n));
  std::vector<int> sums(static_cast<size_t>(n), 0);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        auto comm = std::make_shared<ThreadRank>(group, r);
        Trainer t(configs[static_cast<size_t>(r)], comm);
        if (on_device) t.set_backend(std::shared_ptr<Backend<float>>(make_backend<float>(Device::cpu)));
        std::ostringstream quiet;
        t.run(false, quiet);
        params[static_cast<size_t>(r)] = t.model().params;
        sums[static_cast<size_t>(r)] = comm->device_sums;
      } catch (const std::exception& e) {
        err[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  if (device_sums) *device_sums = sums[0];
  if (errors) {
    *errors = err;
  } else {
    for (const auto& e : err)
      if (!e.empty()) FAIL(e);
  }
  return params;
}

}  // namespace

TEST_CASE("data parallel on threads: 2 ranks train as one process, on the CPU and on a device backend",
          "[dist][device]") {
  TempDir dir("flowloop_dist");
  for (const bool ode : {false, true}) {
    auto config = [&](const std::string& name) {
      TrainConfig c = tiny_config((dir.path / ((ode ? "ode_" : "loop_") + name)).string());
      c.steps = 6;
      c.batch = 9;  // ranks of 5 and 4 rows
      c.eval_every = 3;
      c.checkpoint_every = 3;
      c.eval_batches = 1;
      if (ode) {  // per-sequence adaptive solves with the kinetic regulariser
        c.depth.loops = 0;
        c.depth.solver = "dopri5";
        c.depth.rtol = 1e-3;
        c.depth.atol = 1e-4;
        c.depth.t1 = 2;
        c.kinetic = 0.1;
      }
      return c;
    };
    for (const bool on_device : {false, true}) {
      INFO((ode ? "ODE depth" : "loop depth") << (on_device ? ", reference backend" : ", CPU"));
      const std::string tag = on_device ? "dev" : "cpu";
      train_ranks({config("one_" + tag)}, on_device);
      int device_sums = 0;
      const auto two = train_ranks({config("two_" + tag), config("two_" + tag)}, on_device, nullptr, &device_sums);
      CHECK(two[0] == two[1]);  // every rank holds the same parameters, bit for bit
      CHECK(device_sums == (on_device ? 6 : 0));  // the device's gradients were summed there
      const auto a = read_metrics(dir.path / ((ode ? "ode_one_" : "loop_one_") + tag));
      const auto b = read_metrics(dir.path / ((ode ? "ode_two_" : "loop_two_") + tag));
      REQUIRE(a.size() == 6);
      REQUIRE(b.size() == 6);
      for (size_t i = 0; i < a.size(); ++i) {
        INFO("step " << i + 1);
        CHECK(b[i]["ranks"] == 2);
        CHECK(b[i]["communicator"] == "threads");
        CHECK(b[i]["load_imbalance"].get<double>() >= 1.0);
        for (const char* k : {"loss", "grad_norm"}) {
          const double x = a[i][k].get<double>(), y = b[i][k].get<double>();
          REQUIRE(std::isfinite(x));
          CHECK(std::fabs(x - y) <= 1e-5 * std::max(std::fabs(x), std::fabs(y)));
        }
      }
    }
  }
}

TEST_CASE("data parallel on threads: ranks whose parameters differ stop at the checkpoint, naming it", "[dist]") {
  TempDir dir("flowloop_dist_differ");
  TrainConfig c = tiny_config((dir.path / "run").string());
  c.steps = 4;
  c.checkpoint_every = 2;
  TrainConfig other = c;
  other.seed = c.seed + 1;  // another initialisation on rank 1
  std::vector<std::string> errors;
  train_ranks({c, other}, false, &errors);
  for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("step 2: the ranks' parameters differ"));
}

TEST_CASE("data parallel on threads: ranks on different devices are refused, naming it", "[dist][device]") {
  TempDir dir("flowloop_dist_devices");
  const TrainConfig c = tiny_config((dir.path / "run").string());
  auto group = std::make_shared<ThreadGroup>(2);
  std::vector<std::string> err(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      try {
        Trainer t(c, std::make_shared<ThreadRank>(group, r));
        t.set_device(r == 0 ? Device::cpu : Device::cuda);  // (the check comes before cuda's own)
      } catch (const std::exception& e) {
        err[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (const auto& e : err) CHECK_THAT(e, Catch::Contains("the ranks train on different devices"));
}
