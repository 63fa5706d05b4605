// Per-element math of the fused sampler steps, shared by the CPU kernel (csrc/cpu/step.cpp) and the CUDA
// kernel (csrc/cuda/step.cu). Spec: shared/docs/compress-guidance.md §4-§6; semantics:
// cg_fast/kernels/reference.py (ddpm_step_ref / ddim_step_ref / dpmpp2m_step_ref).
//
// This header needs neither torch nor the CUDA toolkit: under nvcc the functions are __host__ __device__.
//
// Bitwise contract (CPU). Every function below is ONE expression of reference.py, written with the same
// operands in the same association, in float32. Each reference line is a separate torch op, so nothing is
// ever fused into an FMA there; compile this code with -ffp-contract=off (GCC) and --fmad=false (nvcc) so
// that the compilers do not contract `a * b + c` either. The only transcendental, exp, is NOT here: the CPU
// kernel calls the exp that torch.exp calls (csrc/cpu/exp.h), the CUDA kernel calls expf.
//
// Notation (spec §2, §4-§6), per element i of batch row b, coefficients c[k] = coef[b, k]:
//   x   x_t                      o   model output (eps, x0 or v)        v   learned-variance channel
//   g   fresh guidance: classifier gradient, or d = eps_c - eps_u for CFG
//   h   cache state (reuse / momentum)   a   applied guidance = H_DECAY * h + G_WEIGHT * g   (spec §4)
//   s   GUIDE_S: classifier scale s, or w - 1 for CFG (spec §6)
#pragma once

#if defined(__CUDACC__)
#define CG_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always inlined: the CPU kernel's vectorised loops must not contain calls
#define CG_HD inline __attribute__((always_inline))
#else
#define CG_HD inline
#endif

