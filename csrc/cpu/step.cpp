// CPU kernels of cg_fast::ddpm_step / cg_fast::ddim_step (spec §4-§6): the whole sampler step, guidance and
// cache update in one memory pass, bitwise equal to cg_fast/kernels/reference.py on the CPU.
//
// How it is organised. The work is split into tasks of one batch row x up to kChunk elements (coefficients are
// per row), run in parallel with OpenMP. Per task:
//   1. (CFG only) the CFG combine and the cache update, into a stage buffer of guided eps (spec §6);
//   2. (DDPM, learned variance) log Var from the variance channel, then exp(log Var) and exp(0.5 log Var) on
//      the stage buffers with torch's own exp (see "exp" below);
//   3. one loop over the chunk that reads x, the model output, z, g and h, and writes h and x' (DDPM: x0, mean,
//      guidance, noise; DDIM: x0, score shift, DDIM update).
// The loops are branch-free (modes are template parameters or loop invariants) under `#pragma omp simd`, so
// GCC vectorises them; the chunk function is compiled for AVX-512, AVX2 and the baseline ISA (target_clones).
// Stage buffers are 4 KiB and stay in L1. The per-element formulas are those of csrc/step_math.h, shared with
// the CUDA kernel (csrc/step_element.h).
//
// Why the results are bitwise those of the reference:
//  - every formula performs the reference's float32 operations in the reference's order (step_math.h);
//  - the build uses -ffp-contract=off and no -ffast-math, so no FMA contraction and no reassociation;
//  - exp is the function torch.exp calls on this build (see "exp" below).
//
// Memory traffic per element (fp32): read x, o (1x or 2x), z, [fresh], [h]; write x', [h]: 16-32 bytes,
// against ~25 full-tensor operations for the unfused reference. With learned variance, the two exps (as many as
// the reference computes) are most of the time when the data are in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CG_FAST_X86_SLEEF 1
#else
#define CG_FAST_X86_SLEEF 0
#endif

#include "../step_args.h"
#include "../step_check.h"
#include "../step_math.h"

#define CG_RESTRICT __restrict__
#define CG_INLINE inline __attribute__((always_inline))

// The chunk function is compiled for AVX-512, AVX2 and the baseline ISA and picked at load time (ifunc), so a
// build runs everywhere and still uses wide vectors. Plain IEEE mul/add/sub/div/compare in every version:
// the ISA changes the speed, not the bits.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__)
#define CG_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CG_TARGET_CLONES
#endif

// ------------------------------------------------------------------------------------------------------------
// exp: the same bits as torch.exp on this build.
//
// On x86 builds with MKL (the PyTorch wheels), torch.exp on a contiguous float tensor calls MKL VML
// vmsExp(n, in, out, VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE) (ATen/cpu/vml.h); without MKL it calls
// SLEEF's Sleef_expf16_u10 (AVX512 capability) / Sleef_expf8_u10 (AVX2) on full vectors, a padded vector for
// the tail (vec::map), and std::exp at the DEFAULT capability. Both libraries are linked into
// libtorch_cpu.so with these symbols exported, so we call the very same functions. Results are elementwise,
// independent of the call's length or an element's position (checked bitwise by tests/test_kernels_csrc.py).
// CG_FAST_CSRC_EXP=mkl|sleef|std overrides the choice (tests, or speed over bitwise equality: only the
// default is bitwise).
// ------------------------------------------------------------------------------------------------------------
#if AT_MKL_ENABLED()
extern "C" {
// mkl_vml_functions.h, LP64 interface (MKL_INT = int), as linked into the PyTorch wheels.
void vmsExp(int n, const float* a, float* r, long long mode);
}
#define CG_FAST_HAVE_MKL 1
#else
#define CG_FAST_HAVE_MKL 0
#endif

#if CG_FAST_X86_SLEEF
// sleef.h declares these only where the translation unit itself targets AVX / AVX512F; this file is built for
// the baseline ISA, so declare them here and call them from functions compiled for the matching target.
extern "C" {
__m512 Sleef_expf16_u10(__m512);
__m256 Sleef_expf8_u10(__m256);
}
#endif

