// flowloop/train/data.hpp: training data. Built-in reasoning tasks generated on the fly
// from a seed (disjoint train and test sets, a difficulty knob, exact-match
// scoring on the answer tokens), and byte-level language modelling on text.
//
// Every batch is a function of (source, seed, split, batch index): a resumed run
// sees exactly the batches an uninterrupted one would.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "flowloop/nn/model.hpp"

namespace flowloop {

enum class Split { Train, Test };

// One example: the full sequence and which positions are answers.
struct Example {
  std::vector<int32_t> seq;     // (L)
  std::vector<char> is_answer;  // (L): 1 where seq holds an answer token
};

// A source of (tokens, targets) batches. tokens[t] = seq[t], targets[t] = seq[t+1]
// where seq[t+1] is scored (an answer token, or every byte for text), else -1.
class DataSource {
 public:
  virtual ~DataSource() = default;
  virtual std::string describe() const = 0;  // JSON: what regenerates this source
  virtual int vocab_size() const = 0;
  virtual int seq_len() const = 0;           // T of the batches (L - 1)
  virtual void batch(Split split, uint64_t index, int B, TokenBatch& tokens, TokenBatch& targets) const = 0;
  // true: accuracy is exact match of all answer tokens of a row; false: per-token
  virtual bool exact_match() const = 0;
};

// A built-in task: parity, phop, modarith or addition.
class Task : public DataSource {
 public:
  // Example number `index` of a split; splits are disjoint by content.
  virtual Example example(Split split, uint64_t index) const = 0;
  // The answer computed directly (brute force), for checks.
  virtual std::vector<int32_t> solve(const std::vector<int32_t>& question) const = 0;
  void batch(Split split, uint64_t index, int B, TokenBatch& tokens, TokenBatch& targets) const override;
  bool exact_match() const override { return true; }
};

struct TaskOptions {
  std::string name;
  uint64_t seed = 0;
  int n = 0;       // difficulty: sequence length / bits / operators / digits (0: task default)
  int hops = 0;    // phop: p (0: default 4)
  int prime = 0;   // modarith: the field's prime (0: default 7)
};
std::unique_ptr<Task> make_task(const TaskOptions& opt);
std::vector<std::string> task_names();

// Language modelling on a text file, split deterministically: the first 90% of its tokens
// train, the last 10% validate. Its bytes are the tokens (vocabulary 256), or, with a
// tokenizer (a tokenizer.json, or a model directory holding one: io/tokenizer.hpp), its ids
// (the tokenizer's vocabulary). "fortunes" names the collection installed by the fortunes
// package (all files, sorted, joined).
std::unique_ptr<DataSource> make_text_source(const std::string& path, int seq_len, uint64_t seed,
                                             const std::string& tokenizer = "");

// Loss, accuracy and depth statistics of a model on `batches` test batches.
struct EvalResult {
  double loss = 0, accuracy = 0;
  int64_t examples = 0;
  double nfe = 0;  // mean field evaluations per batch (a batch's depth: the most over its sequences)
  double exit_depth = 0;  // mean exit loop per token (early-exit evaluation), else 0
  // Over every test sequence: its evaluations (a loop: K), and their sum (the work).
  double nfe_mean = 0, nfe_p50 = 0, nfe_p90 = 0, nfe_max = 0;
  int64_t sequences = 0, seq_evals = 0;
  double wall_s = 0;
  // Sequences by how their solve ended: success, terminal, max_steps, step_too_small,
  // non_finite (SolveStatus order). A failed sequence is scored from its last
  // accepted state; `message` is the first failure's.
  std::array<int64_t, 5> status_counts{};
  std::string message;
  bool ok() const { return status_counts[2] + status_counts[3] + status_counts[4] == 0; }
  // "ok", or the worst status that occurred ("max_steps", ...).
  std::string status() const;
  // Throws Error with the first failure's message unless ok().
  void require_ok() const;
};

}  // namespace flowloop
