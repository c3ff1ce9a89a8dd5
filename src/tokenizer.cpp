#include "flowloop/io/tokenizer.hpp"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include "flowloop/core/tensor.hpp"
#include "flowloop/io/io.hpp"

namespace flowloop {

// (named, not anonymous: Tokenizer::Impl, a type of the header, holds these)
namespace tokenizer_detail {

using nlohmann::json;

// GPT-2's pre-tokenizer pattern (the ByteLevel pre-tokenizer's use_regex).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A compiled PCRE2 pattern (UTF, Unicode properties), shared by every encode.
class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    int err = 0;
    PCRE2_SIZE at = 0;
    const uint32_t opts = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0u);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts, &err, &at, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw Error(where + ": the pattern " + json(pattern).dump() + " does not compile at offset " + std::to_string(at) +
                  ": " + reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // where JIT is available; the interpreter otherwise
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // The [begin, end) byte ranges of the non-empty matches in s, left to right.
  std::vector<std::pair<size_t, size_t>> matches(const std::string& s) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t start = 0;
    while (start <= s.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), start, 0, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(md);
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        throw Error(std::string("tokenizer: matching failed: ") + reinterpret_cast<const char*>(msg));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] == ov[0]) {  // an empty match: on to the next character
        size_t next = ov[0] + 1;
        while (next < s.size() && (static_cast<unsigned char>(s[next]) & 0xC0) == 0x80) ++next;
        start = next;
        continue;
      }
      out.emplace_back(ov[0], ov[1]);
      start = ov[1];
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};

// GPT-2's printable stand-in of every byte (bytes_to_unicode), as UTF-8.
const std::vector<std::string>& byte_chars() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const int cp = printable ? b : 256 + n++;
      utf8proc_uint8_t buf[4];
      const auto len = utf8proc_encode_char(cp, buf);
      t[static_cast<size_t>(b)] = std::string(reinterpret_cast<const char*>(buf), static_cast<size_t>(len));
    }
    return t;
  }();
  return table;
}

// The UTF-8 characters of s.
std::vector<std::string> chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    size_t j = i + 1;
    while (j < s.size() && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) ++j;
    out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

enum class Behavior { removed, isolated, merged_with_previous, merged_with_next };

struct Step {
  enum Kind { split, byte_level } kind = split;
  std::shared_ptr<Regex> re;  // split (and byte_level with use_regex)
  Behavior behavior = Behavior::isolated;
  bool add_prefix_space = false;
};

std::vector<std::string> apply_split(const std::vector<std::string>& in, const Regex& re, Behavior b) {
  std::vector<std::string> out;
  for (const std::string& s : in) {
    std::vector<std::string> parts;
    bool carry = false;  // merged_with_next: a delimiter waiting for the next piece
    std::string pending;
    size_t prev = 0;
    auto piece = [&](std::string p, bool delim) {
      if (p.empty()) return;
      switch (b) {
        case Behavior::removed:
          if (!delim) parts.push_back(std::move(p));
          break;
        case Behavior::isolated:
          parts.push_back(std::move(p));
          break;
        case Behavior::merged_with_previous:
          if (delim && !parts.empty() && !carry)
            parts.back() += p;
          else
            parts.push_back(std::move(p));
          carry = false;
          break;
        case Behavior::merged_with_next:
          if (delim) {
            pending += p;
            carry = true;
          } else {
            parts.push_back(pending + p);
            pending.clear();
            carry = false;
          }
          break;
      }
    };
    for (const auto& [ms, me] : re.matches(s)) {
      piece(s.substr(prev, ms - prev), false);
      piece(s.substr(ms, me - ms), true);
      prev = me;
    }
    piece(s.substr(prev), false);
    if (!pending.empty()) parts.push_back(pending);
    for (auto& p : parts) out.push_back(std::move(p));
  }
  return out;
}


}  // namespace tokenizer_detail

using namespace tokenizer_detail;

struct Tokenizer::Impl {
  std::string where;
  bool nfc = false;
  std::vector<Step> steps;
  std::unordered_map<std::string, int32_t> vocab;
  std::unordered_map<std::string, int> ranks;  // "a b" -> merge rank
  bool ignore_merges = false;
  struct Added {
    std::string content;
    int32_t id;
  };
  std::vector<Added> added;  // longest first
  std::unordered_map<int32_t, std::string> id_to_token;
  std::unordered_map<int32_t, bool> is_added;

