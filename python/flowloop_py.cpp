// The `flowloop` Python module (pybind11): models loaded, saved and run under any depth
// specification, flowloop's solver on a Python right-hand side, training and evaluation
// with the CLI's options, `compare` and `trajectory` as numpy arrays, and flow matching
// over a teacher's latent trajectories (record, train, eval). Long work releases the GIL.
// Every argument that is wrong raises ValueError naming it (flowloop::Error's text).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "flowloop/flowloop.hpp"

namespace py = pybind11;
using namespace flowloop;

namespace {

using Floats = py::array_t<float, py::array::c_style>;
using Doubles = py::array_t<double, py::array::c_style>;

// A depth specification from keyword arguments, as the CLI's depth flags spell it.
DepthSpec depth_spec(std::optional<int> loops, std::optional<std::string> solver, std::optional<int> steps,
                     std::optional<double> rtol, std::optional<double> atol, std::optional<double> t1,
                     std::optional<std::string> controller, bool batch_coupled, std::optional<int64_t> max_steps) {
  DepthSpec d;
  if (loops) d.loops = *loops;
  if (solver) d.solver = *solver;
  if (steps) d.steps = *steps;
  if (rtol) d.rtol = *rtol;
  if (atol) d.atol = *atol;
  if (t1) d.t1 = *t1;
  if (controller) d.controller = *controller;
  if (max_steps) d.max_steps = *max_steps;
  d.coupled = batch_coupled;
  d.validate();
  return d;
}

// Token rows from a 2-D integer array; `name` names the argument in errors.
TokenBatch token_batch(const py::array& a, const char* name) {
  if (a.ndim() != 2)
    throw Error(std::string("argument '") + name + "' must be a 2-D integer array (B, T), not " +
                std::to_string(a.ndim()) + "-D");
  if (!py::isinstance<py::array_t<int32_t>>(a) && !py::isinstance<py::array_t<int64_t>>(a))
    throw Error(std::string("argument '") + name + "' must hold integers (int32 or int64), not " +
                std::string(py::str(a.dtype())));
  const auto rows = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  TokenBatch b;
  b.B = static_cast<int>(a.shape(0));
  b.T = static_cast<int>(a.shape(1));
  if (b.B < 1 || b.T < 1) throw Error(std::string("argument '") + name + "' is empty");
  b.data.resize(static_cast<size_t>(b.B) * b.T);
  const int64_t* p = rows.data();
  for (size_t i = 0; i < b.data.size(); ++i) {
    if (p[i] < INT32_MIN || p[i] > INT32_MAX)
      throw Error(std::string("argument '") + name + "': value " + std::to_string(p[i]) + " is out of range");
    b.data[i] = static_cast<int32_t>(p[i]);
  }
  return b;
}

// A numpy array over a buffer the library filled, which it now owns (no copy).
Floats owned_array(Buffer<float>&& values, std::vector<py::ssize_t> shape) {
  auto* keep = new Buffer<float>(std::move(values));
  const py::capsule free_it(keep, [](void* p) { delete static_cast<Buffer<float>*>(p); });
  return Floats(std::move(shape), keep->data(), free_it);
}

// A solve's statistics: the worst status, the batch's counts (the most over its
// sequences) and each sequence's own.
template <class S>
py::dict solve_stats(const SolveResult<S>& r) {
  std::vector<int64_t> nfe, steps, accepted, rejected;
  for (const auto& s : r.seq) {
    nfe.push_back(s.nfe);
    steps.push_back(s.steps);
    accepted.push_back(s.accepted);
    rejected.push_back(s.rejected);
  }
  auto arr = [](const std::vector<int64_t>& v) {
    return py::array_t<int64_t>(static_cast<py::ssize_t>(v.size()), v.data());
  };
  py::dict d;
  d["status"] = status_name(r.status);
  d["message"] = r.message;
  d["nfe"] = r.nfe;
  d["steps"] = r.steps;
  d["accepted"] = r.accepted;
  d["rejected"] = r.rejected;
  d["seq_nfe"] = arr(nfe);
  d["seq_steps"] = arr(steps);
  d["seq_accepted"] = arr(accepted);
  d["seq_rejected"] = arr(rejected);
  return d;
}

// A Python right-hand side as an OdeSystem: G rows of n values; f(t, y) with a float t and
// y of shape (n,) returns dy/dt of shape (n,) (or, vectorized, f(t (count,), y (count, n))
// returns (count, n)). The solver runs with the GIL held (it calls Python at every step).
class PySystem : public OdeSystem<double> {
 public:
  PySystem(py::function f, int groups, size_t n, bool vectorized)
      : f_(std::move(f)), groups_(groups), n_(n), vectorized_(vectorized) {}
  int groups() const override { return groups_; }
  size_t dim() const override { return n_; }
  void eval(double* dydt, const double* y, const double* t, const int*, int count) override {
    if (vectorized_) {
      Doubles ts(count, t);
      Doubles ys({static_cast<py::ssize_t>(count), static_cast<py::ssize_t>(n_)}, y);
      take(f_(ts, ys), dydt, static_cast<size_t>(count) * n_, {count, static_cast<py::ssize_t>(n_)});
      return;
    }
    for (int i = 0; i < count; ++i) {
      Doubles yi(static_cast<py::ssize_t>(n_), y + static_cast<size_t>(i) * n_);
      take(f_(t[i], yi), dydt + static_cast<size_t>(i) * n_, n_, {static_cast<py::ssize_t>(n_)});
    }
  }

