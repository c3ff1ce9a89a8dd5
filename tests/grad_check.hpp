// Helpers shared by the gradient tests (test_model, test_grad, test_timecond): token
// batches, and the gradient of L = <w, h(t1)> by each method, against its loss alone.
#pragma once

#include <catch2/catch.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "check.hpp"
#include "flowloop/ode/grad.hpp"
#include "flowloop/nn/model.hpp"

namespace flowloop::test {

// B x T random tokens below V; with_ignore marks the second target ignored (-1).
inline TokenBatch make_batch(int B, int T, int V, uint64_t seed, bool with_ignore = false) {
  Rng rng(seed);
  TokenBatch tb;
  tb.B = B;
  tb.T = T;
  for (int i = 0; i < B * T; ++i) tb.data.push_back(static_cast<int32_t>(rng.next() % V));
  if (with_ignore) tb.data[1] = -1;
  return tb;
}

// The adaptive code path with step sizes that do not depend on the parameters:
// the error is always tiny, so every step grows by fac_max up to hmax.
inline SolveOptions frozen_adaptive(const std::string& method, double t1) {
  SolveOptions o = adaptive_opts(method, t1, 1e6, 1e6);
  o.h0 = 0.1;
  o.hmax = 0.45;
  return o;
}

struct Grads {
  double loss;
  std::vector<double> dh0, dparams;  // dparams: the field's
  GradStats stats;
};

// L = <w, h(t1)> for a fixed w, h(t1) solved from h0 (B x T states) under o; its gradient
// by `method` (the forward solve and the backward pass must succeed).
inline Grads ode_grad(Model<double>& m, const std::vector<double>& h0, int B, int T, const SolveOptions& o,
                      GradMethod method, const std::vector<double>& w, GradOptions gopt = {}) {
  gopt.method = method;
  FieldSystem<double> sys(m.field, m.field_params(), B, T);
  OdeGradient<double> og(sys, o, gopt);
  Buffer<double> h(h0.begin(), h0.end());
  REQUIRE(og.forward(h.data()).ok());
  Grads g;
  g.loss = dot(std::vector<double>(h.begin(), h.end()), w);
  g.dh0.assign(h0.size(), 0.0);
  g.dparams.assign(m.field.num_params(), 0.0);
  g.stats = og.backward(w.data(), g.dh0.data(), g.dparams.data());
  REQUIRE(g.stats.ok());
  return g;
}

// L = <w, h(t1)> alone (the finite differences' function).
inline double ode_loss(Model<double>& m, const std::vector<double>& h0, int B, int T, const SolveOptions& o,
                       const std::vector<double>& w) {
  FieldSystem<double> sys(m.field, m.field_params(), B, T);
  Buffer<double> h(h0.begin(), h0.end());
  REQUIRE(integrate(sys, h.data(), o).ok());
  return dot(std::vector<double>(h.begin(), h.end()), w);
}

}  // namespace flowloop::test
