#include "flowloop/train/flowmatch.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "flowloop/nn/config.hpp"

namespace flowloop {

namespace {
constexpr double kPi = 3.14159265358979323846;
constexpr double kUShape = 4.0;  // rectified flow++'s a

template <class E>
struct Named {
  E value;
  const char* name;
};
const Named<Matcher> kMatchers[] = {{Matcher::ICFM, "icfm"},         {Matcher::OTCFM, "otcfm"},
                                    {Matcher::SBCFM, "sbcfm"},       {Matcher::VP, "vp"},
                                    {Matcher::Trajectory, "trajectory"}, {Matcher::Generative, "generative"}};
const Named<Coupling> kCouplings[] = {
    {Coupling::Identity, "identity"}, {Coupling::Exact, "exact"}, {Coupling::Sinkhorn, "sinkhorn"}};
const Named<TimeSampler> kSamplers[] = {
    {TimeSampler::Uniform, "uniform"}, {TimeSampler::LogitNormal, "logit-normal"}, {TimeSampler::UShaped, "u-shaped"}};

template <class E, size_t N>
E parse_named(const Named<E> (&table)[N], const std::string& name, const char* what) {
  std::string valid;
  for (const auto& e : table) {
    if (name == e.name) return e.value;
    valid += std::string(valid.empty() ? "" : ", ") + e.name;
  }
  throw Error("unknown " + std::string(what) + " '" + name + "' (expected one of: " + valid + ")");
}
template <class E, size_t N>
std::string name_of(const Named<E> (&table)[N], E v) {
  for (const auto& e : table)
    if (e.value == v) return e.name;
  return "?";
}

// A uniform draw strictly inside (0, 1): the 53-bit grid shifted by half a cell.
double interior_uniform(Rng& rng) { return rng.uniform() + std::ldexp(1.0, -54); }
}  // namespace

Matcher parse_matcher(const std::string& name) { return parse_named(kMatchers, name, "matcher"); }
Coupling parse_coupling(const std::string& name) { return parse_named(kCouplings, name, "coupling"); }
TimeSampler parse_time_sampler(const std::string& name) { return parse_named(kSamplers, name, "time sampler"); }
std::string matcher_name(Matcher m) { return name_of(kMatchers, m); }
std::string coupling_name(Coupling c) { return name_of(kCouplings, c); }
std::string time_sampler_name(TimeSampler s) { return name_of(kSamplers, s); }

double sample_time(TimeSampler s, Rng& rng) {
  switch (s) {
    case TimeSampler::Uniform:
      return interior_uniform(rng);
    case TimeSampler::LogitNormal: {
      const double t = 1.0 / (1.0 + std::exp(-rng.normal()));
      return std::clamp(t, 1e-12, 1.0 - 1e-12);
    }
    case TimeSampler::UShaped: {
      // inverse of time_cdf: t = 1/2 + asinh((2u - 1) sinh(a/2)) / a
      const double u = interior_uniform(rng);
      return 0.5 + std::asinh((2.0 * u - 1.0) * std::sinh(kUShape / 2)) / kUShape;
    }
  }
  throw Error("sample_time: unknown sampler");
}

double time_cdf(TimeSampler s, double t) {
  t = std::clamp(t, 0.0, 1.0);
  switch (s) {
    case TimeSampler::Uniform:
      return t;
    case TimeSampler::LogitNormal:
      if (t <= 0.0) return 0.0;
      if (t >= 1.0) return 1.0;
      return 0.5 * std::erfc(-std::log(t / (1.0 - t)) / std::sqrt(2.0));
    case TimeSampler::UShaped:
      return (std::sinh(kUShape * (t - 0.5)) + std::sinh(kUShape / 2)) / (2.0 * std::sinh(kUShape / 2));
  }
  throw Error("time_cdf: unknown sampler");
}

std::vector<int> optimal_assignment(const std::vector<double>& cost, int n) {
  if (n < 0 || cost.size() != static_cast<size_t>(n) * static_cast<size_t>(n))
    throw Error("optimal_assignment: cost has " + std::to_string(cost.size()) + " entries, not n^2 = " +
                std::to_string(static_cast<int64_t>(n) * n));
  for (size_t k = 0; k < cost.size(); ++k)
    if (!std::isfinite(cost[k]))
      throw Error("optimal_assignment: cost entry (" + std::to_string(k / static_cast<size_t>(n)) + ", " +
                  std::to_string(k % static_cast<size_t>(n)) + ") is not finite");
  // Shortest augmenting paths with row and column potentials (Kuhn-Munkres in the form
  // of Jonker and Volgenant, with the lazy dual updates of Crouse's shortest-path
  // variant, as scipy's linear_sum_assignment). First the reductions: v_j = min_i c_ij,
  // u_i = min_j (c_ij - v_j), which keep every reduced cost c_ij - u_i - v_j >= 0; each
  // row whose first tight column is still free takes it. Each row left is then matched
  // along a shortest augmenting path (Dijkstra over the reduced costs, scanning only the
  // columns not yet reached), after which the potentials of the rows and columns it
  // reached are updated.
  const double inf = std::numeric_limits<double>::infinity();
  const size_t N = static_cast<size_t>(n);
  constexpr size_t none = static_cast<size_t>(-1);
  std::vector<double> u(N, 0.0), v(N, inf), dist(N);
  std::vector<size_t> row4col(N, none), col4row(N, none), path(N), remaining(N);
  std::vector<char> scanned_row(N), scanned_col(N);
  for (size_t i = 0; i < N; ++i) {
    const double* row = cost.data() + i * N;
    for (size_t j = 0; j < N; ++j) v[j] = std::min(v[j], row[j]);
  }
  for (size_t i = 0; i < N; ++i) {
    const double* row = cost.data() + i * N;
    size_t best = 0;
    double m = row[0] - v[0];
    for (size_t j = 1; j < N; ++j)
      if (row[j] - v[j] < m) {
        m = row[j] - v[j];
        best = j;
      }
    u[i] = m;
    if (row4col[best] == none) {
      row4col[best] = i;
      col4row[i] = best;
    }
  }
  for (size_t cur = 0; cur < N; ++cur) {
    if (col4row[cur] != none) continue;
    std::fill(dist.begin(), dist.end(), inf);
    std::fill(scanned_row.begin(), scanned_row.end(), 0);
    std::fill(scanned_col.begin(), scanned_col.end(), 0);
    for (size_t j = 0; j < N; ++j) remaining[N - 1 - j] = j;
    size_t left = N, i = cur, sink = none;
    double reached = 0;  // the length of the shortest path found so far
    while (sink == none) {
      scanned_row[i] = 1;
      const double* row = cost.data() + i * N;
      size_t index = none;
      double lowest = inf;
      for (size_t k = 0; k < left; ++k) {
        const size_t j = remaining[k];
        const double r = reached + row[j] - u[i] - v[j];
        if (r < dist[j]) {
          path[j] = i;
          dist[j] = r;
        }
        // the nearest column; among equals a free one (a shorter augmentation)
        if (dist[j] < lowest || (dist[j] == lowest && row4col[j] == none)) {
          lowest = dist[j];
          index = k;
        }
      }
      if (index == none || !std::isfinite(lowest))
        throw Error("optimal_assignment: no augmenting path (a cost that is not finite?)");
      reached = lowest;
      const size_t j = remaining[index];
      if (row4col[j] == none)
        sink = j;
      else
        i = row4col[j];
      scanned_col[j] = 1;
      remaining[index] = remaining[--left];
    }
    // the potentials of what the search reached, then the augmentation along the path
    u[cur] += reached;
    for (size_t r = 0; r < N; ++r)
      if (scanned_row[r] && r != cur) u[r] += reached - dist[col4row[r]];
    for (size_t j = 0; j < N; ++j)
      if (scanned_col[j]) v[j] -= reached - dist[j];
    for (size_t j = sink;;) {
      const size_t r = path[j];
      row4col[j] = r;
      std::swap(col4row[r], j);
      if (r == cur) break;
    }
  }
  std::vector<int> perm(N);
  for (size_t r = 0; r < N; ++r) perm[r] = static_cast<int>(col4row[r]);
  return perm;
}

std::vector<double> sinkhorn_plan(const std::vector<double>& cost, int n, int m, double reg, int max_iter,
                                  double tol) {
  if (n < 1 || m < 1 || cost.size() != static_cast<size_t>(n) * static_cast<size_t>(m))
    throw Error("sinkhorn_plan: cost has " + std::to_string(cost.size()) + " entries for " + std::to_string(n) +
                " x " + std::to_string(m) + " points");
  if (!(reg > 0) || !std::isfinite(reg)) throw Error("sinkhorn_plan: reg must be positive, not " + std::to_string(reg));
  double cmax = 0;
  for (double c : cost) {
    if (!std::isfinite(c)) throw Error("sinkhorn_plan: the cost is not finite");
    cmax = std::max(cmax, std::fabs(c));
  }
  const double scale = cmax > 0 ? 1.0 / cmax : 1.0;
  const size_t N = static_cast<size_t>(n), M = static_cast<size_t>(m);
  const double loga = -std::log(static_cast<double>(n)), logb = -std::log(static_cast<double>(m));
  // log P_ij = (f_i + g_j - C_ij) / reg, with C scaled to [0, 1]
  std::vector<double> f(N, 0.0), g(M, 0.0), tmp(std::max(N, M));
  auto lse = [](const double* x, size_t k) {
    double mx = -std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < k; ++i) mx = std::max(mx, x[i]);
    double s = 0;
    for (size_t i = 0; i < k; ++i) s += std::exp(x[i] - mx);
    return mx + std::log(s);
  };
  for (int it = 0; it < max_iter; ++it) {
    for (size_t i = 0; i < N; ++i) {
      for (size_t j = 0; j < M; ++j) tmp[j] = (g[j] - cost[i * M + j] * scale) / reg;
      f[i] = reg * (loga - lse(tmp.data(), M));
    }
    for (size_t j = 0; j < M; ++j) {
      for (size_t i = 0; i < N; ++i) tmp[i] = (f[i] - cost[i * M + j] * scale) / reg;
      g[j] = reg * (logb - lse(tmp.data(), N));
    }
    // columns now sum to 1/m exactly; stop when the rows sum to 1/n too
    double err = 0;
    for (size_t i = 0; i < N; ++i) {
      for (size_t j = 0; j < M; ++j) tmp[j] = (f[i] + g[j] - cost[i * M + j] * scale) / reg;
      err = std::max(err, std::fabs(std::exp(lse(tmp.data(), M)) - std::exp(loga)));
    }
    if (err < tol) break;
  }
  std::vector<double> P(N * M);
  for (size_t i = 0; i < N; ++i)
    for (size_t j = 0; j < M; ++j) P[i * M + j] = std::exp((f[i] + g[j] - cost[i * M + j] * scale) / reg);
  return P;
}

