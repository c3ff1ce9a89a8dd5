// libFuzzer harness: a Hugging Face config.json (hf_config, with and without --core-layers)
// and a tokenizer.json (Tokenizer::parse, then encoding a multilingual text and decoding it
// back). The first byte picks which. Any input parses or raises flowloop::Error.
#include <cstddef>
#include <cstdint>
#include <string>

#include "flowloop/io/hf.hpp"
#include "flowloop/io/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace flowloop;
  if (size < 1) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    for (const char* core : {"", "1:2"}) {
      try {
        const ModelConfig c = hf_config(text, "fuzz config.json", LoadOptions{core});
        if (c.n_prelude + c.n_block + c.n_coda <= 0 || !c.llama()) __builtin_trap();
        ParamLayout layout(c);  // a config that validates lays out
      } catch (const Error&) {
      }
    }
    return 0;
  }
  try {
    const Tokenizer tok = Tokenizer::parse(text, "fuzz tokenizer.json");
    const std::vector<int32_t> ids = tok.encode("It's 2026: naïve café, 123 🙂 loops\n\n  <|endoftext|> Ωμέγα");
    for (int32_t id : ids)
      if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
    tok.decode(ids);
  } catch (const Error&) {
  }
  return 0;
}
