// flowloop/study/compare.hpp: one trained model under many depth regimes, on the same
// test examples: looping K times, fixed-step and adaptive solves, batch-coupled
// steps, the exit gate, the ||dh|| exit and the terminal condition. The rows and
// their Pareto front (accuracy against mean evaluations) are what `flowloop
// compare` writes and notebooks/loop_vs_ode.ipynb plots.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "flowloop/nn/config.hpp"
#include "flowloop/train/data.hpp"
#include "flowloop/ode/depth.hpp"

namespace flowloop {

// A depth regime and how tokens may leave it early.
struct Regime {
  DepthSpec depth;
  std::string exit_rule;  // "" | "q" (the exit gate) | "delta" (||h_t - h_{t-1}|| < value); loops only
  double exit_value = 0;

  // Throws Error naming what does not fit: the spec (DepthSpec::validate), an exit
  // rule on a solve, q outside (0, 1], a gate the model lacks, delta <= 0.
  void validate(const ModelConfig& model) const;
  // The token parse() reads back: DepthSpec's token, then modifiers after '@':
  // "loop:4@q0.5", "loop:8@delta1", "dopri5:0.001@coupled", "dopri5:0.001@terminal0.01".
  std::string label() const;
  // "loop:K", "METHOD:N", "METHOD:RTOL" (DepthSpec::parse) with optional modifiers
  // "@coupled", "@terminalE", "@qQ", "@deltaD". Throws Error naming the token.
  static Regime parse(const std::string& token);
  // A comma-separated list.
  static std::vector<Regime> parse_list(const std::string& list);
};

// The default set for a model trained at depth D: loop K for K = 1..2D; euler,
// midpoint and rk4 with 1, 2, 4, 8, 16 steps; bosh3, dopri5 and tsit5 at rtol
// 1e-1..1e-6 (atol rtol/10), per sequence; dopri5 batch-coupled at the same
// tolerances; dopri5 1e-3 with the terminal condition ||f||/||h|| < 0.1, 0.03,
// 0.01; the ||dh|| exit on loop 2D at 0.5, 1, 2, 4; and, where the model has an
// exit gate, loop D with q = 0.1, 0.3, 0.5, 0.7, 0.9.
std::vector<Regime> default_regimes(const ModelConfig& model);

struct CompareRow {
  Regime regime;
  EvalResult result;
};

// Evaluates every regime, one after another, on test batches 0..batches-1 of the
// source (the same examples for all). Every regime is validated before any work.
// A regime whose solves fail is a row with its status; the others go on.
// progress(i, n, label) is called before regime i of n.
std::vector<CompareRow> compare_regimes(
    const Model<float>& model, const DataSource& data, const std::vector<Regime>& regimes, int batches,
    int batch_size, const std::function<void(size_t, size_t, const std::string&)>& progress = {});

// Rows on the Pareto front of accuracy (higher) against mean evaluations per
// sequence (lower), among rows without failed solves; indices by ascending nfe.
std::vector<size_t> pareto_front(const std::vector<CompareRow>& rows);

// The files: a header and one line per row (CSV), one JSON object per row with the
// resolved depth (JSON lines), the front (CSV, the same columns).
std::string compare_csv(const std::vector<CompareRow>& rows, const std::vector<size_t>& which);
std::string compare_jsonl(const std::vector<CompareRow>& rows, double trained_depth);
// Writes DIR/compare.csv, DIR/compare.jsonl and DIR/pareto.csv (atomically); returns the front.
std::vector<size_t> write_compare_files(const std::string& dir, const std::vector<CompareRow>& rows,
                                        double trained_depth);

}  // namespace flowloop
