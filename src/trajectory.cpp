#include "flowloop/study/trajectory.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <sstream>

#include "flowloop/io/io.hpp"
#include "flowloop/nn/layers.hpp"
#include "flowloop/nn/model.hpp"
#include "flowloop/ode/solver.hpp"
#include "flowloop/train/train.hpp"

namespace flowloop {

void TrajectoryOptions::validate() const {
  depth.validate();
  if (depth.ode() && times < 2) throw Error("--times must be at least 2 (got " + std::to_string(times) + ")");
  if (batches < 1) throw Error("--batches must be at least 1");
  if (batch_size < 1) throw Error("--batch must be at least 1");
  if (pca_tokens < 1) throw Error("--pca-tokens must be at least 1");
}

namespace {
// log softmax of one row, in double
void log_softmax(const float* l, int V, std::vector<double>& out) {
  out.resize(static_cast<size_t>(V));
  const double mx = *std::max_element(l, l + V);
  double s = 0;
  for (int v = 0; v < V; ++v) s += std::exp(static_cast<double>(l[v]) - mx);
  const double lse = mx + std::log(s);
  for (int v = 0; v < V; ++v) out[static_cast<size_t>(v)] = static_cast<double>(l[v]) - lse;
}

double row_norm(const float* x, int C) {
  double s = 0;
  for (int c = 0; c < C; ++c) s += static_cast<double>(x[c]) * x[c];
  return std::sqrt(s);
}

struct Sums {
  double loss = 0, right = 0, kl = 0, f = 0, h = 0, dist = 0, cos = 0;
  int64_t scored = 0, examples = 0, tokens = 0, cos_tokens = 0;
};
}  // namespace

TrajectoryResult trace(const Model<float>& model, const DataSource& data, const TrajectoryOptions& opt) {
  opt.validate();
  const ModelConfig& cfg = model.cfg;
  const int C = cfg.d_model, V = cfg.vocab_size;
  const bool ode = opt.depth.ode();
  TrajectoryResult r;
  r.source = ode ? "solve" : "loop";
  SolveOptions so;
  int K = 0;
  if (ode) {
    so = opt.depth.solve_options(cfg.depth);
    for (int j = 0; j < opt.times; ++j) r.times.push_back(so.t1 * j / (opt.times - 1));
    r.times.back() = so.t1;
    so.save = SaveKind::Times;
    so.save_times = r.times;
    so.record_steps = true;
  } else {
    K = opt.depth.loop_count(cfg.depth);
    for (int k = 0; k <= K; ++k) r.times.push_back(k);
  }
  const size_t N = r.times.size();
  std::vector<Sums> sums(N);
  TokenBatch tok, tgt;
  LoopWork<float> lw;
  ReadoutCache<float> rc;
  FieldCache<float> fc;
  std::unique_ptr<FieldSystem<float>> lens;  // a model on a device: |f| of each state there
  Buffer<float> h, f, fprev, final_logits;
  std::vector<double> lp_final, lp;
  int seq_offset = 0;
  for (int bi = 0; bi < opt.batches; ++bi) {
    data.batch(Split::Test, static_cast<uint64_t>(bi), opt.batch_size, tok, tgt);
    const int B = tok.B, T = tok.T, BT = B * T;
    const size_t NC = static_cast<size_t>(BT) * C;
    const float* states = nullptr;
    SolveResult<float> sr;
    if (ode) {
      h.resize(NC);
      model.embed(h.data(), tok);
      FieldSystem<float> sys(model.field, model.field_params(), B, T, model.device_field());
      sr = sys.solve(h.data(), so);
      if (!sr.ok()) throw Error("trajectory: the solve of test batch " + std::to_string(bi) + " failed: " + sr.message);
      r.nfe += static_cast<double>(sr.nfe);
      for (int g = 0; g < B; ++g)
        for (size_t k = 0; k < sr.step_h[static_cast<size_t>(g)].size(); ++k)
          r.steps.push_back({seq_offset + g, sr.step_times[static_cast<size_t>(g)][k + 1], sr.step_h[static_cast<size_t>(g)][k]});
      states = sr.saved.data();  // (N, B, T*C)
    } else {
      r.nfe += model.loop_forward(tok, K, lw);
      states = lw.h.data();  // (K+1, B,T,C)
    }
    seq_offset += B;
    if (bi == 0) {
      r.B = B;
      r.T = T;
      r.C = C;
      r.states.assign(states, states + N * NC);
    }
    const float* hfinal = states + (N - 1) * NC;
    rc.resize(cfg, BT);
    model.readout(hfinal, B, T, rc);
    final_logits.assign(rc.logits.begin(), rc.logits.end());
    fc.resize(cfg, B, T);
    f.resize(NC);
    fprev.resize(NC);
    std::vector<double> tb(static_cast<size_t>(B));
    for (size_t j = 0; j < N; ++j) {
      const float* hj = states + j * NC;
      Sums& s = sums[j];
      model.readout(hj, B, T, rc);
      s.loss += crossentropy_forward_backward<float>(nullptr, rc.logits.data(), tgt.data.data(), BT, V);
      int64_t n = 0;
      s.right += accuracy(rc.logits.data(), tgt, V, data.exact_match(), &n) * static_cast<double>(n);
      s.examples += n;
      for (int i = 0; i < BT; ++i) {
        if (tgt.data[static_cast<size_t>(i)] < 0) continue;
        log_softmax(final_logits.data() + static_cast<size_t>(i) * V, V, lp_final);
        log_softmax(rc.logits.data() + static_cast<size_t>(i) * V, V, lp);
        double kl = 0;
        for (int v = 0; v < V; ++v) {
          const double pf = std::exp(lp_final[static_cast<size_t>(v)]);
          kl += pf * (lp_final[static_cast<size_t>(v)] - lp[static_cast<size_t>(v)]);
        }
        s.kl += kl;
        ++s.scored;
      }
      std::fill(tb.begin(), tb.end(), r.times[j]);
      if (model.device_field()) {  // the lens's |f| on the model's device
        if (!lens || lens->groups() != B || lens->T() != T)
          lens = std::make_unique<FieldSystem<float>>(model.field, model.field_params(), B, T, model.device_field());
        lens->eval(f.data(), hj, tb.data(), nullptr, B);
      } else {
        model.field.forward(f.data(), hj, tb.data(), model.field_params(), B, T, fc);
      }
      for (int i = 0; i < BT; ++i) {
        const size_t o = static_cast<size_t>(i) * C;
        const double fn = row_norm(f.data() + o, C);
        s.f += fn;
        s.h += row_norm(hj + o, C);
        double d = 0;
        for (int c = 0; c < C; ++c) {
          const double e = static_cast<double>(hj[o + c]) - hfinal[o + c];
          d += e * e;
        }
        s.dist += std::sqrt(d);
        if (j > 0) {
          const double pn = row_norm(fprev.data() + o, C);
          double dot = 0;
          for (int c = 0; c < C; ++c) dot += static_cast<double>(f[o + c]) * fprev[o + c];
          if (fn > 0 && pn > 0) {
            s.cos += dot / (fn * pn);
            ++s.cos_tokens;
          }
        }
        ++s.tokens;
      }
      std::swap(f, fprev);
    }
  }
  r.nfe /= opt.batches;
  for (size_t j = 0; j < N; ++j) {
    const Sums& s = sums[j];
    LensPoint p;
    p.time = r.times[j];
    p.loss = s.loss / opt.batches;
    p.accuracy = s.examples ? s.right / static_cast<double>(s.examples) : 0.0;
    p.kl_to_final = s.scored ? s.kl / static_cast<double>(s.scored) : 0.0;
    const double nt = std::max<double>(1.0, static_cast<double>(s.tokens));
    p.f_norm = s.f / nt;
    p.h_norm = s.h / nt;
    p.dist_to_final = s.dist / nt;
    p.cos_prev_f = s.cos_tokens ? s.cos / static_cast<double>(s.cos_tokens) : std::numeric_limits<double>::quiet_NaN();
    r.lens.push_back(p);
  }
  r.examples = sums.back().examples;
  r.final_eval.loss = r.lens.back().loss;
  r.final_eval.accuracy = r.lens.back().accuracy;
  r.final_eval.examples = r.examples;
  r.final_eval.nfe = r.nfe;

  // PCA of a sample of token paths of the first batch: tokens spread evenly over its
  // B*T positions, every time; the two leading components of their covariance.
  const int BT0 = r.B * r.T, P = std::min(opt.pca_tokens, BT0);
  const size_t NC0 = static_cast<size_t>(BT0) * C;
  Eigen::MatrixXd X(static_cast<Eigen::Index>(P) * static_cast<Eigen::Index>(N), C);
  std::vector<int> pick(static_cast<size_t>(P));
  for (int s = 0; s < P; ++s) pick[static_cast<size_t>(s)] = static_cast<int>(static_cast<int64_t>(s) * BT0 / P);
  for (int s = 0; s < P; ++s)
    for (size_t j = 0; j < N; ++j) {
      const float* x = r.states.data() + j * NC0 + static_cast<size_t>(pick[static_cast<size_t>(s)]) * C;
      for (int c = 0; c < C; ++c) X(static_cast<Eigen::Index>(s) * static_cast<Eigen::Index>(N) + static_cast<Eigen::Index>(j), c) = x[c];
    }
  const Eigen::RowVectorXd mean = X.colwise().mean();
  X.rowwise() -= mean;
  const Eigen::MatrixXd cov = (X.transpose() * X) / std::max<double>(1.0, static_cast<double>(X.rows()) - 1);
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(cov);
  const Eigen::VectorXd ev = eig.eigenvalues();  // ascending
  const double total = std::max(ev.sum(), std::numeric_limits<double>::min());
  Eigen::MatrixXd W(C, 2);
  for (int k = 0; k < 2 && k < C; ++k) {
    Eigen::VectorXd v = eig.eigenvectors().col(C - 1 - k);
    Eigen::Index at = 0;
    v.cwiseAbs().maxCoeff(&at);
    if (v(at) < 0) v = -v;  // a fixed sign: the largest entry is positive
    W.col(k) = v;
    r.pca_explained[static_cast<size_t>(k)] = std::max(0.0, ev(C - 1 - k)) / total;
  }
  if (C < 2) W.col(1).setZero();
  const Eigen::MatrixXd Y = X * W;
  for (int s = 0; s < P; ++s)
    for (size_t j = 0; j < N; ++j) {
      const Eigen::Index row = static_cast<Eigen::Index>(s) * static_cast<Eigen::Index>(N) + static_cast<Eigen::Index>(j);
      const int at = pick[static_cast<size_t>(s)];
      r.pca.push_back({s, at / r.T, at % r.T, r.times[j], Y(row, 0), Y(row, 1)});
    }
  return r;
}


std::string lens_csv(const TrajectoryResult& r) {
  std::string out = "time,source,loss,accuracy,kl_to_final,f_norm,h_norm,dist_to_final,cos_prev_f\n";
  for (const auto& p : r.lens)
    out += format_number(p.time) + "," + r.source + "," + format_number(p.loss) + "," + format_number(p.accuracy) + "," + format_number(p.kl_to_final) +
           "," + format_number(p.f_norm) + "," + format_number(p.h_norm) + "," + format_number(p.dist_to_final) + "," + format_number(p.cos_prev_f) + "\n";
  return out;
}

std::string steps_csv(const TrajectoryResult& r) {
  std::string out = "sequence,t,h\n";
  for (const auto& s : r.steps) out += std::to_string(s.sequence) + "," + format_number(s.t) + "," + format_number(s.h) + "\n";
  return out;
}

std::string pca_csv(const TrajectoryResult& r) {
  std::string out = "sample,b,pos,time,pc1,pc2\n";
  for (const auto& p : r.pca)
    out += std::to_string(p.sample) + "," + std::to_string(p.b) + "," + std::to_string(p.pos) + "," + format_number(p.time) +
           "," + format_number(p.pc1) + "," + format_number(p.pc2) + "\n";
  return out;
}

}  // namespace flowloop
