// flowloop/nn/config.hpp: the model's hyper-parameters, as stored in a checkpoint's
// "config" metadata (model-spec.md).
#pragma once

#include <string>

namespace flowloop {

struct ModelConfig {
  int vocab_size = 0;  // V
  int context = 0;     // Tmax
  int d_model = 0;     // C
  int n_head = 0;      // NH
  int d_ff = 0;        // F (0 when building means 4C)
  int n_block = 1;     // L, blocks inside one field evaluation
  int depth = 1;       // loop count the model was trained at (T1 of the ODE view)
  bool exit_gate = false;  // Ouro's learned exit gate (tensors exit_gate.weight (C), exit_gate.bias (1))
  // The time-conditioned field (model-spec.md): adaLN modulation of every block from a
  // sinusoidal embedding of tau = t * time_scale with time_freq (E) frequencies.
  bool time_cond = false;
  int time_freq = 256;      // E, even
  double time_scale = 0.0;  // 0 when building means 1000 / depth (filled by finalize)
  // Step-size conditioning (shortcut models; docs/checkpoint-format.md): the field also
  // takes each sequence's step d, embedded as t is (step_embed.mlp.*, added to c_b).
  // Needs time_cond. d = 0 is the instantaneous velocity, what every solver evaluates.
  bool step_cond = false;

  int head_dim() const { return d_model / n_head; }  // D

  // Fills d_ff = 4C when it is 0 and time_scale = 1000 / depth when it is 0, then
  // checks every field; throws Error naming the offending value.
  void finalize();
  void validate() const;
  // Limits of validate(): a checkpoint's config alone never asks for more than this.
  static constexpr int kMaxBlocks = 4096;
  static constexpr double kMaxParams = 68719476736.0;  // 2^36 (256 GiB of float)

  // JSON object with vocab_size, context, d_model, n_head, d_ff, n_block, depth
  // (and exit_gate, time_cond, time_freq, time_scale, step_cond when the model has them).
  std::string to_json() const;
  // Parses the JSON written by to_json; `where` names the source in errors. A
  // config without time_cond is autonomous; a time_cond one without time_scale
  // gets 1000 / depth.
  static ModelConfig from_json(const std::string& text, const std::string& where);

  // time_freq, time_scale and step_cond count only when time_cond.
  bool operator==(const ModelConfig& o) const;
};

// Sizes used by `bench` commands and performance claims (model-spec.md).
struct BenchSize {
  int B, T, C, NH, V, L;
};
BenchSize bench_size(const std::string& name);  // "S", "M" or "G"

}  // namespace flowloop
