#include "flowloop/bench.hpp"

#include <algorithm>
#include <chrono>
#include <nlohmann/json.hpp>
#include <vector>

#include "flowloop/model.hpp"
#include "flowloop/tensor.hpp"

namespace flowloop {

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

namespace {
double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

std::string bench_field(const BenchOptions& opt) {
  const BenchSize bs = bench_size(opt.size);
  set_num_threads(opt.threads);
  ModelConfig cfg;
  cfg.vocab_size = bs.V;
  cfg.context = bs.T;
  cfg.d_model = bs.C;
  cfg.n_head = bs.NH;
  cfg.n_block = bs.L;
  cfg.finalize();
  Model<float> model(cfg);
  model.init(1234);

  const int B = bs.B, T = bs.T, C = bs.C, F = cfg.d_ff;
  const size_t NC = static_cast<size_t>(B) * T * C;
  TokenBatch tokens;
  tokens.B = B;
  tokens.T = T;
  Rng rng(42);
  for (int i = 0; i < B * T; ++i) tokens.data.push_back(static_cast<int32_t>(rng.next() % bs.V));
  Buffer<float> h(NC), f(NC), dh(NC), gf(NC), dparams(model.params.size());
  model.embed(h.data(), tokens);
  for (auto& g : gf) g = static_cast<float>(rng.normal());
  FieldCache<float> cache;
  cache.resize(cfg, B, T);
  FieldGradWork<float> work;
  work.resize(cfg, B, T);

  const int M = B * T;
  Buffer<float> A(static_cast<size_t>(M) * C), W(static_cast<size_t>(F) * C),
      Out(static_cast<size_t>(M) * F);
  for (auto& x : A) x = static_cast<float>(rng.normal());
  for (auto& x : W) x = static_cast<float>(0.02 * rng.normal());

  auto run_field = [&] { model.field.forward(f.data(), h.data(), 0.0, model.params.data(), B, T, cache); };
  auto run_vjp = [&] { model.field.vjp(dh.data(), dparams.data(), gf.data(), model.params.data(), cache, work); };
  auto run_gemm = [&] { gemm<float>(false, true, M, F, C, 1.0f, A.data(), C, W.data(), C, 0.0f, Out.data(), F); };
  for (int i = 0; i < 3; ++i) {
    run_field();
    run_vjp();
    run_gemm();
  }
  std::vector<double> tf, tv, tg;
  const double start = now_ms();
  while (static_cast<int>(tf.size()) < opt.min_reps || now_ms() - start < 1000.0 * opt.min_seconds) {
    double t0 = now_ms();
    run_field();
    double t1 = now_ms();
    run_vjp();
    double t2 = now_ms();
    run_gemm();
    double t3 = now_ms();
    tf.push_back(t1 - t0);
    tv.push_back(t2 - t1);
    tg.push_back(t3 - t2);
    if (tf.size() > 100000) break;
  }
  const double fl = model.field.flops(B, T);
  const double gfl = 2.0 * M * F * C;
  const double ms = median(tf), vms = median(tv), gms = median(tg);
  nlohmann::ordered_json j;
  j["bench"] = "field";
  j["size"] = opt.size;
  j["B"] = B;
  j["T"] = T;
  j["C"] = C;
  j["NH"] = bs.NH;
  j["F"] = F;
  j["L"] = bs.L;
  j["threads"] = num_threads();
  j["reps"] = tf.size();
  j["ms_per_eval"] = ms;
  j["gflops"] = fl / (ms * 1e6);
  j["gemm_shape"] = {M, F, C};
  j["gemm_ms"] = gms;
  j["gemm_gflops"] = gfl / (gms * 1e6);
  j["ratio"] = (fl / ms) / (gfl / gms);
  j["vjp_ms"] = vms;
  j["vjp_gflops"] = 2.0 * fl / (vms * 1e6);
  return j.dump();
}

}  // namespace flowloop
