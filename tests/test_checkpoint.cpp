// safetensors: exact round trips, and every malformed case of model-spec.md rejected
// with an error that names the file and the fault; io.hpp's atomic writer and JSON reader.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "check.hpp"
#include "flowloop/flowloop.hpp"
#include "flowloop/io/io.hpp"

using namespace flowloop;
namespace fs = std::filesystem;

namespace {

ModelConfig tiny() { return test::make_config(7, 5, 4, 2, 0, 2); }

struct CkptDir : test::TempDir {
  CkptDir() : test::TempDir("flowloop_ckpt") {}
};

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void spit(const std::string& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

// A file with a given header text and data section.
std::string with_header(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

// Splits a valid file into (header JSON, data section).
std::pair<nlohmann::json, std::string> split(const std::string& bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  return {nlohmann::json::parse(bytes.substr(8, n)), bytes.substr(8 + n)};
}

}  // namespace

TEST_CASE("checkpoint round trip is exact, in F32 and F64", "[checkpoint]") {
  CkptDir dir;
  const ModelConfig cfg = tiny();
  Model<float> mf(cfg);
  mf.init(11);
  mf.params[3] = 1.0f / 3.0f;
  save_checkpoint(dir.file("f.safetensors"), cfg, mf.layout, mf.params.data());
  Model<float> back = load_model<float>(dir.file("f.safetensors"));
  CHECK(back.cfg == cfg);
  REQUIRE(back.params.size() == mf.params.size());
  CHECK(std::memcmp(back.params.data(), mf.params.data(), mf.params.size() * sizeof(float)) == 0);

  Model<double> md(cfg);
  md.init(12);
  md.params[5] = 1.0 / 3.0;
  save_checkpoint(dir.file("d.safetensors"), cfg, md.layout, md.params.data());
  Model<double> backd = load_model<double>(dir.file("d.safetensors"));
  CHECK(std::memcmp(backd.params.data(), md.params.data(), md.params.size() * sizeof(double)) == 0);

  // header: names, shapes, dtype, metadata of the spec; data section 8-byte aligned
  auto [h, data] = split(slurp(dir.file("f.safetensors")));
  CHECK(h["__metadata__"]["format"] == "flowloop");
  CHECK(ModelConfig::from_json(h["__metadata__"]["config"].get<std::string>(), "x") == cfg);
  CHECK(h["wte.weight"]["dtype"] == "F32");
  CHECK(h["wte.weight"]["shape"] == nlohmann::json::array({7, 4}));
  CHECK(h["field.h.1.attn.c_attn.weight"]["shape"] == nlohmann::json::array({12, 4}));
  CHECK(h["field.h.0.mlp.c_proj.weight"]["shape"] == nlohmann::json::array({4, 16}));
  CHECK(h["ln_f.bias"]["shape"] == nlohmann::json::array({4}));
  CHECK(h.size() == 1 + 2 + 2 * 12 + 2);
  CHECK(data.size() == mf.params.size() * sizeof(float));
  const std::string raw = slurp(dir.file("f.safetensors"));
  CHECK((raw.size() - data.size()) % 8 == 0);

  // extra tensors (another module's) do not stop the base model from loading
  h["exit_gate.weight"] = {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {data.size(), data.size() + 16}}};
  spit(dir.file("extra.safetensors"), with_header(h.dump(), data + std::string(16, '\0')));
  CHECK(load_model<float>(dir.file("extra.safetensors")).params == mf.params);

  // an F64 file loads into a float model (values rounded)
  Model<float> fromd = load_model<float>(dir.file("d.safetensors"));
  CHECK(fromd.params[5] == static_cast<float>(1.0 / 3.0));
}

TEST_CASE("writing is atomic and failures are reported", "[checkpoint]") {
  CkptDir dir;
  const ModelConfig cfg = tiny();
  Model<float> m(cfg);
  const std::string p = dir.file("m.safetensors");
  m.init(1);
  save_checkpoint(p, cfg, m.layout, m.params.data());
  m.init(2);
  save_checkpoint(p, cfg, m.layout, m.params.data());  // replaces the old file
  CHECK(load_model<float>(p).params == m.params);
  size_t files = 0;
  for (auto& e : fs::directory_iterator(dir.path)) {
    (void)e;
    ++files;
  }
  CHECK(files == 1);  // no temporary left behind
  CHECK_THROWS_WITH(save_checkpoint(dir.file("no/such/dir/m.safetensors"), cfg, m.layout, m.params.data()),
                    Catch::Contains("cannot write") && Catch::Contains("no/such/dir/m.safetensors"));
}

TEST_CASE("malformed checkpoints are rejected with the file and the fault", "[checkpoint][errors]") {
  CkptDir dir;
  const ModelConfig cfg = tiny();
  Model<float> m(cfg);
  m.init(3);
  const std::string good = dir.file("good.safetensors");
  save_checkpoint(good, cfg, m.layout, m.params.data());
  const std::string bytes = slurp(good);
  const auto [h, data] = split(bytes);
  const std::string bad = dir.file("bad.safetensors");

  auto expect = [&](const std::string& content, const std::string& fault) {
    spit(bad, content);
    INFO("expecting: " << fault);
    CHECK_THROWS_WITH(load_model<float>(bad), Catch::Contains(bad) && Catch::Contains(fault));
  };

  expect(bytes.substr(0, 5), "truncated: 5 bytes");
  expect(std::string(), "truncated: 0 bytes");
  expect(with_header(h.dump(), data).substr(0, 8) + "{}", "runs past the end of the file");
  expect(with_header("{\"wte.weight\": [", data), "header is not valid JSON");
  expect(with_header("[1, 2]", data), "header is not a JSON object");
  // a file cut inside the data section
  expect(bytes.substr(0, bytes.size() - 10), "run past the end of the data section");
  {
    auto j = h;
    j["ln_f.bias"]["data_offsets"] = {data.size() - 8, data.size() + 8};
    expect(with_header(j.dump(), data), "tensor 'ln_f.bias': data_offsets");
  }
  {
    auto j = h;  // ln_f.bias pointed at ln_f.weight's bytes
    j["ln_f.bias"]["data_offsets"] = j["ln_f.weight"]["data_offsets"];
    expect(with_header(j.dump(), data), "overlap in the data section");
  }
  {
    auto j = h;
    j["ln_f.bias"]["data_offsets"] = {8, 4};
    expect(with_header(j.dump(), data), "reversed");
  }
  {
    auto j = h;
    j.erase("field.h.1.mlp.c_fc.bias");
    expect(with_header(j.dump(), data), "missing tensor 'field.h.1.mlp.c_fc.bias'");
  }
  {
    auto j = h;  // same bytes, another shape: (3C, C) read as (C, 3C)
    j["field.h.0.attn.c_attn.weight"]["shape"] = {4, 12};
    expect(with_header(j.dump(), data), "tensor 'field.h.0.attn.c_attn.weight' has shape [4, 12] but the config implies [12, 4]");
  }
  {
    auto j = h;
    j["wte.weight"]["dtype"] = "F33";
    expect(with_header(j.dump(), data), "unknown dtype 'F33'");
  }
  {
    auto j = h;  // a known dtype with the right byte count, but not one a model holds
    j["ln_f.weight"]["dtype"] = "I32";
    expect(with_header(j.dump(), data), "only F32, F64, BF16 and F16 are supported");
  }
  {
    auto j = h;
    j["wte.weight"]["shape"] = {7, 5};
    expect(with_header(j.dump(), data), "needs 140");
  }
  {
    auto j = h;
    j["__metadata__"].erase("config");
    expect(with_header(j.dump(), data), "__metadata__ has no \"config\"");
  }
  {
    auto j = h;
    j["__metadata__"]["config"] = "{\"vocab_size\": 7}";
    expect(with_header(j.dump(), data), "config lacks \"context\"");
  }
  {
    auto j = h;
    j["__metadata__"]["format"] = "other";
    expect(with_header(j.dump(), data), "metadata format is 'other'");
  }
  CHECK_THROWS_WITH(load_model<float>(dir.file("absent.safetensors")),
                    Catch::Contains("absent.safetensors") && Catch::Contains("cannot open"));
  {  // a config that asks for more than the file holds is refused before anything is allocated
    auto j = h;
    auto c = nlohmann::json::parse(j["__metadata__"]["config"].get<std::string>());
    c["vocab_size"] = 1 << 20;  // 2^30 parameters (4 GiB of float): allowed, but not in this file
    c["d_model"] = 1 << 10;
    c["n_head"] = 2;
    c["d_ff"] = 4;
    j["__metadata__"]["config"] = c.dump();
    expect(with_header(j.dump(), data), "tensor 'wte.weight' has shape [7, 4] but the config implies [1048576, 1024]");
    c["n_block"] = 1 << 20;
    j["__metadata__"]["config"] = c.dump();
    expect(with_header(j.dump(), data), "n_block must be at most 4096");
    c["n_block"] = 4096;
    c["d_ff"] = 1 << 30;
    j["__metadata__"]["config"] = c.dump();
    expect(with_header(j.dump(), data), "parameters, more than");
  }
  // the good file still loads after all that, and parses the same from memory
  CHECK(load_model<float>(good).params == m.params);
  const SafetensorsFile mem =
      SafetensorsFile::parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "in memory");
  CHECK(load_model<float>(mem).params == m.params);
  CHECK_THROWS_WITH(SafetensorsFile::parse(reinterpret_cast<const uint8_t*>(bytes.data()), 5, "in memory"),
                    Catch::Contains("checkpoint 'in memory': truncated: 5 bytes"));
}