 private:
  static void take(const py::object& out, double* dst, size_t n, std::vector<py::ssize_t> shape) {
    const auto a = Doubles::ensure(out);
    if (!a) throw Error("the right-hand side must return an array of floats");
    std::vector<py::ssize_t> got(a.shape(), a.shape() + a.ndim());
    if (got != shape) {
      std::ostringstream s;
      s << "the right-hand side returned shape (";
      for (size_t i = 0; i < got.size(); ++i) s << (i ? ", " : "") << got[i];
      s << "), not (";
      for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
      s << ")";
      throw Error(s.str());
    }
    std::memcpy(dst, a.data(), n * sizeof(double));
  }
  py::function f_;
  int groups_;
  size_t n_;
  bool vectorized_;
};

// A TrainConfig from keyword arguments: the keys of `train --config`'s JSON (unknown keys
// and wrong types are errors naming the key); validated for training.
TrainConfig config_of(const py::dict& options) {
  const py::module_ json = py::module_::import("json");
  return TrainConfig::from_json(py::str(json.attr("dumps")(options)), "train options");
}
TrainConfig train_config(const py::dict& options) {
  TrainConfig c = config_of(options);
  c.validate();
  return c;
}

// The data named by the training keys alone (task, task_n, task_hops, task_prime, text,
// context, seed): evaluation and compare need no depth or optimiser.
std::unique_ptr<DataSource> data_source(const py::dict& options) { return make_source(config_of(options)); }

// A training run (Trainer or FlowMatchTrainer) of a validated configuration on the CPU,
// without the GIL, from the start; the paths it wrote.
template <class TrainerT, class ConfigT>
py::dict train_run(const ConfigT& c) {
  std::ostringstream progress;
  {
    py::gil_scoped_release free;
    TrainerT trainer(c);
    trainer.set_device(Device::cpu);
    trainer.run(/*resume=*/false, progress);
  }
  py::dict out;
  out["out"] = c.out;
  out["model"] = c.out + "/model.safetensors";
  out["metrics"] = c.out + "/metrics.jsonl";
  return out;
}

py::dict eval_dict(const EvalResult& r) {
  py::dict d;
  d["loss"] = r.loss;
  d["accuracy"] = r.accuracy;
  d["examples"] = r.examples;
  d["nfe"] = r.nfe;
  d["nfe_mean"] = r.nfe_mean;
  d["nfe_p50"] = r.nfe_p50;
  d["nfe_p90"] = r.nfe_p90;
  d["nfe_max"] = r.nfe_max;
  d["status"] = r.status();
  d["message"] = r.message;
  d["wall_s"] = r.wall_s;
  return d;
}

}  // namespace

