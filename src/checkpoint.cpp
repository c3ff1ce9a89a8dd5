#include "flowloop/io/checkpoint.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string_view>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flowloop/io/io.hpp"
#include "flowloop/core/tensor.hpp"

namespace flowloop {

namespace {

constexpr uint64_t kMaxHeader = uint64_t{100} << 20;  // 100 MiB, the safetensors limit

int dtype_size(const std::string& d) {
  static const std::map<std::string, int> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I16", 2},
      {"U16", 2},  {"F16", 2}, {"BF16", 2}, {"I32", 4},    {"U32", 4},     {"F32", 4},
      {"I64", 8},  {"U64", 8}, {"F64", 8}};
  auto it = sizes.find(d);
  return it == sizes.end() ? 0 : it->second;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

uint64_t read_u64le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

namespace {
// A read-only private mapping of a whole file, unmapped when the last holder goes.
struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr) munmap(addr, size);
  }
};
}  // namespace

SafetensorsFile SafetensorsFile::read(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error("checkpoint '" + path + "': cannot open: " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error("checkpoint '" + path + "': cannot stat: " + std::strerror(err));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {  // (an empty file cannot be mapped) parse names the truncation
    ::close(fd);
    const uint8_t none[8] = {};
    return parse(none, size, path);
  }
  auto map = std::make_shared<Mapping>();
  map->addr = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map->addr == MAP_FAILED) {
    map->addr = nullptr;
    throw Error("checkpoint '" + path + "': cannot map " + std::to_string(size) + " bytes: " + std::strerror(errno));
  }
  map->size = size;
  SafetensorsFile f = parse_view(static_cast<const uint8_t*>(map->addr), size, path);
  f.hold_ = map;
  f.mapped_ = true;
  return f;
}

SafetensorsFile SafetensorsFile::parse(const uint8_t* bytes, size_t size, const std::string& path) {
  SafetensorsFile f = parse_view(bytes, size, path);
  // a copy of the data section, held by the file object
  auto copy = std::make_shared<std::vector<uint8_t>>(f.data_, f.data_ + f.data_size_);
  f.data_ = copy->data();
  f.hold_ = copy;
  return f;
}

SafetensorsFile SafetensorsFile::parse_view(const uint8_t* bytes, size_t size, const std::string& path) {
  auto fail = [&](const std::string& msg) { return Error("checkpoint '" + path + "': " + msg); };
  if (size < 8)
    throw fail("truncated: " + std::to_string(size) + " bytes, fewer than the 8-byte header length");
  const uint64_t hlen = read_u64le(bytes);
  if (hlen > size - 8)
    throw fail("header length " + std::to_string(hlen) + " runs past the end of the file (" +
               std::to_string(size) + " bytes)");
  if (hlen > kMaxHeader) throw fail("header length " + std::to_string(hlen) + " exceeds 100 MiB");
  const std::string header(reinterpret_cast<const char*>(bytes) + 8, hlen);
  SafetensorsFile f;
  f.path_ = path;
  f.data_ = bytes + 8 + hlen;
  f.data_size_ = size - 8 - hlen;

  const nlohmann::json j = parse_json(header, "checkpoint '" + path + "': header");
  if (!j.is_object()) throw fail("header is not a JSON object");
  const uint64_t dsize = f.data_size_;
  std::vector<std::pair<std::string, SafeTensorEntry>> order;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw fail("__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw fail("__metadata__ value '" + m.key() + "' is not a string");
        f.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "': ";
    if (!v.is_object()) throw fail(where + "entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) throw fail(where + "no dtype string");
    if (!v.contains("shape") || !v["shape"].is_array()) throw fail(where + "no shape array");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      throw fail(where + "data_offsets is not a pair");
    SafeTensorEntry e;
    e.dtype = v["dtype"].get<std::string>();
    const int es = dtype_size(e.dtype);
    if (es == 0) throw fail(where + "unknown dtype '" + e.dtype + "'");
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) throw fail(where + "shape entries must be non-negative integers");
      const auto x = d.get<uint64_t>();
      if (x > (uint64_t{1} << 40) || (x && numel > (uint64_t{1} << 40) / x))
        throw fail(where + "shape " + v["shape"].dump() + " is too large");
      numel *= x;
      e.shape.push_back(static_cast<int64_t>(x));
    }
    for (const auto& d : v["data_offsets"])
      if (!d.is_number_unsigned()) throw fail(where + "data_offsets must be non-negative integers");
    e.begin = v["data_offsets"][0].get<uint64_t>();
    e.end = v["data_offsets"][1].get<uint64_t>();
    if (e.begin > e.end)
      throw fail(where + "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] are reversed");
    if (e.end > dsize)
      throw fail(where + "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                 "] run past the end of the data section (" + std::to_string(dsize) +
                 " bytes; is the file truncated?)");
    if (e.end - e.begin != numel * static_cast<uint64_t>(es))
      throw fail(where + "data_offsets span " + std::to_string(e.end - e.begin) + " bytes but shape " +
                 shape_str(e.shape) + " of " + e.dtype + " needs " + std::to_string(numel * es));
    order.emplace_back(name, e);
  }
  std::sort(order.begin(), order.end(),
            [](const auto& a, const auto& b) { return a.second.begin < b.second.begin; });
  for (size_t i = 1; i < order.size(); ++i)
    if (order[i].second.begin < order[i - 1].second.end)
      throw fail("tensors '" + order[i - 1].first + "' and '" + order[i].first +
                 "' overlap in the data section");
  for (auto& kv : order) f.tensors_.emplace(kv.first, kv.second);
  return f;
}