namespace cg_fast {
namespace {

constexpr int64_t kChunk = 1024;  // elements per task: the stage buffers (4 KiB each) stay in L1
constexpr int64_t kParallelMin = int64_t{1} << 15;  // below this many elements, one thread

enum class ExpImpl { kMkl, kSleef16, kSleef8, kStd };

#if CG_FAST_HAVE_MKL
constexpr long long kVmlHa = 0x00000002;           // VML_HA (high accuracy)
constexpr long long kVmlFtzdazOff = 0x00140000;    // VML_FTZDAZ_OFF
constexpr long long kVmlErrmodeIgnore = 0x00000100;  // VML_ERRMODE_IGNORE
constexpr long long kVmlMode = kVmlHa | kVmlFtzdazOff | kVmlErrmodeIgnore;
#endif

#if CG_FAST_X86_SLEEF
__attribute__((target("avx512f"))) void exp_sleef16(float* out, const float* in, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, Sleef_expf16_u10(_mm512_loadu_ps(in + i)));
  if (i < n) {  // the tail as one zero-padded vector, as vec::map does
    alignas(64) float buf[16] = {0};
    std::memcpy(buf, in + i, sizeof(float) * (n - i));
    _mm512_store_ps(buf, Sleef_expf16_u10(_mm512_load_ps(buf)));
    std::memcpy(out + i, buf, sizeof(float) * (n - i));
  }
}

__attribute__((target("avx2,fma"))) void exp_sleef8(float* out, const float* in, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, Sleef_expf8_u10(_mm256_loadu_ps(in + i)));
  if (i < n) {
    alignas(32) float buf[8] = {0};
    std::memcpy(buf, in + i, sizeof(float) * (n - i));
    _mm256_store_ps(buf, Sleef_expf8_u10(_mm256_load_ps(buf)));
    std::memcpy(out + i, buf, sizeof(float) * (n - i));
  }
}
#endif

ExpImpl choose_exp_impl() {
  const char* env = std::getenv("CG_FAST_CSRC_EXP");
  const std::string want = env != nullptr ? env : "";
  if (want == "std") return ExpImpl::kStd;
#if CG_FAST_HAVE_MKL
  if (want != "sleef") return ExpImpl::kMkl;
#endif
#if CG_FAST_X86_SLEEF
  const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY, as torch's dispatch does
  if (cap == "AVX512") return ExpImpl::kSleef16;
  if (cap == "AVX2") return ExpImpl::kSleef8;
#endif
  return ExpImpl::kStd;
}

ExpImpl exp_impl() {
  static const ExpImpl impl = choose_exp_impl();
  return impl;
}

// out[i] = exp(in[i]) for 0 <= i < n (n <= kChunk); out may equal in.
void exp_f32(float* out, const float* in, int64_t n) {
  switch (exp_impl()) {
#if CG_FAST_HAVE_MKL
    case ExpImpl::kMkl:
      vmsExp(static_cast<int>(n), in, out, kVmlMode);
      return;
#endif
#if CG_FAST_X86_SLEEF
    case ExpImpl::kSleef16:
      exp_sleef16(out, in, n);
      return;
    case ExpImpl::kSleef8:
      exp_sleef8(out, in, n);
      return;
#endif
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = std::exp(in[i]);
      return;
  }
}

float exp_scalar(float v) {
  float r;
  exp_f32(&r, &v, 1);
  return r;
}

// ------------------------------------------------------------------------------------------------------------
// Inputs of any storage type as float32: float32 inputs are read in place, float16 / bfloat16 ones are upcast
// (exactly, as Tensor.float()) into a stage buffer.
// ------------------------------------------------------------------------------------------------------------
template <typename T>
CG_INLINE void load_f32(float* CG_RESTRICT dst, const T* CG_RESTRICT src, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i]);
}

// float32 values of base[offset, offset + len): the input itself, or `buf` filled by upcasting.
CG_INLINE const float* as_f32(float* buf, const void* base, int dtype, int64_t offset, int64_t len) {
  switch (dtype) {
    case DT_FLOAT16:
      load_f32(buf, static_cast<const c10::Half*>(base) + offset, len);
      return buf;
    case DT_BFLOAT16:
      load_f32(buf, static_cast<const c10::BFloat16*>(base) + offset, len);
      return buf;
    default:
      return static_cast<const float*>(base) + offset;
  }
}

// ------------------------------------------------------------------------------------------------------------
// The cache update (spec §4): which of its terms are present. g only: drop / compress; h only: a skipped step
// of reuse / momentum; both: a guided step of reuse / momentum; neither: no guidance applied.
// ------------------------------------------------------------------------------------------------------------
enum CacheMode : int { CACHE_NONE = 0, CACHE_FRESH = 1, CACHE_DECAY = 2, CACHE_MIX = 3 };

inline CacheMode cache_mode(const float* h, const void* g) {
  if (h == nullptr) return g == nullptr ? CACHE_NONE : CACHE_FRESH;
  return g == nullptr ? CACHE_DECAY : CACHE_MIX;
}

