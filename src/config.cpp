#include "flowloop/nn/config.hpp"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "flowloop/io/io.hpp"
#include "flowloop/core/tensor.hpp"

namespace flowloop {

int ModelConfig::rotary_dims() const {
  const int D = head_dim();
  return std::max(2, static_cast<int>(std::floor(D * rope_fraction + 1e-9)) / 2 * 2);
}

void ModelConfig::finalize() {
  if (d_ff == 0) d_ff = 4 * d_model;
  if (llama() && n_kv_head == 0) n_kv_head = n_head;
  if (time_scale == 0.0 && depth > 0) time_scale = 1000.0 / depth;
  validate();
}

void ModelConfig::validate() const {
  auto positive = [](int v, const char* name) {
    if (v <= 0) throw Error(std::string("config: ") + name + " must be positive, got " + std::to_string(v));
  };
  positive(vocab_size, "vocab_size");
  positive(context, "context");
  positive(d_model, "d_model");
  positive(n_head, "n_head");
  positive(d_ff, "d_ff");
  positive(n_block, "n_block");
  positive(depth, "depth");
  if (arch != "gpt2" && arch != "llama")
    throw Error("config: unknown arch '" + arch + "' (expected gpt2 or llama)");
  if (!llama() && (n_kv_head != 0 || d_head != 0 || qkv_bias || o_bias ||
                   mlp_bias || !tie_head || core_norm))
    throw Error("config: n_kv_head, d_head, the llama biases, an untied head and a core norm need arch llama");
  if (n_prelude < 0 || n_coda < 0)
    throw Error("config: n_prelude and n_coda must be >= 0, got " + std::to_string(n_prelude) + " and " +
                std::to_string(n_coda));
  if (d_head == 0 && d_model % n_head != 0)
    throw Error("config: d_model (" + std::to_string(d_model) + ") is not divisible by n_head (" +
                std::to_string(n_head) + ")");
  if (llama()) {
    if (d_head < 0) throw Error("config: d_head must be positive, got " + std::to_string(d_head));
    if (n_kv_head < 0 || (n_kv_head > 0 && n_head % n_kv_head != 0))
      throw Error("config: n_kv_head (" + std::to_string(n_kv_head) + ") must divide n_head (" +
                  std::to_string(n_head) + ")");
    if (!(norm_eps > 0.0) || !std::isfinite(norm_eps))
      throw Error("config: norm_eps must be finite and positive, got " + std::to_string(norm_eps));
    if (!(rope_theta > 1.0) || !std::isfinite(rope_theta))
      throw Error("config: rope_theta must be finite and above 1, got " + std::to_string(rope_theta));
    if (!(rope_fraction > 0.0 && rope_fraction <= 1.0))
      throw Error("config: rope_fraction must be in (0, 1], got " + std::to_string(rope_fraction));
    if (head_dim() < 2) throw Error("config: a head must have at least 2 dims to rotate");
    if (time_cond) throw Error("config: time_cond is not available for arch llama (the adaLN block is gpt2's)");
  }
  if (time_freq <= 0 || time_freq % 2 != 0)
    throw Error("config: time_freq must be positive and even, got " + std::to_string(time_freq));
  if (!std::isfinite(time_scale) || time_scale < 0.0 || (time_cond && time_scale == 0.0))
    throw Error("config: time_scale must be finite and positive, got " + std::to_string(time_scale) +
                (time_scale == 0.0 ? " (finalize() fills 1000 / depth)" : ""));
  if (step_cond && !time_cond)
    throw Error("config: step_cond (step-size conditioning) needs time_cond");
  if (n_layers() > kMaxBlocks)
    throw Error("config: n_block must be at most " + std::to_string(kMaxBlocks) + ", got " + std::to_string(n_block) +
                (n_prelude || n_coda ? " (with n_prelude " + std::to_string(n_prelude) + " and n_coda " +
                                           std::to_string(n_coda) + " added)"
                                     : std::string()));
  // the parameter count (ParamLayout's tensors), in double: no product can overflow here
  const double V = vocab_size, Tm = context, C = d_model, F = d_ff, E = time_freq;
  const double Q = static_cast<double>(n_head) * head_dim(), KV = static_cast<double>(kv_heads()) * head_dim();
  const double block = llama() ? (Q + 2 * KV) * C + Q * C + 3 * F * C + 2 * C + (qkv_bias ? Q + 2 * KV : 0) +
                                     (o_bias ? C : 0) + (mlp_bias ? 2 * F + C : 0)
                               : 4 * C * C + 4 * C + 2 * F * C + F + 5 * C + (time_cond ? 6 * C * C + 6 * C : 0);
  const double embed = C * E + C * C + 2 * C;
  const double count = (llama() ? (tie_head ? V : 2 * V) * C + C + (core_norm ? C : 0) : (V + Tm) * C + 2 * C) +
                       n_layers() * block +
                       (time_cond ? embed : 0) + (step_cond ? embed : 0) + (exit_gate ? C + 1 : 0);
  if (count > kMaxParams)
    throw Error("config: the model would hold " + std::to_string(count) + " parameters, more than " +
                std::to_string(kMaxParams) + " (vocab_size, context, d_model, d_ff, n_block)");
}

std::string ModelConfig::to_json() const {
  nlohmann::ordered_json j;
  j["vocab_size"] = vocab_size;
  j["context"] = context;
  j["d_model"] = d_model;
  j["n_head"] = n_head;
  j["d_ff"] = d_ff;
  j["n_block"] = n_block;
  j["depth"] = depth;
  if (exit_gate) j["exit_gate"] = true;
  if (time_cond) {
    j["time_cond"] = true;
    j["time_freq"] = time_freq;
    j["time_scale"] = time_scale;
    if (step_cond) j["step_cond"] = true;
  }
  if (llama()) {
    j["arch"] = arch;
    j["n_kv_head"] = kv_heads();
    if (d_head > 0) j["d_head"] = d_head;
    j["norm_eps"] = norm_eps;
    j["rope_theta"] = rope_theta;
    if (rope_fraction != 1.0) j["rope_fraction"] = rope_fraction;
    if (rope_interleaved) j["rope_interleaved"] = true;
    if (qkv_bias) j["qkv_bias"] = true;
    if (o_bias) j["o_bias"] = true;
    if (mlp_bias) j["mlp_bias"] = true;
    j["tie_head"] = tie_head;
    if (n_prelude) j["n_prelude"] = n_prelude;
    if (n_coda) j["n_coda"] = n_coda;
    if (core_norm) j["core_norm"] = true;
  }
  return j.dump();
}

ModelConfig ModelConfig::from_json(const std::string& text, const std::string& where) {
  const nlohmann::json j = parse_json(text, where + ": config");
  if (!j.is_object()) throw Error(where + ": config is not a JSON object");
  ModelConfig c;
  auto get = [&](const char* key, int& dst, bool required) {
    auto it = j.find(key);
    if (it == j.end()) {
      if (required) throw Error(where + ": config lacks \"" + key + "\"");
      return;
    }
    if (!it->is_number_integer())
      throw Error(where + ": config \"" + key + "\" is not an integer");
    const auto v = it->get<int64_t>();
    if (v <= 0 || v > (int64_t{1} << 30))
      throw Error(where + ": config \"" + key + "\" out of range: " + std::to_string(v));
    dst = static_cast<int>(v);
  };
  get("vocab_size", c.vocab_size, true);
  get("context", c.context, true);
  get("d_model", c.d_model, true);
  get("n_head", c.n_head, true);
  get("d_ff", c.d_ff, true);
  get("n_block", c.n_block, true);
  get("depth", c.depth, false);
  auto flag = [&](const char* key, bool& dst) {
    if (auto it = j.find(key); it != j.end()) {
      if (!it->is_boolean()) throw Error(where + ": config \"" + key + "\" is not a boolean");
      dst = it->get<bool>();
    }
  };
  flag("exit_gate", c.exit_gate);
  flag("time_cond", c.time_cond);
  flag("step_cond", c.step_cond);
  get("time_freq", c.time_freq, false);
  auto real = [&](const char* key, double& dst) {
    if (auto it = j.find(key); it != j.end()) {
      if (!it->is_number()) throw Error(where + ": config \"" + key + "\" is not a number");
      dst = it->get<double>();
    }
  };
  auto count = [&](const char* key, int& dst) {  // may be 0
    if (auto it = j.find(key); it != j.end()) {
      if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > (int64_t{1} << 30))
        throw Error(where + ": config \"" + key + "\" must be a non-negative integer, got " + it->dump());
      dst = static_cast<int>(it->get<int64_t>());
    }
  };
  if (auto it = j.find("arch"); it != j.end()) {
    if (!it->is_string()) throw Error(where + ": config \"arch\" is not a string");
    c.arch = it->get<std::string>();
  }
  count("n_kv_head", c.n_kv_head);
  count("d_head", c.d_head);
  count("n_prelude", c.n_prelude);
  count("n_coda", c.n_coda);
  real("norm_eps", c.norm_eps);
  real("rope_theta", c.rope_theta);
  real("rope_fraction", c.rope_fraction);
  flag("rope_interleaved", c.rope_interleaved);
  flag("qkv_bias", c.qkv_bias);
  flag("o_bias", c.o_bias);
  flag("mlp_bias", c.mlp_bias);
  flag("tie_head", c.tie_head);
  flag("core_norm", c.core_norm);
  if (auto it = j.find("time_scale"); it != j.end()) {
    if (!it->is_number()) throw Error(where + ": config \"time_scale\" is not a number");
    c.time_scale = it->get<double>();
    if (!(c.time_scale > 0.0) || !std::isfinite(c.time_scale))
      throw Error(where + ": config \"time_scale\" must be finite and positive, got " + it->dump());
  } else if (c.depth > 0) {
    c.time_scale = 1000.0 / c.depth;  // the default, as finalize() fills it
  }
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(where + ": " + e.what());
  }
  return c;
}

