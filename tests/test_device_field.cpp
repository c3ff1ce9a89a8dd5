// The one block composition on the reference backend's ops (kernels.hpp one row at a time)
// (the bodies of the CUDA kernels, run on the host) against Field, the CPU path; the
// device selection and its errors. The same checks run on the CUDA backend in
// test_cuda.cpp where a GPU is visible.
#include <catch2/catch.hpp>

#include "device_field_check.hpp"
#include "driver_check.hpp"
#include "flowloop/backend/backend.hpp"
#include "flowloop/study/bench.hpp"
#include "flowloop/train/flowmatch.hpp"
#include "flowloop/io/io.hpp"

#include <cmath>
#include <nlohmann/json.hpp>

using namespace flowloop;
using namespace flowloop::test;

TEMPLATE_TEST_CASE("device field: the reference backend against Field", "[device]", float, double) {
  using S = TestType;
  auto be = make_backend<S>(Device::cpu);
  REQUIRE(be->device() == Device::cpu);
  for (const char* kind : {"autonomous", "time", "step", "llama"}) check_device_field<S>(*be, kind, backend_tol<S>(2e-6, 1e-13));
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
  Field<double> df(*be, cfg, m.layout);
  FieldCache<double> dc;
  dc.resize(*be, cfg, 2, 5);
  Array<double> h(*be, 3 * 5 * 12), f(*be, 3 * 5 * 12);
  Array<double> p(*be, df.num_params());
  CHECK_THROWS_WITH(df.forward(f.data(), h.data(), nullptr, p.data(), 3, 5, dc), Catch::Contains("cache sized for (B=2"));
  const double t[2] = {0, 0};
  CHECK_THROWS_WITH(df.forward(f.data(), h.data(), t, p.data(), 2, 5, dc, t), Catch::Contains("not step-conditioned"));
}

TEST_CASE("device field: a cache in another backend's memory is refused, naming both", "[device]") {
  auto be = make_backend<double>(Device::cpu);
  const ModelConfig cfg = device_check_config("autonomous");
  Model<double> m(cfg);
  Field<double> df(*be, cfg, m.layout);
  FieldCache<double> on_cpu;
  on_cpu.resize(cfg, 2, 5);  // the cpu backend's memory
  Array<double> h(*be, 2 * 5 * 12), f(*be, 2 * 5 * 12), p(*be, df.num_params());
  CHECK_THROWS_WITH(df.forward(f.data(), h.data(), nullptr, p.data(), 2, 5, on_cpu),
                    Catch::Contains("another backend's memory") && Catch::Contains("cpu (Eigen/OpenBLAS)") &&
                        Catch::Contains("reference (host)"));
}

TEST_CASE("device field: bench field on a backend reports the field against the backend's product", "[device]") {
  auto be = make_backend<float>(Device::cpu);
  BenchOptions o;
  o.size = "S";
  o.min_reps = 2;
  o.min_seconds = 0.0;
  o.time_cond = true;
  const auto j = nlohmann::json::parse(bench_field_on(*be, o));
  CHECK(j["device"] == "cpu");
  CHECK(j["backend"] == "reference (host)");
  CHECK(j["reps"].get<int>() >= 2);
  for (const char* k : {"ms_per_eval", "vjp_ms", "gemm_ms", "gflops", "ratio"}) {
    INFO(k);
    CHECK(j[k].get<double>() > 0.0);
    CHECK(std::isfinite(j[k].get<double>()));
  }
  CHECK(j["time_cond"]["ms_per_eval"].get<double>() > 0.0);
  CHECK(j["cache_bytes"].get<size_t>() > 0);
  o.device = "gpu";
  CHECK_THROWS_WITH(bench_field(o), Catch::Contains("unknown device 'gpu'"));
}

TEMPLATE_TEST_CASE("device field: solves and gradients of a model on the reference backend against the CPU", "[device]",
                   float, double) {
  using S = TestType;
  std::shared_ptr<Backend<S>> be = make_backend<S>(Device::cpu);
  for (const char* kind : {"autonomous", "time", "llama"}) check_device_solves<S>(be, kind, backend_tol<S>(2e-6, 1e-13));
}

