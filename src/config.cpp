#include "flowloop/nn/config.hpp"

#include <cmath>
#include <nlohmann/json.hpp>

#include "flowloop/io/io.hpp"
#include "flowloop/core/tensor.hpp"

namespace flowloop {

void ModelConfig::finalize() {
  if (d_ff == 0) d_ff = 4 * d_model;
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
  if (d_model % n_head != 0)
    throw Error("config: d_model (" + std::to_string(d_model) + ") is not divisible by n_head (" +
                std::to_string(n_head) + ")");
  if (time_freq <= 0 || time_freq % 2 != 0)
    throw Error("config: time_freq must be positive and even, got " + std::to_string(time_freq));
  if (!std::isfinite(time_scale) || time_scale < 0.0 || (time_cond && time_scale == 0.0))
    throw Error("config: time_scale must be finite and positive, got " + std::to_string(time_scale) +
                (time_scale == 0.0 ? " (finalize() fills 1000 / depth)" : ""));
  if (step_cond && !time_cond)
    throw Error("config: step_cond (step-size conditioning) needs time_cond");
  if (n_block > kMaxBlocks)
    throw Error("config: n_block must be at most " + std::to_string(kMaxBlocks) + ", got " + std::to_string(n_block));
  // the parameter count (ParamLayout's tensors), in double: no product can overflow here
  const double V = vocab_size, Tm = context, C = d_model, F = d_ff, E = time_freq;
  const double block = 4 * C * C + 4 * C + 2 * F * C + F + 5 * C + (time_cond ? 6 * C * C + 6 * C : 0);
  const double embed = C * E + C * C + 2 * C;
  const double count = (V + Tm) * C + n_block * block + (time_cond ? embed : 0) + (step_cond ? embed : 0) + 2 * C +
                       (exit_gate ? C + 1 : 0);
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
  if (auto it = j.find("exit_gate"); it != j.end()) {
    if (!it->is_boolean()) throw Error(where + ": config \"exit_gate\" is not a boolean");
    c.exit_gate = it->get<bool>();
  }
  if (auto it = j.find("time_cond"); it != j.end()) {
    if (!it->is_boolean()) throw Error(where + ": config \"time_cond\" is not a boolean");
    c.time_cond = it->get<bool>();
  }
  if (auto it = j.find("step_cond"); it != j.end()) {
    if (!it->is_boolean()) throw Error(where + ": config \"step_cond\" is not a boolean");
    c.step_cond = it->get<bool>();
  }
  get("time_freq", c.time_freq, false);
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
         (!time_cond || (time_freq == o.time_freq && time_scale == o.time_scale && step_cond == o.step_cond));
}

BenchSize bench_size(const std::string& name) {
  if (name == "S") return {4, 64, 128, 4, 256, 1};
  if (name == "M") return {8, 128, 256, 8, 256, 1};
  if (name == "G") return {32, 512, 1024, 16, 512, 1};
  throw Error("unknown benchmark size '" + name + "' (expected S, M or G)");
}

}  // namespace flowloop
