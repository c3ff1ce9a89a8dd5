// Recording a teacher's latent trajectories into safetensors shards with a manifest.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>

#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/hf.hpp"
#include "flowloop/train/flowmatch.hpp"
#include "flowloop/io/io.hpp"
#include "flowloop/ode/solver.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop {

namespace fs = std::filesystem;
using nlohmann::json;

void RecordOptions::validate() const {
  depth.validate();
  if (states < 0 || states == 1)
    throw Error("record: --states must be at least 2 (K + 1 states, K >= 1), not " + std::to_string(states));
  if (states > 0 && !depth.ode()) throw Error("record: --states is for solves; a loop K records its K + 1 states");
  if (batch < 1) throw Error("record: --batch must be at least 1");
  if (train_examples < 1 || test_examples < 0)
    throw Error("record: --examples must be at least 1 and --test-examples at least 0");
  if (shard_size < batch || shard_size % batch != 0)
    throw Error("record: --shard-size (" + std::to_string(shard_size) + ") must be a multiple of --batch (" +
                std::to_string(batch) + ")");
}

const std::vector<TrajectoryShard>& TrajectoryManifest::split(const std::string& name) const {
  if (name == "train") return train;
  if (name == "test") return test;
  throw Error("trajectory data: unknown split '" + name + "' (expected train or test)");
}

int64_t TrajectoryManifest::examples(const std::string& name) const {
  int64_t n = 0;
  for (const auto& s : split(name)) n += s.examples;
  return n;
}

std::string TrajectoryManifest::to_json() const {
  json j;
  j["format"] = "flowloop-trajectories";
  j["teacher"] = teacher_file;
  j["teacher_hash"] = teacher_hash;
  j["data"] = json::parse(data);
  j["depth"] = depth;
  j["K"] = K;
  j["T"] = T;
  j["C"] = C;
  j["times"] = times;
  for (const char* name : {"train", "test"}) {
    json a = json::array();
    for (const auto& s : split(name)) a.push_back({{"file", s.file}, {"examples", s.examples}, {"first", s.first}});
    j["splits"][name] = a;
  }
  return j.dump(1) + "\n";
}

TrajectoryManifest TrajectoryManifest::read(const std::string& dir) {
  const std::string path = (fs::path(dir) / "manifest.json").string();
  const TrajectoryManifest m = parse(read_json_file(path, "trajectory manifest"), path);
  if (!fs::exists(fs::path(dir) / m.teacher_file))
    throw Error("trajectory manifest '" + path + "' names the teacher '" + m.teacher_file + "', which is missing");
  for (const char* name : {"train", "test"})
    for (const auto& s : m.split(name))
      if (!fs::exists(fs::path(dir) / s.file))
        throw Error("trajectory manifest '" + path + "' names the shard '" + s.file + "', which is missing");
  return m;
}