TEST_CASE("token rows: values out of int32 are refused, whatever their JSON type", "[checkpoint][io]") {
  CHECK(parse_token_json("{\"tokens\": [[1, 2], [3, 4]]}", "tokens", "t.json").data == std::vector<int32_t>{1, 2, 3, 4});
  // an unsigned 64-bit value once wrapped to -1 (the ignore marker) on its way to int64
  for (const char* text : {"{\"tokens\": [[18446744073709551615]]}", "{\"tokens\": [[2147483648]]}",
                           "{\"tokens\": [[-2147483649]]}"}) {
    INFO(text);
    CHECK_THROWS_WITH(parse_token_json(text, "tokens", "t.json"),
                      Catch::Contains("'t.json'") && Catch::Contains("row 0, position 0 is out of range"));
  }
  CHECK_THROWS_WITH(parse_token_json("{\"tokens\": [[1, 2], [3]]}", "tokens", "t.json"),
                    Catch::Contains("row 1 has length 1"));
  CHECK_THROWS_WITH(parse_token_json("{\"tokens\": [[1", "tokens", "t.json"), Catch::Contains("t.json"));
}

TEST_CASE("files are written whole, and JSON files read with the file and the fault", "[checkpoint][io]") {
  CkptDir dir;
  const std::string p = dir.file("a.json");
  write_file_atomic(p, std::string("{\"x\": [1, 2]}"));
  CHECK(slurp(p) == "{\"x\": [1, 2]}");
  const std::string bin("\0\1\2", 3);
  write_file_atomic(p, {std::string_view(bin), std::string_view("tail")});  // replaces, parts in order
  CHECK(slurp(p) == bin + "tail");
  write_file_atomic(p, std::string());
  CHECK(slurp(p).empty());
  size_t files = 0;
  for (auto& e : fs::directory_iterator(dir.path)) {
    (void)e;
    ++files;
  }
  CHECK(files == 1);  // no temporary left behind
  CHECK_THROWS_WITH(write_file_atomic(dir.file("no/such/dir/x.json"), std::string("{}")),
                    Catch::Contains("cannot write '" + dir.file("no/such/dir/x.json") + "'") &&
                        Catch::Contains("No such file or directory"));

  spit(p, "{\"tokens\": [[1, 2]], \"n\": 3}");
  const nlohmann::json j = read_json_file(p, "tokens file");
  CHECK(j["n"] == 3);
  CHECK_THROWS_WITH(read_json_file(dir.file("absent.json"), "tokens file"),
                    Catch::Contains("tokens file '" + dir.file("absent.json") + "': cannot open: No such file"));
  spit(p, "{\"a\": 1,, }");
  CHECK_THROWS_WITH(read_json_file(p, "config"),
                    Catch::Contains("config '" + p + "' is not valid JSON at byte 9"));
  CHECK_THROWS_WITH(read_json_file(dir.path.string(), ""), Catch::Contains("'" + dir.path.string() + "': cannot read"));
  CHECK_THROWS_WITH(parse_json("[1, 2", "option --x"), Catch::StartsWith("option --x is not valid JSON at byte 6"));
}

