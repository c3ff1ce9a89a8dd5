// The `flowloop` command: one subcommand per file under cli/, registered here.
#include <iostream>

#include "cli/cli.hpp"
#include "flowloop/core/tensor.hpp"

int main(int argc, char** argv) {
  using namespace flowloop::cli;
  CLI::App app{"flowloop: looped and continuous-depth transformers"};
  app.require_subcommand(1);
  std::vector<Command> commands = {register_init(app),  register_forward(app), register_grad(app),
                                   register_train(app), register_eval(app),    register_study(app),
                                   register_ode_bench(app), register_compare(app),
                                   register_trajectory(app), register_sweep(app),
                                   register_flow_match(app), register_export_hf(app),
                                   register_tokenize(app)};
  for (auto& c : register_bench(app)) commands.push_back(std::move(c));
  CLI11_PARSE(app, argc, argv);
  try {
    for (const Command& c : commands)
      if (c.app->parsed()) return c.run();
  } catch (const std::exception& e) {
    std::cerr << "flowloop: error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
