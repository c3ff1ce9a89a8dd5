// libFuzzer harness: the tokens JSON ({"tokens": [[...], ...]}, `--tokens`), then the
// check against a model's vocabulary and context. Any input parses or raises
// flowloop::Error.
#include <cstddef>
#include <cstdint>
#include <string>

#include "flowloop/nn/model.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace flowloop;
  ModelConfig cfg;
  cfg.vocab_size = 50;
  cfg.context = 16;
  cfg.d_model = 8;
  cfg.n_head = 2;
  cfg.finalize();
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (const char* key : {"tokens", "targets"}) {
    try {
      const TokenBatch b = parse_token_json(text, key, "fuzz.json");
      if (b.data.size() != static_cast<size_t>(b.B) * static_cast<size_t>(b.T)) __builtin_trap();
      b.check(cfg, key, std::string(key) == "targets");
    } catch (const Error&) {
    }
  }
  return 0;
}
