// Evaluating a flow student against its teacher's recorded ends: every sampler at its
// NFE, and the truncated teacher at the same NFE (`flowloop flow-match eval`).
#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>
#include <iostream>
#include <limits>
#include <sstream>

#include "flowloop/io/checkpoint.hpp"
#include "flowloop/train/flowmatch_train.hpp"
#include "flowloop/io/io.hpp"

namespace flowloop {

using nlohmann::json;

namespace {

// Sums of the token states (C values each) for a Gaussian fit.
struct Moments {
  int C = 0;
  double n = 0;
  std::vector<double> sum, outer;  // (C), (C, C)
  void add(const float* x, size_t tokens) {
    const size_t c = static_cast<size_t>(C);
    if (sum.empty()) {
      sum.assign(c, 0.0);
      outer.assign(c * c, 0.0);
    }
    for (size_t t = 0; t < tokens; ++t) {
      const float* v = x + t * c;
      for (size_t i = 0; i < c; ++i) {
        sum[i] += v[i];
        for (size_t j = 0; j <= i; ++j) outer[i * c + j] += static_cast<double>(v[i]) * v[j];
      }
    }
    n += static_cast<double>(tokens);
  }
  void gaussian(std::vector<double>& mu, std::vector<double>& cov) const {
    const size_t c = static_cast<size_t>(C);
    mu.resize(c);
    cov.resize(c * c);
    for (size_t i = 0; i < c; ++i) mu[i] = sum[i] / n;
    for (size_t i = 0; i < c; ++i)
      for (size_t j = 0; j <= i; ++j)
        cov[i * c + j] = cov[j * c + i] = outer[i * c + j] / n - mu[i] * mu[j];
  }
};

// What one row adds up over the batches.
struct RowSums {
  FlowEvalRow row;
  double err2 = 0, ref2 = 0, kl = 0, right = 0, straight = 0, nfe = 0;
  int64_t kl_count = 0, scored = 0, sequences = 0;
  Moments moments;
  std::vector<double> mean_p;  // generative: the summed decoded distributions (T, V)
  void finish(bool generative, const Moments& ref, const std::vector<double>& ref_p, int T, int V) {
    row.rel_l2 = generative ? std::nan("") : ref2 > 0 ? std::sqrt(err2 / ref2) : 0.0;
    row.accuracy = generative ? std::nan("") : scored ? right / static_cast<double>(scored) : 0.0;
    if (!generative) {
      row.kl = kl_count ? kl / static_cast<double>(kl_count) : 0.0;
    } else {  // KL of the mean distributions per position, averaged over the positions
      double k = 0;
      for (int t = 0; t < T; ++t)
        for (int v = 0; v < V; ++v) {
          const size_t i = static_cast<size_t>(t) * V + v;
          const double p = ref_p[i] / static_cast<double>(sequences), q = mean_p[i] / static_cast<double>(sequences);
          if (p > 0) k += p * (std::log(p) - std::log(std::max(q, 1e-300)));
        }
      row.kl = k / T;
    }
    std::vector<double> m1, c1, m2, c2;
    moments.gaussian(m1, c1);
    ref.gaussian(m2, c2);
    row.frechet = frechet_distance(m1, c1, m2, c2, moments.C);
    row.straightness = sequences ? straight / static_cast<double>(sequences) : 0.0;
    row.nfe = sequences ? nfe / static_cast<double>(sequences) : 0.0;
    row.examples = sequences;
  }
};

// Mean over the values of a sequence of ((x1 - x0) - v)^2, summed over the sequences.
double straight_sum(const float* x1, const float* x0, const float* v, int B, size_t n) {
  double s = 0;
  for (int b = 0; b < B; ++b) {
    double q = 0;
    const size_t o = static_cast<size_t>(b) * n;
    for (size_t i = 0; i < n; ++i) {
      const double d = (static_cast<double>(x1[o + i]) - x0[o + i]) - v[o + i];
      q += d * d;
    }
    s += q / static_cast<double>(n);
  }
  return s;
}

}  // namespace

template <class S>
void log_softmax_rows(std::vector<double>& out, const S* logits, size_t N, size_t V) {
  out.resize(N * V);
  for (size_t i = 0; i < N; ++i) {
    const S* l = logits + i * V;
    double mx = -std::numeric_limits<double>::infinity();
    for (size_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(l[v]));
    double z = 0;
    for (size_t v = 0; v < V; ++v) z += std::exp(static_cast<double>(l[v]) - mx);
    const double lse = mx + std::log(z);
    for (size_t v = 0; v < V; ++v) out[i * V + v] = static_cast<double>(l[v]) - lse;
  }
}
template void log_softmax_rows<float>(std::vector<double>&, const float*, size_t, size_t);
template void log_softmax_rows<double>(std::vector<double>&, const double*, size_t, size_t);

double frechet_distance(const std::vector<double>& mu1, const std::vector<double>& cov1,
                        const std::vector<double>& mu2, const std::vector<double>& cov2, int C) {
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const size_t c = static_cast<size_t>(C);
  if (mu1.size() != c || mu2.size() != c || cov1.size() != c * c || cov2.size() != c * c)
    throw Error("frechet_distance: shapes do not agree with C = " + std::to_string(C));
  const Eigen::Map<const Mat> S1(cov1.data(), C, C), S2(cov2.data(), C, C);
  // tr((S1^1/2 S2 S1^1/2)^1/2): both factors symmetric positive semi-definite
  Eigen::SelfAdjointEigenSolver<Mat> e1(S1);
  const Eigen::VectorXd l1 = e1.eigenvalues().cwiseMax(0.0).cwiseSqrt();
  const Mat root = e1.eigenvectors() * l1.asDiagonal() * e1.eigenvectors().transpose();
  const Mat M = root * S2 * root;
  Eigen::SelfAdjointEigenSolver<Mat> e2(0.5 * (M + M.transpose()), Eigen::EigenvaluesOnly);
  const double cross = e2.eigenvalues().cwiseMax(0.0).cwiseSqrt().sum();
  double d = 0;
  for (size_t i = 0; i < c; ++i) d += (mu1[i] - mu2[i]) * (mu1[i] - mu2[i]);
  return std::max(0.0, d + S1.trace() + S2.trace() - 2.0 * cross);
}

FlowStudent load_flow_student(const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::read(path);
  auto get = [&](const char* k) {
    return f.metadata_value(k, "not a flow-match model:", " (written by flow-match train?)");
  };
  const FlowMatchConfig c = FlowMatchConfig::from_json(get("flow_match_config"), path);
  const std::string hash = get("teacher_hash");
  return FlowStudent{load_model<float>(path), c, hash};
}

void require_same_teacher(const FlowStudent& s, const TrajectoryLoader& data) {
  if (s.teacher_hash != data.manifest().teacher_hash)
    throw Error("the student learned from teacher " + s.teacher_hash + ", but the recording at '" + data.dir() +
                "' is of teacher " + data.manifest().teacher_hash);
}

std::string FlowEvalRow::to_json() const {
  nlohmann::ordered_json j;
  j["sampler"] = sampler;
  j["nfe"] = nfe;
  j["nfe_max"] = nfe_max;
  j["rel_l2"] = rel_l2;
  j["kl"] = kl;
  j["accuracy"] = accuracy;
  j["straightness"] = straightness;
  j["frechet"] = frechet;
  j["examples"] = examples;
  j["status"] = status;
  return j.dump();
}

std::string flow_eval_csv(const std::vector<FlowEvalRow>& rows) {
  std::ostringstream s;
  s << "sampler,nfe,nfe_max,rel_l2,kl,accuracy,straightness,frechet,examples,status\n";
  for (const auto& r : rows)
    s << r.sampler << "," << format_number(r.nfe) << "," << format_number(r.nfe_max) << "," << format_number(r.rel_l2)
      << "," << format_number(r.kl) << "," << format_number(r.accuracy) << "," << format_number(r.straightness) << ","
      << format_number(r.frechet) << "," << r.examples << "," << r.status << "\n";
  return s.str();
}

std::vector<FlowEvalRow> flow_match_evaluate(const Model<float>& student, const Model<float>& teacher,
                                             TrajectoryLoader& test, const FlowEvalOptions& opt, std::ostream* progress) {
  const TrajectoryManifest& m = test.manifest();
  const ModelConfig& sc = student.cfg;
  const ModelConfig& tc = teacher.cfg;
  const std::string where = "flow-match eval";
  if (!sc.time_cond) throw Error(where + ": the student's field is not time-conditioned (a flow-match train model?)");
  if (sc.d_model != m.C || tc.d_model != m.C || sc.context < m.T || tc.context < m.T || sc.vocab_size != tc.vocab_size)
    throw Error(where + ": the recording's states (T " + std::to_string(m.T) + ", C " + std::to_string(m.C) +
                ") and the models (student: width " + std::to_string(sc.d_model) + ", context " +
                std::to_string(sc.context) + ", vocabulary " + std::to_string(sc.vocab_size) + "; teacher: width " +
                std::to_string(tc.d_model) + ", context " + std::to_string(tc.context) + ", vocabulary " +
                std::to_string(tc.vocab_size) + ") do not fit together");
  if (opt.batch < 1 || opt.examples < 0 || opt.straightness_points < 1)
    throw Error(where + ": batch and straightness_points must be at least 1, examples at least 0");
  const int K = m.K, T = m.T, C = m.C, V = tc.vocab_size;
  const size_t n = static_cast<size_t>(T) * static_cast<size_t>(C);
  std::vector<DepthSpec> samplers = opt.samplers;
  std::vector<int> shortcut = opt.shortcut;
  if (!shortcut.empty() && !sc.step_cond)
    throw Error(where + ": shortcut samplers need a step-conditioned student (flow-match train --shortcut)");
  for (int N : shortcut)
    if (N < 1) throw Error(where + ": a shortcut sampler needs at least 1 step, not " + std::to_string(N));
  if (samplers.empty() && shortcut.empty() && sc.step_cond) {
    shortcut = {1, 2, 4, 8};
    if (K != 1 && K != 2 && K != 4 && K != 8) shortcut.push_back(K);
  }
  if (samplers.empty() && opt.shortcut.empty()) {
    std::vector<std::string> tokens = {"euler:1", "euler:2", "euler:4", "euler:8"};
    if (K != 1 && K != 2 && K != 4 && K != 8) tokens.push_back("euler:" + std::to_string(K));
    for (const char* t : {"midpoint:1", "midpoint:2", "rk4:1", "rk4:2", "dopri5:1e-2", "dopri5:1e-3", "dopri5:1e-4"})
      tokens.push_back(t);
    for (const auto& t : tokens) samplers.push_back(DepthSpec::parse(t));
  }
  std::vector<SolveOptions> solves;
  std::vector<std::string> names;
  std::vector<double> steps;  // the step told to a step-conditioned student (0: none)
  for (const auto& s : samplers) {
    if (!s.ode()) throw Error(where + ": sampler '" + s.token() + "' is a loop; the student is sampled with a solver");
    if (s.solver.rfind("odeint-", 0) == 0)
      throw Error(where + ": sampler '" + s.token() + "': the odeint solvers do not report their steps, which "
                  "straightness needs; use the built-in method of the same name");
    SolveOptions so = s.solve_options(1.0);
    so.save = SaveKind::Steps;  // the accepted states (no evaluations beyond the sampler's own)
    solves.push_back(so);
    names.push_back(s.token());
    steps.push_back(0.0);
  }
  for (int N : shortcut) {
    SolveOptions so = DepthSpec::parse("euler:" + std::to_string(N)).solve_options(1.0);
    so.save = SaveKind::Steps;
    solves.push_back(so);
    names.push_back("shortcut:" + std::to_string(N));
    steps.push_back(1.0 / N);
  }
  // The truncated teacher: loop N (Euler, dt = 1, from t = 0) for a loop teacher, and
  // N Euler steps over the teacher's whole interval.
  const bool loop_teacher = m.depth.value("mode", std::string()) == "loop";
  const double t_end = m.times.empty() ? static_cast<double>(K) : m.times.back();
  struct TeacherRun {
    std::string name;
    int N;
    double dt;
  };
  std::vector<TeacherRun> truncated;
  if (opt.teacher_rows) {
    if (loop_teacher)
      for (int N = 1; N <= K; ++N) truncated.push_back({"teacher-loop", N, 1.0});
    for (int N = 1; N <= K; ++N)
      if (!loop_teacher || std::abs(t_end / N - 1.0) > 1e-12) truncated.push_back({"teacher-euler", N, t_end / N});
  }
  const size_t ns = solves.size();
  std::vector<RowSums> rows(ns + truncated.size());
  for (size_t i = 0; i < ns; ++i) rows[i].row.sampler = names[i];
  for (size_t i = 0; i < truncated.size(); ++i) rows[ns + i].row.sampler = truncated[i].name;

  const int64_t total = opt.examples > 0 ? std::min<int64_t>(opt.examples, test.examples()) : test.examples();
  TrajectoryBatch tb;
  ReadoutCache<float> rc;
  Buffer<float> h0, x0, y, v, h, f, path, xs, he;
  std::vector<double> ref_logp, logp;
  std::vector<double> tt;
  Moments ref;  // the teacher's ends
  ref.C = C;
  for (auto& r : rows) r.moments.C = C;
  std::vector<double> ref_p(static_cast<size_t>(T) * V, 0.0);  // generative: their summed distributions
  for (int64_t first = 0; first < total; first += opt.batch) {
    const int B = static_cast<int>(std::min<int64_t>(opt.batch, total - first));
    test.range(first, B, tb);
    const size_t N = static_cast<size_t>(B) * n;
    h0.resize(N);
    h.resize(N);
    for (int b = 0; b < B; ++b) {
      std::copy_n(tb.state(b, 0), n, h0.data() + static_cast<size_t>(b) * n);
      std::copy_n(tb.state(b, K), n, h.data() + static_cast<size_t>(b) * n);  // the teacher's end
    }
    // the student's start: the teacher's h_0, or (generative) noise of this batch
    x0 = h0;
    if (opt.generative) {
      Rng rng(opt.seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(first) + 0x6e6f697365ULL);
      for (auto& e : x0) e = static_cast<float>(rng.normal());
    }
    const int rowsN = B * T;
    rc.resize(tc, rowsN);
    teacher.readout(h.data(), B, T, rc);
    log_softmax_rows(ref_logp, rc.logits.data(), static_cast<size_t>(rowsN), static_cast<size_t>(V));
    ref.add(h.data(), static_cast<size_t>(rowsN));
    for (size_t i = 0; i < ref_logp.size(); ++i) ref_p[i % ref_p.size()] += std::exp(ref_logp[i]);
    // the student's instantaneous velocity (straightness), on its device
    FieldSystem<float> velocity(student.field, student.field_params(), B, T, student.device_field());
    // scores x1_hat (B, T, C) into a row
    auto score = [&](RowSums& r, const float* x1) {
      for (size_t i = 0; i < N; ++i) {
        const double d = static_cast<double>(x1[i]) - h[i];
        r.err2 += d * d;
        r.ref2 += static_cast<double>(h[i]) * h[i];
      }
      teacher.readout(x1, B, T, rc);
      int64_t cnt = 0;
      const double acc = accuracy(rc.logits.data(), tb.targets, V, test.exact_match(), &cnt);
      r.right += acc * static_cast<double>(cnt);
      r.scored += cnt;
      log_softmax_rows(logp, rc.logits.data(), static_cast<size_t>(rowsN), static_cast<size_t>(V));
      for (int i = 0; i < rowsN; ++i) {
        if (tb.targets.data[static_cast<size_t>(i)] < 0) continue;
        double kl = 0;
        const size_t o = static_cast<size_t>(i) * static_cast<size_t>(V);
        for (int k = 0; k < V; ++k) kl += std::exp(ref_logp[o + k]) * (ref_logp[o + k] - logp[o + k]);
        r.kl += kl;
        ++r.kl_count;
      }
      r.moments.add(x1, static_cast<size_t>(rowsN));
      if (opt.generative) {
        r.mean_p.resize(ref_p.size(), 0.0);
        for (size_t i = 0; i < logp.size(); ++i) r.mean_p[i % ref_p.size()] += std::exp(logp[i]);
      }
      r.sequences += B;
    };
    // the student under every sampler
    for (size_t s = 0; s < ns; ++s) {
      RowSums& r = rows[s];
      FieldSystem<float> sys(student.field, student.field_params(), B, T, student.device_field());
      if (steps[s] > 0) sys.set_step(steps[s]);
      y = x0;
      const SolveResult<float> res = sys.solve(y.data(), solves[s]);
      if (!res.ok() && r.row.status == "ok") r.row.status = std::string(status_name(res.status)) + ": " + res.message;
      for (int b = 0; b < B; ++b) {
        const double e = res.seq.size() == static_cast<size_t>(B) ? static_cast<double>(res.seq[static_cast<size_t>(b)].nfe)
                                                                   : static_cast<double>(res.nfe);
        r.nfe += e;
        r.row.nfe_max = std::max(r.row.nfe_max, e);
      }
      // straightness on the midpoint grid of the sampler's path (linear between its steps)
      const int M = opt.straightness_points;
      v.resize(N);
      xs.resize(N);
      for (int j = 0; j < M; ++j) {
        const double tj = (j + 0.5) / M;
        for (int b = 0; b < B; ++b) {
          const auto& ts = res.step_times[static_cast<size_t>(b)];
          const auto& st = res.step_states[static_cast<size_t>(b)];
          float* dst = xs.data() + static_cast<size_t>(b) * n;
          const size_t i = std::min<size_t>(
              static_cast<size_t>(std::upper_bound(ts.begin(), ts.end(), tj) - ts.begin()), ts.size() - 1);
          if (i == 0) {  // before the first step: its start
            std::copy_n(st.data(), n, dst);
            continue;
          }
          const double span = ts[i] - ts[i - 1];
          const double w1 = span > 0 ? std::clamp((tj - ts[i - 1]) / span, 0.0, 1.0) : 1.0;
          const float a = static_cast<float>(1.0 - w1), c = static_cast<float>(w1);
          const float* s0 = st.data() + (i - 1) * n;
          for (size_t q = 0; q < n; ++q) dst[q] = a * s0[q] + c * s0[q + n];
        }
        tt.assign(static_cast<size_t>(B), tj);
        // straightness is of the instantaneous velocity (d = 0) along the sampler's path
        velocity.eval(v.data(), xs.data(), tt.data(), nullptr, B);
        r.straight += straight_sum(y.data(), x0.data(), v.data(), B, n) / M;
      }
      score(r, y.data());
    }
    // the truncated teacher: N Euler steps of size dt from t = 0
    // (on the teacher's device, as every evaluation here: FieldSystem evaluates where its model is)
    FieldSystem<float> teacher_sys(teacher.field, teacher.field_params(), B, T, teacher.device_field());
    for (size_t k = 0; k < truncated.size(); ++k) {
      RowSums& r = rows[ns + k];
      const TeacherRun& tr = truncated[k];
      // Euler through the one driver, every state kept: (N+1, B, n) in path
      path.resize(static_cast<size_t>(tr.N + 1) * N);
      std::copy_n(h0.data(), N, path.data());
      SolveOptions eo = Model<float>::loop_options(tr.N, true);  // loop N's solve, on [0, N dt]
      eo.t1 = tr.N * tr.dt;
      he.assign(h0.begin(), h0.end());
      const SolveResult<float> er = teacher_sys.solve(he.data(), eo);
      if (!er.ok()) throw Error("flow-match eval: the truncated teacher's Euler solve failed: " + er.message);
      for (int b = 0; b < B; ++b)
        for (int i = 1; i <= tr.N; ++i)
          std::copy_n(er.step_states[static_cast<size_t>(b)].data() + static_cast<size_t>(i) * n, n,
                      path.data() + static_cast<size_t>(i) * N + static_cast<size_t>(b) * n);
      f.resize(N);
      // straightness of the piecewise-linear path over [0, 1]: velocity N (h_{i+1} - h_i) on segment i
      const float* end = path.data() + static_cast<size_t>(tr.N) * N;
      for (int i = 0; i < tr.N; ++i) {
        const float* hi = path.data() + static_cast<size_t>(i) * N;
        for (size_t q = 0; q < N; ++q) f[q] = static_cast<float>(tr.N) * (hi[q + N] - hi[q]);
        r.straight += straight_sum(end, h0.data(), f.data(), B, n) / tr.N;
      }
      r.nfe += static_cast<double>(tr.N) * B;
      r.row.nfe_max = tr.N;
      score(r, end);
    }
    if (progress) *progress << "flow-match eval: " << first + B << "/" << total << " examples" << std::endl;
  }
  std::vector<FlowEvalRow> out;
  for (size_t k = 0; k < rows.size(); ++k) {
    rows[k].finish(opt.generative && k < ns, ref, ref_p, T, V);
    out.push_back(rows[k].row);
  }
  return out;
}

void set_samplers(FlowEvalOptions& opt, const std::string& list) {
  opt.samplers.clear();
  opt.shortcut.clear();
  std::string solvers;
  std::stringstream in(list);
  for (std::string tok; std::getline(in, tok, ',');) {
    if (tok.rfind("shortcut:", 0) != 0) {
      solvers += (solvers.empty() ? "" : ",") + tok;
      continue;
    }
    const std::string n = tok.substr(9);
    if (n.empty() || n.size() > 6 || n.find_first_not_of("0123456789") != std::string::npos)
      throw Error("samplers: '" + tok + "' is not shortcut:N with N a positive whole number of steps");
    opt.shortcut.push_back(std::stoi(n));
  }
  if (!solvers.empty()) opt.samplers = DepthSpec::parse_list(solvers);
}

std::vector<FlowEvalRow> flow_match_evaluate(const std::string& student, const std::string& data, FlowEvalOptions opt,
                                             Device d, std::ostream* progress) {
  FlowStudent s = load_flow_student(student);
  TrajectoryLoader test(data, "test", 0);
  require_same_teacher(s, test);
  Model<float> teacher = load_model<float>(test.teacher_path());
  s.model.set_device(d);
  teacher.set_device(d);
  opt.generative = s.config.matcher == "generative";  // from noise: distributions only
  return flow_match_evaluate(s.model, teacher, test, opt, progress);
}

}  // namespace flowloop