TEST_CASE("flowloop.hpp includes every public header", "[checkpoint][io]") {
  const fs::path inc = fs::path(__FILE__).parent_path().parent_path() / "include" / "flowloop";
  REQUIRE(fs::exists(inc / "flowloop.hpp"));
  const std::string all = slurp((inc / "flowloop.hpp").string());
  for (const auto& e : fs::directory_iterator(inc)) {
    const std::string name = e.path().filename().string();
    if (e.path().extension() != ".hpp" || name == "flowloop.hpp") continue;
    INFO(name);
    CHECK(all.find("#include \"flowloop/" + name + "\"") != std::string::npos);
  }
}

TEST_CASE("BF16 and F16 tensors convert exactly: zeros, signs, the largest, subnormals, infinities, NaN",
          "[checkpoint][dtype]") {
  // (bits, value) pairs of each 16-bit format
  const std::vector<std::pair<uint16_t, double>> f16 = {
      {0x0000, 0.0},     {0x8000, -0.0},          {0x3C00, 1.0},          {0xC000, -2.0},
      {0x7BFF, 65504.0}, {0x0001, std::ldexp(1.0, -24)}, {0x03FF, std::ldexp(1023.0, -24)},
      {0x3555, 0.333251953125}, {0x7C00, INFINITY}, {0xFC00, -INFINITY}};
  const std::vector<std::pair<uint16_t, double>> bf16 = {
      {0x0000, 0.0}, {0x3F80, 1.0}, {0xC040, -3.0}, {0x7F7F, 3.3895313892515355e38},
      {0x0001, std::ldexp(1.0, -133)}, {0x3EAB, 0.333984375}, {0xFF80, -INFINITY}};
  for (const auto& [dtype, table] : {std::pair{"F16", f16}, std::pair{"BF16", bf16}}) {
    INFO(dtype);
    std::string data;
    for (const auto& [bits, v] : table) {
      data.push_back(static_cast<char>(bits & 0xff));
      data.push_back(static_cast<char>(bits >> 8));
    }
    data.push_back(0);  // then a NaN
    data.push_back(static_cast<char>(0x7E));
    if (std::string(dtype) == "BF16") data[data.size() - 1] = static_cast<char>(0x7F), data[data.size() - 2] = static_cast<char>(0xC0);
    const int64_t n = static_cast<int64_t>(table.size()) + 1;
    nlohmann::json h = {{"x", {{"dtype", dtype}, {"shape", {n}}, {"data_offsets", {0, 2 * n}}}}};
    const std::string bytes = with_header(h.dump(), data);
    const SafetensorsFile f = SafetensorsFile::parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "t");
    std::vector<double> d(static_cast<size_t>(n));
    std::vector<float> s(static_cast<size_t>(n));
    f.copy_to("x", {n}, d.data());
    f.copy_to("x", {n}, s.data());
    for (size_t i = 0; i < table.size(); ++i) {
      CHECK(d[i] == table[i].second);
      CHECK(std::signbit(d[i]) == std::signbit(table[i].second));
      CHECK(static_cast<double>(s[i]) == table[i].second);
    }
    CHECK(std::isnan(d.back()));
    CHECK(std::isnan(s.back()));
  }
}