template <class S>
std::vector<double> squared_distances(const S* a, int n, const S* b, int m, size_t dim) {
  // ||x||^2 + ||y||^2 - 2 x.y in double: the cross terms as one product (n x m x dim)
  const size_t N = static_cast<size_t>(n), M = static_cast<size_t>(m);
  std::vector<double> ad(a, a + N * dim), bd(b, b + M * dim), na(N, 0.0), nb(M, 0.0);
  for (size_t i = 0; i < N; ++i)
    for (size_t k = 0; k < dim; ++k) na[i] += ad[i * dim + k] * ad[i * dim + k];
  for (size_t j = 0; j < M; ++j)
    for (size_t k = 0; k < dim; ++k) nb[j] += bd[j * dim + k] * bd[j * dim + k];
  std::vector<double> d(N * M, 0.0);
  if (N && M && dim)
    gemm<double>(false, true, n, m, static_cast<int>(dim), -2.0, ad.data(), static_cast<int>(dim), bd.data(),
                 static_cast<int>(dim), 0.0, d.data(), m);
  for (size_t i = 0; i < N; ++i)
    for (size_t j = 0; j < M; ++j) d[i * M + j] = std::max(0.0, d[i * M + j] + na[i] + nb[j]);
  return d;
}

template <class S>
void conditional_path(Matcher m, S* xt, S* ut, const S* x0, const S* x1, const S* eps, double sigma, double t,
                      size_t n) {
  if (sigma > 0 && !eps) throw Error("conditional_path: sigma > 0 needs noise");
  switch (m) {
    case Matcher::ICFM:
    case Matcher::OTCFM:
    case Matcher::Generative: {
      const S a = static_cast<S>(1.0 - t), b = static_cast<S>(t), s = static_cast<S>(sigma);
      for (size_t k = 0; k < n; ++k) {
        xt[k] = a * x0[k] + b * x1[k] + (sigma > 0 ? s * eps[k] : S(0));
        ut[k] = x1[k] - x0[k];
      }
      return;
    }
    case Matcher::SBCFM: {
      // x_t = mu_t + sigma_t eps, d/dt x_t = x1 - x0 + sigma_t' eps with
      // sigma_t' = sigma (1 - 2t) / (2 sqrt(t (1 - t))) = (1 - 2t) / (2 t (1 - t)) sigma_t
      const double st = sigma * std::sqrt(t * (1.0 - t));
      const S a = static_cast<S>(1.0 - t), b = static_cast<S>(t), s = static_cast<S>(st);
      const S ds = static_cast<S>((1.0 - 2.0 * t) / (2.0 * t * (1.0 - t)) * st);
      for (size_t k = 0; k < n; ++k) {
        const S e = sigma > 0 ? eps[k] : S(0);
        xt[k] = a * x0[k] + b * x1[k] + s * e;
        ut[k] = x1[k] - x0[k] + ds * e;
      }
      return;
    }
    case Matcher::VP: {
      const double c = std::cos(kPi * t / 2), sn = std::sin(kPi * t / 2);
      const S a = static_cast<S>(c), b = static_cast<S>(sn), s = static_cast<S>(sigma);
      const S ua = static_cast<S>(-kPi / 2 * sn), ub = static_cast<S>(kPi / 2 * c);
      for (size_t k = 0; k < n; ++k) {
        xt[k] = a * x0[k] + b * x1[k] + (sigma > 0 ? s * eps[k] : S(0));
        ut[k] = ua * x0[k] + ub * x1[k];
      }
      return;
    }
    case Matcher::Trajectory:
      throw Error("conditional_path: the trajectory matcher takes every state (trajectory_path)");
  }
}

