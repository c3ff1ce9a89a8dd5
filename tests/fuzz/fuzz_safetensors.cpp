// libFuzzer harness: the safetensors reader (checkpoints, trajectory shards). Any input
// either parses or raises flowloop::Error; a parsed file's F32/F64 tensors convert, and a
// checkpoint's config and tensors load as a model. Anything else (a crash, another
// exception, a sanitizer report, a leak) is a finding.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "flowloop/io/checkpoint.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace flowloop;
  try {
    const SafetensorsFile f = SafetensorsFile::parse(data, size, "fuzz.safetensors");
    for (const auto& [name, e] : f.tensors()) {
      if (e.dtype != "F32" && e.dtype != "F64") continue;
      size_t numel = 1;
      for (int64_t d : e.shape) numel *= static_cast<size_t>(d);
      std::vector<float> out(numel);
      f.copy_to(name, e.shape, out.data());
      std::vector<double> outd(numel);
      f.copy_to(name, e.shape, outd.data());
    }
    if (f.metadata().count("config")) (void)load_model<float>(f);
  } catch (const Error&) {
  }
  return 0;
}
