#include "flowloop/train/data.hpp"

#include "flowloop/io/tokenizer.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "flowloop/core/tensor.hpp"

namespace flowloop {

namespace {

// A stream of random numbers for (seed, split, index): splitmix64 of the three.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
uint64_t stream_seed(uint64_t seed, Split split, uint64_t index, uint64_t attempt) {
  return mix(mix(mix(seed) ^ (split == Split::Train ? 0x5452 : 0x5445)) ^ mix(index) ^ (attempt * 0x632be59bd9b4e019ULL));
}
// The split an example's content belongs to: 1 in 5 is test.
Split split_of(const std::vector<int32_t>& seq) {
  uint64_t h = 1469598103934665603ULL;
  for (int32_t v : seq) h = mix(h ^ static_cast<uint64_t>(v + 1));
  return h % 5 == 0 ? Split::Test : Split::Train;
}

class GeneratedTask : public Task {
 public:
  GeneratedTask(std::string name, uint64_t seed, int vocab, int len) : name_(std::move(name)), seed_(seed), vocab_(vocab), len_(len) {}
  int vocab_size() const override { return vocab_; }
  int seq_len() const override { return len_ - 1; }
  Example example(Split split, uint64_t index) const override {
    for (uint64_t attempt = 0;; ++attempt) {
      Rng rng(stream_seed(seed_, split, index, attempt));
      Example e;
      if (!draw(rng, e)) continue;  // an example without a defined answer
      if (split_of(e.seq) != split) continue;  // belongs to the other split
      return e;
    }
  }

 protected:
  // One candidate example from rng; false if it must be redrawn.
  virtual bool draw(Rng& rng, Example& e) const = 0;
  // Builds an example from the question and its answer (question, SEP, answer).
  void assemble(Example& e, const std::vector<int32_t>& question, int32_t sep) const {
    const std::vector<int32_t> ans = solve(question);
    e.seq = question;
    e.seq.push_back(sep);
    e.is_answer.assign(e.seq.size(), 0);
    for (int32_t a : ans) {
      e.seq.push_back(a);
      e.is_answer.push_back(1);
    }
  }
  std::string name_;
  uint64_t seed_;
  int vocab_, len_;
};

// parity: n bits, SEP, (number of ones) mod 2
class Parity : public GeneratedTask {
 public:
  Parity(uint64_t seed, int n) : GeneratedTask("parity", seed, 3, n + 2), n_(n) {}
  std::string describe() const override { return nlohmann::json({{"task", name_}, {"seed", seed_}, {"n", n_}}).dump(); }
  std::vector<int32_t> solve(const std::vector<int32_t>& q) const override {
    int ones = 0;
    for (int32_t b : q) ones += b;
    return {ones % 2};
  }

 protected:
  bool draw(Rng& rng, Example& e) const override {
    std::vector<int32_t> q(static_cast<size_t>(n_));
    for (auto& b : q) b = static_cast<int32_t>(rng.next() & 1);
    assemble(e, q, 2);
    return true;
  }
  int n_;
};

// phop: n symbols of a 4-letter alphabet, SEP, the symbol reached after p hops
// (from the last position, jump to the previous occurrence of the current symbol
// and move one step right).
class PHop : public GeneratedTask {
 public:
  PHop(uint64_t seed, int n, int p) : GeneratedTask("phop", seed, 5, n + 2), n_(n), p_(p) {}
  std::string describe() const override {
    return nlohmann::json({{"task", name_}, {"seed", seed_}, {"n", n_}, {"hops", p_}}).dump();
  }
  std::vector<int32_t> solve(const std::vector<int32_t>& q) const override {
    int i = static_cast<int>(q.size()) - 1;
    for (int hop = 0; hop < p_; ++hop) {
      int j = i - 1;
      while (j >= 0 && q[static_cast<size_t>(j)] != q[static_cast<size_t>(i)]) --j;
      if (j < 0) return {};
      i = j + 1;
    }
    return {q[static_cast<size_t>(i)]};
  }

