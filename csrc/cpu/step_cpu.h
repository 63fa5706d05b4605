// The CPU step functions of csrc/cpu/step.cpp as plain C++ calls: what torch.ops.cg_fast.* run on CPU tensors
// (registered there), and what the C++ runner (csrc/runner/) calls directly, without the dispatcher.
// Semantics and arguments: the schemas in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace cg_fast {

void ddpm_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                   const std::optional<at::Tensor>& noise, const at::Tensor& out, c10::string_view guide,
                   const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                   c10::string_view prediction, bool learned_var, bool clip, std::optional<int64_t> cfg_channels,
                   const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_index);

void ddim_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                   const std::optional<at::Tensor>& noise, const at::Tensor& out, c10::string_view guide,
                   const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                   c10::string_view prediction, bool learned_var, bool clip, std::optional<int64_t> cfg_channels,
                   const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_index);

void dpmpp2m_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                      const at::Tensor& prev, const at::Tensor& out, c10::string_view guide,
                      const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                      c10::string_view prediction, bool learned_var, bool clip,
                      std::optional<int64_t> cfg_channels);

// Counter-based normals of `step` for every row of `out` (float32 [B, ...], contiguous): row b from seeds[b]
// (int64 [B]), bitwise cg_fast.kernels.rng.counter_normal(seeds, step, out.shape) on this build. x_T is
// step 0xFFFFFFFF (rng.XT_STEP).
void counter_normal_cpu(const at::Tensor& seeds, uint32_t step, const at::Tensor& out);

}  // namespace cg_fast
