// flowloop/bench.hpp: timing of the field at the benchmark sizes of model-spec.md,
// side by side with a plain matrix product measured in the same run.
#pragma once

#include <string>
#include <vector>

namespace flowloop {

struct BenchOptions {
  std::string size = "S";   // S, M or G
  int threads = 0;          // 0: all hardware threads
  int min_reps = 10;        // at least this many timed repetitions of each measurement
  double min_seconds = 1.0; // and at least this long in total
};

// Times one field evaluation (forward, and its vjp) against an sgemm of the
// MLP's shape (B*T, C) x (C, 4C), interleaving the two so that both see the same
// machine state. Returns one JSON object (as text) with size, ms_per_eval
// (median), gflops, gemm_gflops, ratio, vjp_ms, vjp_gflops and the shape.
std::string bench_field(const BenchOptions& opt);

// Median of a sample (by copy).
double median(std::vector<double> v);

}  // namespace flowloop