bool ModelConfig::operator==(const ModelConfig& o) const {
  return vocab_size == o.vocab_size && context == o.context && d_model == o.d_model &&
         n_head == o.n_head && d_ff == o.d_ff && n_block == o.n_block && depth == o.depth &&
         exit_gate == o.exit_gate && time_cond == o.time_cond &&
         (!time_cond || (time_freq == o.time_freq && time_scale == o.time_scale && step_cond == o.step_cond)) &&
         arch == o.arch &&
         (!llama() || (kv_heads() == o.kv_heads() && head_dim() == o.head_dim() && norm_eps == o.norm_eps &&
                       rope_theta == o.rope_theta && rope_fraction == o.rope_fraction &&
                       rope_interleaved == o.rope_interleaved && qkv_bias == o.qkv_bias && o_bias == o.o_bias &&
                       mlp_bias == o.mlp_bias && tie_head == o.tie_head && n_prelude == o.n_prelude &&
                       n_coda == o.n_coda && core_norm == o.core_norm));
}

BenchSize bench_size(const std::string& name) {
  if (name == "S") return {4, 64, 128, 4, 256, 1};
  if (name == "M") return {8, 128, 256, 8, 256, 1};
  if (name == "G") return {32, 512, 1024, 16, 512, 1};
  throw Error("unknown benchmark size '" + name + "' (expected S, M or G)");
}

}  // namespace flowloop