TrajectoryManifest TrajectoryManifest::parse(const json& j, const std::string& path) {
  TrajectoryManifest m;
  try {
    if (j.at("format").get<std::string>() != "flowloop-trajectories")
      throw Error("format is '" + j.at("format").get<std::string>() + "', not flowloop-trajectories");
    m.teacher_file = j.at("teacher").get<std::string>();
    m.teacher_hash = j.at("teacher_hash").get<std::string>();
    m.data = j.at("data").dump();
    m.depth = j.at("depth");
    m.K = j.at("K").get<int>();
    m.T = j.at("T").get<int>();
    m.C = j.at("C").get<int>();
    m.times = j.at("times").get<std::vector<double>>();
    for (const char* name : {"train", "test"}) {
      auto& v = std::string(name) == "train" ? m.train : m.test;
      for (const auto& s : j.at("splits").at(name))
        v.push_back({s.at("file").get<std::string>(), s.at("examples").get<int>(), s.at("first").get<int64_t>()});
    }
  } catch (const json::exception& e) {
    throw Error("trajectory manifest '" + path + "': " + e.what());
  } catch (const Error& e) {
    throw Error("trajectory manifest '" + path + "': " + e.what());
  }
  if (m.K < 1) throw Error("trajectory manifest '" + path + "': K must be at least 1, not " + std::to_string(m.K));
  if (m.T < 1 || m.C < 1) throw Error("trajectory manifest '" + path + "': T and C must be positive");
  if (m.times.size() != static_cast<size_t>(m.K) + 1)
    throw Error("trajectory manifest '" + path + "': " + std::to_string(m.times.size()) + " times for K = " +
                std::to_string(m.K));
  // the files it names are DATA's own: a plain file name, never a path out of it
  auto plain = [&](const std::string& file, const char* what) {
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
        file.find('\\') != std::string::npos || file.find('\0') != std::string::npos)
      throw Error("trajectory manifest '" + path + "' names the " + what + " '" + file +
                  "': a file name inside the data directory is expected");
  };
  plain(m.teacher_file, "teacher");
  for (const char* name : {"train", "test"})
    for (const auto& s : m.split(name)) {
      plain(s.file, "shard");
      if (s.examples < 1 || s.first < 0)
        throw Error("trajectory manifest '" + path + "': shard '" + s.file + "' has " + std::to_string(s.examples) +
                    " examples from " + std::to_string(s.first));
    }
  return m;
}

TrajectoryShardData read_trajectory_shard(const TrajectoryManifest& m, const std::string& dir,
                                          const TrajectoryShard& shard) {
  const SafetensorsFile f = SafetensorsFile::read((fs::path(dir) / shard.file).string());
  TrajectoryShardData d;
  d.n = shard.examples;
  d.K = m.K;
  d.T = m.T;
  d.C = m.C;
  const int64_t n = shard.examples;
  // sized only once the file holds that shape (a manifest's sizes are not trusted alone);
  // otherwise copy_to names the missing tensor or the shape it has
  const std::vector<int64_t> shape{n, int64_t{m.K} + 1, m.T, m.C};
  const auto st = f.tensors().find("states");
  if (st != f.tensors().end() && st->second.shape == shape)
    d.states.resize(static_cast<size_t>(n) * static_cast<size_t>(shape[1]) * static_cast<size_t>(m.T) *
                    static_cast<size_t>(m.C));
  f.copy_to("states", shape, d.states.data());
  std::vector<float> tmp(static_cast<size_t>(n) * static_cast<size_t>(m.T));
  for (const char* name : {"tokens", "targets"}) {
    f.copy_to(name, {n, m.T}, tmp.data());
    auto& out = std::string(name) == "tokens" ? d.tokens : d.targets;
    out.resize(tmp.size());
    for (size_t k = 0; k < tmp.size(); ++k) {
      if (tmp[k] != std::floor(tmp[k]) || tmp[k] < -1 || tmp[k] > 16777216.0f)
        throw Error("trajectory shard '" + shard.file + "': " + name + " holds " + std::to_string(tmp[k]) +
                    ", not a token id");
      out[k] = static_cast<int32_t>(tmp[k]);
    }
  }
  return d;
}

std::string file_hash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read '" + path + "'");
  // FNV-1a from 1469598103934665603, not FNV's own basis (which has one digit more): the
  // basis every recording's manifest was hashed with, kept so that they still match
  uint64_t h = 1469598103934665603ull;
  std::vector<char> buf(1 << 16);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h = fnv1a64(buf.data(), static_cast<size_t>(in.gcount()), h);
  }
  std::ostringstream s;
  s << "fnv1a64:" << std::hex << std::setw(16) << std::setfill('0') << h;
  return s.str();
}

