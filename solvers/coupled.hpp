// Private to solvers/: a batch of G sequences seen as one sequence of G*n values,
// so that the whole batch takes one shared step (torchdiffeq's behaviour).
#pragma once

#include <algorithm>
#include <vector>

#include "flowloop/ode/solver.hpp"

namespace flowloop::detail {

// Sys is OdeSystem<S> or DiffSystem<S>; the view forwards evaluations of its single
// row to all of the inner system's sequences at the same time.
template <class S, class Sys>
class CoupledView : public Sys {
 public:
  explicit CoupledView(Sys& inner) : in_(inner), ids_(static_cast<size_t>(inner.groups())), t_(ids_.size()) {
    for (int g = 0; g < inner.groups(); ++g) ids_[static_cast<size_t>(g)] = g;
  }
  int groups() const override { return 1; }
  size_t dim() const override { return in_.dim() * static_cast<size_t>(in_.groups()); }
  void eval(S* dydt, const S* y, const double* t, const int*, int) override {
    in_.eval(dydt, y, times(t[0]), ids_.data(), in_.groups());
  }
  StateOps<S>* backend() override { return in_.backend(); }

 protected:
  const double* times(double t) {
    std::fill(t_.begin(), t_.end(), t);
    return t_.data();
  }
  Sys& in_;
  std::vector<int> ids_;
  std::vector<double> t_;
};

}  // namespace flowloop::detail
