// flowloop/study/bench.hpp: timing of the field at the benchmark sizes of model-spec.md,
// side by side with a plain matrix product measured in the same run.
#pragma once

#include <string>
#include <vector>

#include "flowloop/nn/config.hpp"
#include "flowloop/ode/depth.hpp"

namespace flowloop {

struct BenchOptions {
  std::string size = "S";   // S, M or G
  int threads = 0;          // 0: all hardware threads
  int min_reps = 10;        // at least this many timed repetitions of each measurement
  double min_seconds = 1.0; // and at least this long in total
  bool time_cond = false;   // also time the time-conditioned field (random nonzero ada)
  std::string device = "auto";  // cpu: the Field on the cpu backend; cuda: on the CUDA backend; auto: resolve_device
};

// Times one field evaluation (forward, and its vjp) against an sgemm of the
// MLP's shape (B*T, C) x (C, 4C), interleaving the two so that both see the same
// machine state. Returns one JSON object (as text) with size, ms_per_eval
// (median), gflops, gemm_gflops, ratio, vjp_ms, vjp_gflops and the shape.
// With time_cond, the time-conditioned field of the same size (time_embed as
// init, ada N(0, 0.02), a different time per sequence) runs interleaved with the
// others, and "time_cond" holds its ms_per_eval, gflops, vjp_ms, vjp_gflops
// (its own FLOP count) and ms_ratio, vjp_ms_ratio: its median time over the
// autonomous field's.
// With device cuda, bench_field_on on the CUDA backend.
std::string bench_field(const BenchOptions& opt);

// The same measurement for the Field on another backend (float): forward and vjp of the
// autonomous field (and, with time_cond, the time-conditioned one) against the
// backend's own product of the MLP's shape, each timed to the backend's synchronize.
// JSON: device, backend, the shape, ms_per_eval, gflops, vjp_ms, vjp_gflops, gemm_ms,
// gemm_gflops, ratio (the field's rate over the product's), cache_bytes.
template <class S>
class Backend;
std::string bench_field_on(Backend<float>& be, const BenchOptions& opt);

struct BenchSolveOptions {
  std::string size = "S";
  int threads = 0;
  int min_reps = 5;
  double min_seconds = 1.0;
  std::string model_path;   // weights to use (default: GPT-2 init with seed 1234 at the size)
  std::string tokens_path;  // {"tokens": [[...]]} (default: random tokens, seed 42, B x T of the size)
  // the solve (bench train: or loop K); t1 defaults to kBenchDepth
  DepthSpec depth;
  std::string device = "auto";  // where the field runs (resolve_device)
  static constexpr double kBenchDepth = 4.0;
};

// Times one whole solve of the field from the embedding of the tokens; one JSON
// object with size, solver, nfe, steps, ms (median), field_ms (time inside field
// evaluations), overhead (the rest, as a fraction of ms) and the final state's norm.
std::string bench_solve(const BenchSolveOptions& opt);

struct BenchWpOptions : BenchSolveOptions {
  // every adaptive method at every relative tolerance (atol = rtol / 10); the rest of
  // `depth` (t1, controller, initial norm, coupled, max steps) applies to every row
  std::vector<std::string> solvers = {"bosh3", "dopri5", "tsit5"};
  std::vector<double> rtols = {1e-2, 1e-3, 1e-4, 1e-5, 1e-6};
  double reference_rtol = 1e-10;  // the reference: dopri5 in double, atol = rtol / 100
  std::string reference_out;      // if set: the reference h(t1) (B, T, C) as F64 safetensors ("h_t1")
};

// A work-precision diagram on the transformer ODE (DiffEqBenchmarks' style): for
// every solver and tolerance, the error of h(t1) (float solve) against the
// reference solve, relative in the L2 norm over the batch (error) and the largest
// over sequences (error_max), its NFE and wall-clock (median). One JSON object per
// row (bench "wp": solver, rtol, atol, error, error_max, nfe, ms, ...), the
// reference's first ("solver": "reference").
std::vector<std::string> bench_wp(const BenchWpOptions& opt);

struct BenchTrainOptions : BenchSolveOptions {
  std::string grad = "backprop";  // backprop, checkpoint, adjoint
  bool seminorm = false;
  bool adamw = false;  // include an AdamW update in the step
};

// Times one training step: forward solve, loss, gradient. One JSON object with
// ms (median), nfe_forward, nfe_backward, peak_bytes, loss.
std::string bench_train(const BenchTrainOptions& opt);

struct BenchFlowMatchOptions {
  std::string size = "S";
  int threads = 0;
  int min_reps = 5;
  double min_seconds = 1.0;
  int ot_batch = 256;  // the exact coupling's batch
};

// Flow matching's costs side by side with their peers, interleaved: one flow-matching
// training step (icfm: the time-conditioned field's evaluation, its vjp and the AdamW
// update over the field) against one `loop 1` training step of the same size (embedding,
// field, readout, loss, backward, AdamW); and the exact OT coupling of ot_batch
// recordings of (T, C) each: the cost matrix, the assignment, and Sinkhorn's plan.
// One JSON object: fm_ms, loop1_ms, ratio (fm over loop 1), ot_cost_ms, ot_assign_ms,
// sinkhorn_ms (medians).
std::string bench_flow_match(const BenchFlowMatchOptions& opt);

// The model config of a benchmark size (F = 4C, depth 1).
ModelConfig bench_config(const BenchSize& bs);

// Median of a sample (by copy).
double median(std::vector<double> v);

}  // namespace flowloop
