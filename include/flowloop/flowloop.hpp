// flowloop/flowloop.hpp: the whole public API in one include, by layer:
//   core/     tensors, errors, memory (where arrays live)
//   ode/      the solvers: state algebra, tableaus and integrate(), depth specs, gradients
//   nn/       the network: ops, layers, the field (one block composition), the model
//   backend/  backends (cpu, reference, cuda), the kernels' bodies
//   train/    training, data, data parallelism, flow matching
//   io/       checkpoints and files
//   study/    compare, sweep, trajectories, benchmarks
// backend/cuda.hpp's functions and ode/algebra.hpp's flowloop::algebra::device are
// defined in the library flowloop_cuda (built with FLOWLOOP_CUDA).
#pragma once

#include "flowloop/core/memory.hpp"
#include "flowloop/core/tensor.hpp"

#include "flowloop/ode/algebra.hpp"
#include "flowloop/ode/depth.hpp"
#include "flowloop/ode/grad.hpp"
#include "flowloop/ode/problems.hpp"
#include "flowloop/ode/solver.hpp"
#include "flowloop/ode/state_ops.hpp"

#include "flowloop/nn/config.hpp"
#include "flowloop/nn/field.hpp"
#include "flowloop/nn/layers.hpp"
#include "flowloop/nn/model.hpp"
#include "flowloop/nn/ops.hpp"
#include "flowloop/nn/params.hpp"

#include "flowloop/backend/backend.hpp"
#include "flowloop/backend/cuda.hpp"
#include "flowloop/backend/kernels.hpp"

#include "flowloop/train/data.hpp"
#include "flowloop/train/dist.hpp"
#include "flowloop/train/flowmatch.hpp"
#include "flowloop/train/flowmatch_train.hpp"
#include "flowloop/train/train.hpp"

#include "flowloop/io/checkpoint.hpp"
#include "flowloop/io/hf.hpp"
#include "flowloop/io/io.hpp"

#include "flowloop/study/bench.hpp"
#include "flowloop/study/compare.hpp"
#include "flowloop/study/sweep.hpp"
#include "flowloop/study/trajectory.hpp"
