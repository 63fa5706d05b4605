// cg_fast_run: the C++ runner as a program, no Python anywhere.
//
//   cg_fast_run PLAN OUT DENOISER_B.pt2 [DENOISER_2B.pt2] [--grad GRAD.pt2] --seeds S1,S2,... [--labels Y1,...]
//
// PLAN is cg_fast.runner.save_plan's file (config, table, timesteps, guided); the batch B is the number of
// seeds; a second denoiser package serves CFG's 2B pass. Writes the samples [B, C, ...] to OUT with
// torch::pickle_save (torch.load reads it). The sample shape comes from --shape C,H,W.
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <torch/csrc/jit/serialization/pickle.h>

#include "runner.h"

namespace {

std::vector<int64_t> ints(const std::string& list) {
  std::vector<int64_t> out;
  std::stringstream in(list);
  for (std::string item; std::getline(in, item, ',');) out.push_back(std::stoll(item));
  return out;
}

int usage() {
  std::cerr << "usage: cg_fast_run PLAN OUT DENOISER.pt2 [DENOISER_2B.pt2] [--grad GRAD.pt2] --seeds S1,S2,... "
               "--shape C,H,W [--labels Y1,Y2,...]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string grad, seeds_arg, labels_arg, shape_arg;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--grad" || a == "--seeds" || a == "--labels" || a == "--shape") && i + 1 < argc) {
      (a == "--grad" ? grad : a == "--seeds" ? seeds_arg : a == "--labels" ? labels_arg : shape_arg) = argv[++i];
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() < 3 || seeds_arg.empty() || shape_arg.empty()) return usage();
  try {
    const cg_fast::runner::Plan plan = cg_fast::runner::load_plan(positional[0]);
    const std::vector<int64_t> seeds = ints(seeds_arg);
    const int64_t batch = static_cast<int64_t>(seeds.size());
    std::map<int64_t, std::string> denoisers{{batch, positional[2]}};
    if (positional.size() > 3) denoisers[2 * batch] = positional[3];
    cg_fast::runner::Runner runner(denoisers, grad, plan.config);
    std::vector<int64_t> shape{batch};
    for (int64_t d : ints(shape_arg)) shape.push_back(d);
    std::optional<at::Tensor> y;
    if (!labels_arg.empty()) y = at::tensor(ints(labels_arg), at::kLong);
    const at::Tensor x = runner.sample(plan.table, plan.timesteps, plan.guided, at::tensor(seeds, at::kLong), y,
                                       shape);
    const std::vector<char> bytes = torch::jit::pickle_save(x);
    std::ofstream(positional[1], std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    std::cout << "cg_fast_run: " << batch << " samples, " << runner.denoiser_passes() << " denoiser passes, "
              << runner.classifier_grads() << " classifier gradients -> " << positional[1] << "\n";
  } catch (const std::exception& e) {
    std::cerr << "cg_fast_run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