template <class S>
void trajectory_path(S* xt, S* ut, const S* states, int K, double t, size_t n) {
  if (K < 1) throw Error("trajectory_path: K must be at least 1, not " + std::to_string(K));
  const double s = t * K;
  const int k = std::clamp(static_cast<int>(std::floor(s)), 0, K - 1);
  const S r = static_cast<S>(s - k), q = static_cast<S>(1.0 - (s - k)), Ks = static_cast<S>(K);
  const S* y0 = states + static_cast<size_t>(k) * n;
  const S* y1 = y0 + n;
  for (size_t i = 0; i < n; ++i) {
    xt[i] = q * y0[i] + r * y1[i];
    ut[i] = Ks * (y1[i] - y0[i]);
  }
}

void FlowMatchOptions::validate() const {
  if (!(sigma >= 0) || !std::isfinite(sigma))
    throw Error("flow matching: sigma must be 0 or more, not " + std::to_string(sigma));
  if (!(sinkhorn_reg > 0) || !std::isfinite(sinkhorn_reg))
    throw Error("flow matching: the Sinkhorn reg must be positive, not " + std::to_string(sinkhorn_reg));
  if (matcher == Matcher::SBCFM && sigma <= 0) throw Error("flow matching: sbcfm needs sigma > 0");
  if (matcher == Matcher::Trajectory && coupling != Coupling::Identity)
    throw Error("flow matching: the trajectory matcher follows each recording through all its states; coupling '" +
                coupling_name(coupling) + "' would mix recordings (use identity)");
  if (matcher == Matcher::Trajectory && sigma > 0)
    throw Error("flow matching: the trajectory matcher has no bridge noise (sigma must be 0)");
  if (shortcut) {
    if (!(shortcut_fraction > 0 && shortcut_fraction < 1))
      throw Error("flow matching: the shortcut fraction must be in (0, 1), not " + std::to_string(shortcut_fraction));
    if (shortcut_steps < 4 || (shortcut_steps & (shortcut_steps - 1)) != 0)
      throw Error("flow matching: shortcut_steps must be a power of two of at least 4, not " +
                  std::to_string(shortcut_steps));
    if (matcher == Matcher::SBCFM)
      throw Error("flow matching: shortcut needs a path whose target is finite at t = 0 (not sbcfm)");
  }
}

