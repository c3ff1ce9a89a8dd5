#include "flowloop/io/hf.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "flowloop/core/tensor.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/io.hpp"

namespace fs = std::filesystem;

namespace flowloop {

namespace {

using nlohmann::json;


// "a:b" into [a, b) within L layers.
std::pair<int, int> parse_core_layers(const std::string& spec, int L) {
  const auto colon = spec.find(':');
  auto bad = [&](const std::string& why) {
    return Error("--core-layers '" + spec + "': " + why + " (expected a:b with 0 <= a < b <= " + std::to_string(L) +
                 ", the model's num_hidden_layers)");
  };
  if (colon == std::string::npos) throw bad("no ':'");
  int a = 0, b = 0;
  try {
    size_t pa = 0, pb = 0;
    a = std::stoi(spec.substr(0, colon), &pa);
    b = std::stoi(spec.substr(colon + 1), &pb);
    if (pa != colon || pb != spec.size() - colon - 1) throw bad("not two integers");
  } catch (const std::logic_error&) {
    throw bad("not two integers");
  }
  if (a < 0 || b > L || a >= b) throw bad("out of range");
  return {a, b};
}

// flowloop's names within a llama block and the Hugging Face ones.
const std::vector<std::pair<std::string, std::string>>& block_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"attn_norm.weight", "input_layernorm.weight"},
      {"attn.q_proj.weight", "self_attn.q_proj.weight"},
      {"attn.k_proj.weight", "self_attn.k_proj.weight"},
      {"attn.v_proj.weight", "self_attn.v_proj.weight"},
      {"attn.q_proj.bias", "self_attn.q_proj.bias"},
      {"attn.k_proj.bias", "self_attn.k_proj.bias"},
      {"attn.v_proj.bias", "self_attn.v_proj.bias"},
      {"attn.o_proj.weight", "self_attn.o_proj.weight"},
      {"attn.o_proj.bias", "self_attn.o_proj.bias"},
      {"mlp_norm.weight", "post_attention_layernorm.weight"},
      {"mlp.gate_proj.weight", "mlp.gate_proj.weight"},
      {"mlp.up_proj.weight", "mlp.up_proj.weight"},
      {"mlp.gate_proj.bias", "mlp.gate_proj.bias"},
      {"mlp.up_proj.bias", "mlp.up_proj.bias"},
      {"mlp.down_proj.weight", "mlp.down_proj.weight"},
      {"mlp.down_proj.bias", "mlp.down_proj.bias"}};
  return names;
}

// A block tensor of a stack: which stack, its layer there, and its Hugging Face name within
// a layer (model.layers.N.<hf>); absent for the embedding, the final norm and the head.
struct BlockTensor {
  FieldPart part;
  int layer;
  std::string hf;
};
std::optional<BlockTensor> block_tensor(const std::string& name) {
  for (const auto& [part, prefix] : {std::pair{FieldPart::prelude, std::string("prelude.h.")},
                                     {FieldPart::core, std::string("field.h.")},
                                     {FieldPart::coda, std::string("coda.h.")}}) {
    if (name.rfind(prefix, 0) != 0) continue;
    const size_t dot = name.find('.', prefix.size());
    const std::string rest = name.substr(dot + 1);
    for (const auto& [ours, theirs] : block_names())
      if (rest == ours) return BlockTensor{part, std::stoi(name.substr(prefix.size(), dot - prefix.size())), theirs};
  }
  return std::nullopt;
}

// The weight map of an index file: tensor name -> shard file name, refusing a tensor named
// twice (a JSON object's repeated key, which a plain parse would silently collapse).
std::map<std::string, std::string> read_index(const std::string& path) {
  const std::string text = read_text_file(path, "index");
  std::string top;  // the current key of the top-level object
  std::set<std::string> seen;
  auto cb = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key) {
      const std::string k = parsed.get<std::string>();
      if (depth == 1) top = k;
      if (depth == 2 && top == "weight_map" && !seen.insert(k).second)
        throw Error("index '" + path + "': weight_map names tensor '" + k + "' twice");
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text, cb);
  } catch (const json::exception& e) {
    throw Error("index '" + path + "': invalid JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw Error("index '" + path + "': no \"weight_map\" object");
  std::map<std::string, std::string> map;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string())
      throw Error("index '" + path + "': weight_map entry '" + it.key() + "' is not a file name");
    const std::string file = it.value().get<std::string>();
    if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
      throw Error("index '" + path + "': weight_map entry '" + it.key() + "' names '" + file +
                  "', not a file of the directory");
    map[it.key()] = file;
  }
  return map;
}

}  // namespace

