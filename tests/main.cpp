// The tests' main: the CLI commands that the tests run (children of this process) use
// the CPU unless FLOWLOOP_DEVICE is set already, so that their bits can be compared with
// the library's CPU path on a GPU machine too (auto would pick the GPU there).
#include <cstdlib>

#include "catch_session.hpp"

int main(int argc, char** argv) {
  setenv("FLOWLOOP_DEVICE", "cpu", /*overwrite=*/0);
  return flowloop::test::catch_session_run(argc, argv);
}