const std::string& SafetensorsFile::metadata_value(const std::string& key, const std::string& what,
                                                   const std::string& hint) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) throw Error(what + " '" + path_ + "': metadata lacks \"" + key + "\"" + hint);
  return it->second;
}

const SafeTensorEntry& SafetensorsFile::require(const std::string& name, const std::vector<int64_t>& shape) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(kind_ + " '" + path_ + "': missing tensor '" + name + "'");
  const SafeTensorEntry& e = it->second;
  if (e.shape != shape)
    throw Error(kind_ + " '" + path_ + "': tensor '" + name + "' has shape " + shape_str(e.shape) +
                " but the config implies " + shape_str(shape));
  return e;
}

namespace {
// bfloat16: the upper half of a float32.
float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
// IEEE binary16, exactly (subnormals, infinities and NaN included).
float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man 2^-24
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  uint32_t u;
  if (exp == 31)
    u = sign | 0x7f800000u | (man << 13);
  else
    u = sign | (static_cast<uint32_t>(exp - 15 + 127) << 23) | (man << 13);
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
template <class S, class Src, class Conv>
void convert(S* out, const uint8_t* src, size_t numel, Conv conv) {
  for (size_t i = 0; i < numel; ++i) {
    Src v;
    std::memcpy(&v, src + sizeof(Src) * i, sizeof(Src));
    out[i] = static_cast<S>(conv(v));
  }
}
}  // namespace

template <class S>
void SafetensorsFile::copy_to(const std::string& name, const std::vector<int64_t>& shape,
                              S* out) const {
  const SafeTensorEntry& e = require(name, shape);
  const uint8_t* src = data_ + e.begin;
  size_t numel = 1;
  for (auto s : shape) numel *= static_cast<size_t>(s);
  if (e.dtype == "F32")
    convert<S, float>(out, src, numel, [](float v) { return v; });
  else if (e.dtype == "F64")
    convert<S, double>(out, src, numel, [](double v) { return v; });
  else if (e.dtype == "BF16")
    convert<S, uint16_t>(out, src, numel, bf16_to_float);
  else if (e.dtype == "F16")
    convert<S, uint16_t>(out, src, numel, f16_to_float);
  else
    throw Error(kind_ + " '" + path_ + "': tensor '" + name + "' has dtype " + e.dtype +
                "; only F32, F64, BF16 and F16 are supported");
  if (mapped_ && e.end > e.begin) {  // the tensor's whole pages go back to the system
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(src) + page - 1) / page * page;
    const uintptr_t hi = reinterpret_cast<uintptr_t>(src + (e.end - e.begin)) / page * page;
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  }
}