TEST_CASE("device field: a model set to cpu evaluates with Field again", "[device]") {
  Model<double> m(device_check_config("autonomous"));
  m.set_backend(make_backend<double>(Device::cpu));
  CHECK(m.device_field() != nullptr);
  m.set_device(Device::cpu);
  CHECK(m.device_field() == nullptr);
  if (!cuda_built()) CHECK_THROWS_WITH(m.set_device(Device::cuda), Catch::Contains("no CUDA backend"));
}

TEST_CASE("device: the CLI's --device flag, its report and its errors", "[device]") {
  TempDir dir("flowloop_device_cli");
  const std::string cli = FLOWLOOP_CLI, model = dir.file("m.safetensors");
  int rc = 0;
  run_command(cli + " init --vocab 11 --context 6 --d-model 8 --n-head 2 --n-block 1 --depth 2 --seed 5 -o " + model, &rc);
  REQUIRE(rc == 0);
  write_file_atomic(dir.file("tok.json"), R"({"tokens": [[1, 2, 3], [4, 5, 6]], "targets": [[2, 3, -1], [5, 6, -1]]})");
  const std::string fwd = cli + " forward -m " + model + " --tokens " + dir.file("tok.json") + " --solver dopri5 --rtol 1e-4 --atol 1e-6";
  std::string out = run_command(fwd + " --device cpu -o " + dir.file("f.json"), &rc);
  REQUIRE(rc == 0);
  CHECK(read_json_file(dir.file("f.json"), "forward")["device"] == "cpu");
  out = run_command(cli + " grad -m " + model + " --tokens " + dir.file("tok.json") + " --device cpu -o " + dir.file("g.safetensors"), &rc);
  REQUIRE(rc == 0);
  CHECK(out.find("\"device\":\"cpu\"") != std::string::npos);
  out = run_command(fwd + " --device tpu -o " + dir.file("x.json"), &rc);
  CHECK(rc != 0);
  CHECK(out.find("--device") != std::string::npos);
  if (cuda_device_count() == 0) {
    out = run_command(fwd + " --device cuda -o " + dir.file("x.json"), &rc);
    CHECK(rc != 0);
    CHECK(out.find("--device cuda: ") != std::string::npos);
    out = run_command("FLOWLOOP_DEVICE=cuda " + fwd + " -o " + dir.file("x.json"), &rc);  // auto, overridden
    CHECK(rc != 0);
    CHECK(out.find("--device cuda: ") != std::string::npos);
  }
}

TEMPLATE_TEST_CASE("device field: a flow-matching step on the reference backend against the CPU", "[device]", float,
                   double) {
  using S = TestType;
  const ModelConfig cfg = device_check_config("step");
  Model<S> model(cfg);
  model.init(4);
  Rng rng(9);
  for (const auto& t : model.layout.tensors())  // the modulation and step embedding away from zero
    if (t.name.find(".ada.") != std::string::npos || t.name.find("step_embed") != std::string::npos)
      for (size_t i = 0; i < t.numel; ++i) model.params[t.offset + i] = static_cast<S>(0.1 * rng.normal());
  Model<S> dev = model;
  dev.set_backend(make_backend<S>(Device::cpu));
  const int B = 4, K = 3, T = 5;
  const size_t n = static_cast<size_t>(T) * cfg.d_model, np = model.field.num_params();
  const auto states = random_values<S>(static_cast<size_t>(B) * (K + 1) * n, rng);
  std::vector<S> target(model.field_params(), model.field_params() + np);
  for (auto& v : target) v = static_cast<S>(v * 0.9);
  for (const char* matcher : {"icfm", "trajectory"}) {
    FlowMatchOptions o;
    o.matcher = parse_matcher(matcher);
    o.shortcut = std::string(matcher) == "trajectory";
    o.shortcut_fraction = 0.5;
    o.shortcut_steps = 8;
    FlowMatchWork<S> wc, wd;
    wd.device = dev.device_field();
    std::vector<S> gc(np, S(0)), gd(np, S(0));
    Rng r1(5), r2(5);
    const FlowMatchStep a =
        flow_match_step(model.field, model.field_params(), states.data(), B, K, T, o, r1, gc.data(), wc, static_cast<const EndpointLoss<S>*>(nullptr),
                        target.data());
    const FlowMatchStep b =
        flow_match_step(dev.field, dev.field_params(), states.data(), B, K, T, o, r2, gd.data(), wd, static_cast<const EndpointLoss<S>*>(nullptr),
                        target.data());
    INFO(matcher);
    CHECK(b.t == a.t);
    CHECK(std::fabs(b.loss - a.loss) < 100 * backend_tol<S>(2e-6, 1e-13) * a.loss);
    CHECK(rel_error_of(gd, gc) < 100 * backend_tol<S>(2e-6, 1e-13));
    if (o.shortcut) CHECK(std::fabs(b.shortcut_loss - a.shortcut_loss) < 1e-3 * a.shortcut_loss);
  }
}

