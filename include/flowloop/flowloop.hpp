// flowloop/flowloop.hpp: the whole public API in one include.
#pragma once

#include "flowloop/bench.hpp"
#include "flowloop/checkpoint.hpp"
#include "flowloop/config.hpp"
#include "flowloop/field.hpp"
#include "flowloop/layers.hpp"
#include "flowloop/model.hpp"
#include "flowloop/params.hpp"
#include "flowloop/tensor.hpp"
