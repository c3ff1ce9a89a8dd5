// flowloop/io/tokenizer.hpp: a model's own tokenizer.json (the Hugging Face tokenizers
// format), for byte-level BPE: the GPT-2, Llama-3, Qwen and SmolLM families.
//
// encode() runs the file's pipeline as the tokenizers library does, without adding special
// tokens (add_special_tokens=False):
//   1. the added tokens ("added_tokens") are cut out of the text first, each its own id;
//   2. the normalizer: none, or NFC (utf8proc);
//   3. the pre-tokenizers, in order: Split (a Regex or String pattern, behavior Isolated,
//      Removed, MergedWithPrevious or MergedWithNext), Digits, ByteLevel (its GPT-2 regex when
//      use_regex, a prefix space when add_prefix_space, then every byte as its printable
//      stand-in); a Sequence of them;
//   4. BPE on each piece: the lowest-ranked merge first (ignore_merges: a piece that is a
//      whole vocabulary entry is taken as it is).
// The Unicode regular expressions run on PCRE2 (UTF, Unicode properties). Anything else in
// the file (another model type, normalizer or pre-tokenizer, byte_fallback, a subword
// prefix) is refused with an Error naming it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace flowloop {

class Tokenizer {
 public:
  // A tokenizer.json, or a directory that holds one (a Hugging Face model's).
  static Tokenizer from_file(const std::string& path);
  // From the file's text; `where` names it in errors.
  static Tokenizer parse(const std::string& json_text, const std::string& where);

  std::vector<int32_t> encode(const std::string& utf8) const;
  // The text of ids (the byte-level stand-ins turned back into bytes; added tokens as written).
  std::string decode(const std::vector<int32_t>& ids) const;
  // One more than the largest id (vocabulary and added tokens).
  int vocab_size() const { return vocab_size_; }
  // The id of a token string, or -1.
  int32_t token_id(const std::string& token) const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
  int vocab_size_ = 0;
};

}  // namespace flowloop