// a = H_DECAY * h + G_WEIGHT * g with the terms of MODE (not CACHE_NONE); h <- a is the caller's.
template <int MODE>
CG_INLINE float cache_applied(float h, float g, float h_decay, float g_weight) {
  if constexpr (MODE == CACHE_FRESH) return cache_fresh_only(g, g_weight);
  if constexpr (MODE == CACHE_DECAY) return cache_decay_only(h, h_decay);
  return cache_mix(h, g, h_decay, g_weight);
}

// predicted x0 from the model output (ADM p_mean_variance), clipped when `clip`
template <int PRED>
CG_INLINE float pred_x0(float x, float o, const float* c, bool clip) {
  float x0 = o;
  if constexpr (PRED == PRED_EPS) x0 = x0_from_eps(x, o, c[SQRT_RECIP_AC], c[SQRT_RECIPM1_AC]);
  if constexpr (PRED == PRED_V) x0 = x0_from_v(x, o, c[SQRT_AC], c[SQRT_1M_AC]);
  return clip ? clip1(x0) : x0;
}

// ------------------------------------------------------------------------------------------------------------
// Loops over one chunk. Branch-free bodies (modes are template parameters or loop invariants) under
// `#pragma omp simd`, which lets GCC vectorise without alias checks: every iteration reads element i of its
// inputs and writes element i of its outputs, so `out` aliasing `x` is safe (that is the only aliasing allowed).
// ------------------------------------------------------------------------------------------------------------

// spec §6, CFG fused into the step: d = eps_c - eps_u (when fresh), a = cache(h, d), h <- a, and
// eps = eps_c + (w - 1) * a on the guided prefix [0, guided) of the chunk, eps_c after it.
template <int MODE>
CG_INLINE void loop_cfg(float* CG_RESTRICT eps, const float* CG_RESTRICT eps_c, const float* CG_RESTRICT eps_u,
                        float* CG_RESTRICT h, const float* c, int64_t guided, int64_t len) {
  const float h_decay = c[H_DECAY], g_weight = c[G_WEIGHT], s = c[GUIDE_S];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float ec = eps_c[i];
    const float d = MODE == CACHE_DECAY ? 0.0f : cfg_direction(ec, eps_u[i]);
    const float a = cache_applied<MODE>(MODE == CACHE_FRESH ? 0.0f : h[i], d, h_decay, g_weight);
    if constexpr (MODE != CACHE_FRESH) h[i] = a;
    eps[i] = i < guided ? cfg_combine(ec, a, s) : ec;
  }
}

// spec §5, learned range: log Var = frac * MAX_LOG + (1 - frac) * MIN_LOG, and 0.5 * log Var.
CG_INLINE void loop_learned_log_var(float* CG_RESTRICT log_var, float* CG_RESTRICT half,
                                    const float* CG_RESTRICT v, float max_log, float min_log, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float lv = learned_log_var(v[i], max_log, min_log);
    log_var[i] = lv;
    half[i] = half_log_var(lv);
  }
}

// DDPM (spec §5), everything after the variance in one loop: x0, posterior mean, classifier guidance
// mean + Var * (a * s) with the cache update (MODE), x' = mean + (NONZERO * sigma) * z. Var and sigma =
// exp(0.5 log Var) per element (LEARNED, precomputed) or per row.
template <int PRED, int MODE, bool LEARNED>
CG_INLINE void loop_ddpm(float* out, const float* x, const float* CG_RESTRICT eps, const float* CG_RESTRICT g,
                         float* CG_RESTRICT h, const float* CG_RESTRICT var, const float* CG_RESTRICT sigma,
                         const float* CG_RESTRICT z, const float* c, bool clip, float row_scale, int64_t len) {
  const float c1 = c[POST_C1], c2 = c[POST_C2], var_row = c[VAR], nonzero = c[NONZERO];
  const float h_decay = c[H_DECAY], g_weight = c[G_WEIGHT], s = c[GUIDE_S];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float xi = x[i];
    float mean = posterior_mean(pred_x0<PRED>(xi, eps[i], c, clip), xi, c1, c2);
    if constexpr (MODE != CACHE_NONE) {
      const float a = cache_applied<MODE>(MODE == CACHE_FRESH ? 0.0f : h[i], MODE == CACHE_DECAY ? 0.0f : g[i],
                                          h_decay, g_weight);
      if constexpr (MODE != CACHE_FRESH) h[i] = a;
      mean = guided_mean(mean, LEARNED ? var[i] : var_row, a, s);
    }
    out[i] = add_noise(mean, LEARNED ? nonzero * sigma[i] : row_scale, z[i]);
  }
}

