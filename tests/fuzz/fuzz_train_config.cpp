// libFuzzer harness: the training configurations (`train --config`, `flow-match train
// --config`) and a model's config JSON. Any input parses or raises flowloop::Error; a
// configuration that parses and validates writes JSON that reads back to the same one.
#include <cstddef>
#include <cstdint>
#include <string>

#include "flowloop/nn/config.hpp"
#include "flowloop/train/flowmatch_train.hpp"
#include "flowloop/train/train.hpp"

namespace {
template <class Config>
void round_trip(const std::string& text) {
  try {
    const Config c = Config::from_json(text, "fuzz.json");
    c.validate();
    const std::string once = c.to_json();
    if (Config::from_json(once, "fuzz.json (written)").to_json() != once) __builtin_trap();
  } catch (const flowloop::Error&) {
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  round_trip<flowloop::TrainConfig>(text);
  round_trip<flowloop::FlowMatchConfig>(text);
  round_trip<flowloop::ModelConfig>(text);
  return 0;
}
