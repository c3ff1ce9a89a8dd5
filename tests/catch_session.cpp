// Catch2's implementation, compiled once for every test executable (it is the slowest file
// of the tests to compile); each executable's main (main.cpp, main_cuda.cpp) calls
// catch_session_run after its own preparations.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "catch_session.hpp"

int flowloop::test::catch_session_run(int argc, char** argv) { return Catch::Session().run(argc, argv); }
