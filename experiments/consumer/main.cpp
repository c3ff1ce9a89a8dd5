// A user's program on the installed package: a small model from a seed, run looped and
// as an adaptive ODE on the same weights, its checkpoint written and read back. Prints
// one JSON object; the shared and the static build must print the same one.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "flowloop/flowloop.hpp"

int main(int argc, char** argv) {
  using namespace flowloop;
  try {
    ModelConfig cfg;
    cfg.vocab_size = 32;
    cfg.context = 16;
    cfg.d_model = 32;
    cfg.n_head = 4;
    cfg.depth = 4;
    cfg.finalize();
    Model<double> model(cfg);
    model.init(7);

    TokenBatch tokens;
    tokens.B = 3;
    tokens.T = 12;
    for (int i = 0; i < tokens.B * tokens.T; ++i) tokens.data.push_back((i * 7 + 3) % cfg.vocab_size);

    LoopWork<double> lw;
    const int evals = model.loop_forward(tokens, cfg.depth, lw);
    DepthSpec ode;
    ode.solver = "dopri5";
    ode.rtol = 1e-6;
    ode.atol = 1e-8;
    Buffer<double> h;
    ReadoutCache<double> rc;
    const SolveResult<double> res = model.ode_forward(tokens, ode.solve_options(cfg.depth), h, rc);

    // the largest difference between the looped logits and the ODE's
    double diff = 0, norm = 0;
    for (size_t i = 0; i < rc.logits.size(); ++i) {
      diff = std::fmax(diff, std::fabs(rc.logits[i] - lw.readout.logits[i]));
      norm = std::fmax(norm, std::fabs(rc.logits[i]));
    }
    if (argc > 1) {
      save_checkpoint(argv[1], model.cfg, model.layout, model.params.data(), {});
      const Model<double> back = load_model<double>(argv[1]);
      if (!(back.cfg == model.cfg) || back.params != model.params)
        throw Error("the checkpoint read back differs from the model written");
    }
    nlohmann::ordered_json out;
    out["loop_evals"] = evals;
    out["ode_status"] = status_name(res.status);
    out["ode_nfe"] = res.nfe;
    out["ode_steps"] = res.steps;
    out["logits_max_abs"] = norm;
    out["loop_vs_ode_max_diff"] = diff;
    std::cout << out.dump() << std::endl;
    return res.ok() && std::isfinite(diff) ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
}
