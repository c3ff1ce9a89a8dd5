// flowloop/nn/params.hpp: every parameter of a model lives in one flat buffer with
// named views; gradients use the same layout (same offsets), so optimizers,
// finite-difference checks and the ODE's parameter adjoint loop over one vector.
//
// Order in the buffer: wte, wpe (gpt2), prelude.h.* (n_prelude), field.h.0.* ...
// field.h.{L-1}.* (each block ending with ada.weight, ada.bias when the config has
// time_cond), then time_embed.mlp.* (time_cond), coda.h.* (n_coda), ln_f.*, lm_head.weight
// (an untied head), then the exit gate (exit_gate.weight, exit_gate.bias) when the config has
// one. The field's parameters, time conditioning included, form one contiguous range
// [field_begin, field_end); the prelude's and the coda's theirs (part_begin, part_end).
//
// A llama block's tensors (prefix P = prelude.h.i., field.h.i. or coda.h.i.):
//   P attn_norm.weight (C); P attn.{q,k,v}_proj.weight (NH D, C), (NKV D, C), (NKV D, C), then
//   their biases (qkv_bias); P attn.o_proj.weight (C, NH D) [and bias (C), o_bias];
//   P mlp_norm.weight (C); P mlp.{gate,up}_proj.weight (F, C) [and biases, mlp_bias];
//   P mlp.down_proj.weight (C, F) [and bias]. q, k and v (and gate and up) lie back to back,
//   so that one product computes them: BlockOffsets' attn_w is q's, fc_w gate's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "flowloop/nn/config.hpp"

namespace flowloop {

struct TensorInfo {
  std::string name;            // checkpoint name, e.g. "field.h.0.attn.c_attn.weight"
  std::vector<int64_t> shape;  // e.g. {3C, C}
  size_t offset = 0;           // element offset into the flat buffer
  size_t numel = 0;
};

// Offsets of one block's tensors inside the flat buffer. A llama block uses ln1_w (attn_norm),
// attn_w/attn_b ([q | k | v] and their biases), aproj_w/aproj_b (o_proj), ln2_w (mlp_norm),
// fc_w/fc_b ([gate | up]) and mproj_w/mproj_b (down_proj); an absent bias stays 0.
struct BlockOffsets {
  size_t ln1_w, ln1_b;      // (C), (C)
  size_t attn_w, attn_b;    // (3C, C), (3C)
  size_t aproj_w, aproj_b;  // (C, C), (C)
  size_t ln2_w, ln2_b;      // (C), (C)
  size_t fc_w, fc_b;        // (F, C), (F)
  size_t mproj_w, mproj_b;  // (C, F), (C)
  size_t ada_w = 0, ada_b = 0;  // (6C, C), (6C): time_cond only
};

// Offsets of the time embedding's MLP (time_cond only), and of the step embedding's
// (step_embed.mlp.*, the same shapes; step_cond only).
struct TimeEmbedOffsets {
  size_t w1 = 0, b1 = 0;  // time_embed.mlp.0: (C, E), (C)
  size_t w2 = 0, b2 = 0;  // time_embed.mlp.2: (C, C), (C)
};

// The three stacks of blocks (model-families.md): run once before the loop, the loop's body
// (the field), run once after it.
enum class FieldPart { prelude, core, coda };
const char* part_name(FieldPart p);  // "prelude", "core", "coda"

class ParamLayout {
 public:
  explicit ParamLayout(const ModelConfig& cfg);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo& at(const std::string& name) const;  // throws Error if unknown
  const TensorInfo* find(const std::string& name) const;
  size_t size() const { return size_; }

  const BlockOffsets& block(int i) const { return blocks_.at(static_cast<size_t>(i)); }  // core's
  const std::vector<BlockOffsets>& blocks(FieldPart p) const { return parts_[static_cast<int>(p)]; }
  size_t part_begin(FieldPart p) const { return part_range_[static_cast<int>(p)][0]; }
  size_t part_end(FieldPart p) const { return part_range_[static_cast<int>(p)][1]; }
  size_t wte() const { return wte_; }
  bool has_wpe() const { return has_wpe_; }
  size_t wpe() const { return wpe_; }  // has_wpe() only
  size_t lnf_w() const { return lnf_w_; }
  bool has_lnf_b() const { return has_lnf_b_; }
  size_t lnf_b() const { return lnf_b_; }  // has_lnf_b() only
  size_t head() const { return head_; }
  size_t core_norm() const { return core_norm_; }  // field.norm.weight (config core_norm)    // the readout's (V, C) weight: lm_head's, or wte's when tied
  size_t gate_w() const { return gate_w_; }  // exit gate (when the config has one)
  size_t gate_b() const { return gate_b_; }
  const TimeEmbedOffsets& time_embed() const { return time_embed_; }  // time_cond only
  const TimeEmbedOffsets& step_embed() const { return step_embed_; }  // step_cond only
  size_t field_begin() const { return field_begin_; }
  size_t field_end() const { return field_end_; }

 private:
  size_t add(const std::string& name, std::vector<int64_t> shape);
  std::vector<TensorInfo> tensors_;
  BlockOffsets add_block(const ModelConfig& cfg, const std::string& prefix);
  std::vector<BlockOffsets> blocks_;
  std::vector<BlockOffsets> parts_[3];
  size_t part_range_[3][2] = {{0, 0}, {0, 0}, {0, 0}};
  bool has_wpe_ = false, has_lnf_b_ = false;
  size_t head_ = 0, core_norm_ = 0;
  TimeEmbedOffsets time_embed_, step_embed_;
  size_t gate_w_ = 0, gate_b_ = 0;
  size_t size_ = 0, wte_ = 0, wpe_ = 0, lnf_w_ = 0, lnf_b_ = 0, field_begin_ = 0, field_end_ = 0;
};

// GPT-2 initialisation: Linear and embedding weights N(0, 0.02), residual
// projections (attn.c_proj, mlp.c_proj; a llama block's o_proj and down_proj) N(0, 0.02 /
// sqrt(2 * (n_block * depth + n_prelude + n_coda))), biases 0, LayerNorm and RMSNorm weights 1
// and biases 0. Deterministic in `seed`.
// Time conditioning: time_embed's weights N(0, 0.02) from a stream of their own
// (so every other tensor is drawn as in the same model without it), ada zero: a
// freshly initialised time_cond model computes the autonomous field. step_embed's
// weights likewise come from a stream of their own.
template <class S>
void init_gpt2(S* params, const ParamLayout& layout, const ModelConfig& cfg, uint64_t seed);

}  // namespace flowloop
