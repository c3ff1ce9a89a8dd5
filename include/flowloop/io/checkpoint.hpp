// flowloop/io/checkpoint.hpp: safetensors files (8-byte little-endian header
// length, JSON header, raw little-endian data), with the tensor names, layouts
// and metadata of model-spec.md.
//
// Reading validates everything before any value is used; every fault raises
// Error with the file name and the problem (truncation, header length past the
// end, invalid JSON, bad or overlapping offsets, unknown dtype, missing tensor,
// shape disagreeing with the config). Writing is atomic (write_file_atomic of
// flowloop/io/io.hpp: a temporary file in the same directory, flushed, then renamed
// over the target).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "flowloop/nn/config.hpp"
#include "flowloop/nn/model.hpp"
#include "flowloop/nn/params.hpp"

namespace flowloop {

struct SafeTensorEntry {
  std::string dtype;           // "F32", "F64", ... as in the header
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets into the data section
};

// A parsed, validated safetensors file: read() maps the file into memory (nothing is copied
// until a tensor is asked for); parse() copies the bytes it is given.
class SafetensorsFile {
 public:
  static SafetensorsFile read(const std::string& path);
  // The same from the file's bytes in memory; `path` names it in errors.
  static SafetensorsFile parse(const uint8_t* bytes, size_t size, const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, SafeTensorEntry>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The metadata value of `key`; throws Error("<what> '<path>': metadata lacks "<key>"<hint>").
  const std::string& metadata_value(const std::string& key, const std::string& what,
                                    const std::string& hint = "") const;
  // Tensor `name`'s entry; throws Error if it is missing or of another shape.
  const SafeTensorEntry& require(const std::string& name, const std::vector<int64_t>& shape) const;
  // Copies tensor `name` into out (numel values), converting F32, F64, BF16 or F16 to S.
  // Throws if missing, of another dtype, or of another shape. A mapped file's pages of the
  // tensor are handed back to the system after the copy (they are not kept resident), so a
  // model loads tensor by tensor without a second full copy in memory.
  template <class S>
  void copy_to(const std::string& name, const std::vector<int64_t>& shape, S* out) const;
  // "checkpoint" (the default) or another word that names the file in errors.
  void set_kind(const std::string& kind) { kind_ = kind; }

 private:
  static SafetensorsFile parse_view(const uint8_t* bytes, size_t size, const std::string& path);
  std::string path_, kind_ = "checkpoint";
  std::shared_ptr<const void> hold_;  // the mapping or the copied bytes
  const uint8_t* data_ = nullptr;     // the data section
  size_t data_size_ = 0;
  bool mapped_ = false;
  std::map<std::string, SafeTensorEntry> tensors_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write: values are S (written as F32 for float, F64 for double).
template <class S>
struct TensorOut {
  std::string name;
  std::vector<int64_t> shape;
  const S* data;
};

template <class S>
void write_safetensors(const std::string& path, const std::vector<TensorOut<S>>& tensors,
                       const std::map<std::string, std::string>& metadata);

// Writes a buffer in the model layout (parameters, or gradients) under the
// checkpoint names, with metadata format = "flowloop" and config = cfg.to_json().
template <class S>
void save_checkpoint(const std::string& path, const ModelConfig& cfg, const ParamLayout& layout,
                     const S* buffer, std::map<std::string, std::string> extra_metadata = {});

// Reads the config from the metadata, then every tensor of the layout.
// Tensors of extra modules are ignored here (they stay readable through
// SafetensorsFile).
template <class S>
Model<S> load_model(const std::string& path);
// The same from a file already read (or parsed from memory).
template <class S>
Model<S> load_model(const SafetensorsFile& f);

}  // namespace flowloop
