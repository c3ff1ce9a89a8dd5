// Helpers shared by the training tests (test_train, test_dist): a tiny p-hop run and its
// metrics.
#pragma once

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "flowloop/train/train.hpp"

namespace flowloop::test {

// p-hop (10 symbols, 2 hops), d_model 16, looped twice; 24 steps of batch 8, evaluated
// and checkpointed every 8, into `out`.
inline TrainConfig tiny_config(const std::string& out) {
  TrainConfig c;
  c.task = "phop";
  c.task_n = 10;
  c.task_hops = 2;
  c.d_model = 16;
  c.n_head = 2;
  c.depth.loops = 2;
  c.steps = 24;
  c.batch = 8;
  c.warmup = 4;
  c.eval_every = 8;
  c.eval_batches = 2;
  c.checkpoint_every = 8;
  c.seed = 3;
  c.out = out;
  return c;
}

// DIR/metrics.jsonl, a line each.
inline std::vector<nlohmann::json> read_metrics(const std::filesystem::path& dir) {
  std::vector<nlohmann::json> v;
  std::ifstream in(dir / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) v.push_back(nlohmann::json::parse(line));
  return v;
}

}  // namespace flowloop::test