namespace {
// One evaluation of the field for flow_match_step: on the CPU (Field), or on w.device
// with the parameters already uploaded to `dev_params` (the state goes up, f comes down).
template <class S>
void fm_forward(const Field<S>& field, FlowMatchWork<S>& w, bool target, S* out, const S* x, const double* t,
                const S* params, int B, int T, const double* d) {
  FieldCache<S>& cache = target ? w.target_cache : w.cache;
  if (!w.device) {
    field.forward(out, x, t, params, B, T, cache, d);
    return;
  }
  const ModelConfig& cfg = field.config();
  const size_t n = static_cast<size_t>(B) * T * cfg.d_model;
  NetOps<S>& be = w.device->backend();
  FieldCache<S>& dc = target ? w.dev_target_cache : w.dev_cache;
  if (dc.capacity < B || dc.T != T) dc.resize(be, cfg, B, T);
  w.dev_in.resize(be, std::max(n, w.dev_in.size()));
  w.dev_out.resize(be, std::max(n, w.dev_out.size()));
  be.upload(w.dev_in.data(), x, n);
  w.device->forward(w.dev_out.data(), w.dev_in.data(), t, (target ? w.dev_target : w.dev_params).data(), B, T, dc, d);
  be.download(out, w.dev_out.data(), n);
}

// dx += J^T g and dparams += the parameter gradient of the last (non-target) evaluation.
template <class S>
void fm_vjp(const Field<S>& field, FlowMatchWork<S>& w, S* dx, S* dparams, const S* g, const S* params) {
  if (!w.device) {
    field.vjp(dx, dparams, g, params, w.cache, w.grad);
    return;
  }
  const size_t n = static_cast<size_t>(w.dev_cache.B) * w.dev_cache.T * field.config().d_model, P = field.num_params();
  NetOps<S>& be = w.device->backend();
  w.dev_grad.resize(be, P);
  be.fill(w.dev_grad.data(), S(0), P);
  be.upload(w.dev_in.data(), g, n);
  be.fill(w.dev_out.data(), S(0), n);
  w.device->vjp(w.dev_out.data(), w.dev_grad.data(), w.dev_in.data(), w.dev_params.data(), w.dev_cache, w.dev_work);
  Buffer<S> host(std::max(n, P));
  be.download(host.data(), w.dev_out.data(), n);
  for (size_t i = 0; i < n; ++i) dx[i] += host[i];
  be.download(host.data(), w.dev_grad.data(), P);
  for (size_t i = 0; i < P; ++i) dparams[i] += host[i];
}
}  // namespace

