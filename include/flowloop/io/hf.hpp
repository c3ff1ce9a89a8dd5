// flowloop/io/hf.hpp: Hugging Face checkpoints of the Llama family (model_type llama and
// qwen2): a directory with config.json and model.safetensors, or shards listed by
// model.safetensors.index.json. Loaded into the general structure of nn/model.hpp, and
// written back (export_hf) in the layout transformers reads.
//
// Loading maps every file (BF16, F16, F32 or F64 tensors, converted to the compute
// precision one tensor at a time, each one's pages handed back after its copy: no second
// full copy in memory). Everything is checked before the model's memory is taken: the
// config keys (an unsupported rope_scaling, sliding-window attention, an activation other
// than silu, an unknown model_type are refused, naming the key and its value), the index (a
// shard it names but the directory lacks, a tensor named twice), and every tensor's presence
// and shape. Nothing is partly loaded.
#pragma once

#include <string>

#include "flowloop/nn/config.hpp"
#include "flowloop/nn/model.hpp"

namespace flowloop {

struct LoadOptions {
  // "a:b": a Hugging Face model's layers [a, b) become the recurrent core (the retrofitting
  // experiment), the layers before it the prelude and those after it the coda, each run once.
  // Empty: every layer is the core. Either way the model's depth is 1: looped once (Euler,
  // dt = 1 on [0, 1]) it is the checkpoint's own forward.
  std::string core_layers;
};

// A directory that holds a config.json (what every -m takes for a Hugging Face checkpoint).
bool is_hf_dir(const std::string& path);

// The flowloop config of a Hugging Face config.json's object; `where` names it in errors.
ModelConfig hf_config(const std::string& config_json, const std::string& where, const LoadOptions& opt = {});

// The Hugging Face name of a flowloop tensor of cfg (model.layers.N.self_attn.q_proj.weight, ...);
// layer N counts the prelude's layers, then the core's, then the coda's.
std::string hf_tensor_name(const ModelConfig& cfg, const std::string& name);

template <class S>
Model<S> load_hf(const std::string& dir, const LoadOptions& opt = {});

// A flowloop checkpoint (a .safetensors file) or a Hugging Face directory.
template <class S>
Model<S> load_any(const std::string& path, const LoadOptions& opt = {});

// Writes m as a Hugging Face directory (config.json, model.safetensors in F32 or F64) that
// transformers' LlamaForCausalLM (or Qwen2ForCausalLM, for q/k/v biases without others)
// loads. A looped core (depth > 1) is written `unroll` times in a row, as the K-times
// unrolled stack (the same logits as K loops); without unroll it is refused. Refuses what
// transformers cannot express: a gpt2 block, time conditioning, an exit gate, interleaved
// rotary, an o_proj bias without q/k/v biases. Files are written atomically.
template <class S>
void export_hf(const Model<S>& m, const std::string& dir, int unroll = 0);

}  // namespace flowloop
