// flowloop/io/io.hpp: files written whole or not at all, and JSON read with errors
// that say which file and where it breaks. Every writer and JSON reader of the
// library goes through these; and the lists and numbers of option values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "flowloop/core/tensor.hpp"

namespace flowloop {

// Writes the concatenated `parts` to `path` atomically: a new temporary file in
// the same directory (so the rename cannot cross file systems), written, flushed
// and synced, every step checked, then renamed over `path`. A reader sees the old
// file or the new one, never a part; on failure the temporary file is removed and
// `path` is untouched. Throws Error("cannot write '<path>': <reason>"), the reason
// from errno.
void write_file_atomic(const std::string& path, const std::vector<std::string_view>& parts);
void write_file_atomic(const std::string& path, const std::string& bytes);

// Parses JSON text. A parse error throws Error("<what> is not valid JSON at byte
// N: <parser's message>"), `what` naming the text (a file, a header, an option).
nlohmann::json parse_json(const std::string& text, const std::string& what);

// Parses a JSON object whose keys must all be among `known`: throws Error("<where>: not
// a JSON object") or Error("<where>: unknown key "<key>"").
nlohmann::json parse_json_object(const std::string& text, const std::string& where,
                                 const std::vector<std::string>& known);

// Reads and parses the JSON file at `path`. Errors name `what` (e.g. "tokens",
// "config"; may be empty) and the path: "<what> '<path>': cannot open: <reason>",
// "<what> '<path>' is not valid JSON at byte N: ...".
nlohmann::json read_json_file(const std::string& path, const std::string& what);
// The bytes of the file at `path`; errors as read_json_file's.
std::string read_text_file(const std::string& path, const std::string& what);

// The items of a comma-separated list, spaces around each trimmed, empty ones dropped.
std::vector<std::string> split_list(const std::string& list);

// FNV-1a (64 bits) of n bytes, continuing from h (the offset basis for a fresh hash).
constexpr uint64_t kFnv1aBasis = 0xcbf29ce484222325ULL;
inline uint64_t fnv1a64(const void* data, size_t n, uint64_t h = kFnv1aBasis) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

// The whole of `text` as a finite number (no trailing characters): true and `out`,
// or false.
bool parse_number(const std::string& text, double& out);

// Reads j[key] into dst when j has it: a bool, an integer, a number (null: NaN, a
// value not given) or a string as dst is; another type throws Error("<where>: "<key>"
// has the wrong type (...)").
template <class T>
void json_field(const nlohmann::json& j, const char* key, T& dst, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) return;
  if constexpr (std::is_floating_point_v<T>) {
    if (it->is_null()) {  // a value not given (written as null)
      dst = std::numeric_limits<T>::quiet_NaN();
      return;
    }
  }
  bool ok;
  if constexpr (std::is_same_v<T, bool>) ok = it->is_boolean();
  else if constexpr (std::is_integral_v<T>) ok = it->is_number_integer();
  else if constexpr (std::is_floating_point_v<T>) ok = it->is_number();
  else ok = it->is_string();
  if (!ok) throw Error(where + ": \"" + key + "\" has the wrong type (" + it->type_name() + ")");
  dst = it->get<T>();
}

// A number for CSV tables: 10 significant digits, "nan" for NaN.
std::string format_number(double v);

}  // namespace flowloop
