#include <catch2/catch.hpp>
int dummy_layers;
