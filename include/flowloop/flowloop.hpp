// flowloop/flowloop.hpp: the whole public API in one include (every header of
// include/flowloop/). cuda.hpp's functions and algebra.hpp's flowloop::algebra::device
// are defined in the library flowloop_cuda (built with FLOWLOOP_CUDA).
#pragma once

#include "flowloop/algebra.hpp"
#include "flowloop/bench.hpp"
#include "flowloop/checkpoint.hpp"
#include "flowloop/compare.hpp"
#include "flowloop/config.hpp"
#include "flowloop/cuda.hpp"
#include "flowloop/data.hpp"
#include "flowloop/depth.hpp"
#include "flowloop/field.hpp"
#include "flowloop/flowmatch.hpp"
#include "flowloop/flowmatch_train.hpp"
#include "flowloop/grad.hpp"
#include "flowloop/io.hpp"
#include "flowloop/kernels.hpp"
#include "flowloop/layers.hpp"
#include "flowloop/model.hpp"
#include "flowloop/params.hpp"
#include "flowloop/problems.hpp"
#include "flowloop/solver.hpp"
#include "flowloop/sweep.hpp"
#include "flowloop/tensor.hpp"
#include "flowloop/train.hpp"
#include "flowloop/trajectory.hpp"