bool is_hf_dir(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec) && fs::is_regular_file(fs::path(path) / "config.json", ec);
}

ModelConfig hf_config(const std::string& text, const std::string& where, const LoadOptions& opt) {
  const json j = parse_json(text, where);
  if (!j.is_object()) throw Error(where + ": not a JSON object");
  auto has = [&](const char* k) { return j.contains(k) && !j[k].is_null(); };
  const std::string type = has("model_type") && j["model_type"].is_string() ? j["model_type"].get<std::string>() : "";
  if (type != "llama" && type != "qwen2")
    throw Error(where + ": model_type " + (has("model_type") ? j["model_type"].dump() : std::string("(absent)")) +
                " is not supported (flowloop reads llama and qwen2)");
  auto integer = [&](const char* k, int dflt, bool required) {
    if (!has(k)) {
      if (required) throw Error(where + ": lacks \"" + k + "\"");
      return dflt;
    }
    if (!j[k].is_number_integer() || j[k].get<int64_t>() <= 0 || j[k].get<int64_t>() > (int64_t{1} << 30))
      throw Error(where + ": \"" + k + "\" must be a positive integer, not " + j[k].dump());
    return static_cast<int>(j[k].get<int64_t>());
  };
  auto real = [&](const char* k, double dflt) {
    if (!has(k)) return dflt;
    if (!j[k].is_number()) throw Error(where + ": \"" + k + "\" must be a number, not " + j[k].dump());
    return j[k].get<double>();
  };
  auto flag = [&](const char* k, bool dflt) {
    if (!has(k)) return dflt;
    if (!j[k].is_boolean()) throw Error(where + ": \"" + k + "\" must be true or false, not " + j[k].dump());
    return j[k].get<bool>();
  };
  ModelConfig c;
  c.arch = "llama";
  c.vocab_size = integer("vocab_size", 0, true);
  c.d_model = integer("hidden_size", 0, true);
  c.d_ff = integer("intermediate_size", 0, true);
  const int L = integer("num_hidden_layers", 0, true);
  c.n_head = integer("num_attention_heads", 0, true);
  c.n_kv_head = integer("num_key_value_heads", c.n_head, false);
  c.context = integer("max_position_embeddings", type == "qwen2" ? 32768 : 2048, false);
  const int D = integer("head_dim", c.d_model / c.n_head, false);
  if (D != c.d_model / c.n_head || c.d_model % c.n_head != 0) {
    if (type == "qwen2")
      throw Error(where + ": \"head_dim\" " + std::to_string(D) + " differs from hidden_size / num_attention_heads, "
                  "which qwen2 does not support");
    c.d_head = D;
  }
  c.norm_eps = real("rms_norm_eps", 1e-6);
  c.rope_theta = real("rope_theta", 10000.0);
  if (has("rope_scaling")) {
    const json& rs = j["rope_scaling"];
    std::string kind = "(not an object)";
    if (rs.is_object()) {
      kind = rs.contains("rope_type") ? rs["rope_type"].dump() : rs.contains("type") ? rs["type"].dump() : "(none)";
      if (kind == "\"default\"") kind.clear();
    }
    if (!kind.empty())
      throw Error(where + ": \"rope_scaling\" of type " + kind + " is not supported (" + rs.dump() +
                  "; flowloop takes plain rotary embeddings: rope_scaling null)");
  }
  if (has("partial_rotary_factor") && real("partial_rotary_factor", 1.0) != 1.0)
    throw Error(where + ": \"partial_rotary_factor\" " + j["partial_rotary_factor"].dump() +
                " is not supported for model_type " + type);
  if (has("hidden_act") && j["hidden_act"] != "silu")
    throw Error(where + ": \"hidden_act\" " + j["hidden_act"].dump() + " is not supported (the SwiGLU MLP is silu's)");
  if (type == "qwen2") {
    if (flag("use_sliding_window", false))
      throw Error(where + ": \"use_sliding_window\" true: sliding-window attention is not supported");
    c.qkv_bias = true;
  } else {
    c.qkv_bias = c.o_bias = flag("attention_bias", false);
    c.mlp_bias = flag("mlp_bias", false);
  }
  c.tie_head = flag("tie_word_embeddings", false);
  c.depth = 1;
  if (opt.core_layers.empty()) {
    c.n_block = L;
  } else {
    const auto [a, b] = parse_core_layers(opt.core_layers, L);
    c.n_prelude = a;
    c.n_block = b - a;
    c.n_coda = L - b;
  }
  try {
    c.finalize();
  } catch (const Error& e) {
    throw Error(where + ": " + e.what());
  }
  return c;
}