 protected:
  bool draw(Rng& rng, Example& e) const override {
    // Random sequences end on their own last symbol far more often than 1 in 4 (the
    // hops tend to return to it), which would let a model skip the hops. One draw in
    // four asks for that answer, the others for any other: the answer is the last
    // symbol exactly 1 time in 4.
    const bool want_last = rng.next() % 4 == 0;
    for (int tries = 0; tries < 1000; ++tries) {
      std::vector<int32_t> q(static_cast<size_t>(n_));
      for (auto& s : q) s = static_cast<int32_t>(rng.next() % 4);
      const std::vector<int32_t> a = solve(q);
      if (a.empty() || (a[0] == q.back()) != want_last) continue;
      assemble(e, q, 4);
      return true;
    }
    return false;
  }
  int n_, p_;
};

// modarith: a prefix expression with k operators (+, -, *) over Z_prime, SEP, its value
class ModArith : public GeneratedTask {
 public:
  ModArith(uint64_t seed, int k, int prime)
      : GeneratedTask("modarith", seed, prime + 4, 2 * k + 3), k_(k), p_(prime) {}
  std::string describe() const override {
    return nlohmann::json({{"task", name_}, {"seed", seed_}, {"n", k_}, {"prime", p_}}).dump();
  }
  std::vector<int32_t> solve(const std::vector<int32_t>& q) const override {
    size_t pos = 0;
    std::function<int(void)> ev = [&]() -> int {
      const int32_t tok = q.at(pos++);
      if (tok < p_) return tok;
      const int a = ev(), b = ev();
      if (tok == p_) return (a + b) % p_;
      if (tok == p_ + 1) return ((a - b) % p_ + p_) % p_;
      return (a * b) % p_;
    };
    return {ev()};
  }

 protected:
  bool draw(Rng& rng, Example& e) const override {
    // a random full binary tree with k internal nodes, written in prefix order
    std::vector<int32_t> q;
    std::function<void(int)> gen = [&](int ops) {
      if (ops == 0) {
        q.push_back(static_cast<int32_t>(rng.next() % static_cast<uint64_t>(p_)));
        return;
      }
      q.push_back(static_cast<int32_t>(p_ + static_cast<int>(rng.next() % 3)));
      const int left = static_cast<int>(rng.next() % static_cast<uint64_t>(ops));
      gen(left);
      gen(ops - 1 - left);
    };
    gen(k_);
    assemble(e, q, p_ + 3);
    return true;
  }
  int k_, p_;
};

// addition: two d-digit numbers (a + b), SEP, the d+1 digits of the sum, most significant first
class Addition : public GeneratedTask {
 public:
  Addition(uint64_t seed, int d) : GeneratedTask("addition", seed, 12, 2 * d + 1 + 1 + d + 1), d_(d) {}
  std::string describe() const override { return nlohmann::json({{"task", name_}, {"seed", seed_}, {"n", d_}}).dump(); }
  std::vector<int32_t> solve(const std::vector<int32_t>& q) const override {
    // q = a digits, '+', b digits
    std::vector<int32_t> out(static_cast<size_t>(d_ + 1), 0);
    int carry = 0;
    for (int i = d_ - 1; i >= 0; --i) {
      const int s = q[static_cast<size_t>(i)] + q[static_cast<size_t>(d_ + 1 + i)] + carry;
      out[static_cast<size_t>(i + 1)] = s % 10;
      carry = s / 10;
    }
    out[0] = carry;
    return out;
  }

 protected:
  bool draw(Rng& rng, Example& e) const override {
    std::vector<int32_t> q;
    for (int i = 0; i < d_; ++i) q.push_back(static_cast<int32_t>(rng.next() % 10));
    q.push_back(10);
    for (int i = 0; i < d_; ++i) q.push_back(static_cast<int32_t>(rng.next() % 10));
    assemble(e, q, 11);
    return true;
  }
  int d_;
};

// Language modelling on a text's tokens (its bytes, or a tokenizer's ids), split
// deterministically: the first 90% of the tokens train, the last 10% validate.
class TextSource : public DataSource {
 public:
  TextSource(std::string path, std::string tokenizer, std::vector<int32_t> tokens, int V, int T, uint64_t seed)
      : path_(std::move(path)), tokenizer_(std::move(tokenizer)), tokens_(std::move(tokens)), V_(V), T_(T),
        seed_(seed) {
    split_ = tokens_.size() * 9 / 10;
    if (split_ < static_cast<size_t>(T) + 2 || tokens_.size() - split_ < static_cast<size_t>(T) + 2)
      throw Error("text '" + path_ + "': " + std::to_string(tokens_.size()) + (tokenizer_.empty() ? " bytes" : " tokens") +
                  " are too few for sequences of " + std::to_string(T) + " in both splits");
  }
  std::string describe() const override {
    nlohmann::json j = {{"text", path_}, {"seed", seed_}};
    if (tokenizer_.empty()) {
      j["bytes"] = tokens_.size();
    } else {
      j["tokenizer"] = tokenizer_;
      j["tokens"] = tokens_.size();
    }
    return j.dump();
  }
  int vocab_size() const override { return V_; }
  int seq_len() const override { return T_; }
  bool exact_match() const override { return false; }
  void batch(Split split, uint64_t index, int B, TokenBatch& tokens, TokenBatch& targets) const override {
    const size_t lo = split == Split::Train ? 0 : split_;
    const size_t hi = split == Split::Train ? split_ : tokens_.size();
    const size_t span = hi - lo - static_cast<size_t>(T_);
    tokens.B = targets.B = B;
    tokens.T = targets.T = T_;
    tokens.data.resize(static_cast<size_t>(B) * T_);
    targets.data.resize(static_cast<size_t>(B) * T_);
    for (int b = 0; b < B; ++b) {
      Rng rng(stream_seed(seed_, split, index * 1000003ULL + static_cast<uint64_t>(b), 0));
      const size_t off = lo + static_cast<size_t>(rng.next() % span);
      for (int t = 0; t < T_; ++t) {
        tokens.data[static_cast<size_t>(b) * T_ + t] = tokens_[off + static_cast<size_t>(t)];
        targets.data[static_cast<size_t>(b) * T_ + t] = tokens_[off + static_cast<size_t>(t) + 1];
      }
    }
  }