TrajectoryManifest record_trajectories(const std::string& teacher, const DataSource& data, const RecordOptions& opt,
                                       const std::string& out, std::ostream& progress) {
  opt.validate();
  const bool hf = is_hf_dir(teacher);
  if (!hf && !opt.core_layers.empty())
    throw Error("record: --core-layers applies to a Hugging Face teacher; '" + teacher + "' is a flowloop checkpoint");
  Model<float> model = load_any<float>(teacher, LoadOptions{opt.core_layers});
  model.set_device(resolve_device(opt.device));
  const ModelConfig& cfg = model.cfg;
  require_fits(cfg, data, "the data");
  TrajectoryManifest m;
  fs::create_directories(out);
  // a Hugging Face teacher is kept as the flowloop checkpoint of the model that records
  // (its structure, its data's configuration): the same bits on every run, so the same hash
  const fs::path staged = fs::path(out) / (m.teacher_file + ".new");
  if (hf) {
    if (opt.teacher_config.empty()) throw Error("record: a Hugging Face teacher needs its data's configuration");
    save_checkpoint(staged.string(), model.cfg, model.layout, model.params.data(),
                    {{"train_config", opt.teacher_config}, {"source", teacher}});
  }
  m.teacher_hash = file_hash(hf ? staged.string() : teacher);
  m.data = data.describe();
  m.depth = json::parse(opt.depth.to_json(cfg.depth));
  m.T = data.seq_len();
  m.C = cfg.d_model;
  SolveOptions so;
  const bool ode = opt.depth.ode();
  if (ode) {
    so = opt.depth.solve_options(cfg.depth);
    m.K = (opt.states > 0 ? opt.states : cfg.depth + 1) - 1;
    for (int k = 0; k <= m.K; ++k) m.times.push_back(so.t1 * k / m.K);
    m.times.back() = so.t1;
    so.save = SaveKind::Times;
    so.save_times = m.times;
  } else {
    m.K = opt.depth.loop_count(cfg.depth);
    if (m.K < 1) throw Error("record: a loop of K = " + std::to_string(m.K) + " has no path to record (K of 0)");
    for (int k = 0; k <= m.K; ++k) m.times.push_back(k);
  }
  fs::create_directories(out);
  const fs::path dir(out), mpath = dir / "manifest.json";
  if (fs::exists(mpath)) {
    TrajectoryManifest had = TrajectoryManifest::read(out);
    if (had.teacher_hash != m.teacher_hash)
      throw Error("record: '" + out + "' holds trajectories of another teacher (" + had.teacher_hash + ", not " +
                  m.teacher_hash + ")");
    if (had.depth != m.depth || had.K != m.K || had.T != m.T || had.C != m.C || had.data != m.data)
      throw Error("record: '" + out + "' holds trajectories of another depth regime or data (" + had.depth.dump() +
                  ", K " + std::to_string(had.K) + ")");
    m.train = had.train;
    m.test = had.test;
  } else if (!hf) {
    fs::copy_file(teacher, dir / m.teacher_file, fs::copy_options::overwrite_existing);
  }
  if (hf) fs::rename(staged, dir / m.teacher_file);
  write_file_atomic(mpath.string(), m.to_json());
  const size_t n = static_cast<size_t>(m.T) * static_cast<size_t>(m.C), S = static_cast<size_t>(m.K) + 1;
  TokenBatch tok, tgt;
  LoopWork<float> lw;
  Buffer<float> h;
  // solves: one system (and its field caches) for every batch, all of size opt.batch
  std::unique_ptr<FieldSystem<float>> sys;
  std::future<void> writer;  // the shard being written
  if (ode) sys = std::make_unique<FieldSystem<float>>(model.field, model.field_params(), opt.batch, m.T, model.device_field());
  for (const char* name : {"train", "test"}) {
    const bool is_train = std::string(name) == "train";
    const int want = is_train ? opt.train_examples : opt.test_examples;
    const int batches = (want + opt.batch - 1) / opt.batch, per_shard = opt.shard_size / opt.batch;
    auto& shards = is_train ? m.train : m.test;
    // a resumed recording goes on after its last shard
    const int64_t next = shards.empty() ? 0 : shards.back().first + shards.back().examples;
    if (next % opt.batch != 0)
      throw Error("record: '" + out + "' was recorded with another --batch (" + std::string(name) + " stops at example " +
                  std::to_string(next) + ")");
    for (int first_batch = static_cast<int>(next / opt.batch); first_batch < batches; first_batch += per_shard) {
      const int nb = std::min(per_shard, batches - first_batch), ne = nb * opt.batch;
      std::vector<float> states(static_cast<size_t>(ne) * S * n), tokens(static_cast<size_t>(ne) * m.T),
          targets(tokens.size());
      for (int bi = 0; bi < nb; ++bi) {
        const int64_t index = first_batch + bi;
        data.batch(is_train ? Split::Train : Split::Test, static_cast<uint64_t>(index), opt.batch, tok, tgt);
        const float* st = nullptr;  // (K + 1, B, T, C)
        SolveResult<float> sr;
        if (ode) {
          h.resize(static_cast<size_t>(opt.batch) * n);
          model.embed(h.data(), tok);
          sr = sys->solve(h.data(), so);
          if (!sr.ok())
            throw Error("record: the teacher's solve of " + std::string(name) + " batch " + std::to_string(index) +
                        " failed: " + sr.message);
          st = sr.saved.data();
        } else {
          model.loop_forward(tok, m.K, lw);
          st = lw.h.data();
        }
        for (int b = 0; b < opt.batch; ++b) {
          const size_t e = static_cast<size_t>(bi) * static_cast<size_t>(opt.batch) + static_cast<size_t>(b);
          for (size_t k = 0; k < S; ++k)
            std::copy_n(st + (k * static_cast<size_t>(opt.batch) + static_cast<size_t>(b)) * n, n,
                        states.data() + (e * S + k) * n);
          for (int t = 0; t < m.T; ++t) {
            const size_t src = static_cast<size_t>(b) * static_cast<size_t>(m.T) + static_cast<size_t>(t);
            tokens[e * static_cast<size_t>(m.T) + static_cast<size_t>(t)] = static_cast<float>(tok.data[src]);
            targets[e * static_cast<size_t>(m.T) + static_cast<size_t>(t)] = static_cast<float>(tgt.data[src]);
          }
        }
      }
      // The shard is written (and then entered in the manifest) by a writer thread while
      // the teacher computes the next one; writes stay in order (each waits for the one
      // before), and the manifest names a shard only once its file is complete.
      char file[64];
      std::snprintf(file, sizeof file, "%s-%05zu.safetensors", name, shards.size());
      shards.push_back({file, ne, static_cast<int64_t>(first_batch) * opt.batch});
      if (writer.valid()) writer.get();  // the previous shard (rethrows its error)
      writer = std::async(std::launch::async,
                          [&progress, path = (dir / file).string(), manifest = m.to_json(), mfile = mpath.string(),
                           hash = m.teacher_hash, split = std::string(name), st = std::move(states),
                           tk = std::move(tokens), tg = std::move(targets), ne, K = m.K, T = m.T, C = m.C,
                           line = "record: " + std::string(name) + " " + std::to_string(m.examples(name)) + "/" +
                                  std::to_string(static_cast<int64_t>(batches) * opt.batch) + " examples (" + file +
                                  ")"] {
                            const int64_t e64 = ne;
                            write_safetensors<float>(path,
                                                     {{"states", {e64, K + 1, T, C}, st.data()},
                                                      {"tokens", {e64, T}, tk.data()},
                                                      {"targets", {e64, T}, tg.data()}},
                                                     {{"format", "flowloop-trajectories"},
                                                      {"teacher_hash", hash},
                                                      {"split", split}});
                            write_file_atomic(mfile, manifest);
                            progress << line << std::endl;
                          });
    }
  }
  if (writer.valid()) writer.get();
  return m;
}

}  // namespace flowloop
