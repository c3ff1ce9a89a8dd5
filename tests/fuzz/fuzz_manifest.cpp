// libFuzzer harness: the manifest of recorded latent trajectories (DATA/manifest.json,
// `flow-match record|train|eval`). Any input parses or raises flowloop::Error, and a
// manifest that parses names only files inside its directory.
#include <cstddef>
#include <cstdint>
#include <string>

#include "flowloop/train/flowmatch.hpp"
#include "flowloop/io/io.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace flowloop;
  try {
    const std::string text(reinterpret_cast<const char*>(data), size);
    const TrajectoryManifest m = TrajectoryManifest::parse(parse_json(text, "fuzz manifest"), "fuzz/manifest.json");
    for (const char* split : {"train", "test"})
      for (const auto& s : m.split(split))
        if (s.file.find('/') != std::string::npos || s.examples < 1) __builtin_trap();
    (void)m.to_json();
  } catch (const Error&) {
  }
  return 0;
}
