// Helpers shared by the tests: random fills and central finite differences.
#pragma once

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <unistd.h>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "flowloop/nn/config.hpp"
#include "flowloop/ode/solver.hpp"
#include "flowloop/core/tensor.hpp"

namespace flowloop::test {

// A fresh directory under the system's temporary one, removed with its contents.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix)
      : path(std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

// A finalized config (F = 0 means 4C).
inline ModelConfig make_config(int V, int Tmax, int C, int NH, int F, int L, int depth = 3) {
  ModelConfig c;
  c.vocab_size = V;
  c.context = Tmax;
  c.d_model = C;
  c.n_head = NH;
  c.d_ff = F;
  c.n_block = L;
  c.depth = depth;
  c.finalize();
  return c;
}

inline std::vector<double> randn(size_t n, flowloop::Rng& rng, double scale = 1.0) {
  std::vector<double> v(n);
  for (auto& x : v) x = scale * rng.normal();
  return v;
}

// n values of type S from N(0, scale^2).
template <class S>
std::vector<S> random_values(size_t n, flowloop::Rng& rng, double scale = 1.0) {
  std::vector<S> v(n);
  for (auto& x : v) x = static_cast<S>(scale * rng.normal());
  return v;
}

// Norm-wise relative error ||a - b|| / max(||a||, ||b||, floor); NaN anywhere
// gives +inf so that NaN never passes.
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b,
                        double floor = 1e-300) {
  if (a.size() != b.size()) return INFINITY;
  double d = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    d += (a[i] - b[i]) * (a[i] - b[i]);
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return std::sqrt(d) / std::max({std::sqrt(na), std::sqrt(nb), floor});
}

// rel_error of vectors of any floating type, and the tolerance of a backend comparison:
// float 1e-6 (a few roundings), double 1e-15, unless given.
template <class S>
double rel_error_of(const std::vector<S>& a, const std::vector<S>& b) {
  return rel_error(std::vector<double>(a.begin(), a.end()), std::vector<double>(b.begin(), b.end()));
}
template <class S>
constexpr double backend_tol(double float_tol = 1e-6, double double_tol = 1e-15) {
  return std::is_same_v<S, float> ? float_tol : double_tol;
}

// Central differences of loss() with respect to x[lo, lo + n): (L(x+e) - L(x-e)) / 2e,
// with e scaled by max(1, |x_i|).
inline std::vector<double> fd_grad(const std::function<double()>& loss, double* x, size_t n,
                                   double eps = 1e-5) {
  std::vector<double> g(n);
  for (size_t i = 0; i < n; ++i) {
    const double x0 = x[i];
    const double e = eps * std::max(1.0, std::fabs(x0));
    x[i] = x0 + e;
    const double lp = loss();
    x[i] = x0 - e;
    const double lm = loss();
    x[i] = x0;
    g[i] = (lp - lm) / (2 * e);
  }
  return g;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

inline SolveOptions fixed_opts(const std::string& method, double t1, int steps) {
  SolveOptions o;
  o.method = method;
  o.t1 = t1;
  o.steps = steps;
  return o;
}

inline SolveOptions adaptive_opts(const std::string& method, double t1, double rtol, double atol) {
  SolveOptions o;
  o.method = method;
  o.t1 = t1;
  o.adaptive = true;
  o.rtol = rtol;
  o.atol = atol;
  return o;
}

// Runs a shell command, returns its stdout and stderr together; *rc gets the status.
inline std::string run_command(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  *rc = pclose(p);
  return out;
}

}  // namespace flowloop::test
