// The CompG sampling loop in C++ (no Python): AOTInductor packages of the denoiser (and of the classifier
// gradient), the schedule table, the guided-step mask, the cache state, the fused CPU step functions
// (csrc/cpu/step_cpu.h, called directly) and counter-based noise. It mirrors cg_fast/sampler.py's loop with
// rng="counter" (x_T at step 0xFFFFFFFF, z_j computed inside the step from (seed, j, element)); a test keeps
// the two equal (tests/test_runner.py). CPU only.
//
//   cg_fast::runner::Config cfg;  cfg.method = "ddim";  cfg.guide = "classifier";  cfg.stateful = true;
//   cg_fast::runner::Runner r({{4, "denoiser_b4.pt2"}}, "classifier_grad_b4.pt2", cfg);
//   at::Tensor x = r.sample(table, timesteps, guided, seeds, y, {4, 3, 8, 8});
//
// Inputs of sample(): table float32 [N, NUM_COLS] (Sampler.table(guidance), sampling order), timesteps int64
// [N] (the ORIGINAL training timesteps the model is called at), guided bool [N] (the policy's mask), seeds
// int64 [B] (uint64 bits; cg_fast.kernels.rng.sample_seeds), y int64 [B] or undefined (unconditional).
// Or all of them from one file: load_plan("plan.pt") reads what cg_fast.runner.save_plan(sampler, guidance, path)
// writes (torch.save of a dict; read with torch::pickle_load). csrc/runner/main.cpp is a command-line program
// over this API. Python: cg_fast.runner.CppRunner (bindings in csrc/runner/bindings.cpp, cg_fast._runner).
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace cg_fast::runner {

struct Config {
  std::string method = "ddpm";      // "ddpm" | "ddim" | "dpmpp2m"
  std::string guide = "none";       // "none" | "classifier" | "cfg" (the guidance kind, at every step)
  std::string prediction = "eps";   // "eps" | "x0" | "v"
  bool learned_var = false;         // the model returns 2C channels (eps, v)
  bool clip = true;                 // clamp x0 to [-1, 1]
  bool class_cond = true;           // call the denoiser with y
  bool stateful = false;            // carry the cache state h (compress / reuse / momentum caches)
  bool cfg_batched = true;          // CFG guided steps as one 2B pass (needs the 2B denoiser package)
  std::optional<int64_t> cfg_channels;  // CFG: channels guided (None: all)
  int64_t null_label = -1;          // CFG: the unconditional label
};

// One run's inputs besides the packages, seeds and labels (see load_plan).
struct Plan {
  Config config;
  at::Tensor table;      // float32 [N, NUM_COLS]
  at::Tensor timesteps;  // int64 [N]
  at::Tensor guided;     // bool [N]
};

// Reads a plan file written by cg_fast.runner.save_plan (torch.save of {"config": {...}, "table", "timesteps",
// "guided"}). Throws with what is missing or of the wrong type.
Plan load_plan(const std::string& path);

class Runner {
 public:
  // `denoisers`: batch size -> package of the denoiser made for it (B; and 2B for batched CFG). Packages have
  // static shapes and do not check their inputs, so each call uses the package of its batch. `classifier_grad`:
  // the (x, t, y) -> (g, logits) package of batch B, or "" when the guidance is not classifier guidance.
  // Throws (c10::Error) with what to fix on bad input.
  Runner(const std::map<int64_t, std::string>& denoisers, const std::string& classifier_grad, Config config);
  ~Runner();

  at::Tensor sample(const at::Tensor& table, const at::Tensor& timesteps, const at::Tensor& guided,
                    const at::Tensor& seeds, const std::optional<at::Tensor>& y, at::IntArrayRef shape);

  // Counts of the last sample(): denoiser passes and classifier gradients (as SamplingStats).
  int64_t denoiser_passes() const { return passes_; }
  int64_t classifier_grads() const { return grads_; }
  const Config& config() const { return config_; }

 private:
  at::Tensor denoise(const at::Tensor& x, const at::Tensor& t, const std::optional<at::Tensor>& y);
  std::map<int64_t, std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> denoisers_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> grad_;
  Config config_;
  int64_t passes_ = 0, grads_ = 0;
};

}  // namespace cg_fast::runner