PYBIND11_MODULE(_flowloop, m) {
  m.doc() = "flowloop: looped and continuous-depth transformers (C++), from Python";
  py::register_exception<Error>(m, "Error", PyExc_ValueError);

  py::class_<Model<float>>(m, "Model", "a model in float (the checkpoint's tensors, the field, the readout)")
      .def_static(
          "init",
          [](int vocab, int context, int d_model, int n_head, int n_block, int depth, int d_ff, bool time_cond,
             uint64_t seed) {
            ModelConfig cfg;
            cfg.vocab_size = vocab;
            cfg.context = context;
            cfg.d_model = d_model;
            cfg.n_head = n_head;
            cfg.n_block = n_block;
            cfg.depth = depth;
            cfg.d_ff = d_ff;
            cfg.time_cond = time_cond;
            cfg.finalize();
            Model<float> model(cfg);
            model.init(seed);
            return model;
          },
          py::arg("vocab"), py::arg("context"), py::arg("d_model"), py::arg("n_head"), py::arg("n_block") = 1,
          py::arg("depth") = 1, py::arg("d_ff") = 0, py::arg("time_cond") = false, py::arg("seed") = 0,
          "a GPT-2-style initialisation from a seed (as `flowloop init`)")
      .def_static(
          "load", [](const std::string& path) { return load_any<float>(path); }, py::arg("path"),
          "a checkpoint (.safetensors) written by flowloop or PyTorch with the spec's names, or a Hugging Face "
          "directory")
      .def_static(
          "from_pretrained",
          [](const std::string& dir, const std::string& core_layers) {
            if (!is_hf_dir(dir)) throw Error("from_pretrained: '" + dir + "' is not a directory with a config.json");
            return load_hf<float>(dir, LoadOptions{core_layers});
          },
          py::arg("dir"), py::arg("core_layers") = "",
          "a Hugging Face llama or qwen2 directory (config.json, safetensors, BF16 included); core_layers 'a:b' "
          "makes layers [a, b) the looped core, the others run once before and after it")
      .def(
          "save",
          [](const Model<float>& model, const std::string& path) {
            save_checkpoint(path, model.cfg, model.layout, model.params.data());
          },
          py::arg("path"), "writes the checkpoint atomically")
      .def_property_readonly(
          "config",
          [](const Model<float>& model) {
            return py::module_::import("json").attr("loads")(model.cfg.to_json());
          },
          "the configuration as a dict")
      .def_property_readonly(
          "params",
          [](const Model<float>& model) {
            return Floats(static_cast<py::ssize_t>(model.params.size()), model.params.data());
          },
          "a copy of the flat parameter buffer (the checkpoint's layout)")
      .def(
          "forward",
          [](const Model<float>& model, const py::array& tokens, std::optional<int> loops,
             std::optional<std::string> solver, std::optional<int> steps, std::optional<double> rtol,
             std::optional<double> atol, std::optional<double> t1, std::optional<std::string> controller,
             bool batch_coupled, std::optional<int64_t> max_steps) {
            const TokenBatch tb = token_batch(tokens, "tokens");
            tb.check(model.cfg, "argument 'tokens'");
            const DepthSpec d =
                depth_spec(loops, solver, steps, rtol, atol, t1, controller, batch_coupled, max_steps);
            const int V = model.cfg.vocab_size;
            py::dict out;
            Floats logits;
            const auto t0 = std::chrono::steady_clock::now();
            if (!d.ode()) {
              LoopWork<float> w;
              int evals;
              {
                py::gil_scoped_release free;
                evals = model.loop_forward(tb, d.loop_count(model.cfg.depth), w);
              }
              logits = owned_array(std::move(w.readout.logits), {tb.B, tb.T, V});
              out["nfe"] = evals;
              out["status"] = "success";
            } else {
              Buffer<float> h;
              ReadoutCache<float> rc;
              SolveResult<float> r;
              {
                py::gil_scoped_release free;
                r = model.ode_forward(tb, d.solve_options(model.cfg.depth), h, rc);
              }
              logits = owned_array(std::move(rc.logits), {tb.B, tb.T, V});
              out = solve_stats(r);
            }
            // the library call's own seconds (a Python caller's time less this is the binding's)
            out["wall_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            out["logits"] = logits;
            out["depth"] = d.describe(model.cfg.depth);
            return out;
          },
          py::arg("tokens"), py::kw_only(), py::arg("loops") = py::none(), py::arg("solver") = py::none(),
          py::arg("steps") = py::none(), py::arg("rtol") = py::none(), py::arg("atol") = py::none(),
          py::arg("t1") = py::none(), py::arg("controller") = py::none(), py::arg("batch_coupled") = false,
          py::arg("max_steps") = py::none(),
          "logits (B, T, V) of token rows (B, T) under a depth: loop K (loops=K, the default is the "
          "trained depth) or a solve (solver=..., with steps or rtol/atol, t1, controller); with the "
          "solve's statistics (nfe, steps, accepted, rejected, per-sequence arrays, status)");

  m.def(
      "solve",
      [](py::function f, const py::array& y0, double t0, double t1, const std::string& method,
         std::optional<double> rtol, std::optional<double> atol, std::optional<int> steps,
         const std::string& controller, const std::string& initial_norm, bool batch_coupled, bool vectorized,
         int64_t max_steps) {
        if (y0.ndim() != 1 && y0.ndim() != 2)
          throw Error("argument 'y0' must be 1-D (n,) or 2-D (G, n), not " + std::to_string(y0.ndim()) + "-D");
        if (!py::isinstance<py::array_t<double>>(y0) && !py::isinstance<py::array_t<float>>(y0))
          throw Error("argument 'y0' must hold floats, not " + std::string(py::str(y0.dtype())));
        auto y = Doubles::ensure(y0);
        const bool batched = y.ndim() == 2;
        const int G = batched ? static_cast<int>(y.shape(0)) : 1;
        const size_t n = static_cast<size_t>(batched ? y.shape(1) : y.shape(0));
        if (G < 1 || n < 1) throw Error("argument 'y0' is empty");
        SolveOptions opt;
        opt.method = method;
        opt.t0 = t0;
        opt.t1 = t1;
        const bool fixed = steps.has_value();
        opt.adaptive = !fixed;
        if (fixed) opt.steps = *steps;
        if (!fixed) {
          opt.rtol = rtol.value_or(1e-6);
          opt.atol = atol.value_or(1e-9);
        }
        if (controller != "pi" && controller != "i") throw Error("argument 'controller' must be 'pi' or 'i'");
        opt.controller = controller == "pi" ? Controller::PI : Controller::I;
        if (initial_norm != "hairer" && initial_norm != "torchdiffeq")
          throw Error("argument 'initial_norm' must be 'hairer' or 'torchdiffeq'");
        opt.initial_norm = initial_norm == "hairer" ? InitialStepNorm::Sum : InitialStepNorm::RMS;
        opt.batch_coupled = batch_coupled;
        opt.max_steps = max_steps;
        opt.validate();
        PySystem sys(std::move(f), G, n, vectorized);
        Buffer<double> state(static_cast<size_t>(G) * n);
        std::memcpy(state.data(), y.data(), state.size() * sizeof(double));
        const SolveResult<double> r = integrate(sys, state.data(), opt);
        py::dict out = solve_stats(r);
        Doubles yout = batched ? Doubles({static_cast<py::ssize_t>(G), static_cast<py::ssize_t>(n)})
                               : Doubles(static_cast<py::ssize_t>(n));
        std::memcpy(yout.mutable_data(), state.data(), state.size() * sizeof(double));
        out["y"] = yout;
        return out;
      },
      py::arg("f"), py::arg("y0"), py::arg("t0"), py::arg("t1"), py::kw_only(), py::arg("method") = "dopri5",
      py::arg("rtol") = py::none(), py::arg("atol") = py::none(), py::arg("steps") = py::none(),
      py::arg("controller") = "pi", py::arg("initial_norm") = "hairer", py::arg("batch_coupled") = false,
      py::arg("vectorized") = false, py::arg("max_steps") = 100000,
      "integrates dy/dt = f(t, y) from t0 to t1 with flowloop's solvers and step control (Hairer's "
      "DOPRI5 by default); y0 (n,) or (G, n): G independent rows, each with its own steps unless "
      "batch_coupled; f(t, y (n,)) -> (n,), or with vectorized f(t (count,), y (count, n)) -> (count, n)");

  m.def(
      "train",
      [](const py::kwargs& options) {
        return train_run<Trainer>(train_config(options));
      },
      "trains a model as `flowloop train --config` does, from the configuration's keys (task, "
      "loops or solver, steps, batch, lr, seed, out, ...); the same options give the CLI's bits. "
      "Returns the paths of the model, checkpoint directory and metrics");

  m.def(
      "flow_match_record",
      [](const std::string& model, const std::string& out, int examples, int test_examples, int batch, int shard_size,
         std::optional<int> states, std::optional<std::string> task, std::optional<std::string> text,
         std::optional<int> loops, std::optional<std::string> solver, std::optional<int> steps,
         std::optional<double> rtol, std::optional<double> atol, std::optional<double> t1) {
        const TrainConfig tc = trained_config(model, task.value_or(""), text.value_or(""));
        RecordOptions opt;
        opt.train_examples = examples;
        opt.test_examples = test_examples;
        opt.batch = batch;
        opt.shard_size = shard_size;
        opt.states = states.value_or(0);
        opt.device = "cpu";
        // the teacher's trained regime unless a depth is given (any of its keys, as the CLI's flags)
        const bool given = loops || solver || steps || rtol || atol || t1;
        opt.depth = given ? depth_spec(loops, solver, steps, rtol, atol, t1, std::nullopt, false, std::nullopt) : tc.depth;
        opt.validate();
        const auto data = make_source(tc);
        require_writable(out);
        std::ostringstream progress;
        TrajectoryManifest mf;
        {
          py::gil_scoped_release free;
          mf = record_trajectories(model, *data, opt, out, progress);
        }
        py::dict d;
        d["data"] = out;
        d["manifest"] = out + "/manifest.json";
        d["K"] = mf.K;
        d["T"] = mf.T;
        d["C"] = mf.C;
        d["times"] = Doubles(static_cast<py::ssize_t>(mf.times.size()), mf.times.data());
        d["train_examples"] = mf.examples("train");
        d["test_examples"] = mf.examples("test");
        d["teacher_hash"] = mf.teacher_hash;
        return d;
      },
      py::arg("model"), py::arg("out"), py::kw_only(), py::arg("examples") = 2048, py::arg("test_examples") = 512,
      py::arg("batch") = 64, py::arg("shard_size") = 512, py::arg("states") = py::none(), py::arg("task") = py::none(),
      py::arg("text") = py::none(), py::arg("loops") = py::none(), py::arg("solver") = py::none(),
      py::arg("steps") = py::none(), py::arg("rtol") = py::none(), py::arg("atol") = py::none(),
      py::arg("t1") = py::none(),
      "records a teacher's latent paths h_0 .. h_K (train and test splits) into safetensors shards with a "
      "manifest under `out`, as `flowloop flow-match record` does (its trained regime unless a depth is given; a "
      "rerun resumes). Returns the recording's shape, times and example counts");

  m.def(
      "flow_match_train",
      [](const py::kwargs& options) {
        const py::module_ json = py::module_::import("json");
        const FlowMatchConfig c =
            FlowMatchConfig::from_json(py::str(json.attr("dumps")(options)), "flow_match_train options");
        c.validate();
        return train_run<FlowMatchTrainer>(c);
      },
      "trains a flow student on a recording as `flowloop flow-match train --config` does, from its configuration's "
      "keys (data, matcher, coupling, steps, batch, lr, seed, out, ...); the same options give the CLI's bits. "
      "Returns the paths of the model (the EMA weights) and metrics");

  m.def(
      "flow_match_eval",
      [](const std::string& model, const std::string& data, const std::string& samplers, int examples, int batch,
         int straightness_points, uint64_t seed, bool teacher) {
        FlowEvalOptions opt;
        set_samplers(opt, samplers);
        opt.examples = examples;
        opt.batch = batch;
        opt.straightness_points = straightness_points;
        opt.seed = seed;
        opt.teacher_rows = teacher;
        std::vector<FlowEvalRow> rows;
        {
          py::gil_scoped_release free;
          rows = flow_match_evaluate(model, data, opt, Device::cpu);
        }
        const size_t n = rows.size();
        py::list sampler, status;
        Doubles nfe(static_cast<py::ssize_t>(n)), nfe_max(static_cast<py::ssize_t>(n)), rel_l2(static_cast<py::ssize_t>(n)),
            kl(static_cast<py::ssize_t>(n)), acc(static_cast<py::ssize_t>(n)), straight(static_cast<py::ssize_t>(n)),
            frechet(static_cast<py::ssize_t>(n));
        py::array_t<int64_t> ex(static_cast<py::ssize_t>(n));
        for (size_t i = 0; i < n; ++i) {
          const FlowEvalRow& r = rows[i];
          sampler.append(r.sampler);
          status.append(r.status);
          nfe.mutable_data()[i] = r.nfe;
          nfe_max.mutable_data()[i] = r.nfe_max;
          rel_l2.mutable_data()[i] = r.rel_l2;
          kl.mutable_data()[i] = r.kl;
          acc.mutable_data()[i] = r.accuracy;
          straight.mutable_data()[i] = r.straightness;
          frechet.mutable_data()[i] = r.frechet;
          ex.mutable_data()[i] = r.examples;
        }
        py::dict d;
        d["sampler"] = sampler;
        d["nfe"] = nfe;
        d["nfe_max"] = nfe_max;
        d["rel_l2"] = rel_l2;
        d["kl"] = kl;
        d["accuracy"] = acc;
        d["straightness"] = straight;
        d["frechet"] = frechet;
        d["examples"] = ex;
        d["status"] = status;
        return d;
      },
      py::arg("model"), py::arg("data"), py::kw_only(), py::arg("samplers") = "", py::arg("examples") = 0,
      py::arg("batch") = 256, py::arg("straightness_points") = 8, py::arg("seed") = 0, py::arg("teacher") = true,
      "samples a flow student (flow_match_train's model) with each sampler on the recording's test split against "
      "the teacher's h_K, as `flowloop flow-match eval` does: columns sampler, nfe, nfe_max, rel_l2, kl, accuracy, "
      "straightness, frechet, examples, status (samplers: regime tokens on [0, 1] and shortcut:N, comma-separated; "
      "empty: the defaults; teacher: also the truncated teacher's rows)");

  m.def(
      "evaluate",
      [](const Model<float>& model, int batches, int batch, std::optional<int> loops,
         std::optional<std::string> solver, std::optional<int> steps, std::optional<double> rtol,
         std::optional<double> atol, std::optional<double> t1, const py::kwargs& data) {
        const DepthSpec d = depth_spec(loops, solver, steps, rtol, atol, t1, std::nullopt, false, std::nullopt);
        const auto source = data_source(data);
        require_fits(model.cfg, *source, "the data");
        EvalResult r;
        {
          py::gil_scoped_release free;
          r = evaluate(model, *source, d, batches, batch);
        }
        return eval_dict(r);
      },
      py::arg("model"), py::kw_only(), py::arg("batches") = 8, py::arg("batch") = 64, py::arg("loops") = py::none(),
      py::arg("solver") = py::none(), py::arg("steps") = py::none(), py::arg("rtol") = py::none(),
      py::arg("atol") = py::none(), py::arg("t1") = py::none(),
      "loss, accuracy and evaluations on test batches of the data named by the training keys "
      "(task=..., task_n=..., or text=...), under a depth");

  m.def(
      "trajectory",
      [](const Model<float>& model, int times, int batches, int batch, std::optional<int> loops,
         std::optional<std::string> solver, std::optional<int> steps, std::optional<double> rtol,
         std::optional<double> atol, std::optional<double> t1, const py::kwargs& data) {
        const auto source = data_source(data);
        require_fits(model.cfg, *source, "the data");
        TrajectoryOptions o;
        o.depth = depth_spec(loops, solver, steps, rtol, atol, t1, std::nullopt, false, std::nullopt);
        o.times = times;
        o.batches = batches;
        o.batch_size = batch;
        TrajectoryResult r;
        {
          py::gil_scoped_release free;
          r = trace(model, *source, o);
        }
        auto arr = [](const std::vector<double>& v) {
          return Doubles(static_cast<py::ssize_t>(v.size()), v.data());
        };
        auto column = [&](double LensPoint::*field) {
          std::vector<double> v;
          for (const auto& p : r.lens) v.push_back(p.*field);
          return arr(v);
        };
        py::dict out;
        out["source"] = r.source;
        out["times"] = arr(r.times);
        out["loss"] = column(&LensPoint::loss);
        out["accuracy"] = column(&LensPoint::accuracy);
        out["kl_to_final"] = column(&LensPoint::kl_to_final);
        out["f_norm"] = column(&LensPoint::f_norm);
        out["h_norm"] = column(&LensPoint::h_norm);
        out["dist_to_final"] = column(&LensPoint::dist_to_final);
        out["cos_prev_f"] = column(&LensPoint::cos_prev_f);
        std::vector<double> step_t, step_h;
        for (const auto& st : r.steps) {
          step_t.push_back(st.t);
          step_h.push_back(st.h);
        }
        out["step_t"] = arr(step_t);
        out["step_h"] = arr(step_h);
        Floats states({static_cast<py::ssize_t>(r.times.size()), static_cast<py::ssize_t>(r.B),
                       static_cast<py::ssize_t>(r.T), static_cast<py::ssize_t>(r.C)});
        std::memcpy(states.mutable_data(), r.states.data(), r.states.size() * sizeof(float));
        out["states"] = states;
        out["nfe"] = r.nfe;
        out["final"] = eval_dict(r.final_eval);
        return out;
      },
      py::arg("model"), py::kw_only(), py::arg("times") = 17, py::arg("batches") = 1, py::arg("batch") = 16,
      py::arg("loops") = py::none(), py::arg("solver") = py::none(), py::arg("steps") = py::none(),
      py::arg("rtol") = py::none(), py::arg("atol") = py::none(), py::arg("t1") = py::none(),
      "`flowloop trajectory` as arrays: the logit lens at each depth time (loss, accuracy, KL to "
      "the final distribution, the norms), a solve's accepted steps, and the states h(t) "
      "(N, B, T, C) of the first test batch of the data named by the training keys");

  m.def(
      "compare",
      [](const Model<float>& model, std::optional<std::string> regimes, int batches, int batch,
         const py::kwargs& data) {
        const auto source = data_source(data);
        require_fits(model.cfg, *source, "the data");
        const std::vector<Regime> list = regimes ? Regime::parse_list(*regimes) : default_regimes(model.cfg);
        std::vector<CompareRow> rows;
        {
          py::gil_scoped_release free;
          rows = compare_regimes(model, *source, list, batches, batch);
        }
        const std::vector<size_t> front = pareto_front(rows);
        std::vector<std::string> labels, status;
        std::vector<double> acc, loss, nfe_mean, nfe_max, wall;
        for (const auto& r : rows) {
          labels.push_back(r.regime.label());
          status.push_back(r.result.status());
          acc.push_back(r.result.accuracy);
          loss.push_back(r.result.loss);
          nfe_mean.push_back(r.result.nfe_mean);
          nfe_max.push_back(r.result.nfe_max);
          wall.push_back(r.result.wall_s);
        }
        std::vector<bool> on_front(rows.size(), false);
        for (size_t i : front) on_front[i] = true;
        auto arr = [](const std::vector<double>& v) {
          return Doubles(static_cast<py::ssize_t>(v.size()), v.data());
        };
        py::dict out;
        out["regime"] = labels;
        out["status"] = status;
        out["accuracy"] = arr(acc);
        out["loss"] = arr(loss);
        out["nfe_mean"] = arr(nfe_mean);
        out["nfe_max"] = arr(nfe_max);
        out["wall_s"] = arr(wall);
        out["pareto"] = py::array_t<bool>(py::cast(on_front));
        return out;
      },
      py::arg("model"), py::kw_only(), py::arg("regimes") = py::none(), py::arg("batches") = 4,
      py::arg("batch") = 64,
      "`flowloop compare` as arrays: the model under every regime (a comma-separated list as the "
      "CLI's --regimes, default the full set) on the same test examples of the data named by the "
      "training keys; one entry per regime, and which are on the accuracy-evaluations front");
}
