// The [cuda] tests' main: without a GPU (or a driver) it says so and exits with 77,
// which CTest reports as skipped; listing the tests works anywhere.
#include <cstdio>
#include <cstring>

#include "catch_session.hpp"
#include "flowloop/backend/cuda.hpp"

int main(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) listing = listing || std::strncmp(argv[i], "--list", 6) == 0;
  if (!listing && flowloop::cuda::device_count() == 0) {
    std::printf("no CUDA device visible: the [cuda] tests are skipped (run them on a GPU machine)\n");
    return 77;
  }
  if (!listing) std::printf("CUDA device: %s\n", flowloop::cuda::device_description(0).c_str());
  return flowloop::test::catch_session_run(argc, argv);
}
