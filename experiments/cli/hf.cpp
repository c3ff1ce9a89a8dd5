// flowloop export-hf: a model written back as a Hugging Face directory (io/hf.hpp);
// flowloop tokenize: a text in a model's own tokens (io/tokenizer.hpp).
#include <iostream>

#include "cli.hpp"
#include "flowloop/io/hf.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/io/tokenizer.hpp"

namespace flowloop::cli {
namespace {
struct ExportArgs {
  std::string model, core_layers, out, precision = "f32";
  int unroll = 0;
};

template <class S>
void run(const ExportArgs& a) {
  const Model<S> m = load_any<S>(a.model, {a.core_layers});
  export_hf(m, a.out, a.unroll);
  const int K = a.unroll > 0 ? a.unroll : m.cfg.depth;
  json s = {{"written", a.out},
            {"layers", m.cfg.n_prelude + K * m.cfg.n_block + m.cfg.n_coda},
            {"core_copies", K},
            {"model_type", m.cfg.qkv_bias && !m.cfg.o_bias ? "qwen2" : "llama"}};
  std::cout << s.dump() << std::endl;
}
}  // namespace

Command register_export_hf(CLI::App& app) {
  auto a = std::make_shared<ExportArgs>();
  auto* c = app.add_subcommand("export-hf", "write a llama-family model as a Hugging Face directory transformers loads");
  add_model_flags(c, a->model, a->core_layers, "model .safetensors");
  c->add_option("--out", a->out, "the directory to write (config.json, model.safetensors)")->required();
  c->add_option("--unroll", a->unroll, "write a looped core K times in a row (the K-loop model as a plain stack)")
      ->check(CLI::PositiveNumber);
  c->add_option("--precision", a->precision, "the stored dtype: f32 or f64")
      ->check(CLI::IsMember({"f32", "f64"}))
      ->capture_default_str();
  return {c, [a] {
            if (a->precision == "f64")
              run<double>(*a);
            else
              run<float>(*a);
            return 0;
          }};
}

Command register_tokenize(CLI::App& app) {
  struct Args {
    std::string tokenizer, text, text_file, out;
    bool decode = false;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("tokenize", "a text in a model's own tokens (its tokenizer.json: byte-level BPE)");
  c->add_option("-m,--model,--tokenizer", a->tokenizer, "a tokenizer.json, or a Hugging Face directory holding one")
      ->required()
      ->check(CLI::ExistingPath);
  auto* text = c->add_option("--text", a->text, "the text");
  auto* file = c->add_option("--text-file", a->text_file, "a UTF-8 file, the text")->check(CLI::ExistingFile);
  text->excludes(file);
  c->add_option("-o,--output", a->out, "output JSON {\"tokens\": [[ids]]} (forward's --tokens); default: stdout");
  return {c, [a] {
            if (a->text.empty() == a->text_file.empty()) throw Error("tokenize: give --text TEXT or --text-file FILE");
            const std::string input = a->text_file.empty() ? a->text : read_text_file(a->text_file, "text");
            const Tokenizer tok = Tokenizer::from_file(a->tokenizer);
            const std::vector<int32_t> ids = tok.encode(input);
            json out = {{"tokens", json::array({ids})}, {"count", ids.size()}, {"vocab_size", tok.vocab_size()}};
            if (a->out.empty()) {
              std::cout << out.dump() << std::endl;
            } else {
              write_file_atomic(a->out, out.dump());
              std::cout << json({{"written", a->out}, {"count", ids.size()}}).dump() << std::endl;
            }
            return 0;
          }};
}

}  // namespace flowloop::cli