 private:
  std::string path_, tokenizer_;
  std::vector<int32_t> tokens_;
  int V_, T_;
  uint64_t seed_;
  size_t split_ = 0;
};

}  // namespace

void Task::batch(Split split, uint64_t index, int B, TokenBatch& tokens, TokenBatch& targets) const {
  const int T = seq_len();
  tokens.B = targets.B = B;
  tokens.T = targets.T = T;
  tokens.data.resize(static_cast<size_t>(B) * T);
  targets.data.resize(static_cast<size_t>(B) * T);
  for (int b = 0; b < B; ++b) {
    const Example e = example(split, index * static_cast<uint64_t>(B) + static_cast<uint64_t>(b));
    for (int t = 0; t < T; ++t) {
      tokens.data[static_cast<size_t>(b) * T + t] = e.seq[static_cast<size_t>(t)];
      targets.data[static_cast<size_t>(b) * T + t] = e.is_answer[static_cast<size_t>(t) + 1] ? e.seq[static_cast<size_t>(t) + 1] : -1;
    }
  }
}

std::unique_ptr<Task> make_task(const TaskOptions& o) {
  auto need = [&](int v, int lo, int hi, const char* what) {
    if (v < lo || v > hi)
      throw Error("task '" + o.name + "': " + what + " = " + std::to_string(v) + " is outside [" + std::to_string(lo) +
                  ", " + std::to_string(hi) + "]");
    return v;
  };
  if (o.name == "parity") return std::make_unique<Parity>(o.seed, need(o.n ? o.n : 12, 1, 256, "n"));
  if (o.name == "phop")
    return std::make_unique<PHop>(o.seed, need(o.n ? o.n : 24, 4, 256, "n"), need(o.hops ? o.hops : 4, 1, 16, "hops"));
  if (o.name == "modarith") {
    const int p = o.prime ? o.prime : 7;
    bool prime = p >= 2;
    for (int d = 2; d * d <= p; ++d) prime = prime && p % d != 0;
    if (!prime || p > 97) throw Error("task 'modarith': prime = " + std::to_string(p) + " is not a prime up to 97");
    return std::make_unique<ModArith>(o.seed, need(o.n ? o.n : 3, 1, 64, "n (operators)"), p);
  }
  if (o.name == "addition") return std::make_unique<Addition>(o.seed, need(o.n ? o.n : 3, 1, 32, "n (digits)"));
  throw Error("unknown task '" + o.name + "' (known: parity, phop, modarith, addition)");
}

std::vector<std::string> task_names() { return {"parity", "phop", "modarith", "addition"}; }

std::unique_ptr<DataSource> make_text_source(const std::string& path, int seq_len, uint64_t seed,
                                             const std::string& tokenizer) {
  namespace fs = std::filesystem;
  std::vector<uint8_t> bytes;
  auto append = [&](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    if (!in) throw Error("text '" + p.string() + "': cannot open");
    bytes.insert(bytes.end(), std::istreambuf_iterator<char>(in), {});
  };
  if (path == "fortunes") {
    const fs::path dir = "/usr/share/games/fortunes";
    if (!fs::is_directory(dir))
      throw Error("text 'fortunes': " + dir.string() + " is missing (install Debian's fortunes package; ./run.sh does)");
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir)) {
      const auto ext = e.path().extension().string();
      if (e.is_regular_file() && ext != ".dat" && ext != ".u8") files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) append(f);
  } else {
    append(path);
  }
  if (tokenizer.empty())
    return std::make_unique<TextSource>(path, "", std::vector<int32_t>(bytes.begin(), bytes.end()), 256, seq_len, seed);
  const Tokenizer tok = Tokenizer::from_file(tokenizer);
  return std::make_unique<TextSource>(path, tokenizer, tok.encode(std::string(bytes.begin(), bytes.end())),
                                      tok.vocab_size(), seq_len, seed);
}

}  // namespace flowloop
