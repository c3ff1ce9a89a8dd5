#include "flowloop/nn/params.hpp"

#include <cmath>

#include "flowloop/core/tensor.hpp"

namespace flowloop {

size_t ParamLayout::add(const std::string& name, std::vector<int64_t> shape) {
  TensorInfo t;
  t.name = name;
  t.numel = 1;
  for (auto s : shape) t.numel *= static_cast<size_t>(s);
  t.shape = std::move(shape);
  t.offset = size_;
  size_ += t.numel;
  tensors_.push_back(std::move(t));
  return tensors_.back().offset;
}

const char* part_name(FieldPart p) {
  switch (p) {
    case FieldPart::prelude: return "prelude";
    case FieldPart::core: return "core";
    case FieldPart::coda: return "coda";
  }
  return "?";
}

BlockOffsets ParamLayout::add_block(const ModelConfig& cfg, const std::string& p) {
  const int64_t C = cfg.d_model, F = cfg.d_ff;
  BlockOffsets b{};
  if (cfg.llama()) {
    const int64_t Q = int64_t{cfg.n_head} * cfg.head_dim(), KV = int64_t{cfg.kv_heads()} * cfg.head_dim();
    b.ln1_w = add(p + "attn_norm.weight", {C});
    b.attn_w = add(p + "attn.q_proj.weight", {Q, C});
    add(p + "attn.k_proj.weight", {KV, C});
    add(p + "attn.v_proj.weight", {KV, C});
    if (cfg.qkv_bias) {
      b.attn_b = add(p + "attn.q_proj.bias", {Q});
      add(p + "attn.k_proj.bias", {KV});
      add(p + "attn.v_proj.bias", {KV});
    }
    b.aproj_w = add(p + "attn.o_proj.weight", {C, Q});
    if (cfg.o_bias) b.aproj_b = add(p + "attn.o_proj.bias", {C});
    b.ln2_w = add(p + "mlp_norm.weight", {C});
    b.fc_w = add(p + "mlp.gate_proj.weight", {F, C});
    add(p + "mlp.up_proj.weight", {F, C});
    if (cfg.mlp_bias) {
      b.fc_b = add(p + "mlp.gate_proj.bias", {F});
      add(p + "mlp.up_proj.bias", {F});
    }
    b.mproj_w = add(p + "mlp.down_proj.weight", {C, F});
    if (cfg.mlp_bias) b.mproj_b = add(p + "mlp.down_proj.bias", {C});
    return b;
  }
  b.ln1_w = add(p + "ln_1.weight", {C});
  b.ln1_b = add(p + "ln_1.bias", {C});
  b.attn_w = add(p + "attn.c_attn.weight", {3 * C, C});
  b.attn_b = add(p + "attn.c_attn.bias", {3 * C});
  b.aproj_w = add(p + "attn.c_proj.weight", {C, C});
  b.aproj_b = add(p + "attn.c_proj.bias", {C});
  b.ln2_w = add(p + "ln_2.weight", {C});
  b.ln2_b = add(p + "ln_2.bias", {C});
  b.fc_w = add(p + "mlp.c_fc.weight", {F, C});
  b.fc_b = add(p + "mlp.c_fc.bias", {F});
  b.mproj_w = add(p + "mlp.c_proj.weight", {C, F});
  b.mproj_b = add(p + "mlp.c_proj.bias", {C});
  return b;
}

ParamLayout::ParamLayout(const ModelConfig& cfg) {
  cfg.validate();
  const int64_t V = cfg.vocab_size, Tm = cfg.context, C = cfg.d_model;
  wte_ = add("wte.weight", {V, C});
  if (!cfg.llama()) {
    has_wpe_ = true;
    wpe_ = add("wpe.weight", {Tm, C});
  }
  auto stack = [&](FieldPart part, const char* prefix, int n) {
    auto& range = part_range_[static_cast<int>(part)];
    range[0] = size_;
    for (int i = 0; i < n; ++i) {
      const std::string p = std::string(prefix) + std::to_string(i) + ".";
      BlockOffsets b = add_block(cfg, p);
      if (part == FieldPart::core && cfg.time_cond) {
        b.ada_w = add(p + "ada.weight", {6 * C, C});
        b.ada_b = add(p + "ada.bias", {6 * C});
      }
      parts_[static_cast<int>(part)].push_back(b);
    }
    range[1] = size_;
  };
  stack(FieldPart::prelude, "prelude.h.", cfg.n_prelude);
  field_begin_ = size_;
  stack(FieldPart::core, "field.h.", cfg.n_block);
  blocks_ = parts_[static_cast<int>(FieldPart::core)];
  if (cfg.core_norm) core_norm_ = add("field.norm.weight", {C});
  // the time (and step) embedding: mlp.0 (C, E), mlp.2 (C, C), each with its bias
  auto embed = [&](const std::string& p, TimeEmbedOffsets& o) {
    const int64_t E = cfg.time_freq;
    o.w1 = add(p + ".mlp.0.weight", {C, E});
    o.b1 = add(p + ".mlp.0.bias", {C});
    o.w2 = add(p + ".mlp.2.weight", {C, C});
    o.b2 = add(p + ".mlp.2.bias", {C});
  };
  if (cfg.time_cond) embed("time_embed", time_embed_);
  if (cfg.step_cond) embed("step_embed", step_embed_);
  field_end_ = size_;
  part_range_[static_cast<int>(FieldPart::core)][1] = field_end_;
  stack(FieldPart::coda, "coda.h.", cfg.n_coda);
  lnf_w_ = add("ln_f.weight", {C});
  if (!cfg.llama()) {
    has_lnf_b_ = true;
    lnf_b_ = add("ln_f.bias", {C});
  }
  head_ = wte_;
  if (!cfg.tie_head) head_ = add("lm_head.weight", {V, C});
  if (cfg.exit_gate) {
    gate_w_ = add("exit_gate.weight", {C});
    gate_b_ = add("exit_gate.bias", {1});
  }
}

const TensorInfo* ParamLayout::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

const TensorInfo& ParamLayout::at(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) throw Error("unknown parameter tensor '" + name + "'");
  return *t;
}

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }
}  // namespace