// DDIM (spec §5) in one loop: x0; at guided steps the score shift eps' = eps - sqrt(1 - alpha_bar) * (a * s)
// and x0 from eps'; then eps from x0, mean = x0 * sqrt(alpha_bar_prev) + dir * eps, x' = mean + sigma z.
template <int PRED, int MODE>
CG_INLINE void loop_ddim(float* out, const float* x, const float* CG_RESTRICT eps_in, const float* CG_RESTRICT g,
                         float* CG_RESTRICT h, const float* CG_RESTRICT z, const float* c, bool clip, int64_t len) {
  const float sra = c[SQRT_RECIP_AC], srm1 = c[SQRT_RECIPM1_AC], s1m = c[DDIM_SQRT_1M_AC];
  const float acp = c[DDIM_SQRT_ACP], dir = c[DDIM_DIR], scale = c[NONZERO] * c[DDIM_SIGMA];
  const float h_decay = c[H_DECAY], g_weight = c[G_WEIGHT], s = c[GUIDE_S];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float xi = x[i];
    float x0 = pred_x0<PRED>(xi, eps_in[i], c, clip);
    if constexpr (MODE != CACHE_NONE) {
      const float a = cache_applied<MODE>(MODE == CACHE_FRESH ? 0.0f : h[i], MODE == CACHE_DECAY ? 0.0f : g[i],
                                          h_decay, g_weight);
      if constexpr (MODE != CACHE_FRESH) h[i] = a;
      x0 = x0_from_eps(xi, ddim_shift_eps(eps_from_x0(xi, x0, sra, srm1), s1m, a, s), sra, srm1);
    }
    const float mean = ddim_mean(x0, eps_from_x0(xi, x0, sra, srm1), acp, dir);
    out[i] = add_noise(mean, scale, z[i]);
  }
}

// Calls f(integral_constant<int, PRED>) for a runtime prediction mode.
template <typename F>
CG_INLINE void with_prediction(int pred, F&& f) {
  switch (pred) {
    case PRED_X0:
      f(std::integral_constant<int, PRED_X0>{});
      break;
    case PRED_V:
      f(std::integral_constant<int, PRED_V>{});
      break;
    default:
      f(std::integral_constant<int, PRED_EPS>{});
      break;
  }
}

// Calls f(integral_constant<int, MODE>) for a runtime cache mode.
template <typename F>
CG_INLINE void with_cache_mode(CacheMode mode, F&& f) {
  switch (mode) {
    case CACHE_FRESH:
      f(std::integral_constant<int, CACHE_FRESH>{});
      break;
    case CACHE_DECAY:
      f(std::integral_constant<int, CACHE_DECAY>{});
      break;
    case CACHE_MIX:
      f(std::integral_constant<int, CACHE_MIX>{});
      break;
    default:
      f(std::integral_constant<int, CACHE_NONE>{});
      break;
  }
}