TEST_CASE("device: the driver on a backend's memory equals the host driver, bit for bit", "[device][solvers]") {
  auto be = make_backend<double>(Device::cpu);
  check_backend_driver(*be, /*exact=*/true);
}

TEST_CASE("device: a resident field system refuses what needs host states", "[device]") {
  const ModelConfig cfg = device_check_config("autonomous");
  Model<double> cpu(cfg);
  cpu.init(3);
  FieldSystem<double> host(cpu.field, cpu.field_params(), 2, 4);
  CHECK(host.backend() == nullptr);
  CHECK_THROWS_WITH(host.set_resident(true), Catch::Contains("only a field on a device"));
  Model<double> dev = cpu;
  dev.set_backend(std::shared_ptr<Backend<double>>(make_backend<double>(Device::cpu)));
  FieldSystem<double> sys(dev.field, dev.field_params(), 2, 4, dev.device_field());
  CHECK(sys.backend() == nullptr);  // host states until made resident
  sys.set_resident(true);
  REQUIRE(sys.backend() == &dev.device_field()->backend());
  SolveOptions opt;
  opt.method = "odeint-rk4";
  opt.steps = 2;
  Array<double> y(*sys.backend(), 2 * sys.dim());
  y.zero();
  CHECK_THROWS_WITH(integrate(sys, y.data(), opt), Catch::Contains("odeint") && Catch::Contains("host states only"));
  opt.method = "rk4";
  GradOptions reg;
  reg.kinetic = 0.1;
  CHECK_THROWS_WITH(OdeGradient<double>(sys, opt, reg), Catch::Contains("the regularisers need host states"));
  for (const char* method : {"backprop", "checkpoint", "adjoint"}) {
    GradOptions g;
    g.method = grad_method(method);
    CHECK_NOTHROW(OdeGradient<double>(sys, opt, g));
  }
  sys.set_resident(false);
  CHECK(sys.backend() == nullptr);
  {  // a resident scope ends with the host's states again, after a throw too
    try {
      FieldSystem<double>::Resident resident(sys);
      CHECK(sys.backend() != nullptr);
      throw Error("inside the scope");
    } catch (const Error&) {
    }
    CHECK(sys.backend() == nullptr);
  }
  // an array whose bytes overflow is an Error naming it, not an allocation
  CHECK_THROWS_WITH(Array<double>(dev.device_field()->backend(), SIZE_MAX / 4), Catch::Contains("overflows"));
}

