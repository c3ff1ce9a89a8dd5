// The `flowloop` command: init, forward, bench field.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <limits>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "flowloop/flowloop.hpp"
#include "flowloop/problems.hpp"
#include "flowloop/solver.hpp"

using namespace flowloop;
using nlohmann::json;

namespace {

json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("cannot open '" + path + "'");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw Error("'" + path + "' is not valid JSON: " + e.what());
  }
}

// {"tokens": [[...], ...]} -> (B, T) batch; `key` may also be "targets".
TokenBatch parse_rows(const json& j, const std::string& key, const std::string& path) {
  const std::string where = "'" + path + "' \"" + key + "\"";
  if (!j.is_object() || !j.contains(key)) throw Error("'" + path + "' has no \"" + key + "\" field");
  const json& rows = j[key];
  if (!rows.is_array() || rows.empty()) throw Error(where + " must be a non-empty list of rows");
  TokenBatch tb;
  tb.B = static_cast<int>(rows.size());
  for (size_t b = 0; b < rows.size(); ++b) {
    const json& r = rows[b];
    if (!r.is_array() || r.empty())
      throw Error(where + ": row " + std::to_string(b) + " is not a non-empty list");
    if (b == 0) tb.T = static_cast<int>(r.size());
    if (static_cast<int>(r.size()) != tb.T)
      throw Error(where + ": row " + std::to_string(b) + " has length " + std::to_string(r.size()) +
                  " but row 0 has " + std::to_string(tb.T) + " (rows must be equally long)");
    for (size_t t = 0; t < r.size(); ++t) {
      if (!r[t].is_number_integer())
        throw Error(where + ": row " + std::to_string(b) + ", position " + std::to_string(t) +
                    " is not an integer");
      const auto v = r[t].get<int64_t>();
      if (v < INT32_MIN || v > INT32_MAX)
        throw Error(where + ": row " + std::to_string(b) + ", position " + std::to_string(t) +
                    " is out of range");
      tb.data.push_back(static_cast<int32_t>(v));
    }
  }
  return tb;
}

void write_text_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) throw Error("cannot write '" + path + "'");
    out << text;
    out.flush();
    if (!out) throw Error("cannot write '" + path + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Error("cannot write '" + path + "': rename failed");
}

template <class S>
json logits_json(const Buffer<S>& logits, int B, int T, int V) {
  json out = json::array();
  for (int b = 0; b < B; ++b) {
    json rows = json::array();
    for (int t = 0; t < T; ++t) {
      const S* p = logits.data() + (static_cast<size_t>(b) * T + t) * V;
      rows.push_back(std::vector<S>(p, p + V));
    }
    out.push_back(std::move(rows));
  }
  return out;
}