namespace cg_fast {

// Columns of the per-row coefficient table coef[B, CG_NUM_COLS]; must match cg_fast/kernels/table.py `Col`.
enum Col : int {
  SQRT_RECIP_AC = 0,
  SQRT_RECIPM1_AC = 1,
  SQRT_AC = 2,
  SQRT_1M_AC = 3,
  POST_C1 = 4,
  POST_C2 = 5,
  VAR = 6,
  LOG_VAR = 7,
  MIN_LOG = 8,
  MAX_LOG = 9,
  NONZERO = 10,
  DDIM_SQRT_1M_AC = 11,
  DDIM_SQRT_ACP = 12,
  DDIM_DIR = 13,
  DDIM_SIGMA = 14,
  GUIDE_S = 15,
  H_DECAY = 16,
  G_WEIGHT = 17,
  DPM_CX = 18,
  DPM_C0 = 19,
  DPM_C1 = 20,
};
constexpr int CG_NUM_COLS = 21;

// Modes, as parsed from the op's string arguments.
enum Method : int { METHOD_DDPM = 0, METHOD_DDIM = 1, METHOD_DPMPP2M = 2 };
enum Guide : int { GUIDE_NONE = 0, GUIDE_CLASSIFIER = 1, GUIDE_CFG = 2 };
enum Prediction : int { PRED_EPS = 0, PRED_X0 = 1, PRED_V = 2 };

// ---- spec §4: the cache update, a = H_DECAY * h + G_WEIGHT * g (absent terms left out), then h <- a -------
// (reference._applied_guidance; the three cases are separate functions so that no branch sits in a loop)

// No state (drop / compress): a = g * G_WEIGHT.
CG_HD float cache_fresh_only(float g, float g_weight) { return g * g_weight; }
// State, no fresh guidance (a skipped step of reuse / momentum): a = h * H_DECAY.
CG_HD float cache_decay_only(float h, float h_decay) { return h * h_decay; }
// State and fresh guidance (a guided step of reuse / momentum): a = h * H_DECAY + g * G_WEIGHT.
CG_HD float cache_mix(float h, float g, float h_decay, float g_weight) {
  const float kept = h * h_decay;
  return kept + g * g_weight;
}

// ---- spec §6: classifier-free guidance, fused into the step -------------------------------------------------
// d = eps_c - eps_u (the fresh CFG direction)
CG_HD float cfg_direction(float eps_c, float eps_u) { return eps_c - eps_u; }
// eps = eps_c + (w - 1) * a   (reference: eps_c + GUIDE_S * a)
CG_HD float cfg_combine(float eps_c, float a, float s) { return eps_c + s * a; }

// ---- predicted x0 (ADM p_mean_variance / _predict_xstart_from_*) ---------------------------------------------
CG_HD float x0_from_eps(float x, float eps, float sqrt_recip_ac, float sqrt_recipm1_ac) {
  const float t1 = sqrt_recip_ac * x;
  const float t2 = sqrt_recipm1_ac * eps;
  return t1 - t2;
}
CG_HD float x0_from_v(float x, float v, float sqrt_ac, float sqrt_1m_ac) {
  const float t1 = sqrt_ac * x;
  const float t2 = sqrt_1m_ac * v;
  return t1 - t2;
}
// clip_denoised: clamp to [-1, 1]; NaN passes through, as in torch.clamp. Both comparisons are evaluated
// unconditionally, so that compilers turn them into vector selects (no branch).
CG_HD float clip1(float v) {
  const float lo = v < -1.0f ? -1.0f : v;
  return lo > 1.0f ? 1.0f : lo;
}

// eps recovered from x0 (ADM _predict_eps_from_xstart): (SQRT_RECIP_AC * x - x0) / SQRT_RECIPM1_AC
CG_HD float eps_from_x0(float x, float x0, float sqrt_recip_ac, float sqrt_recipm1_ac) {
  const float t1 = sqrt_recip_ac * x;
  return (t1 - x0) / sqrt_recipm1_ac;
}

// ---- spec §5: DDPM ancestral step ----------------------------------------------------------------------------
// posterior mean mu = POST_C1 * x0 + POST_C2 * x
CG_HD float posterior_mean(float x0, float x, float c1, float c2) {
  const float t1 = c1 * x0;
  const float t2 = c2 * x;
  return t1 + t2;
}
// learned range: frac = (v + 1) / 2, log Var = frac * MAX_LOG + (1 - frac) * MIN_LOG
CG_HD float learned_log_var(float v, float max_log, float min_log) {
  const float frac = (v + 1.0f) / 2.0f;
  const float t1 = frac * max_log;
  const float t2 = (1.0f - frac) * min_log;
  return t1 + t2;
}
// argument of the noise scale exp(0.5 * log Var)
CG_HD float half_log_var(float log_var) { return 0.5f * log_var; }
// classifier guidance shifts the mean (ADM condition_mean): mean + Var * (a * s)
CG_HD float guided_mean(float mean, float var, float a, float s) {
  const float as = a * s;
  return mean + var * as;
}
// x_{t-1} = mean + (NONZERO * sigma) * z, with sigma = exp(0.5 log Var) (DDPM) or DDIM_SIGMA (DDIM); the
// caller forms the row or element factor `scale = NONZERO * sigma` first, as the reference does.
CG_HD float add_noise(float mean, float scale, float z) { return mean + scale * z; }

// ---- spec §5: DDIM step --------------------------------------------------------------------------------------
// score shift (ADM condition_score): eps' = eps - DDIM_SQRT_1M_AC * (a * s)
CG_HD float ddim_shift_eps(float eps, float sqrt_1m_ac, float a, float s) {
  const float as = a * s;
  return eps - sqrt_1m_ac * as;
}
// mean = x0 * DDIM_SQRT_ACP + DDIM_DIR * eps
CG_HD float ddim_mean(float x0, float eps, float sqrt_acp, float dir) {
  const float t1 = x0 * sqrt_acp;
  const float t2 = dir * eps;
  return t1 + t2;
}

// ---- spec §5 "DPM-Solver++": 2M multistep update in data prediction ---------------------------------------
// x' = DPM_CX * x + DPM_C0 * x0 + DPM_C1 * (x0 - x0_prev); x0 is the (guided) data prediction of this step,
// x0_prev the previous step's (the caller then stores x0 into prev)
CG_HD float dpmpp2m_update(float x, float x0, float x0_prev, float cx, float c0, float c1) {
  const float t1 = cx * x;
  const float t2 = c0 * x0;
  const float first = t1 + t2;
  const float t3 = c1 * (x0 - x0_prev);
  return first + t3;
}

}  // namespace cg_fast
