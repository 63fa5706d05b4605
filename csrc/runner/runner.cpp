// The C++ sampling loop (csrc/runner/runner.h): the body of cg_fast/sampler.py + cg_fast/engine.py's
// StepProgram for rng="counter" on the CPU, with the networks run from AOTInductor packages.
#include "runner.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdint>
#include <fstream>
#include <iterator>
#include <string>

#include "../cpu/step_cpu.h"
#include "../step_math.h"

namespace cg_fast::runner {
namespace {

constexpr uint32_t kXtStep = 0xFFFFFFFFu;  // cg_fast.kernels.rng.XT_STEP
constexpr int64_t kNumCols = CG_NUM_COLS;  // cg_fast.kernels.table.NUM_COLS (csrc/step_math.h)

void check_config(const Config& c) {
  TORCH_CHECK(c.method == "ddpm" || c.method == "ddim" || c.method == "dpmpp2m", "cg_fast runner: unknown method '",
              c.method, "': use ddpm, ddim or dpmpp2m");
  TORCH_CHECK(c.guide == "none" || c.guide == "classifier" || c.guide == "cfg", "cg_fast runner: unknown guide '",
              c.guide, "': use none, classifier or cfg");
  TORCH_CHECK(c.guide != "cfg" || c.null_label >= 0, "cg_fast runner: CFG needs config.null_label (the label of "
              "the unconditional pass)");
  TORCH_CHECK(c.guide != "cfg" || c.class_cond, "cg_fast runner: CFG needs a class-conditional denoiser");
}
}  // namespace

Plan load_plan(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cg_fast runner: cannot read the plan file ", path, " (cg_fast.runner.save_plan writes one)");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const c10::IValue root = torch::jit::pickle_load(bytes);
  TORCH_CHECK(root.isGenericDict(), "cg_fast runner: ", path, " is not a plan (a dict) from cg_fast.runner.save_plan");
  const auto dict = root.toGenericDict();
  auto get = [&](const c10::impl::GenericDict& d, const char* key) -> c10::IValue {
    TORCH_CHECK(d.contains(key), "cg_fast runner: the plan ", path, " has no '", key, "'");
    return d.at(key);
  };
  Plan plan;
  plan.table = get(dict, "table").toTensor();
  plan.timesteps = get(dict, "timesteps").toTensor();
  plan.guided = get(dict, "guided").toTensor();
  const auto c = get(dict, "config").toGenericDict();
  Config& cfg = plan.config;
  cfg.method = get(c, "method").toStringRef();
  cfg.guide = get(c, "guide").toStringRef();
  cfg.prediction = get(c, "prediction").toStringRef();
  cfg.learned_var = get(c, "learned_var").toBool();
  cfg.clip = get(c, "clip").toBool();
  cfg.class_cond = get(c, "class_cond").toBool();
  cfg.stateful = get(c, "stateful").toBool();
  cfg.cfg_batched = get(c, "cfg_batched").toBool();
  const c10::IValue channels = get(c, "cfg_channels");
  if (!channels.isNone()) cfg.cfg_channels = channels.toInt();
  cfg.null_label = get(c, "null_label").toInt();
  check_config(cfg);
  return plan;
}

Runner::Runner(const std::map<int64_t, std::string>& denoisers, const std::string& classifier_grad, Config config)
    : config_(std::move(config)) {
  check_config(config_);
  TORCH_CHECK(!denoisers.empty(), "cg_fast runner: pass at least one denoiser package (.pt2)");
  TORCH_CHECK(config_.guide != "classifier" || !classifier_grad.empty(), "cg_fast runner: classifier guidance "
              "needs the classifier-gradient package (cg_fast.backends.aoti.AotiClassifierGrad.prepare, or "
              "cg-fast export --format aoti --classifier ...)");
  for (const auto& [batch, path] : denoisers) {
    denoisers_[batch] = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
  }
  if (config_.guide == "classifier") {
    grad_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(classifier_grad);
  }
}

Runner::~Runner() = default;

at::Tensor Runner::denoise(const at::Tensor& x, const at::Tensor& t, const std::optional<at::Tensor>& y) {
  std::vector<at::Tensor> inputs{x, t};
  if (y.has_value()) inputs.push_back(*y);
  const auto found = denoisers_.find(x.size(0));
  TORCH_CHECK(found != denoisers_.end(), "cg_fast runner: no denoiser package for a batch of ", x.size(0),
              " rows: export one for it (cg-fast export --format aoti --batch-size ...; --cfg adds CFG's 2B pass)");
  ++passes_;
  return found->second->run(inputs)[0];
}

at::Tensor Runner::sample(const at::Tensor& table, const at::Tensor& timesteps, const at::Tensor& guided,
                          const at::Tensor& seeds, const std::optional<at::Tensor>& y, at::IntArrayRef shape) {
  const Config& c = config_;
  TORCH_CHECK(table.dim() == 2 && table.size(1) == kNumCols && table.scalar_type() == at::kFloat,
              "cg_fast runner: table must be float32 [N, ", kNumCols, "] (Sampler.table(guidance)), got ",
              table.sizes(), " ", table.scalar_type());
  const int64_t n = table.size(0);
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.size(0) == n, "cg_fast runner: timesteps must be [N] = [", n, "]");
  TORCH_CHECK(guided.dim() == 1 && guided.size(0) == n, "cg_fast runner: guided must be [N] = [", n, "]");
  TORCH_CHECK(shape.size() >= 2, "cg_fast runner: shape must be [B, C, ...]");
  const int64_t batch = shape[0];
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == batch, "cg_fast runner: seeds must be int64 [B] = [", batch,
              "]");
  TORCH_CHECK(denoisers_.count(batch), "cg_fast runner: no denoiser package for batch ", batch);
  TORCH_CHECK(c.guide != "cfg" || !c.cfg_batched || denoisers_.count(2 * batch), "cg_fast runner: batched CFG "
              "needs the denoiser package of batch 2B = ", 2 * batch, " (cg-fast export --format aoti --cfg)");
  const bool need_y = c.class_cond || c.guide != "none";
  TORCH_CHECK(!need_y || (y.has_value() && y->dim() == 1 && y->size(0) == batch),
              "cg_fast runner: labels y [B] are required (class-conditional model or guidance)");
  passes_ = grads_ = 0;

  const at::Tensor s = seeds.to(at::kLong).contiguous();
  const auto guided_host = guided.to(at::kBool).contiguous();
  const bool* mask = guided_host.data_ptr<bool>();
  at::Tensor labels = y.has_value() ? y->to(at::kLong).contiguous() : at::Tensor();
  at::Tensor labels2, null;
  if (c.guide == "cfg") {
    null = at::full_like(labels, c.null_label);
    labels2 = at::cat({labels, null});
  }
  // per step: coefficient rows [N, B, NUM_COLS] and timesteps [N, B], as the Python sampler lays them out
  const at::Tensor rows = table.contiguous().unsqueeze(1).expand({n, batch, kNumCols}).contiguous();
  const at::Tensor ts = timesteps.to(at::kLong).unsqueeze(1).expand({n, batch}).contiguous();

  at::Tensor x = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  counter_normal_cpu(s, kXtStep, x);  // x_T (rng.py item 3)
  const bool deterministic = c.method == "dpmpp2m";
  std::optional<at::Tensor> h, prev;
  if (c.stateful) h = at::zeros_like(x);
  if (deterministic) prev = at::zeros_like(x);
  const std::optional<at::Tensor> cond = c.class_cond ? std::optional<at::Tensor>(labels) : std::nullopt;
  at::Tensor step_index = at::zeros({1}, at::kLong);

  for (int64_t j = 0; j < n; ++j) {
    const at::Tensor t = ts[j];
    const at::Tensor coef = rows[j];
    const bool g = mask[j];
    at::Tensor o;
    std::optional<at::Tensor> fresh;
    if (c.guide == "cfg" && g) {
      if (c.cfg_batched) {
        at::Tensor o2 = denoise(at::cat({x, x}), at::cat({t, t}), labels2);
        o = o2.narrow(0, 0, batch);
        fresh = o2.narrow(0, batch, batch);
      } else {
        o = denoise(x, t, labels);
        fresh = denoise(x, t, null);
      }
    } else {
      o = denoise(x, t, cond);
    }
    if (c.guide == "classifier" && g) {
      std::vector<at::Tensor> out = grad_->run({x, t, labels});
      ++grads_;
      fresh = out[0];
    }
    step_index.fill_(j);
    if (deterministic) {
      dpmpp2m_step_cpu(x, o, coef, *prev, x, c.guide, fresh, h, c.prediction, c.learned_var, c.clip,
                       c.cfg_channels);
    } else if (c.method == "ddpm") {
      ddpm_step_cpu(x, o, coef, std::nullopt, x, c.guide, fresh, h, c.prediction, c.learned_var, c.clip,
                    c.cfg_channels, s, step_index);
    } else {
      ddim_step_cpu(x, o, coef, std::nullopt, x, c.guide, fresh, h, c.prediction, c.learned_var, c.clip,
                    c.cfg_channels, s, step_index);
    }
  }
  return x;
}

}  // namespace cg_fast::runner
