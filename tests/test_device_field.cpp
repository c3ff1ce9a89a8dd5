// The field composed from a Backend's operations (DeviceField) on the reference backend
// (the bodies of the CUDA kernels, run on the host) against Field, the CPU path; the
// device selection and its errors. The same checks run on the CUDA backend in
// test_cuda.cpp where a GPU is visible.
#include <catch2/catch.hpp>

#include "device_field_check.hpp"
#include "flowloop/backend.hpp"

using namespace flowloop;
using namespace flowloop::test;

TEMPLATE_TEST_CASE("device field: the reference backend against Field", "[device]", float, double) {
  using S = TestType;
  auto be = make_backend<S>(Device::cpu);
  REQUIRE(be->device() == Device::cpu);
  for (const char* kind : {"autonomous", "time", "step"}) check_device_field<S>(*be, kind, backend_tol<S>(2e-6, 1e-13));
}

TEST_CASE("device: names, defaults and the errors of an unavailable device", "[device]") {
  CHECK(parse_device("cpu") == Device::cpu);
  CHECK(parse_device("cuda") == Device::cuda);
  CHECK(std::string(device_name(Device::cuda)) == "cuda");
  CHECK_THROWS_WITH(parse_device("gpu"), Catch::Contains("unknown device 'gpu'") && Catch::Contains("cpu or cuda"));
  if (cuda_device_count() == 0) {
    CHECK(default_device() == Device::cpu);
    CHECK_THROWS_WITH(make_backend<float>(Device::cuda), Catch::Contains("--device cuda") &&
                                                             (Catch::Contains("no CUDA backend") || Catch::Contains("no GPU")));
  } else {
    CHECK(default_device() == Device::cuda);
  }
  CHECK_NOTHROW(require_device(Device::cpu));
}

TEST_CASE("device field: a cache of another shape or configuration is refused", "[device]") {
  auto be = make_backend<double>(Device::cpu);
  const ModelConfig cfg = device_check_config("autonomous");
  Model<double> m(cfg);
  DeviceField<double> df(*be, cfg, m.layout);
  DeviceFieldCache<double> dc;
  dc.resize(*be, cfg, 2, 5);
  Array<double> h(*be, 3 * 5 * 12), f(*be, 3 * 5 * 12);
  Array<double> p(*be, df.num_params());
  CHECK_THROWS_WITH(df.forward(f.data(), h.data(), nullptr, p.data(), 3, 5, dc), Catch::Contains("cache sized for (B=2"));
  const double t[2] = {0, 0};
  CHECK_THROWS_WITH(df.forward(f.data(), h.data(), t, p.data(), 2, 5, dc, t), Catch::Contains("not step-conditioned"));
}
