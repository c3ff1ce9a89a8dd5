#include "flowloop/study/compare.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "flowloop/io/io.hpp"
#include "flowloop/core/tensor.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop {

namespace {
std::string num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}
}  // namespace

void Regime::validate(const ModelConfig& model) const {
  const std::string where = "regime '" + label() + "': ";
  depth.validate();
  if (exit_rule.empty()) return;
  if (depth.ode()) throw Error(where + "the exit rules apply to looping; a solve stops by @terminal");
  if (exit_rule == "q") {
    if (!(exit_value > 0 && exit_value <= 1)) throw Error(where + "q must be in (0, 1]");
    if (!model.exit_gate) throw Error(where + "the model has no exit gate (train it with --exit-gate)");
  } else if (exit_rule == "delta") {
    if (!(exit_value > 0) || !std::isfinite(exit_value)) throw Error(where + "delta must be positive");
  } else {
    throw Error(where + "unknown exit rule '" + exit_rule + "' (q or delta)");
  }
}

std::string Regime::label() const {
  std::string s = depth.token();
  if (depth.coupled) s += "@coupled";
  if (depth.exit_threshold > 0) s += "@terminal" + num(depth.exit_threshold);
  if (!exit_rule.empty()) s += "@" + exit_rule + num(exit_value);
  return s;
}

Regime Regime::parse(const std::string& token) {
  auto fail = [&](const std::string& m) { return Error("regime '" + token + "': " + m); };
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t at; (at = token.find('@', start)) != std::string::npos; start = at + 1)
    parts.push_back(token.substr(start, at - start));
  parts.push_back(token.substr(start));
  Regime r;
  r.depth = DepthSpec::parse(parts[0]);
  auto value = [&](const std::string& mod, const std::string& text) {
    double v = 0;
    if (!parse_number(text, v) || !(v > 0)) throw fail("@" + mod + " needs a positive number, got '" + text + "'");
    return v;
  };
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string& m = parts[i];
    if (m == "coupled") {
      r.depth.coupled = true;
    } else if (m.rfind("terminal", 0) == 0) {
      r.depth.exit_threshold = value("terminal", m.substr(8));
    } else if (m.rfind("delta", 0) == 0) {
      r.exit_rule = "delta";
      r.exit_value = value("delta", m.substr(5));
    } else if (m.rfind("q", 0) == 0) {
      r.exit_rule = "q";
      r.exit_value = value("q", m.substr(1));
    } else {
      throw fail("unknown modifier '@" + m + "' (coupled, terminalE, qQ, deltaD)");
    }
  }
  try {
    r.depth.validate();
  } catch (const Error& e) {
    throw fail(e.what());
  }
  if (!r.exit_rule.empty() && r.depth.ode()) throw fail("the exit rules apply to looping; a solve stops by @terminal");
  return r;
}

std::vector<Regime> Regime::parse_list(const std::string& list) {
  std::vector<Regime> out;
  for (const auto& tok : split_list(list)) out.push_back(parse(tok));
  if (out.empty()) throw Error("regime list '" + list + "' is empty");
  return out;
}

std::vector<Regime> default_regimes(const ModelConfig& model) {
  const int D = std::max(1, model.depth);
  std::vector<std::string> t;
  for (int k = 1; k <= 2 * D; ++k) t.push_back("loop:" + std::to_string(k));
  for (const char* m : {"euler", "midpoint", "rk4"})
    for (int n : {1, 2, 4, 8, 16}) t.push_back(std::string(m) + ":" + std::to_string(n));
  const char* tols[] = {"1e-1", "1e-2", "1e-3", "1e-4", "1e-5", "1e-6"};
  for (const char* m : {"bosh3", "dopri5", "tsit5"})
    for (const char* tol : tols) t.push_back(std::string(m) + ":" + tol);
  for (const char* tol : tols) t.push_back(std::string("dopri5:") + tol + "@coupled");
  for (const char* e : {"0.1", "0.03", "0.01"}) t.push_back(std::string("dopri5:1e-3@terminal") + e);
  for (const char* d : {"0.5", "1", "2", "4"}) t.push_back("loop:" + std::to_string(2 * D) + "@delta" + d);
  if (model.exit_gate)
    for (const char* q : {"0.1", "0.3", "0.5", "0.7", "0.9"}) t.push_back("loop:" + std::to_string(D) + "@q" + q);
  std::vector<Regime> out;
  for (const auto& s : t) out.push_back(Regime::parse(s));
  return out;
}

std::vector<CompareRow> compare_regimes(const Model<float>& model, const DataSource& data,
                                        const std::vector<Regime>& regimes, int batches, int batch_size,
                                        const std::function<void(size_t, size_t, const std::string&)>& progress) {
  if (batches < 1 || batch_size < 1) throw Error("compare: batches and batch size must be at least 1");
  for (const auto& r : regimes) r.validate(model.cfg);
  std::vector<CompareRow> rows;
  rows.reserve(regimes.size());
  for (size_t i = 0; i < regimes.size(); ++i) {
    if (progress) progress(i, regimes.size(), regimes[i].label());
    const Regime& r = regimes[i];
    rows.push_back({r, evaluate(model, data, r.depth, batches, batch_size, r.exit_rule, r.exit_value)});
  }
  if (progress) progress(regimes.size(), regimes.size(), "");
  return rows;
}

