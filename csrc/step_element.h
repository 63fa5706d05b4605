// One element of the fused step: the body of the CUDA kernel's grid-stride loop (csrc/cuda/step.cu), kept in
// a header free of torch and CUDA so that the same code can also be compiled for the host and checked against
// the reference without a GPU (tests/test_kernels_csrc.py::test_cuda_element_math_on_host).
//
// Before including this header, declare `float cg_fast::to_f32(T)` for every storage type T of the model
// output / fresh guidance that is used (float; __half and __nv_bfloat16 under CUDA).
// Spec §4-§6; the per-element formulas and their order are those of csrc/step_math.h (= reference.py).
#pragma once

#include <cstdint>

#include "philox.h"
#include "step_args.h"
#include "step_math.h"

namespace cg_fast {

// Applied guidance a of one element and the cache update h <- a (spec §4). Returns false when no guidance
// applies (neither fresh guidance nor a state).
CG_HD bool element_guidance(float* h, int64_t idx, bool has_g, float g, const float* c, float* a) {
  if (h == nullptr) {
    if (!has_g) return false;
    *a = cache_fresh_only(g, c[G_WEIGHT]);
    return true;
  }
  const float hv = h[idx];
  *a = has_g ? cache_mix(hv, g, c[H_DECAY], c[G_WEIGHT]) : cache_decay_only(hv, c[H_DECAY]);
  h[idx] = *a;
  return true;
}

// x_{t-1}[idx] (and h[idx], and for dpmpp2m prev[idx]) for flat index idx = b * n + i of a StepArgs whose
// model_out / fresh hold TO / TF.
// `exp_fn` is the exp of the device (expf on CUDA).
template <typename TO, typename TF, typename Exp>
CG_HD void step_element(const StepArgs& p, int64_t idx, const Exp& exp_fn) {
  const TO* mo = static_cast<const TO*>(p.model_out);
  const TF* fr = static_cast<const TF*>(p.fresh);
  const bool has_g = fr != nullptr;
  const int64_t b = idx / p.n;
  const int64_t i = idx - b * p.n;
  const float* c = p.coef + b * CG_NUM_COLS;
  const float x = p.x[idx];
  // the noise: read, or counter-based from the row's seed and the step index (cg_fast/kernels/rng.py);
  // none for dpmpp2m (deterministic)
  const float z = p.method == METHOD_DPMPP2M ? 0.0f
                  : p.seeds == nullptr
                      ? p.noise[idx]
                      : counter_normal(static_cast<uint64_t>(p.seeds[b]),
                                       static_cast<uint32_t>(p.step_index[b * p.step_stride]), i);
  float o = to_f32(mo[b * p.o_row + i]);
  float a = 0.0f;

  // spec §6: CFG combine on the model output; the cache update on every element, the guidance on the first
  // `channels` channels only (i < guided_limit)
  if (p.guide == GUIDE_CFG) {
    const float d = has_g ? cfg_direction(o, to_f32(fr[b * p.f_row + i])) : 0.0f;
    if (element_guidance(p.h, idx, has_g, d, c, &a) && i < p.guided_limit) o = cfg_combine(o, a, c[GUIDE_S]);
  }
  // predicted x0, optionally clipped
  float x0 = o;
  if (p.prediction == PRED_EPS) {
    x0 = x0_from_eps(x, o, c[SQRT_RECIP_AC], c[SQRT_RECIPM1_AC]);
  } else if (p.prediction == PRED_V) {
    x0 = x0_from_v(x, o, c[SQRT_AC], c[SQRT_1M_AC]);
  }
  if (p.clip) x0 = clip1(x0);

  float result;
  if (p.method == METHOD_DDPM) {
    // spec §5: posterior mean, (learned) variance, mean + Var * (a * s), + (NONZERO * sqrt(Var)) * z
    float mean = posterior_mean(x0, x, c[POST_C1], c[POST_C2]);
    float log_var = c[LOG_VAR];
    float var = c[VAR];
    if (p.learned_var) log_var = learned_log_var(to_f32(mo[b * p.o_row + p.n + i]), c[MAX_LOG], c[MIN_LOG]);
    if (p.guide == GUIDE_CLASSIFIER) {
      const float g = has_g ? to_f32(fr[b * p.f_row + i]) : 0.0f;
      if (element_guidance(p.h, idx, has_g, g, c, &a)) {
        if (p.learned_var) var = exp_fn(log_var);
        mean = guided_mean(mean, var, a, c[GUIDE_S]);
      }
    }
    result = add_noise(mean, c[NONZERO] * exp_fn(half_log_var(log_var)), z);
  } else {
    // spec §5: DDIM / DPM-Solver++, with the score shift eps' = eps - sqrt(1 - alpha_bar) * (a * s) at guided
    // steps, and x0 from eps'
    if (p.guide == GUIDE_CLASSIFIER) {
      const float g = has_g ? to_f32(fr[b * p.f_row + i]) : 0.0f;
      if (element_guidance(p.h, idx, has_g, g, c, &a)) {
        const float eps = ddim_shift_eps(eps_from_x0(x, x0, c[SQRT_RECIP_AC], c[SQRT_RECIPM1_AC]),
                                         c[DDIM_SQRT_1M_AC], a, c[GUIDE_S]);
        x0 = x0_from_eps(x, eps, c[SQRT_RECIP_AC], c[SQRT_RECIPM1_AC]);
      }
    }
    if (p.method == METHOD_DPMPP2M) {
      // spec §5 "DPM-Solver++": x' = CX * x + C0 * x0 + C1 * (x0 - prev), then prev <- the (guided) x0
      result = dpmpp2m_update(x, x0, p.prev[idx], c[DPM_CX], c[DPM_C0], c[DPM_C1]);
      p.prev[idx] = x0;
    } else {
      const float eps = eps_from_x0(x, x0, c[SQRT_RECIP_AC], c[SQRT_RECIPM1_AC]);
      result = add_noise(ddim_mean(x0, eps, c[DDIM_SQRT_ACP], c[DDIM_DIR]), c[NONZERO] * c[DDIM_SIGMA], z);
    }
  }
  p.out[idx] = result;  // every read of element idx is done: out may alias x
}

}  // namespace cg_fast