  void bpe(const std::string& piece, std::vector<int32_t>& ids) const {
    if (piece.empty()) return;
    if (ignore_merges) {
      auto it = vocab.find(piece);
      if (it != vocab.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    std::vector<std::string> sym = chars(piece);
    while (sym.size() > 1) {
      int best = INT_MAX;
      std::string best_a, best_b;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = ranks.find(sym[i] + " " + sym[i + 1]);
        if (it != ranks.end() && it->second < best) {
          best = it->second;
          best_a = sym[i];
          best_b = sym[i + 1];
        }
      }
      if (best == INT_MAX) break;
      std::vector<std::string> next;
      for (size_t i = 0; i < sym.size(); ++i) {
        if (i + 1 < sym.size() && sym[i] == best_a && sym[i + 1] == best_b) {
          next.push_back(best_a + best_b);
          ++i;
        } else {
          next.push_back(sym[i]);
        }
      }
      sym.swap(next);
    }
    for (const std::string& s : sym) {
      auto it = vocab.find(s);
      if (it == vocab.end())
        throw Error(where + ": the symbol " + json(s).dump() + " of " + json(piece).dump() +
                    " is not in the vocabulary (and the model has no unknown token)");
      ids.push_back(it->second);
    }
  }

  // A segment of text without added tokens.
  void encode_plain(std::string text, std::vector<int32_t>& ids) const {
    if (text.empty()) return;
    if (nfc) {
      utf8proc_uint8_t* n = utf8proc_NFC(reinterpret_cast<const utf8proc_uint8_t*>(text.c_str()));
      if (!n) throw Error(where + ": the text is not valid UTF-8");
      text.assign(reinterpret_cast<const char*>(n));
      std::free(n);
    }
    std::vector<std::string> pieces{text};
    for (const Step& st : steps) {
      if (st.kind == Step::split) {
        pieces = apply_split(pieces, *st.re, st.behavior);
        continue;
      }
      std::vector<std::string> mapped;
      for (std::string p : pieces) {
        if (st.add_prefix_space && (p.empty() || p[0] != ' ')) p.insert(p.begin(), ' ');
        std::vector<std::string> parts = st.re ? apply_split({p}, *st.re, Behavior::isolated) : std::vector{p};
        for (const std::string& q : parts) {
          std::string m;
          for (unsigned char c : q) m += byte_chars()[c];
          mapped.push_back(std::move(m));
        }
      }
      pieces.swap(mapped);
    }
    for (const std::string& p : pieces) bpe(p, ids);
  }
};

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    const std::string file = (std::filesystem::path(path) / "tokenizer.json").string();
    if (!std::filesystem::is_regular_file(file, ec))
      throw Error("'" + path + "' has no tokenizer.json (give the tokenizer with --tokenizer FILE)");
    return from_file(file);
  }
  return parse(read_text_file(path, "tokenizer"), "tokenizer '" + path + "'");
}