TEST_CASE("device: the exit gate's loops on the reference backend against the CPU", "[device]") {
  ModelConfig cfg = device_check_config("time");
  cfg.exit_gate = true;
  Model<double> cpu(cfg);
  cpu.init(9);
  Model<double> dev = cpu;
  dev.set_backend(std::shared_ptr<Backend<double>>(make_backend<double>(Device::cpu)));
  TokenBatch tok, tgt;
  check_tokens(cfg, 2, 5, tok, tgt);
  std::vector<double> gc(cpu.params.size(), 0.0), gd(dev.params.size(), 0.0);
  LoopWork<double> wc, wd;
  double dc = 0, dd = 0;
  const double lc = cpu.loop_gate_loss_and_grad(tok, tgt, 3, 0.1, gc.data(), wc, &dc);
  const double ld = dev.loop_gate_loss_and_grad(tok, tgt, 3, 0.1, gd.data(), wd, &dd);
  CHECK(ld == Approx(lc).epsilon(1e-12));
  CHECK(dd == Approx(dc).epsilon(1e-12));
  CHECK(rel_error_of(gd, gc) < 1e-12);
  CHECK(rel_error_of(std::vector<double>(wd.h.begin(), wd.h.end()), std::vector<double>(wc.h.begin(), wc.h.end())) <
        1e-13);
  // truncated backprop through the last loop only
  std::fill(gc.begin(), gc.end(), 0.0);
  std::fill(gd.begin(), gd.end(), 0.0);
  const double tc = cpu.loop_loss_and_grad(tok, tgt, 3, gc.data(), wc, nullptr, 1);
  const double td = dev.loop_loss_and_grad(tok, tgt, 3, gd.data(), wd, nullptr, 1);
  CHECK(td == Approx(tc).epsilon(1e-12));
  CHECK(rel_error_of(gd, gc) < 1e-12);
}

TEST_CASE("device: a model training from device arrays of its field's parameters and gradient", "[device][train]") {
  const ModelConfig cfg = device_check_config("time");
  Model<float> cpu(cfg);
  cpu.init(5);
  CHECK_THROWS_WITH(cpu.set_device_training(cpu.field_params(), nullptr), Catch::Contains("on the CPU"));
  std::shared_ptr<Backend<float>> be(make_backend<float>(Device::cpu));
  Model<float> a = cpu, b = cpu;
  a.set_backend(be);
  b.set_backend(be);
  const size_t P = b.field.num_params(), fb = b.layout.field_begin();
  Array<float> p(*be, P), g(*be, P);
  p.upload(b.field_params(), P);
  b.set_device_training(p.data(), g.data());
  TokenBatch tok, tgt;
  check_tokens(cfg, 2, 5, tok, tgt);
  SolveOptions so;
  so.method = "dopri5";
  so.adaptive = true;
  so.rtol = 1e-4;
  so.atol = 1e-6;
  so.t1 = 2.0;
  for (const char* what : {"backprop", "adjoint", "loop"}) {
    INFO(what);
    std::vector<float> ga(a.params.size(), 0.0f), gb(b.params.size(), 0.0f), gd(P);
    g.zero();
    float la, lb;
    if (std::string(what) == "loop") {
      LoopWork<float> wa, wb;
      la = a.loop_loss_and_grad(tok, tgt, 3, ga.data(), wa);
      lb = b.loop_loss_and_grad(tok, tgt, 3, gb.data(), wb);
    } else {
      GradOptions go;
      go.method = grad_method(what);
      GradStats sa, sb;
      OdeWork<float> wa, wb;
      la = a.ode_loss_and_grad(tok, tgt, so, go, ga.data(), sa, wa);
      lb = b.ode_loss_and_grad(tok, tgt, so, go, gb.data(), sb, wb);
    }
    CHECK(la == lb);
    g.download(gd.data(), P);
    bool field_zero = true, same = true;
    for (size_t i = 0; i < P; ++i) {
      field_zero = field_zero && gb[fb + i] == 0.0f;  // nothing of the field came down
      same = same && gd[i] == ga[fb + i];             // it is on the device, with the same bits
      gb[fb + i] = gd[i];
    }
    CHECK(field_zero);
    CHECK(same);
    CHECK(gb == ga);
  }
  b.set_device(Device::cpu);  // a device change turns it off
  std::vector<float> gc(cpu.params.size(), 0.0f);
  LoopWork<float> wc;
  CHECK_NOTHROW(b.loop_loss_and_grad(tok, tgt, 2, gc.data(), wc));
}