template <class S>
FlowMatchStep flow_match_step(const Field<S>& field, const S* params, const S* states, int B, int K, int T,
                              const FlowMatchOptions& opt, Rng& rng, S* dparams, FlowMatchWork<S>& w,
                              const EndpointLoss<S>* endpoint, const S* target_params, int row_begin, int row_end) {
  opt.validate();
  if (row_end < 0) row_end = B;
  if (row_begin < 0 || row_begin >= row_end || row_end > B)
    throw Error("flow matching: rows [" + std::to_string(row_begin) + ", " + std::to_string(row_end) +
                ") are not a range of the batch of " + std::to_string(B));
  if (endpoint && (row_begin > 0 || row_end < B))
    throw Error("flow matching: an endpoint loss reads the whole batch; it cannot be split over ranks");
  if (endpoint && opt.shortcut)
    throw Error("flow matching: an endpoint loss reads v as the velocity to t = 1; shortcut slots learn a step, "
                "so the two do not combine");
  if (endpoint && (opt.matcher == Matcher::VP || opt.matcher == Matcher::Trajectory))
    throw Error("flow matching: an endpoint loss needs a linear path (icfm, otcfm, sbcfm, generative), not " +
                matcher_name(opt.matcher));
  const ModelConfig& cfg = field.config();
  if (!cfg.time_cond) throw Error("flow matching needs a time-conditioned field (init --time-cond)");
  if (opt.shortcut && !cfg.step_cond)
    throw Error("flow matching: shortcut needs a step-conditioned field (config step_cond)");
  if (B < 1 || T < 1) throw Error("flow matching: an empty batch (B " + std::to_string(B) + ", T " + std::to_string(T) + ")");
  if (K < 1) throw Error("flow matching: K must be at least 1 (a recording of K + 1 states), not " + std::to_string(K));
  const size_t n = static_cast<size_t>(T) * static_cast<size_t>(cfg.d_model), Bs = static_cast<size_t>(B);
  const size_t stride = static_cast<size_t>(K + 1) * n;  // one recording
  for (Buffer<S>* b : {&w.x0, &w.x1, &w.xt, &w.ut, &w.v, &w.gv, &w.dx}) b->resize(Bs * n);
  FlowMatchStep st;
  // x0 and x1 of each recording (generative: x0 is noise)
  const S* x0_src = states;
  size_t x0_stride = stride;
  if (opt.matcher == Matcher::Generative) {
    w.noise.resize(Bs * n);
    for (auto& e : w.noise) e = static_cast<S>(rng.normal());
    x0_src = w.noise.data();
    x0_stride = n;
  }
  // slot b takes x0 of recording x0_row[b] and x1 (state K) of recording x1_row[b]
  auto gather = [&](const FlowMatchStep& p) {
    for (size_t b = 0; b < Bs; ++b) {
      std::copy_n(x0_src + static_cast<size_t>(p.x0_row[b]) * x0_stride, n, w.x0.data() + b * n);
      std::copy_n(states + static_cast<size_t>(p.x1_row[b]) * stride + static_cast<size_t>(K) * n, n,
                  w.x1.data() + b * n);
    }
  };
  st.x0_row.resize(Bs);
  st.x1_row.resize(Bs);
  for (int b = 0; b < B; ++b) st.x0_row[static_cast<size_t>(b)] = st.x1_row[static_cast<size_t>(b)] = b;
  gather(st);
  // the coupling, from the costs between the recordings as they come
  if (opt.coupling != Coupling::Identity) {
    const std::vector<double> cost = squared_distances(w.x0.data(), B, w.x1.data(), B, n);
    if (opt.coupling == Coupling::Exact) {
      st.x1_row = optimal_assignment(cost, B);
    } else {
      // B pairs drawn from the plan with replacement (torchcfm's sample_map)
      const std::vector<double> P = sinkhorn_plan(cost, B, B, opt.sinkhorn_reg);
      std::vector<double> cdf(P.size());
      double acc = 0;
      for (size_t k = 0; k < P.size(); ++k) cdf[k] = acc += P[k];
      for (size_t b = 0; b < Bs; ++b) {
        const double u = rng.uniform() * acc;
        const size_t k = std::min<size_t>(static_cast<size_t>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin()),
                                          P.size() - 1);
        st.x0_row[b] = static_cast<int>(k / Bs);
        st.x1_row[b] = static_cast<int>(k % Bs);
      }
    }
    gather(st);
  }
  double cc = 0;
  for (size_t k = 0; k < Bs * n; ++k) {
    const double e = static_cast<double>(w.x0[k]) - static_cast<double>(w.x1[k]);
    cc += e * e;
  }
  st.coupling_cost = cc / static_cast<double>(Bs * n);
  // t per sequence, then the bridge noise
  st.t.resize(Bs);
  for (auto& t : st.t) t = sample_time(opt.time_sampler, rng);
  // shortcut slots: level k, step d = 2^-k, t = j d on its grid
  std::vector<double> half;  // the target's half step as the field is told it
  if (opt.shortcut) {
    int levels = 0;
    while ((1 << levels) < opt.shortcut_steps) ++levels;  // d = 1 .. 2 / shortcut_steps
    st.shortcut_rows = std::min(B, std::max(1, static_cast<int>(std::lround(B * opt.shortcut_fraction))));
    st.d.assign(Bs, 0.0);
    half.resize(static_cast<size_t>(st.shortcut_rows));
    for (int b = 0; b < st.shortcut_rows; ++b) {
      const int k = static_cast<int>(rng.next() % static_cast<uint64_t>(levels));
      const uint64_t cells = uint64_t{1} << k;
      const double d = 1.0 / static_cast<double>(cells);
      const auto i = static_cast<size_t>(b);
      st.d[i] = d;
      st.t[i] = static_cast<double>(rng.next() % cells) * d;
      half[i] = k == levels - 1 ? 0.0 : d / 2;  // the finest half step is the instantaneous velocity
    }
  }
  const bool noisy = opt.sigma > 0;
  if (noisy) {
    w.eps.resize(Bs * n);
    for (auto& e : w.eps) e = static_cast<S>(rng.normal());
  }
  for (size_t b = 0; b < Bs; ++b) {
    S* xt = w.xt.data() + b * n;
    S* ut = w.ut.data() + b * n;
    if (opt.matcher == Matcher::Trajectory)
      trajectory_path(xt, ut, states + b * stride, K, st.t[b], n);
    else
      conditional_path(opt.matcher, xt, ut, w.x0.data() + b * n, w.x1.data() + b * n,
                       noisy ? w.eps.data() + b * n : nullptr, opt.sigma, st.t[b], n);
  }
  if (w.device) {  // the weights as they are at this step
    NetOps<S>& be = w.device->backend();
    const size_t P = field.num_params();
    w.dev_params.resize(be, P);
    w.dev_params.upload(params, P);
    if (opt.shortcut) {
      w.dev_target.resize(be, P);
      w.dev_target.upload(target_params ? target_params : params, P);
    }
  }
  // this call's rows [r0, r1) of the batch: the field evaluates and differentiates them alone
  const size_t r0 = static_cast<size_t>(row_begin), r1 = static_cast<size_t>(row_end);
  const int Bl = row_end - row_begin;
  // shortcut targets: two half steps of the target weights, without gradient (the
  // shortcut slots are rows [0, m); this call's are [r0, min(r1, m)))
  const size_t m = opt.shortcut ? static_cast<size_t>(st.shortcut_rows) : 0, s1 = std::min(r1, m);
  if (r0 < s1) {
    const int ms = static_cast<int>(s1 - r0);
    const size_t mn = (s1 - r0) * n, o = r0 * n;
    const S* tp = target_params ? target_params : params;
    w.v1.resize(mn);
    w.xh.resize(mn);
    if (!w.device) w.target_cache.resize(field.backend(), cfg, ms, T);
    fm_forward(field, w, true, w.v1.data(), w.xt.data() + o, st.t.data() + r0, tp, ms, T, half.data() + r0);
    std::vector<double> t2(s1 - r0);
    for (size_t b = r0; b < s1; ++b) {
      const double hs = st.d[b] / 2;
      t2[b - r0] = st.t[b] + hs;
      const S hf = static_cast<S>(hs);
      for (size_t k = b * n; k < (b + 1) * n; ++k) w.xh[k - o] = w.xt[k] + hf * w.v1[k - o];
    }
    fm_forward(field, w, true, w.ut.data() + o, w.xh.data(), t2.data(), tp, ms, T, half.data() + r0);
    for (size_t k = 0; k < mn; ++k) w.ut[o + k] = (w.v1[k] + w.ut[o + k]) / S(2);
  }
  // v(x_t, t) and the loss mean((v - u)^2) (over the whole batch: these rows' part)
  if (!w.device && (w.cache.capacity < Bl || w.cache.T != T || w.cache.blocks.size() != static_cast<size_t>(cfg.n_block)))
    w.cache.resize(field.backend(), cfg, Bl, T);
  fm_forward(field, w, false, w.v.data() + r0 * n, w.xt.data() + r0 * n, st.t.data() + r0, params, Bl, T,
             opt.shortcut ? st.d.data() + r0 : nullptr);
  const size_t N = Bs * n;
  double loss = 0;
  const S scale = static_cast<S>(2.0 / static_cast<double>(N));
  for (size_t k = r0 * n; k < r1 * n; ++k) {
    const S d = w.v[k] - w.ut[k];
    loss += static_cast<double>(d) * static_cast<double>(d);
    w.gv[k] = scale * d;
  }
  st.loss = loss / static_cast<double>(N);
  if (opt.shortcut) {
    double sl = 0;
    for (size_t k = r0 * n; k < s1 * n; ++k) {
      const double e = static_cast<double>(w.v[k]) - static_cast<double>(w.ut[k]);
      sl += e * e;
    }
    st.shortcut_loss = sl / static_cast<double>(m * n);
  }
  if (!std::isfinite(st.loss)) throw Error("flow matching: the loss is not finite (" + std::to_string(st.loss) + ")");
  if (endpoint) {
    // x1_hat = x_t + (1 - t) v; its gradient reaches v scaled by (1 - t)
    w.x1hat.resize(N);
    w.gx1hat.resize(N);
    for (size_t b = 0; b < Bs; ++b) {
      const S r = static_cast<S>(1.0 - st.t[b]);
      for (size_t k = b * n; k < (b + 1) * n; ++k) w.x1hat[k] = w.xt[k] + r * w.v[k];
    }
    st.endpoint_loss = (*endpoint)(w.x1hat.data(), st, w.gx1hat.data());
    if (!std::isfinite(st.endpoint_loss))
      throw Error("flow matching: the endpoint loss is not finite (" + std::to_string(st.endpoint_loss) + ")");
    for (size_t b = 0; b < Bs; ++b) {
      const S r = static_cast<S>(1.0 - st.t[b]);
      for (size_t k = b * n; k < (b + 1) * n; ++k) w.gv[k] += r * w.gx1hat[k];
    }
  }
  if (dparams) {
    std::fill(w.dx.begin(), w.dx.end(), S(0));
    fm_vjp(field, w, w.dx.data(), dparams, w.gv.data() + r0 * n, params);
  }
  return st;
}

#define FLOWLOOP_FLOWMATCH(S)                                                                                  \
  template std::vector<double> squared_distances<S>(const S*, int, const S*, int, size_t);                     \
  template void conditional_path<S>(Matcher, S*, S*, const S*, const S*, const S*, double, double, size_t);    \
  template void trajectory_path<S>(S*, S*, const S*, int, double, size_t);                                     \
  template FlowMatchStep flow_match_step<S>(const Field<S>&, const S*, const S*, int, int, int,                 \
                                            const FlowMatchOptions&, Rng&, S*, FlowMatchWork<S>&,                \
                                            const EndpointLoss<S>*, const S*, int, int);
FLOWLOOP_FLOWMATCH(float)
FLOWLOOP_FLOWMATCH(double)

}  // namespace flowloop