template <class S>
void run_forward(const std::string& model_path, const std::string& tokens_path, int loops,
                 const std::string& out_path) {
  Model<S> model = load_model<S>(model_path);
  const TokenBatch tokens = parse_rows(read_json_file(tokens_path), "tokens", tokens_path);
  tokens.check(model.cfg, "'" + tokens_path + "' tokens");
  const int K = loops >= 0 ? loops : model.cfg.depth;
  LoopWork<S> w;
  const int nfe = model.loop_forward(tokens, K, w);
  json out;
  out["logits"] = logits_json(w.readout.logits, tokens.B, tokens.T, model.cfg.vocab_size);
  out["nfe"] = nfe;
  out["loops"] = K;
  out["B"] = tokens.B;
  out["T"] = tokens.T;
  out["V"] = model.cfg.vocab_size;
  write_text_atomic(out_path, out.dump());
  json summary = {{"written", out_path}, {"B", tokens.B}, {"T", tokens.T}, {"loops", K}, {"nfe", nfe}};
  std::cout << summary.dump() << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flowloop: looped and continuous-depth transformers"};
  app.require_subcommand(1);

  // ---- init
  ModelConfig cfg;
  uint64_t seed = 0;
  std::string init_out;
  std::string init_dtype = "f32";
  auto* init = app.add_subcommand("init", "write a GPT-2-style randomly initialised model");
  init->add_option("--vocab", cfg.vocab_size, "vocabulary size V")->required();
  init->add_option("--context", cfg.context, "context length Tmax")->required();
  init->add_option("--d-model", cfg.d_model, "model width C")->required();
  init->add_option("--n-head", cfg.n_head, "attention heads NH (C divisible by NH)")->required();
  init->add_option("--d-ff", cfg.d_ff, "MLP width F (default 4C)");
  init->add_option("--n-block", cfg.n_block, "blocks L inside one field evaluation")->required();
  init->add_option("--depth", cfg.depth, "loop count the model is meant for (T1 of the ODE)")
      ->capture_default_str();
  init->add_option("--seed", seed, "random seed")->required();
  init->add_option("--dtype", init_dtype, "stored dtype")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();
  init->add_option("-o,--output", init_out, "output .safetensors file")->required();

  // ---- forward
  std::string fwd_model, fwd_tokens, fwd_out, fwd_precision = "f32";
  int fwd_loops = -1;
  auto* fwd = app.add_subcommand("forward", "logits of a looped model on token rows");
  fwd->add_option("-m,--model", fwd_model, "model .safetensors")->required()->check(CLI::ExistingFile);
  fwd->add_option("--tokens", fwd_tokens, "JSON file {\"tokens\": [[...], ...]}")->required()->check(CLI::ExistingFile);
  fwd->add_option("--loops", fwd_loops, "loop count K (default: the model's depth)");
  fwd->add_option("--precision", fwd_precision, "arithmetic")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();
  fwd->add_option("-o,--output", fwd_out, "output JSON {logits, nfe}")->required();

  // ---- bench
  auto* bench = app.add_subcommand("bench", "benchmarks (one JSON line each)");
  bench->require_subcommand(1);
  BenchOptions bopt;
  auto* bfield = bench->add_subcommand("field", "time one field evaluation against sgemm");
  bfield->add_option("--size", bopt.size, "benchmark size")->check(CLI::IsMember({"S", "M", "G"}))->capture_default_str();
  bfield->add_option("--threads", bopt.threads, "threads (0 = all)")->capture_default_str();
  bfield->add_option("--reps", bopt.min_reps, "minimum timed repetitions")->capture_default_str();
  bfield->add_option("--seconds", bopt.min_seconds, "minimum timed seconds")->capture_default_str();

  // ---- ode-bench
  std::string ob_problem = "arenstorf", ob_solver = "dopri5", ob_controller = "pi";
  double ob_rtol = std::numeric_limits<double>::quiet_NaN(), ob_atol = std::numeric_limits<double>::quiet_NaN();
  int ob_steps = 0;
  bool ob_json = false;
  auto* ob = app.add_subcommand("ode-bench", "a solver on a classical non-stiff problem");
  ob->add_option("--problem", ob_problem, "arenstorf, lorenz, vdp or brusselator")
      ->check(CLI::IsMember(ode_problem_names()))->capture_default_str();
  ob->add_option("--solver", ob_solver, "method")->capture_default_str();
  ob->add_option("--rtol", ob_rtol, "relative tolerance (adaptive)");
  ob->add_option("--atol", ob_atol, "absolute tolerance (adaptive)");
  ob->add_option("--steps", ob_steps, "fixed step count (instead of tolerances)");
  ob->add_option("--controller", ob_controller, "pi (Hairer) or i (torchdiffeq)")
      ->check(CLI::IsMember({"pi", "i"}))->capture_default_str();
  ob->add_flag("--json", ob_json, "one JSON line instead of text");

  CLI11_PARSE(app, argc, argv);

  try {
    if (*init) {
      cfg.finalize();
      const std::map<std::string, std::string> meta = {{"seed", std::to_string(seed)}};
      if (init_dtype == "f32") {
        Model<float> m(cfg);
        m.init(seed);
        save_checkpoint(init_out, cfg, m.layout, m.params.data(), meta);
      } else {
        Model<double> m(cfg);
        m.init(seed);
        save_checkpoint(init_out, cfg, m.layout, m.params.data(), meta);
      }
      json s = {{"written", init_out}, {"config", json::parse(cfg.to_json())},
                {"parameters", ParamLayout(cfg).size()}};
      std::cout << s.dump() << std::endl;
    } else if (*fwd) {
      if (fwd_precision == "f32")
        run_forward<float>(fwd_model, fwd_tokens, fwd_loops, fwd_out);
      else
        run_forward<double>(fwd_model, fwd_tokens, fwd_loops, fwd_out);
    } else if (*ob) {
      const OdeProblem p = ode_problem(ob_problem);
      SolveOptions o;
      o.method = ob_solver;
      o.t0 = p.t0;
      o.t1 = p.t1;
      o.controller = ob_controller == "pi" ? Controller::PI : Controller::I;
      if (ob_steps > 0) {
        o.steps = ob_steps;
      } else {
        if (std::isnan(ob_rtol) || std::isnan(ob_atol))
          throw Error("ode-bench: give --rtol and --atol (adaptive) or --steps (fixed)");
        o.adaptive = true;
        o.rtol = ob_rtol;
        o.atol = ob_atol;
      }
      FunctionSystem sys(p.f, p.y0.size());
      std::vector<double> y = p.y0;
      const auto r = integrate(sys, y.data(), o);
      json j = {{"problem", ob_problem}, {"solver", ob_solver}, {"rtol", ob_rtol}, {"atol", ob_atol},
                {"nfe", r.nfe}, {"steps", r.steps}, {"accepted", r.accepted}, {"rejected", r.rejected},
                {"y_end", y}, {"status", status_name(r.status)}};
      if (ob_steps > 0) j["fixed_steps"] = ob_steps;
      if (!r.message.empty()) j["message"] = r.message;
      if (ob_json) {
        std::cout << j.dump() << std::endl;
      } else {
        std::cout << ob_problem << " with " << ob_solver << ": status " << status_name(r.status) << ", nfe "
                  << r.nfe << ", steps " << r.steps << " (" << r.accepted << " accepted, " << r.rejected
                  << " rejected)\n  y_end = " << json(y).dump() << std::endl;
        if (!r.message.empty()) std::cout << "  " << r.message << std::endl;
      }
      if (!r.ok()) return 3;
    } else if (*bfield) {
      std::cout << bench_field(bopt) << std::endl;
    }
  } catch (const Error& e) {
    std::cerr << "flowloop: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "flowloop: error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
