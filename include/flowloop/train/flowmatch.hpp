// Flow matching over latent trajectories: the conditional paths and their target
// velocities, time samplers, minibatch couplings (exact and entropic optimal
// transport), and the simulation-free loss of a time-conditioned field with its
// gradient. Formulas as in torchcfm and facebookresearch/flow_matching (see
// ../shared/design/reference-notes.md).
//
// A batch holds B recorded trajectories, one per sequence: K + 1 states (T, C) at
// depths 0..K, the first the teacher's embedding h_0, the last its h_K. The student
// field v(x, t) is integrated over t in [0, 1]; one t per sequence.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <iosfwd>
#include <nlohmann/json.hpp>
#include <vector>

#include "flowloop/train/data.hpp"
#include "flowloop/ode/depth.hpp"
#include "flowloop/nn/field.hpp"
#include "flowloop/core/tensor.hpp"

namespace flowloop {

// What the field learns to carry where:
//   icfm        x_t = (1 - t) x0 + t x1 + sigma eps,  u_t = x1 - x0 (x0 = h_0, x1 = h_K)
//   otcfm       the same path, (x0, x1) paired by the minibatch OT plan
//   sbcfm       sigma_t = sigma sqrt(t (1 - t)),
//               u_t = (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + x1 - x0 (Schrodinger bridge)
//   vp          x_t = cos(pi t / 2) x0 + sin(pi t / 2) x1 + sigma eps,
//               u_t = pi / 2 (cos(pi t / 2) x1 - sin(pi t / 2) x0)
//   trajectory  piecewise linear through the K + 1 states at t_k = k / K,
//               u_t = K (h_{k+1} - h_k) on segment k
//   generative  icfm's path from Gaussian noise x0 to the distribution of h_K
enum class Matcher { ICFM, OTCFM, SBCFM, VP, Trajectory, Generative };
// How x0 and x1 of a batch are paired: as recorded (the teacher's own pairs), by the
// exact OT plan of cost ||x0 - x1||^2, or by pairs drawn from the entropic plan.
enum class Coupling { Identity, Exact, Sinkhorn };
// t ~ U(0, 1); logit-normal (sigmoid of N(0, 1)); U-shaped, density proportional to
// cosh(a (t - 1/2)) with a = 4 (rectified flow++), more weight at both ends.
enum class TimeSampler { Uniform, LogitNormal, UShaped };

Matcher parse_matcher(const std::string& name);  // throws Error naming the valid ones
Coupling parse_coupling(const std::string& name);
TimeSampler parse_time_sampler(const std::string& name);
std::string matcher_name(Matcher m);
std::string coupling_name(Coupling c);
std::string time_sampler_name(TimeSampler s);

// One draw in (0, 1).
double sample_time(TimeSampler s, Rng& rng);
// The sampler's CDF (for tests and plots).
double time_cdf(TimeSampler s, double t);

// Exact optimal assignment: perm minimising sum_i cost[i * n + perm[i]] (the
// Hungarian method with potentials, O(n^3)). Ties are broken the same way on every
// machine.
std::vector<int> optimal_assignment(const std::vector<double>& cost, int n);
// Entropic OT between uniform marginals (n and m points): the plan P (n, m), summing
// to 1, of min <P, cost> - reg H(P), by Sinkhorn iterations in the log domain. The
// cost is divided by its largest entry first (as POT's callers in torchcfm do), so
// reg is relative to it. The columns sum to 1/m exactly; the iterations stop when every
// row sums to 1/n within tol, or after max_iter (a small reg converges slowly: the
// rate is near 1 - exp(-1/reg)).
std::vector<double> sinkhorn_plan(const std::vector<double>& cost, int n, int m, double reg,
                                  int max_iter = 2000, double tol = 1e-10);
// Squared Euclidean distances between the rows of a (n, dim) and b (m, dim), in double.
template <class S>
std::vector<double> squared_distances(const S* a, int n, const S* b, int m, size_t dim);

// The conditional path of one sequence (n values) at time t: x_t and u_t for icfm,
// otcfm, generative (the same path), sbcfm and vp. eps may be null when sigma is 0.
template <class S>
void conditional_path(Matcher m, S* xt, S* ut, const S* x0, const S* x1, const S* eps, double sigma, double t,
                      size_t n);
// The trajectory path through K + 1 states (K + 1, n) at t_k = k / K.
template <class S>
void trajectory_path(S* xt, S* ut, const S* states, int K, double t, size_t n);

struct FlowMatchOptions {
  Matcher matcher = Matcher::ICFM;
  Coupling coupling = Coupling::Identity;
  TimeSampler time_sampler = TimeSampler::Uniform;
  double sigma = 0.0;          // bridge noise; sbcfm's sigma
  double sinkhorn_reg = 0.05;  // entropic coupling, relative to the largest cost
  // Shortcut models (Frans et al. 2024), for a step-conditioned field (config step_cond):
  // the first round(B shortcut_fraction) slots of a batch learn the step d = 2^-k (k
  // uniform in 0 .. log2(shortcut_steps) - 1) at t uniform on the grid of d, with the
  // self-consistency target (v(x_t, t, d/2) + v(x', t + d/2, d/2)) / 2,
  // x' = x_t + d/2 v(x_t, t, d/2), evaluated by the target weights without gradient;
  // the finest half step 1 / shortcut_steps is evaluated as d = 0. The other slots are
  // plain flow matching at d = 0, the instantaneous velocity.
  bool shortcut = false;
  double shortcut_fraction = 0.125;
  int shortcut_steps = 128;  // a power of two, at least 4
  // Throws Error naming what is wrong: sigma below 0 or not finite, reg not positive,
  // sbcfm without noise, a coupling the matcher cannot use (trajectory pairs every
  // state of one recording), a shortcut fraction outside (0, 1), shortcut_steps not a
  // power of two of at least 4, shortcut with sbcfm (its target is singular at t = 0).
  void validate() const;
};

// Buffers of one flow-matching step, reused across steps.
template <class S>
struct FlowMatchWork {
  Buffer<S> noise, x0, x1, eps, xt, ut, v, gv, dx, x1hat, gx1hat;
  Buffer<S> v1, xh;      // shortcut: the target's first half step and where it lands
  FieldCache<S> cache, target_cache;
  FieldGradWork<S> grad;
  // Where the field's evaluations and vjp run: null, Field on the CPU; else this device
  // field (Model::device_field() of the student), with its arrays below: the parameters
  // and the target's (uploaded at every step), a state in and a field out, the gradient.
  const Field<S>* device = nullptr;
  Array<S> dev_params, dev_target, dev_in, dev_out, dev_grad;
  FieldCache<S> dev_cache, dev_target_cache;
  FieldGradWork<S> dev_work;
};

// What one step drew and measured.
struct FlowMatchStep {
  double loss = 0;               // mean over B T C values of (v(x_t, t) - u_t)^2
  std::vector<double> t;         // each sequence's time
  std::vector<double> d;         // each sequence's step (shortcut; empty otherwise)
  int shortcut_rows = 0;         // slots 0 .. shortcut_rows - 1 learned a step d > 0
  double shortcut_loss = 0;      // the mean of (v - target)^2 over those slots
  // the coupling: slot b of the batch pairs x0 of recording x0_row[b] with x1 of
  // recording x1_row[b] (identity: b and b; exact: b and perm[b]; sinkhorn: a draw)
  std::vector<int> x0_row, x1_row;
  double coupling_cost = 0;      // mean over the pairs and values of (x0 - x1)^2
  double endpoint_loss = 0;      // the EndpointLoss's value (0 without one)
};

// An extra loss on the end each sequence's velocity points at, x1_hat = x_t + (1 - t) v
// (the linear paths' one-step jump to t = 1), e.g. the KL of its decoding against the
// teacher's: given x1_hat (B, T, C) and the step's draws, returns the loss and writes its
// gradient d loss / d x1_hat (B, T, C, overwritten).
template <class S>
using EndpointLoss = std::function<double(const S* x1hat, const FlowMatchStep& st, S* grad)>;

// The simulation-free loss of one batch, and dparams += its gradient (when dparams is
// non-null); with `endpoint`, that of the loss plus endpoint's (linear paths only:
// icfm, otcfm, sbcfm, generative). states: B recordings of K + 1 states, (B, K + 1, T, C); the field must be
// time-conditioned. Every draw comes from rng in this order: generative's noise x0,
// the coupling's pairs, t per sequence, with shortcut each shortcut slot's level k and
// grid point (its t replaced), the bridge noise (when sigma > 0); so a step is a
// function of the weights, the batch and rng. target_params: the weights that make the
// shortcut targets (the trainer's EMA; null: params).
// Data parallelism: rows [row_begin, row_end) only (row_end -1: all) are evaluated and
// differentiated. The draws and couplings are the whole batch's, as every rank makes
// them, and loss, shortcut_loss and the gradient are these rows' parts of the whole
// batch's means: summed over the ranks' row ranges, they are the one-process step's.
// An endpoint loss reads the whole batch (not sharded).
template <class S>
FlowMatchStep flow_match_step(const Field<S>& field, const S* params, const S* states, int B, int K, int T,
                              const FlowMatchOptions& opt, Rng& rng, S* dparams, FlowMatchWork<S>& w,
                              const EndpointLoss<S>* endpoint = nullptr, const S* target_params = nullptr,
                              int row_begin = 0, int row_end = -1);

// ---- recorded trajectories: `flowloop flow-match record` -------------------------
// A teacher's latent path per sequence, h_0 .. h_K: a loop's states after 0..K loops,
// or a solve's dense output at K + 1 times evenly over [0, t1]. DATA/ holds
//   manifest.json          format, the teacher's file and hash, its depth regime, K,
//                          T, C, the times, and per split ("train", "test") the shards
//   teacher.safetensors    a copy of the teacher (its embedding and readout decode)
//   SPLIT-NNNNN.safetensors  states (n, K + 1, T, C) F32; tokens and targets (n, T),
//                          integers stored as F32 (exact below 2^24; -1: not scored)
// A shard is written atomically and then entered in the manifest (atomically too):
// a crash loses only the shard in progress, and a rerun goes on from there.
struct RecordOptions {
  DepthSpec depth;           // the teacher's regime (default: its trained loop)
  int states = 0;            // solves: K + 1 states (default: the teacher's depth + 1)
  int train_examples = 2048;  // each split is recorded in whole batches (rounded up)
  int test_examples = 512;
  int batch = 64;
  int shard_size = 512;      // recordings per shard, a multiple of batch
  std::string device = "auto";  // where the teacher runs (resolve_device)
  // A Hugging Face teacher (a directory, io/hf.hpp): its --core-layers, and the configuration
  // of its data (study_config's JSON). It is recorded as a flowloop checkpoint of that
  // structure, with this configuration as its train_config, so that flow-match train and eval
  // read it as any teacher.
  std::string core_layers, teacher_config;
  void validate() const;     // throws Error naming what is wrong
};

struct TrajectoryShard {
  std::string file;  // relative to DATA
  int examples = 0;
  int64_t first = 0;  // the split's index of its first example
};

struct TrajectoryManifest {
  std::string teacher_file = "teacher.safetensors", teacher_hash, data;  // data: the source's describe()
  nlohmann::json depth;
  int K = 0, T = 0, C = 0;
  std::vector<double> times;
  std::vector<TrajectoryShard> train, test;
  const std::vector<TrajectoryShard>& split(const std::string& name) const;  // "train" or "test"
  int64_t examples(const std::string& name) const;
  std::string to_json() const;
  // Reads DATA/manifest.json; throws Error naming the file and the problem
  // (missing, malformed, a field of the wrong type, a shard file that is missing).
  static TrajectoryManifest read(const std::string& dir);
  // The manifest's JSON checked (without looking for its files); `path` names it in errors.
  static TrajectoryManifest parse(const nlohmann::json& j, const std::string& path);
};

// One shard, checked against the manifest (shapes, dtypes, its example count).
struct TrajectoryShardData {
  int n = 0, K = 0, T = 0, C = 0;
  std::vector<float> states;             // (n, K + 1, T, C)
  std::vector<int32_t> tokens, targets;  // (n, T)
};
TrajectoryShardData read_trajectory_shard(const TrajectoryManifest& m, const std::string& dir,
                                          const TrajectoryShard& shard);

// "fnv1a64:" and 16 hex digits of the file's bytes: which teacher a recording came from.
std::string file_hash(const std::string& path);

// Records (or resumes recording) the teacher's trajectories on data into out.
// Throws Error before any work for bad options, an unreadable teacher, data the
// teacher cannot read, or an out directory that holds another recording (another
// teacher, regime or shape).
TrajectoryManifest record_trajectories(const std::string& teacher, const DataSource& data, const RecordOptions& opt,
                                       const std::string& out, std::ostream& progress);

}  // namespace flowloop
