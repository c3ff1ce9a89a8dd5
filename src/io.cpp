#include "flowloop/io/io.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "flowloop/core/tensor.hpp"

namespace flowloop {

namespace {
// errno, or EIO where a failed call left it unset (a short fwrite may)
int last_error() { return errno != 0 ? errno : EIO; }
}  // namespace

void write_file_atomic(const std::string& path, const std::vector<std::string_view>& parts) {
  auto fail = [&](const std::string& why) { return Error("cannot write '" + path + "': " + why); };
  // unique per process and per call: concurrent writers never share a temporary file
  static std::atomic<unsigned> serial{0};
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(serial++);
  errno = 0;
  std::FILE* fp = std::fopen(tmp.c_str(), "wbx");  // x: fail rather than reuse an existing file
  if (!fp) throw fail(std::strerror(last_error()));
  int err = 0;
  for (const std::string_view& p : parts) {
    errno = 0;
    if (std::fwrite(p.data(), 1, p.size(), fp) != p.size()) {
      err = last_error();
      break;
    }
  }
  errno = 0;
  if (std::fflush(fp) != 0 && err == 0) err = last_error();
  if (::fsync(::fileno(fp)) != 0 && err == 0) err = last_error();
  if (std::fclose(fp) != 0 && err == 0) err = last_error();
  if (err == 0 && std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = last_error();
    std::remove(tmp.c_str());
    throw fail(std::string("rename failed: ") + std::strerror(e));
  }
  if (err != 0) {
    std::remove(tmp.c_str());
    throw fail(std::strerror(err));
  }
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  write_file_atomic(path, std::vector<std::string_view>{bytes});
}

nlohmann::json parse_json(const std::string& text, const std::string& what) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(what + " is not valid JSON at byte " + std::to_string(e.byte) + ": " + e.what());
  } catch (const nlohmann::json::exception& e) {  // e.g. a number out of range
    throw Error(what + " is not valid JSON: " + e.what());
  }
}

nlohmann::json read_json_file(const std::string& path, const std::string& what) {
  const std::string where = (what.empty() ? std::string() : what + " ") + "'" + path + "'";
  return parse_json(read_text_file(path, what), where);
}

std::string read_text_file(const std::string& path, const std::string& what) {
  const std::string where = (what.empty() ? std::string() : what + " ") + "'" + path + "'";
  errno = 0;
  std::FILE* fp = std::fopen(path.c_str(), "rb");
  if (!fp) throw Error(where + ": cannot open: " + std::strerror(last_error()));
  std::string text;
  char buf[1 << 16];
  size_t got;
  errno = 0;
  while ((got = std::fread(buf, 1, sizeof buf, fp)) > 0) text.append(buf, got);
  const bool failed = std::ferror(fp) != 0;
  const int e = last_error();
  std::fclose(fp);
  if (failed) throw Error(where + ": cannot read: " + std::strerror(e));  // e.g. a directory
  return text;
}

std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    std::string item = list.substr(start, end - start);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (!item.empty()) out.push_back(item);
    start = end + 1;
  }
  return out;
}

std::string format_number(double v) {
  if (std::isnan(v)) return "nan";
  std::ostringstream s;
  s.precision(10);
  s << v;
  return s.str();
}

bool parse_number(const std::string& text, double& out) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    return false;
  }
  if (text.empty() || used != text.size() || !std::isfinite(v)) return false;
  out = v;
  return true;
}

nlohmann::json parse_json_object(const std::string& text, const std::string& where,
                                 const std::vector<std::string>& known) {
  nlohmann::json j = parse_json(text, where);
  if (!j.is_object()) throw Error(where + ": not a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(known.begin(), known.end(), it.key()) == known.end())
      throw Error(where + ": unknown key \"" + it.key() + "\"");
  return j;
}

}  // namespace flowloop