std::vector<size_t> pareto_front(const std::vector<CompareRow>& rows) {
  std::vector<size_t> ok;
  for (size_t i = 0; i < rows.size(); ++i)
    if (rows[i].result.ok() && std::isfinite(rows[i].result.accuracy)) ok.push_back(i);
  // by mean evaluations, then by accuracy (best first): a row is on the front when
  // it beats the accuracy of every row that costs no more
  std::stable_sort(ok.begin(), ok.end(), [&](size_t a, size_t b) {
    const auto &x = rows[a].result, &y = rows[b].result;
    if (x.nfe_mean != y.nfe_mean) return x.nfe_mean < y.nfe_mean;
    return x.accuracy > y.accuracy;
  });
  std::vector<size_t> front;
  double best = -1;
  for (size_t i : ok)
    if (rows[i].result.accuracy > best) {
      front.push_back(i);
      best = rows[i].result.accuracy;
    }
  return front;
}

namespace {
const char* kColumns[] = {"regime",   "mode",     "solver",     "steps",        "rtol",     "atol",
                          "coupled",  "terminal", "exit_rule",  "exit_value",   "loss",     "accuracy",
                          "examples", "nfe",      "nfe_mean",   "nfe_p50",      "nfe_p90",  "nfe_max",
                          "seq_evals", "exit_depth", "wall_s",  "status",       "n_success", "n_terminal",
                          "n_max_steps", "n_step_too_small", "n_non_finite", "message"};

nlohmann::ordered_json row_json(const CompareRow& row) {
  const DepthSpec& d = row.regime.depth;
  const EvalResult& e = row.result;
  nlohmann::ordered_json j;
  j["regime"] = row.regime.label();
  j["mode"] = d.ode() ? "solve" : "loop";
  j["solver"] = d.ode() ? d.solver : "";
  j["steps"] = d.ode() ? d.steps : d.loops;
  j["rtol"] = d.adaptive() ? d.rtol : 0.0;
  j["atol"] = d.adaptive() ? d.atol : 0.0;
  j["coupled"] = d.coupled;
  j["terminal"] = d.exit_threshold;
  j["exit_rule"] = row.regime.exit_rule;
  j["exit_value"] = row.regime.exit_value;
  j["loss"] = e.loss;
  j["accuracy"] = e.accuracy;
  j["examples"] = e.examples;
  j["nfe"] = e.nfe;
  j["nfe_mean"] = e.nfe_mean;
  j["nfe_p50"] = e.nfe_p50;
  j["nfe_p90"] = e.nfe_p90;
  j["nfe_max"] = e.nfe_max;
  j["seq_evals"] = e.seq_evals;
  j["exit_depth"] = e.exit_depth;
  j["wall_s"] = e.wall_s;
  j["status"] = e.status();
  j["n_success"] = e.status_counts[0];
  j["n_terminal"] = e.status_counts[1];
  j["n_max_steps"] = e.status_counts[2];
  j["n_step_too_small"] = e.status_counts[3];
  j["n_non_finite"] = e.status_counts[4];
  j["message"] = e.message;
  return j;
}

std::string csv_field(const nlohmann::ordered_json& v) {
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    if (s.find_first_of(",\"\n") == std::string::npos) return s;
    std::string q = "\"";
    for (char c : s) {
      if (c == '"') q += '"';
      q += c == '\n' ? ' ' : c;
    }
    return q + "\"";
  }
  if (v.is_boolean()) return v.get<bool>() ? "1" : "0";
  if (v.is_number_float()) return format_number(v.get<double>());
  return v.dump();
}
}  // namespace

std::string compare_csv(const std::vector<CompareRow>& rows, const std::vector<size_t>& which) {
  std::string out;
  for (const char* c : kColumns) out += std::string(out.empty() ? "" : ",") + c;
  out += "\n";
  for (size_t i : which) {
    const auto j = row_json(rows.at(i));
    std::string line;
    for (const char* c : kColumns) line += (line.empty() ? "" : ",") + csv_field(j.at(c));
    out += line + "\n";
  }
  return out;
}

std::string compare_jsonl(const std::vector<CompareRow>& rows, double trained_depth) {
  std::string out;
  for (const auto& row : rows) {
    auto j = row_json(row);
    j["depth"] = parse_json(row.regime.depth.to_json(trained_depth), "depth spec");
    out += j.dump() + "\n";
  }
  return out;
}

std::vector<size_t> write_compare_files(const std::string& dir, const std::vector<CompareRow>& rows,
                                        double trained_depth) {
  std::vector<size_t> all(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) all[i] = i;
  const std::vector<size_t> front = pareto_front(rows);
  const std::filesystem::path d(dir);
  write_file_atomic((d / "compare.csv").string(), compare_csv(rows, all));
  write_file_atomic((d / "compare.jsonl").string(), compare_jsonl(rows, trained_depth));
  write_file_atomic((d / "pareto.csv").string(), compare_csv(rows, front));
  return front;
}

}  // namespace flowloop