template <class S>
void init_gpt2(S* params, const ParamLayout& layout, const ModelConfig& cfg, uint64_t seed) {
  Rng rng(seed);
  Rng time_rng(seed ^ 0x74696d655f656d62ULL);  // time_embed's own stream ("time_emb")
  Rng step_rng(seed ^ 0x737465705f656d62ULL);  // step_embed's own stream ("step_emb")
  const double proj_std = 0.02 / std::sqrt(2.0 * (double(cfg.n_block) * cfg.depth + cfg.n_prelude + cfg.n_coda));
  for (const auto& t : layout.tensors()) {
    S* p = params + t.offset;
    const bool is_ln = t.name.find("ln_") != std::string::npos || ends_with(t.name, "norm.weight");
    if (ends_with(t.name, ".bias") || ends_with(t.name, ".ada.weight")) {  // ada: zero modulation
      for (size_t i = 0; i < t.numel; ++i) p[i] = S(0);
    } else if (starts_with(t.name, "time_embed.")) {
      for (size_t i = 0; i < t.numel; ++i) p[i] = static_cast<S>(0.02 * time_rng.normal());
    } else if (starts_with(t.name, "step_embed.")) {
      for (size_t i = 0; i < t.numel; ++i) p[i] = static_cast<S>(0.02 * step_rng.normal());
    } else if (is_ln) {
      for (size_t i = 0; i < t.numel; ++i) p[i] = S(1);
    } else {
      const bool residual = ends_with(t.name, "c_proj.weight") || ends_with(t.name, "o_proj.weight") ||
                            ends_with(t.name, "down_proj.weight");
      const double sd = residual ? proj_std : 0.02;
      for (size_t i = 0; i < t.numel; ++i) p[i] = static_cast<S>(sd * rng.normal());
    }
  }
}

template void init_gpt2<float>(float*, const ParamLayout&, const ModelConfig&, uint64_t);
template void init_gpt2<double>(double*, const ParamLayout&, const ModelConfig&, uint64_t);

}  // namespace flowloop