// ------------------------------------------------------------------------------------------------------------
// One task: batch row b, elements [i0, i0 + len).
// ------------------------------------------------------------------------------------------------------------
CG_TARGET_CLONES void step_chunk(const StepArgs& p, int64_t b, int64_t i0, int64_t len) {
  alignas(64) float ebuf[kChunk];  // model output upcast to float32, or CFG-guided
  alignas(64) float fbuf[kChunk];  // fresh guidance upcast to float32
  alignas(64) float vbuf[kChunk];  // variance channel upcast to float32
  alignas(64) float var[kChunk];   // learned Var = exp(log Var)
  alignas(64) float lv[kChunk];    // learned log Var, then the noise scale exp(0.5 log Var)
  alignas(64) float hl[kChunk];    // 0.5 * learned log Var

  float c[CG_NUM_COLS];
  std::memcpy(c, p.coef + b * CG_NUM_COLS, sizeof(c));
  const int64_t off = b * p.n + i0;
  float* hs = p.h != nullptr ? p.h + off : nullptr;
  const float* g = p.fresh != nullptr ? as_f32(fbuf, p.fresh, p.f_dtype, b * p.f_row + i0, len) : nullptr;
  const float* eps = as_f32(ebuf, p.model_out, p.o_dtype, b * p.o_row + i0, len);
  CacheMode mode = cache_mode(hs, g);

  // spec §6: classifier-free guidance on the model output (g = eps_u here); the cache update on every
  // channel, the guidance on the first `channels` only. What follows is then unguided.
  if (p.guide == GUIDE_CFG) {
    if (mode != CACHE_NONE) {
      const int64_t guided = std::clamp<int64_t>(p.guided_limit - i0, 0, len);
      const float* eps_c = eps;
      if (eps_c == ebuf) {  // upcast already: the combine may overwrite it in place
        std::memcpy(vbuf, ebuf, sizeof(float) * len);
        eps_c = vbuf;
      }
      with_cache_mode(mode, [&](auto m) __attribute__((always_inline)) {
        if constexpr (decltype(m)::value != CACHE_NONE) loop_cfg<decltype(m)::value>(ebuf, eps_c, g, hs, c, guided, len);
      });
      eps = ebuf;
    }
    mode = CACHE_NONE;
  } else if (p.guide == GUIDE_NONE) {
    mode = CACHE_NONE;
  }

  if (p.method == METHOD_DDPM) {
    // spec §5: the variance, learned (per element, two exps as the reference) or fixed (per row)
    float row_scale = 0.0f;
    if (p.learned_var) {
      const float* v = as_f32(vbuf, p.model_out, p.o_dtype, b * p.o_row + p.n + i0, len);
      loop_learned_log_var(lv, hl, v, c[MAX_LOG], c[MIN_LOG], len);
      if (mode != CACHE_NONE) exp_f32(var, lv, len);  // Var, needed only for the guidance shift
      exp_f32(lv, hl, len);                           // exp(0.5 log Var)
    } else {
      row_scale = c[NONZERO] * exp_scalar(half_log_var(c[LOG_VAR]));
    }
    with_prediction(p.prediction, [&](auto pred) __attribute__((always_inline)) {
      with_cache_mode(mode, [&](auto m) __attribute__((always_inline)) {
        constexpr int P = decltype(pred)::value, M = decltype(m)::value;
        if (p.learned_var) {
          loop_ddpm<P, M, true>(p.out + off, p.x + off, eps, g, hs, var, lv, p.noise + off, c, p.clip, row_scale,
                                len);
        } else {
          loop_ddpm<P, M, false>(p.out + off, p.x + off, eps, g, hs, var, lv, p.noise + off, c, p.clip, row_scale,
                                 len);
        }
      });
    });
    return;
  }
  with_prediction(p.prediction, [&](auto pred) __attribute__((always_inline)) {
    with_cache_mode(mode, [&](auto m) __attribute__((always_inline)) {
      loop_ddim<decltype(pred)::value, decltype(m)::value>(p.out + off, p.x + off, eps, g, hs, p.noise + off, c,
                                                           p.clip, len);
    });
  });
}

void run_step_cpu(const StepArgs& p) {
  if (p.rows == 0 || p.n == 0) return;
  const int64_t per_row = (p.n + kChunk - 1) / kChunk;
  const int64_t tasks = p.rows * per_row;
  const int threads = (p.rows * p.n >= kParallelMin) ? at::get_num_threads() : 1;
  // Dynamic schedule over runs of 16 tasks (16k elements, contiguous): balanced even when another process
  // shares a core, and each run still streams one contiguous region.
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / per_row;
    const int64_t i0 = (t - b * per_row) * kChunk;
    step_chunk(p, b, i0, std::min(kChunk, p.n - i0));
  }
}

void ddpm_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                   const at::Tensor& noise, const at::Tensor& out, c10::string_view guide,
                   const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                   c10::string_view prediction, bool learned_var, bool clip, std::optional<int64_t> cfg_channels) {
  StepTensors t = prepare_step("cg_fast::ddpm_step", METHOD_DDPM, x, model_out, coef, noise, out, guide, fresh,
                               h, prediction, learned_var, clip, cfg_channels);
  run_step_cpu(t.args);
  t.finish();
}

void ddim_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                   const at::Tensor& noise, const at::Tensor& out, c10::string_view guide,
                   const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                   c10::string_view prediction, bool learned_var, bool clip, std::optional<int64_t> cfg_channels) {
  StepTensors t = prepare_step("cg_fast::ddim_step", METHOD_DDIM, x, model_out, coef, noise, out, guide, fresh,
                               h, prediction, learned_var, clip, cfg_channels);
  run_step_cpu(t.args);
  t.finish();
}

}  // namespace
}  // namespace cg_fast

TORCH_LIBRARY_IMPL(cg_fast, CPU, m) {
  m.impl("ddpm_step", &cg_fast::ddpm_step_cpu);
  m.impl("ddim_step", &cg_fast::ddim_step_cpu);
}
