// Data parallelism's arithmetic without MPI: the shards of a batch, and the ranks'
// weighted gradients summed equal the whole batch's gradient in double (the MPI runs
// themselves: tests/mpi_check.sh).
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "check.hpp"
#include "flowloop/dist.hpp"
#include "flowloop/grad.hpp"
#include "flowloop/model.hpp"

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