Tokenizer Tokenizer::parse(const std::string& text, const std::string& where) {
  const json j = parse_json(text, where);
  auto impl = std::make_shared<Impl>();
  Impl& I = *impl;
  I.where = where;
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) throw Error(where + ": no \"model\" object");
  const json& m = j["model"];
  const std::string type = m.value("type", std::string("(none)"));
  if (type != "BPE") throw Error(where + ": model type \"" + type + "\" is not supported (byte-level BPE only)");
  auto refuse_set = [&](const char* key) {
    if (m.contains(key) && !m[key].is_null() && !(m[key].is_boolean() && !m[key].get<bool>()) &&
        !(m[key].is_string() && m[key].get<std::string>().empty()))
      throw Error(where + ": model \"" + key + "\" " + m[key].dump() + " is not supported (byte-level BPE only)");
  };
  refuse_set("byte_fallback");
  refuse_set("continuing_subword_prefix");
  refuse_set("end_of_word_suffix");
  refuse_set("dropout");
  I.ignore_merges = m.value("ignore_merges", false);
  if (!m.contains("vocab") || !m["vocab"].is_object()) throw Error(where + ": model has no \"vocab\" object");
  int32_t max_id = -1;
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX)
      throw Error(where + ": vocab entry " + json(it.key()).dump() + " has no valid id");
    const auto id = static_cast<int32_t>(it.value().get<int64_t>());
    I.vocab[it.key()] = id;
    I.id_to_token[id] = it.key();
    max_id = std::max(max_id, id);
  }
  if (!m.contains("merges") || !m["merges"].is_array()) throw Error(where + ": model has no \"merges\" list");
  int rank = 0;
  for (const json& mg : m["merges"]) {
    std::string key;
    if (mg.is_string()) {
      key = mg.get<std::string>();
      if (key.find(' ') == std::string::npos) throw Error(where + ": merge " + mg.dump() + " is not two tokens");
    } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
      key = mg[0].get<std::string>() + " " + mg[1].get<std::string>();
    } else {
      throw Error(where + ": merge " + mg.dump() + " is not two tokens");
    }
    I.ranks.emplace(key, rank++);  // a repeated merge keeps its first rank
  }
  // the normalizer
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    const json& n = j["normalizer"];
    std::vector<json> list = n.value("type", "") == "Sequence" ? n.value("normalizers", std::vector<json>{})
                                                                 : std::vector<json>{n};
    for (const json& x : list) {
      const std::string t = x.value("type", std::string("(none)"));
      if (t != "NFC") throw Error(where + ": normalizer \"" + t + "\" is not supported (none or NFC)");
      I.nfc = true;
    }
  }
  // the pre-tokenizers
  bool byte_level = false;
  std::vector<json> pre;
  if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) {
    const json& p = j["pre_tokenizer"];
    if (p.value("type", "") == "Sequence")
      pre = p.value("pretokenizers", std::vector<json>{});
    else
      pre = {p};
  }
  for (const json& p : pre) {
    const std::string t = p.value("type", std::string("(none)"));
    Step st;
    if (t == "ByteLevel") {
      st.kind = Step::byte_level;
      st.add_prefix_space = p.value("add_prefix_space", false);
      if (p.value("use_regex", true)) st.re = std::make_shared<Regex>(kGpt2Pattern, false, where);
      byte_level = true;
    } else if (t == "Split") {
      if (p.value("invert", false)) throw Error(where + ": Split with invert true is not supported");
      const json& pat = p.contains("pattern") ? p["pattern"] : json();
      if (pat.contains("Regex") && pat["Regex"].is_string())
        st.re = std::make_shared<Regex>(pat["Regex"].get<std::string>(), false, where);
      else if (pat.contains("String") && pat["String"].is_string())
        st.re = std::make_shared<Regex>(pat["String"].get<std::string>(), true, where);
      else
        throw Error(where + ": Split has no Regex or String pattern");
      const std::string b = p.value("behavior", std::string("Isolated"));
      if (b == "Isolated") st.behavior = Behavior::isolated;
      else if (b == "Removed") st.behavior = Behavior::removed;
      else if (b == "MergedWithPrevious") st.behavior = Behavior::merged_with_previous;
      else if (b == "MergedWithNext") st.behavior = Behavior::merged_with_next;
      else throw Error(where + ": Split behavior \"" + b + "\" is not supported");
    } else if (t == "Digits") {
      st.re = std::make_shared<Regex>(p.value("individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)", false, where);
    } else {
      throw Error(where + ": pre-tokenizer \"" + t + "\" is not supported (ByteLevel, Split, Digits, Sequence)");
    }
    I.steps.push_back(std::move(st));
  }
  if (!byte_level) throw Error(where + ": no ByteLevel pre-tokenizer: only byte-level BPE tokenizers are supported");
  // the added tokens
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const json& a : j["added_tokens"]) {
      if (!a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") || !a["content"].is_string())
        throw Error(where + ": added token " + a.dump() + " lacks its id or content");
      for (const char* k : {"single_word", "lstrip", "rstrip"})
        if (a.value(k, false))
          throw Error(where + ": added token " + a["content"].dump() + " has " + k + " true, which is not supported");
      const auto id = static_cast<int32_t>(a["id"].get<int64_t>());
      const std::string c = a["content"].get<std::string>();
      if (c.empty()) continue;
      I.added.push_back({c, id});
      I.id_to_token[id] = c;
      I.is_added[id] = true;
      max_id = std::max(max_id, id);
    }
    std::stable_sort(I.added.begin(), I.added.end(),
                     [](const Impl::Added& x, const Impl::Added& y) { return x.content.size() > y.content.size(); });
  }
  Tokenizer tok;
  tok.impl_ = std::move(impl);
  tok.vocab_size_ = max_id + 1;
  return tok;
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  const Impl& I = *impl_;
  // valid UTF-8 first: the position of a bad byte is named
  for (size_t i = 0; i < text.size();) {
    utf8proc_int32_t cp = 0;
    const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(text.data() + i),
                                    static_cast<utf8proc_ssize_t>(text.size() - i), &cp);
    if (n <= 0) throw Error(I.where + ": the text is not valid UTF-8 at byte " + std::to_string(i));
    i += static_cast<size_t>(n);
  }
  std::vector<int32_t> ids;
  size_t prev = 0;
  for (size_t i = 0; i < text.size();) {
    const Impl::Added* hit = nullptr;
    for (const auto& a : I.added)  // longest first
      if (text.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    if (!hit) {
      ++i;
      continue;
    }
    I.encode_plain(text.substr(prev, i - prev), ids);
    ids.push_back(hit->id);
    i += hit->content.size();
    prev = i;
  }
  I.encode_plain(text.substr(prev), ids);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const Impl& I = *impl_;
  static const std::unordered_map<std::string, unsigned char> back = [] {
    std::unordered_map<std::string, unsigned char> b;
    for (int c = 0; c < 256; ++c) b[byte_chars()[static_cast<size_t>(c)]] = static_cast<unsigned char>(c);
    return b;
  }();
  std::string out;
  for (int32_t id : ids) {
    auto it = I.id_to_token.find(id);
    if (it == I.id_to_token.end()) throw Error(I.where + ": id " + std::to_string(id) + " is not in the vocabulary");
    if (I.is_added.count(id)) {
      out += it->second;
      continue;
    }
    for (const std::string& c : chars(it->second)) {
      auto b = back.find(c);
      out += b == back.end() ? c : std::string(1, static_cast<char>(b->second));
    }
  }
  return out;
}

int32_t Tokenizer::token_id(const std::string& token) const {
  for (const auto& a : impl_->added)
    if (a.content == token) return a.id;
  auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? -1 : it->second;
}

}  // namespace flowloop
