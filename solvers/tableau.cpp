// Butcher tableaus of flowloop's built-in explicit Runge-Kutta methods.
#include <cmath>
#include <map>

#include "flowloop/ode/solver.hpp"

namespace flowloop {

void ButcherTableau::validate() {
  const size_t s = c.size();
  auto fail = [&](const std::string& what) { return Error("tableau '" + name + "': " + what); };
  if (s == 0) throw fail("no stages");
  if (s > 32) throw fail(std::to_string(s) + " stages: the state algebra takes at most 32");
  if (a.size() != s * s) throw fail("a has " + std::to_string(a.size()) + " entries, expected s*s = " + std::to_string(s * s));
  if (b.size() != s) throw fail("b has " + std::to_string(b.size()) + " entries, expected " + std::to_string(s));
  if (!e.empty() && e.size() != s) throw fail("error weights have " + std::to_string(e.size()) + " entries, expected " + std::to_string(s));
  if (!dense.empty() && dense.size() != s) throw fail("dense weights have the wrong length");
  if (order <= 0) throw fail("order must be positive");
  if (!e.empty() && (error_order <= 0 || error_order >= order + 2)) throw fail("error_order is missing or implausible");
  const double tol = 1e-12;
  for (size_t i = 0; i < s; ++i) {
    double row = 0.0;
    for (size_t j = 0; j < s; ++j) {
      if (j >= i && A(static_cast<int>(i), static_cast<int>(j)) != 0.0)
        throw fail("a[" + std::to_string(i) + "][" + std::to_string(j) + "] is not zero: the method must be explicit");
      row += A(static_cast<int>(i), static_cast<int>(j));
    }
    if (std::fabs(row - c[i]) > tol)
      throw fail("row " + std::to_string(i) + " of a sums to " + std::to_string(row) + ", not c = " + std::to_string(c[i]));
  }
  double sb = 0.0, se = 0.0;
  for (size_t j = 0; j < s; ++j) {
    sb += b[j];
    if (!e.empty()) se += e[j];
  }
  if (std::fabs(sb - 1.0) > tol) throw fail("weights b sum to " + std::to_string(sb) + ", not 1");
  if (!e.empty() && std::fabs(se) > tol) throw fail("error weights sum to " + std::to_string(se) + ", not 0");
  // FSAL: the last stage is evaluated at t + h on exactly the propagated solution
  fsal = s > 1 && c[s - 1] == 1.0 && b[s - 1] == 0.0;
  for (size_t j = 0; fsal && j < s; ++j) fsal = A(static_cast<int>(s - 1), static_cast<int>(j)) == b[j];
}

namespace {

ButcherTableau make(std::string name, int order, int error_order, std::vector<double> c,
                    std::vector<std::vector<double>> rows, std::vector<double> b,
                    std::vector<double> e, std::string doc, std::vector<double> dense = {}) {
  ButcherTableau t;
  t.name = std::move(name);
  t.order = order;
  t.error_order = error_order;
  const size_t s = c.size();
  t.a.assign(s * s, 0.0);
  for (size_t i = 0; i < rows.size() && i < s; ++i)
    for (size_t j = 0; j < rows[i].size(); ++j) t.a[i * s + j] = rows[i][j];
  if (rows.size() > s) throw Error("tableau '" + t.name + "': more rows than stages");
  t.c = std::move(c);
  t.b = std::move(b);
  t.e = std::move(e);
  t.dense = std::move(dense);
  t.doc = std::move(doc);
  t.validate();
  return t;
}

std::map<std::string, ButcherTableau> build() {
  std::map<std::string, ButcherTableau> m;
  auto add = [&](ButcherTableau t) { m.emplace(t.name, std::move(t)); };
  add(make("euler", 1, 0, {0}, {{}}, {1}, {}, "explicit Euler; loop K == euler with K steps on [0, K]"));
  add(make("midpoint", 2, 0, {0, 0.5}, {{}, {0.5}}, {0, 1}, {}, "explicit midpoint rule"));
  add(make("heun", 2, 0, {0, 1}, {{}, {1}}, {0.5, 0.5}, {}, "Heun's method (explicit trapezoid)"));
  add(make("rk4", 4, 0, {0, 0.5, 0.5, 1}, {{}, {0.5}, {0, 0.5}, {0, 0, 1}},
           {1.0 / 6, 1.0 / 3, 1.0 / 3, 1.0 / 6}, {}, "classical Runge-Kutta"));
  add(make("rk38", 4, 0, {0, 1.0 / 3, 2.0 / 3, 1}, {{}, {1.0 / 3}, {-1.0 / 3, 1}, {1, -1, 1}},
           {1.0 / 8, 3.0 / 8, 3.0 / 8, 1.0 / 8}, {}, "Kutta's 3/8 rule (torchdiffeq's rk4)"));
  add(make("bosh3", 3, 2, {0, 0.5, 0.75, 1}, {{}, {0.5}, {0, 0.75}, {2.0 / 9, 1.0 / 3, 4.0 / 9}},
           {2.0 / 9, 1.0 / 3, 4.0 / 9, 0},
           {2.0 / 9 - 7.0 / 24, 1.0 / 3 - 1.0 / 4, 4.0 / 9 - 1.0 / 3, -1.0 / 8},
           "Bogacki-Shampine 3(2), FSAL"));
  const std::vector<double> dp_c = {0, 1.0 / 5, 3.0 / 10, 4.0 / 5, 8.0 / 9, 1, 1};
  const std::vector<std::vector<double>> dp_a = {
      {},
      {1.0 / 5},
      {3.0 / 40, 9.0 / 40},
      {44.0 / 45, -56.0 / 15, 32.0 / 9},
      {19372.0 / 6561, -25360.0 / 2187, 64448.0 / 6561, -212.0 / 729},
      {9017.0 / 3168, -355.0 / 33, 46732.0 / 5247, 49.0 / 176, -5103.0 / 18656},
      {35.0 / 384, 0, 500.0 / 1113, 125.0 / 192, -2187.0 / 6784, 11.0 / 84}};
  const std::vector<double> dp_b = {35.0 / 384, 0, 500.0 / 1113, 125.0 / 192, -2187.0 / 6784, 11.0 / 84, 0};
  // Shampine's continuous extension as in Hairer's dopri5.f (contd5)
  const std::vector<double> dp_d = {-12715105075.0 / 11282082432.0, 0, 87487479700.0 / 32700410799.0,
                                    -10690763975.0 / 1880347072.0, 701980252875.0 / 199316789632.0,
                                    -1453857185.0 / 822651844.0, 69997945.0 / 29380423.0};
  add(make("dopri5", 5, 4, dp_c, dp_a, dp_b,
           {71.0 / 57600, 0, -71.0 / 16695, 71.0 / 1920, -17253.0 / 339200, 22.0 / 525, -1.0 / 40},
           "Dormand-Prince 5(4) with Hairer's error weights (dopri5.f), FSAL, dense output", dp_d));
  add(make("dopri5-shampine", 5, 4, dp_c, dp_a, dp_b,
           {35.0 / 384 - 1951.0 / 21600, 0, 500.0 / 1113 - 22642.0 / 50085, 125.0 / 192 - 451.0 / 720,
            -2187.0 / 6784 + 12231.0 / 42400, 11.0 / 84 - 649.0 / 6300, -1.0 / 60},
           "Dormand-Prince 5(4) with Shampine's error weights (torchdiffeq, diffrax)", dp_d));
  add(make("tsit5", 5, 4, {0, 0.161, 0.327, 0.9, 0.9800255409045097, 1, 1},
           {{},
            {0.161},
            {-0.008480655492356989, 0.335480655492357},
            {2.8971530571054935, -6.359448489975075, 4.3622954328695815},
            {5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525},
            {5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401006,
             -0.02826905039406838},
            {0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
             2.324710524099774}},
           {0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
            2.324710524099774, 0},
           {-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995,
            -0.1447110071732629, 0.5823571654525552, -0.45808210592918697, 1.0 / 66},
           "Tsitouras 5(4), FSAL"));
  return m;
}

const std::map<std::string, ButcherTableau>& all() {
  static const std::map<std::string, ButcherTableau> m = build();
  return m;
}

}  // namespace

const ButcherTableau& tableau(const std::string& name) {
  auto it = all().find(name);
  if (it == all().end()) {
    std::string known;
    for (const auto& kv : all()) known += (known.empty() ? "" : ", ") + kv.first;
    throw Error("unknown solver '" + name + "' (known: " + known + ")");
  }
  return it->second;
}

std::vector<std::string> tableau_names() {
  std::vector<std::string> v;
  for (const auto& kv : all()) v.push_back(kv.first);
  return v;
}

}  // namespace flowloop