std::string hf_tensor_name(const ModelConfig& cfg, const std::string& name) {
  if (name == "wte.weight") return "model.embed_tokens.weight";
  if (name == "ln_f.weight") return "model.norm.weight";
  if (name == "lm_head.weight") return "lm_head.weight";
  if (const auto b = block_tensor(name)) {
    const int base = b->part == FieldPart::prelude ? 0
                     : b->part == FieldPart::core  ? cfg.n_prelude
                                                   : cfg.n_prelude + cfg.n_block;
    return "model.layers." + std::to_string(base + b->layer) + "." + b->hf;
  }
  throw Error("no Hugging Face name for tensor '" + name + "' (a " + cfg.arch + " model's)");
}

template <class S>
Model<S> load_hf(const std::string& dir, const LoadOptions& opt) {
  const fs::path root(dir);
  const std::string cfg_path = (root / "config.json").string();
  const ModelConfig cfg = hf_config(read_text_file(cfg_path, "config"), "config '" + cfg_path + "'", opt);
  // the files: one model.safetensors, or the shards of the index
  std::map<std::string, std::string> where;  // tensor -> file
  std::map<std::string, SafetensorsFile> files;
  const fs::path index = root / "model.safetensors.index.json";
  std::error_code ec;
  if (fs::is_regular_file(index, ec)) {
    where = read_index(index.string());
    std::set<std::string> shards;
    for (const auto& kv : where) shards.insert(kv.second);
    for (const std::string& s : shards)
      if (!fs::is_regular_file(root / s, ec))
        throw Error("index '" + index.string() + "' names shard '" + s + "', which the directory lacks");
  } else if (!fs::is_regular_file(root / "model.safetensors", ec)) {
    throw Error("'" + dir + "' has neither model.safetensors nor model.safetensors.index.json");
  }
  auto file = [&](const std::string& name) -> const SafetensorsFile& {
    std::string f = "model.safetensors";
    if (!where.empty()) {
      auto it = where.find(name);
      if (it == where.end())
        throw Error("index '" + index.string() + "': weight_map has no tensor '" + name + "'");
      f = it->second;
    }
    auto it = files.find(f);
    if (it == files.end()) {
      SafetensorsFile sf = SafetensorsFile::read((root / f).string());
      sf.set_kind("Hugging Face shard");
      it = files.emplace(f, std::move(sf)).first;
      // a shard's tensor that its index places elsewhere (or names twice) is a malformed checkpoint
      for (const auto& kv : it->second.tensors())
        if (!where.empty() && where.count(kv.first) && where.at(kv.first) != f)
          throw Error("shard '" + (root / f).string() + "' holds tensor '" + kv.first + "', which the index places in '" +
                      where.at(kv.first) + "'");
    }
    return it->second;
  };
  // every tensor present with its shape before the model's memory is taken
  const ParamLayout layout(cfg);
  for (const auto& t : layout.tensors()) {
    const std::string n = hf_tensor_name(cfg, t.name);
    file(n).require(n, t.shape);
  }
  Model<S> m(cfg);
  for (const auto& t : m.layout.tensors()) {
    const std::string n = hf_tensor_name(cfg, t.name);
    file(n).copy_to(n, t.shape, m.params.data() + t.offset);
  }
  return m;
}

template <class S>
Model<S> load_any(const std::string& path, const LoadOptions& opt) {
  if (is_hf_dir(path)) return load_hf<S>(path, opt);
  std::error_code ec;
  if (fs::is_directory(path, ec))
    throw Error("'" + path + "' is a directory without config.json (neither a flowloop checkpoint nor a Hugging Face "
                "model)");
  if (!opt.core_layers.empty())
    throw Error("--core-layers '" + opt.core_layers + "' applies to a Hugging Face directory; '" + path +
                "' is a flowloop checkpoint, whose structure its config fixes");
  return load_model<S>(path);
}

