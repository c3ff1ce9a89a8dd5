// Private to solvers/: what a recorded (backprop) solve keeps for its reverse pass.
#pragma once

#include <vector>

#include "flowloop/ode/grad.hpp"

namespace flowloop::detail {

struct Tape {
  struct Call {
    int slot;              // DiffSystem recording slot
    std::vector<int> ids;  // the sequences evaluated, in row order
  };
  // One round of the driver in which some sequences accepted their step.
  struct Round {
    std::vector<int> groups;      // the sequences that accepted
    std::vector<double> t, h;     // their step start and size
    std::vector<int> k0_call;     // where f(t, y) of each of them was evaluated
    std::vector<int> stage_call;  // stage j >= 1 of this round (stage 0: k0_call)
  };
  std::vector<Call> calls;
  std::vector<Round> rounds;
  std::vector<int> k0_call;  // per sequence, while recording
  int row_of(int call, int g) const {
    const auto& ids = calls[static_cast<size_t>(call)].ids;
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] == g) return static_cast<int>(i);
    return -1;
  }
};

// integrate() that records every field evaluation of the steps that were
// accepted (rounds in which nobody accepted give their slots back).
template <class S>
SolveResult<S> integrate_taped(DiffSystem<S>& sys, S* y, const SolveOptions& opt, Tape& tape);

}  // namespace flowloop::detail