template <class S>
void write_safetensors(const std::string& path, const std::vector<TensorOut<S>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const char* dtype = sizeof(S) == 4 ? "F32" : "F64";
  nlohmann::ordered_json h;
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& kv : metadata) m[kv.first] = kv.second;
    h["__metadata__"] = m;
  }
  uint64_t off = 0;
  for (const auto& t : tensors) {
    uint64_t numel = 1;
    for (auto s : t.shape) numel *= static_cast<uint64_t>(s);
    h[t.name] = {{"dtype", dtype}, {"shape", t.shape}, {"data_offsets", {off, off + numel * sizeof(S)}}};
    off += numel * sizeof(S);
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');  // align the data section to 8 bytes
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>((header.size() >> (8 * i)) & 0xff);

  std::vector<std::string_view> parts = {{reinterpret_cast<const char*>(len), 8}, header};
  for (const auto& t : tensors) {
    size_t numel = 1;
    for (auto s : t.shape) numel *= static_cast<size_t>(s);
    parts.emplace_back(reinterpret_cast<const char*>(t.data), numel * sizeof(S));  // little-endian hosts only
  }
  write_file_atomic(path, parts);
}

template <class S>
void save_checkpoint(const std::string& path, const ModelConfig& cfg, const ParamLayout& layout,
                     const S* buffer, std::map<std::string, std::string> extra_metadata) {
  std::vector<TensorOut<S>> ts;
  for (const auto& t : layout.tensors()) ts.push_back({t.name, t.shape, buffer + t.offset});
  extra_metadata["format"] = "flowloop";
  extra_metadata["config"] = cfg.to_json();
  write_safetensors(path, ts, extra_metadata);
}

template <class S>
Model<S> load_model(const std::string& path) {
  return load_model<S>(SafetensorsFile::read(path));
}

template <class S>
Model<S> load_model(const SafetensorsFile& f) {
  const std::string& path = f.path();
  auto fmt = f.metadata().find("format");
  if (fmt != f.metadata().end() && fmt->second != "flowloop")
    throw Error("checkpoint '" + path + "': metadata format is '" + fmt->second + "', expected 'flowloop'");
  auto cfg_it = f.metadata().find("config");
  if (cfg_it == f.metadata().end())
    throw Error("checkpoint '" + path + "': __metadata__ has no \"config\"");
  const ModelConfig cfg = ModelConfig::from_json(cfg_it->second, "checkpoint '" + path + "'");
  // every tensor is there with its shape before the model's memory is taken (a config
  // alone does not decide how much is allocated)
  const ParamLayout layout(cfg);
  for (const auto& t : layout.tensors()) f.require(t.name, t.shape);
  Model<S> m(cfg);
  for (const auto& t : m.layout.tensors()) f.copy_to(t.name, t.shape, m.params.data() + t.offset);
  return m;
}

#define FLOWLOOP_CKPT(S)                                                                     \
  template void SafetensorsFile::copy_to<S>(const std::string&, const std::vector<int64_t>&, \
                                            S*) const;                                       \
  template void write_safetensors<S>(const std::string&, const std::vector<TensorOut<S>>&,   \
                                     const std::map<std::string, std::string>&);             \
  template void save_checkpoint<S>(const std::string&, const ModelConfig&, const ParamLayout&, \
                                   const S*, std::map<std::string, std::string>);            \
  template Model<S> load_model<S>(const std::string&);                                        \
  template Model<S> load_model<S>(const SafetensorsFile&);

FLOWLOOP_CKPT(float)
FLOWLOOP_CKPT(double)

}  // namespace flowloop