template <class S>
void export_hf(const Model<S>& m, const std::string& dir, int unroll) {
  const ModelConfig& c = m.cfg;
  auto refuse = [&](const std::string& why) {
    throw Error("export-hf: transformers cannot express this model: " + why);
  };
  if (!c.llama()) refuse("its block is gpt2's (LayerNorm, learned positions); export-hf writes llama and qwen2");
  if (c.exit_gate) refuse("it has an exit gate");
  if (c.core_norm) refuse("its core ends every step with a norm (core_norm)");
  if (c.rope_interleaved) refuse("its rotary embeddings are interleaved (llama and qwen2 rotate halves)");
  if (c.rotary_dims() != c.head_dim()) refuse("its rotary embeddings turn part of each head (rope_fraction)");
  if (c.o_bias && !c.qkv_bias) refuse("an o_proj bias without q/k/v biases");
  const bool qwen2 = c.qkv_bias && !c.o_bias;
  if (qwen2 && c.mlp_bias) refuse("MLP biases beside q/k/v biases only");
  if (qwen2 && c.head_dim() * c.n_head != c.d_model) refuse("a head width other than d_model / n_head with q/k/v biases only");
  const int K = unroll > 0 ? unroll : c.depth;
  if (unroll <= 0 && c.depth != 1)
    throw Error("export-hf: the core is looped " + std::to_string(c.depth) +
                " times (depth); a Hugging Face model runs each layer once: give --unroll K to write the core K times");
  ModelConfig flat = c;  // the written model: prelude, K copies of the core, coda, in one stack
  flat.n_prelude = flat.n_coda = 0;
  flat.n_block = c.n_prelude + K * c.n_block + c.n_coda;
  flat.depth = 1;
  flat.validate();
  json j = {{"architectures", {qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
            {"model_type", qwen2 ? "qwen2" : "llama"},
            {"vocab_size", c.vocab_size},
            {"hidden_size", c.d_model},
            {"intermediate_size", c.d_ff},
            {"num_hidden_layers", flat.n_block},
            {"num_attention_heads", c.n_head},
            {"num_key_value_heads", c.kv_heads()},
            {"max_position_embeddings", c.context},
            {"rms_norm_eps", c.norm_eps},
            {"rope_theta", c.rope_theta},
            {"rope_scaling", nullptr},
            {"hidden_act", "silu"},
            {"tie_word_embeddings", c.tie_head},
            {"torch_dtype", sizeof(S) == 4 ? "float32" : "float64"},
            {"attention_dropout", 0.0}};
  if (!qwen2) {
    j["attention_bias"] = c.qkv_bias;
    j["mlp_bias"] = c.mlp_bias;
    j["head_dim"] = c.head_dim();
  } else {
    j["use_sliding_window"] = false;
  }
  // tensors by Hugging Face name: a layer of the stack from its flowloop tensor
  std::vector<TensorOut<S>> ts;
  const S* P = m.params.data();
  auto add = [&](const std::string& name, const TensorInfo& t) { ts.push_back({name, t.shape, P + t.offset}); };
  for (const auto& t : m.layout.tensors()) {
    const auto b = block_tensor(t.name);
    if (!b) {  // the embedding, the final norm, the head
      add(hf_tensor_name(c, t.name), t);
      continue;
    }
    // the stack prelude, K copies of the core, coda
    const bool core = b->part == FieldPart::core;
    const int base = b->part == FieldPart::prelude ? 0 : core ? c.n_prelude : c.n_prelude + K * c.n_block;
    for (int k = 0; k < (core ? K : 1); ++k)
      add("model.layers." + std::to_string(base + k * c.n_block + b->layer) + "." + b->hf, t);
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error("export-hf: cannot create '" + dir + "': " + ec.message());
  write_safetensors((fs::path(dir) / "model.safetensors").string(), ts, {{"format", "pt"}});
  write_file_atomic((fs::path(dir) / "config.json").string(), j.dump(2) + "\n");
}

#define FLOWLOOP_HF(S)                                                      \
  template Model<S> load_hf<S>(const std::string&, const LoadOptions&);     \
  template Model<S> load_any<S>(const std::string&, const LoadOptions&);    \
  template void export_hf<S>(const Model<S>&, const std::string&, int);
FLOWLOOP_HF(float)
FLOWLOOP_HF(double)

}  // namespace flowloop
