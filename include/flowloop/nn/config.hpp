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

  // The block's family (model-families.md). "gpt2": model-spec.md's block (LayerNorm, learned
  // positions wpe, GELU MLP, a fused biased QKV, the head tied to wte). "llama": the Llama /
  // Qwen2 layer (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, the biases
  // below, a tied or untied head, a final RMSNorm without bias).
  std::string arch = "gpt2";
  // llama only:
  int n_kv_head = 0;           // key/value heads, dividing n_head (0 when building means n_head)
  int d_head = 0;              // a head's width D (0 when building means d_model / n_head)
  double norm_eps = 1e-5;      // RMSNorm's eps, inside the square root
  double rope_theta = 10000.0;
  double rope_fraction = 1.0;  // the rotated share of a head's dims (partial rotary)
  bool rope_interleaved = false;  // pairs (2i, 2i+1) instead of rotate-half's (i, i + rot/2)
  bool qkv_bias = false;       // biases on q, k and v (Qwen2; Llama's attention_bias)
  bool o_bias = false;         // a bias on the output projection (Llama's attention_bias)
  bool mlp_bias = false;       // biases on gate, up and down (Llama's mlp_bias)
  bool tie_head = true;        // the head reads wte; false: its own lm_head.weight (V, C)
  // Layers run once before the recurrent core (the prelude) and after it (the coda), of the
  // same block as the core's n_block (model-families.md's structure). gpt2 has none.
  int n_prelude = 0, n_coda = 0;
  // llama only: an RMSNorm (weight field.norm.weight, eps norm_eps) at the end of every step of
  // the core: F(h) = norm(core(h)), f = F(h) - h (Ouro's loop; the final norm stays in the readout)
  bool core_norm = false;

  bool llama() const { return arch == "llama"; }
  int head_dim() const { return d_head > 0 ? d_head : d_model / n_head; }  // D
  int kv_heads() const { return n_kv_head > 0 ? n_kv_head : n_head; }    // NKV
  int rotary_dims() const;  // the rotated dims of a head: D rope_fraction, rounded down to even
  int n_layers() const { return n_prelude + n_block + n_coda; }

  // Fills d_ff = 4C when it is 0 and time_scale = 1000 / depth when it is 0, then
  // checks every field; throws Error naming the offending value.
  void finalize();
  void validate() const;
  // Limits of validate(): a checkpoint's config alone never asks for more than this.
  static constexpr int kMaxBlocks = 4096;
  static constexpr double kMaxParams = 68719476736.0;  // 2^36 (256 GiB of float)

  // JSON object with vocab_size, context, d_model, n_head, d_ff, n_block, depth
  // (and exit_gate, time_cond, time_freq, time_scale, step_cond when the model has them;
  // arch and the llama keys for a llama model).
  std::string to_json() const;
  // Parses the JSON written by to_json; `where` names the source in errors. A
  // config without time_cond is autonomous; a time_cond one without time_scale
  // gets 1000 / depth.
  static ModelConfig from_json(const std::string& text, const std::string& where);

  // time_freq, time_scale and step_cond count only when time_cond; the llama keys only for llama.
  bool operator==(const ModelConfig& o) const;
};

// Sizes used by `bench` commands and performance claims (model-spec.md).
struct BenchSize {
  int B, T, C, NH, V, L;
};
BenchSize bench_size(const std::string& name);  // "S", "M" or "G"

}  // namespace flowloop
