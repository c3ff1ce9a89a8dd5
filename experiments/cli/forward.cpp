// flowloop forward: the logits of a model on token rows, looped or solved.
#include <iostream>

#include "cli.hpp"
#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/hf.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/nn/model.hpp"

namespace flowloop::cli {
namespace {

struct ForwardArgs {
  std::string model, core_layers, tokens, text, tokenizer, out, precision = "f32", device = "auto";
  DepthSpec depth;
  bool time_cond = false;
};

template <class S>
json logits_json(const Buffer<S>& logits, int B, int T, int V) {
  json out = json::array();
  for (int b = 0; b < B; ++b) {
    json rows = json::array();
    for (int t = 0; t < T; ++t) {
      const S* p = logits.data() + (static_cast<size_t>(b) * T + t) * V;
      rows.push_back(std::vector<S>(p, p + V));
    }
    out.push_back(std::move(rows));
  }
  return out;
}

template <class S>
int run(const ForwardArgs& a) {
  a.depth.validate();
  Model<S> model = load_any<S>(a.model, {a.core_layers});
  model.set_device(resolve_device(a.device));
  if (a.time_cond && !model.cfg.time_cond)
    throw Error("--time-cond: '" + a.model + "' has no time conditioning (init or train it with --time-cond)");
  const TokenBatch tokens = a.text.empty() ? read_token_file(a.tokens, "tokens")
                                           : text_tokens(a.text, a.tokenizer.empty() ? a.model : a.tokenizer);
  tokens.check(model.cfg, a.text.empty() ? "'" + a.tokens + "' tokens" : "the text's tokens");
  json out, summary = {{"written", a.out}, {"B", tokens.B}, {"T", tokens.T}};
  bool ok = true;
  if (!a.depth.ode()) {
    const int K = a.depth.loop_count(model.cfg.depth);
    LoopWork<S> w;
    const int nfe = model.loop_forward(tokens, K, w);
    out["logits"] = logits_json(w.readout.logits, tokens.B, tokens.T, model.cfg.vocab_size);
    out["nfe"] = nfe;
    out["loops"] = K;
    summary["loops"] = K;
    summary["nfe"] = nfe;
  } else {
    const SolveOptions o = a.depth.solve_options(model.cfg.depth);
    Buffer<S> h;
    ReadoutCache<S> rc;
    const SolveResult<S> r = model.ode_forward(tokens, o, h, rc);
    out = solve_json(r, o);
    out["logits"] = logits_json(rc.logits, tokens.B, tokens.T, model.cfg.vocab_size);
    for (const char* k : {"solver", "nfe", "steps", "accepted", "rejected", "status"}) summary[k] = out[k];
    ok = r.ok();
    if (!ok) std::cerr << "flowloop: solve failed: " << r.message << std::endl;
  }
  out["depth"] = json::parse(a.depth.to_json(model.cfg.depth));
  out["B"] = tokens.B;
  out["T"] = tokens.T;
  out["V"] = model.cfg.vocab_size;
  out["device"] = device_name(model.device());
  summary["device"] = device_name(model.device());
  write_file_atomic(a.out, out.dump());
  std::cout << summary.dump() << std::endl;
  return ok ? 0 : 3;
}

}  // namespace

Command register_forward(CLI::App& app) {
  auto a = std::make_shared<ForwardArgs>();
  auto* c = app.add_subcommand("forward", "logits of a model on token rows, looped or as an ODE");
  add_model_flags(c, a->model, a->core_layers, "model .safetensors");
  auto* tok = c->add_option("--tokens", a->tokens, "JSON file {\"tokens\": [[...], ...]}")->check(CLI::ExistingFile);
  auto* text = c->add_option("--text", a->text, "a text, one row, in the model's own tokens (its tokenizer.json)");
  c->add_option("--tokenizer", a->tokenizer, "the tokenizer.json (or its directory) for --text (default: the model's)")
      ->check(CLI::ExistingPath);
  tok->excludes(text);
  add_depth_flags(c, a->depth);
  add_device_flag(c, a->device);
  c->add_flag("--time-cond", a->time_cond, "require a time-conditioned model (error if it has none)");
  c->add_option("--precision", a->precision, "arithmetic")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();
  c->add_option("-o,--output", a->out, "output JSON {logits, nfe, depth}")->required();
  return {c, [a] {
            if (a->tokens.empty() == a->text.empty()) throw Error("forward: give --tokens FILE or --text TEXT");
            return a->precision == "f32" ? run<float>(*a) : run<double>(*a);
          }};
}

}  // namespace flowloop::cli
