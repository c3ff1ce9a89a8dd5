// flowloop export-hf: a model written back as a Hugging Face directory (io/hf.hpp).
#include <iostream>

#include "cli.hpp"
#include "flowloop/io/hf.hpp"

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

}  // namespace flowloop::cli
