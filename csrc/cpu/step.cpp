// CPU kernels of cg_fast::ddpm_step / ddim_step / dpmpp2m_step (spec §4-§6): the whole sampler step, guidance
// and cache update in one memory pass, bitwise equal to cg_fast/kernels/reference.py on the CPU.
//
// How it is organised. The work is split into tasks of one batch row x up to kChunk elements (coefficients are
// per row), run in parallel with OpenMP. Per task:
//   1. (CFG only) the CFG combine and the cache update, into a stage buffer of guided eps (spec §6);
//   2. (DDPM, learned variance) log Var from the variance channel, then exp(log Var) and exp(0.5 log Var) on
//      the stage buffers with torch's own exp (see "exp" below);
//   3. (counter-based noise) z of the chunk into a stage buffer: Philox4x32-10 and Box-Muller with torch's own
//      log / cos / sin (cg_fast/kernels/rng.py, csrc/philox.h), instead of reading a noise tensor;
//   4. one loop over the chunk that reads x, the model output, z, g and h, and writes h and x' (DDPM: x0, mean,
//      guidance, noise; DDIM: x0, score shift, DDIM update; DPM-Solver++ 2M: x0, score shift, the multistep
//      update from prev, which then receives x0; no z).
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
// Memory traffic per element (fp32): read x, o (1x or 2x), z, [fresh], [h]; write x', [h]: 16-32 bytes
// (dpmpp2m: read x, o, prev, [fresh], [h]; write x', prev, [h]),
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

#include "../philox.h"
#include "../step_args.h"
#include "../step_check.h"
#include "../step_math.h"
#include "step_cpu.h"

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
void vmsLn(int n, const float* a, float* r, long long mode);  // torch.log (counter-based noise)
void vmsCos(int n, const float* a, float* r, long long mode);  // torch.cos
void vmsSin(int n, const float* a, float* r, long long mode);  // torch.sin
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
__m512 Sleef_logf16_u10(__m512);
__m256 Sleef_logf8_u10(__m256);
__m512 Sleef_cosf16_u10(__m512);
__m256 Sleef_cosf8_u10(__m256);
__m512 Sleef_sinf16_u10(__m512);
__m256 Sleef_sinf8_u10(__m256);
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

// The transcendental functions the kernels call: exp (the step), and log / cos / sin (counter-based noise,
// Box-Muller; rng.py item 5), each the function torch calls for it on this build.
enum class Fn { kExp, kLog, kCos, kSin };

#if CG_FAST_X86_SLEEF
template <Fn F>
__attribute__((target("avx512f"))) inline __m512 sleef16(__m512 v) {
  if constexpr (F == Fn::kExp) return Sleef_expf16_u10(v);
  if constexpr (F == Fn::kLog) return Sleef_logf16_u10(v);
  if constexpr (F == Fn::kCos) return Sleef_cosf16_u10(v);
  return Sleef_sinf16_u10(v);
}

template <Fn F>
__attribute__((target("avx2,fma"))) inline __m256 sleef8(__m256 v) {
  if constexpr (F == Fn::kExp) return Sleef_expf8_u10(v);
  if constexpr (F == Fn::kLog) return Sleef_logf8_u10(v);
  if constexpr (F == Fn::kCos) return Sleef_cosf8_u10(v);
  return Sleef_sinf8_u10(v);
}

template <Fn F>
__attribute__((target("avx512f"))) void map_sleef16(float* out, const float* in, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, sleef16<F>(_mm512_loadu_ps(in + i)));
  if (i < n) {  // the tail as one zero-padded vector, as vec::map does
    alignas(64) float buf[16] = {0};
    std::memcpy(buf, in + i, sizeof(float) * (n - i));
    _mm512_store_ps(buf, sleef16<F>(_mm512_load_ps(buf)));
    std::memcpy(out + i, buf, sizeof(float) * (n - i));
  }
}

template <Fn F>
__attribute__((target("avx2,fma"))) void map_sleef8(float* out, const float* in, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, sleef8<F>(_mm256_loadu_ps(in + i)));
  if (i < n) {
    alignas(32) float buf[8] = {0};
    std::memcpy(buf, in + i, sizeof(float) * (n - i));
    _mm256_store_ps(buf, sleef8<F>(_mm256_load_ps(buf)));
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

template <Fn F>
float std_fn(float v) {
  if constexpr (F == Fn::kExp) return std::exp(v);
  if constexpr (F == Fn::kLog) return std::log(v);
  if constexpr (F == Fn::kCos) return std::cos(v);
  return std::sin(v);
}

// out[i] = F(in[i]) for 0 <= i < n (n <= kChunk); out may equal in.
template <Fn F>
void map_f32(float* out, const float* in, int64_t n) {
  switch (exp_impl()) {
#if CG_FAST_HAVE_MKL
    case ExpImpl::kMkl:
      if constexpr (F == Fn::kExp) vmsExp(static_cast<int>(n), in, out, kVmlMode);
      if constexpr (F == Fn::kLog) vmsLn(static_cast<int>(n), in, out, kVmlMode);
      if constexpr (F == Fn::kCos) vmsCos(static_cast<int>(n), in, out, kVmlMode);
      if constexpr (F == Fn::kSin) vmsSin(static_cast<int>(n), in, out, kVmlMode);
      return;
#endif
#if CG_FAST_X86_SLEEF
    case ExpImpl::kSleef16:
      map_sleef16<F>(out, in, n);
      return;
    case ExpImpl::kSleef8:
      map_sleef8<F>(out, in, n);
      return;
#endif
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = std_fn<F>(in[i]);
      return;
  }
}

void exp_f32(float* out, const float* in, int64_t n) { map_f32<Fn::kExp>(out, in, n); }

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

// The guided x0 of DDIM and DPM-Solver++ (reference _guided_x0_score_form, spec §5): x0; at guided steps
// (MODE != CACHE_NONE) the cache update of spec §4, the score shift eps' = eps - sqrt(1 - alpha_bar) * (a * s)
// and x0 from eps'.
template <int PRED, int MODE>
CG_INLINE float guided_x0_score_form(float xi, float eps, const float* CG_RESTRICT g, float* CG_RESTRICT h,
                                     int64_t i, const float* c, bool clip, float sra, float srm1, float s1m,
                                     float h_decay, float g_weight, float s) {
  float x0 = pred_x0<PRED>(xi, eps, c, clip);
  if constexpr (MODE != CACHE_NONE) {
    const float a = cache_applied<MODE>(MODE == CACHE_FRESH ? 0.0f : h[i], MODE == CACHE_DECAY ? 0.0f : g[i],
                                        h_decay, g_weight);
    if constexpr (MODE != CACHE_FRESH) h[i] = a;
    x0 = x0_from_eps(xi, ddim_shift_eps(eps_from_x0(xi, x0, sra, srm1), s1m, a, s), sra, srm1);
  }
  return x0;
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
    const float x0 = guided_x0_score_form<PRED, MODE>(xi, eps_in[i], g, h, i, c, clip, sra, srm1, s1m, h_decay,
                                                      g_weight, s);
    const float mean = ddim_mean(x0, eps_from_x0(xi, x0, sra, srm1), acp, dir);
    out[i] = add_noise(mean, scale, z[i]);
  }
}

// DPM-Solver++ 2M (spec §5 "DPM-Solver++") in one loop: x0 and, at guided steps, the score shift as DDIM;
// then x' = DPM_CX * x + DPM_C0 * x0 + DPM_C1 * (x0 - prev) and prev <- x0. Deterministic: no z.
template <int PRED, int MODE>
CG_INLINE void loop_dpmpp2m(float* out, const float* x, const float* CG_RESTRICT eps_in, const float* CG_RESTRICT g,
                            float* CG_RESTRICT h, float* CG_RESTRICT prev, const float* c, bool clip, int64_t len) {
  const float sra = c[SQRT_RECIP_AC], srm1 = c[SQRT_RECIPM1_AC], s1m = c[DDIM_SQRT_1M_AC];
  const float cx = c[DPM_CX], c0 = c[DPM_C0], c1 = c[DPM_C1];
  const float h_decay = c[H_DECAY], g_weight = c[G_WEIGHT], s = c[GUIDE_S];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float xi = x[i];
    const float x0 = guided_x0_score_form<PRED, MODE>(xi, eps_in[i], g, h, i, c, clip, sra, srm1, s1m, h_decay,
                                                      g_weight, s);
    out[i] = dpmpp2m_update(xi, x0, prev[i], cx, c0, c1);
    prev[i] = x0;
  }
}

// Counter-based noise (cg_fast/kernels/rng.py items 2-5). Philox4x32-10 of the quads q0 .. q0 + quads - 1 of
// one row: w[m][k] = word m of quad q0 + k. Integer arithmetic only: every version gives the same bits.
constexpr int64_t kQuads = kChunk / 4;  // quads per chunk (a multiple of 16)

#if CG_FAST_X86_SLEEF
// (hi, lo) of the 16 products a * m: vpmuludq on the even and the odd lanes, recombined. (The maskz forms with
// a full mask are the plain instructions; the unmasked intrinsics trip GCC 12's -Wmaybe-uninitialized.)
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  constexpr __mmask8 kAll = 0xFF;
  const __m512i even = _mm512_maskz_mul_epu32(kAll, a, m);
  const __m512i odd = _mm512_maskz_mul_epu32(kAll, _mm512_maskz_srli_epi64(kAll, a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_maskz_slli_epi64(kAll, odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_maskz_srli_epi64(kAll, even, 32), odd);
}

// 16 quads per iteration (the compiler's own vectorisation of philox4x32_10 is ~3x slower: it widens to
// 64-bit lanes); rounds the quad count up to 16 (the buffers hold kQuads).
__attribute__((target("avx512f"))) void philox_words_avx512(uint32_t (*w)[kQuads], uint32_t q0, int64_t quads,
                                                            uint32_t step, uint32_t k0, uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  __m512i key0[10], key1[10];  // the bumped keys of the ten rounds (rng.py item 1)
  for (int r = 0; r < 10; ++r) {
    key0[r] = _mm512_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(r) * kPhiloxW0));
    key1[r] = _mm512_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(r) * kPhiloxW1));
  }
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t k = 0; k < quads; k += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(q0 + static_cast<uint32_t>(k))), iota);
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(step));
    __m512i c2 = _mm512_setzero_si512();
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(kDomainNoise));
    for (int r = 0; r < 10; ++r) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, m0, hi0, lo0);
      mulhilo16(c2, m1, hi1, lo1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, key0[r], 0x96);  // hi1 ^ c1 ^ k0
      c1 = lo1;
      c2 = _mm512_ternarylogic_epi32(hi0, c3, key1[r], 0x96);  // hi0 ^ c3 ^ k1
      c3 = lo0;
    }
    _mm512_storeu_si512(w[0] + k, c0);
    _mm512_storeu_si512(w[1] + k, c1);
    _mm512_storeu_si512(w[2] + k, c2);
    _mm512_storeu_si512(w[3] + k, c3);
  }
}

// The AVX-512 path where the CPU has it, unless ATEN_CPU_CAPABILITY asks torch for another ISA (which also
// lets the tests run the portable loop on an AVX-512 machine).
bool use_avx512_philox() {
  static const bool yes = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    const bool allowed = cap == nullptr || *cap == '\0' || std::string(cap) == "avx512" || std::string(cap) == "AVX512";
    return allowed && __builtin_cpu_supports("avx512f");
  }();
  return yes;
}
#endif

CG_INLINE void philox_words(uint32_t (*w)[kQuads], uint32_t q0, int64_t quads, uint32_t step, uint32_t k0,
                            uint32_t k1) {
#if CG_FAST_X86_SLEEF
  if (use_avx512_philox()) {
    philox_words_avx512(w, q0, quads, step, k0, k1);
    return;
  }
#endif
#pragma omp simd
  for (int64_t k = 0; k < quads; ++k) {
    uint32_t c0 = q0 + static_cast<uint32_t>(k), c1 = step, c2 = 0u, c3 = kDomainNoise;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    w[0][k] = c0;
    w[1][k] = c1;
    w[2][k] = c2;
    w[3][k] = c3;
  }
}

// z for elements [i0, i0 + len) of one row (i0 % 4 == 0): the Philox words of the chunk's quads, then
// Box-Muller with the log / cos / sin torch calls on this build, so that z is bitwise rng.counter_normal.
// Buffers hold the even pairs (words w0, w1) of the quads first, then the odd pairs (w2, w3).
CG_INLINE void counter_noise_chunk(float* CG_RESTRICT z, uint64_t seed, uint32_t step, int64_t i0, int64_t len) {
  alignas(64) uint32_t w[4][kQuads];
  alignas(64) float r[2 * kQuads];   // u(a), then log u(a); a = w0 (even pairs), w2 (odd pairs)
  alignas(64) float th[2 * kQuads];  // the angle u(b) * 2 pi; b = w1, w3
  alignas(64) float cs[2 * kQuads];  // cos(angle)
  alignas(64) float sn[2 * kQuads];  // sin(angle)
  const int64_t quads = (len + 3) / 4;
  philox_words(w, static_cast<uint32_t>(i0 >> 2), quads, step, static_cast<uint32_t>(seed),
               static_cast<uint32_t>(seed >> 32));
#pragma omp simd
  for (int64_t k = 0; k < quads; ++k) {
    r[k] = philox_uniform(w[0][k]);
    th[k] = box_muller_angle(philox_uniform(w[1][k]));
    r[quads + k] = philox_uniform(w[2][k]);
    th[quads + k] = box_muller_angle(philox_uniform(w[3][k]));
  }
  map_f32<Fn::kLog>(r, r, 2 * quads);
  map_f32<Fn::kCos>(cs, th, 2 * quads);
  map_f32<Fn::kSin>(sn, th, 2 * quads);
#pragma omp simd
  for (int64_t k = 0; k < quads; ++k) {
    const float ra = box_muller_radius(r[k]), rb = box_muller_radius(r[quads + k]);
    z[4 * k] = ra * cs[k];  // element 4k: pair 2k, cos; 4k + 1: pair 2k, sin; 4k + 2, 4k + 3: pair 2k + 1
    z[4 * k + 1] = ra * sn[k];
    z[4 * k + 2] = rb * cs[quads + k];
    z[4 * k + 3] = rb * sn[quads + k];
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
  alignas(64) float zbuf[kChunk];  // counter-based noise

  float c[CG_NUM_COLS];
  std::memcpy(c, p.coef + b * CG_NUM_COLS, sizeof(c));
  const int64_t off = b * p.n + i0;
  float* hs = p.h != nullptr ? p.h + off : nullptr;
  const float* g = p.fresh != nullptr ? as_f32(fbuf, p.fresh, p.f_dtype, b * p.f_row + i0, len) : nullptr;
  const float* eps = as_f32(ebuf, p.model_out, p.o_dtype, b * p.o_row + i0, len);
  CacheMode mode = cache_mode(hs, g);
  // the noise: read, or counter-based (zero where the row's noise scale is zero: DDIM eta = 0, the last step);
  // none for dpmpp2m
  const float* z = p.noise != nullptr ? p.noise + off : zbuf;
  if (p.noise == nullptr && p.method != METHOD_DPMPP2M) {
    if (c[NONZERO] == 0.0f || (p.method == METHOD_DDIM && c[DDIM_SIGMA] == 0.0f)) {
      std::memset(zbuf, 0, sizeof(float) * len);
    } else {
      const uint64_t seed = static_cast<uint64_t>(p.seeds[b]);
      const uint32_t step = static_cast<uint32_t>(p.step_index[b * p.step_stride]);
      counter_noise_chunk(zbuf, seed, step, i0, len);
    }
  }

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
          loop_ddpm<P, M, true>(p.out + off, p.x + off, eps, g, hs, var, lv, z, c, p.clip, row_scale, len);
        } else {
          loop_ddpm<P, M, false>(p.out + off, p.x + off, eps, g, hs, var, lv, z, c, p.clip, row_scale, len);
        }
      });
    });
    return;
  }
  if (p.method == METHOD_DPMPP2M) {
    with_prediction(p.prediction, [&](auto pred) __attribute__((always_inline)) {
      with_cache_mode(mode, [&](auto m) __attribute__((always_inline)) {
        loop_dpmpp2m<decltype(pred)::value, decltype(m)::value>(p.out + off, p.x + off, eps, g, hs, p.prev + off,
                                                                c, p.clip, len);
      });
    });
    return;
  }
  with_prediction(p.prediction, [&](auto pred) __attribute__((always_inline)) {
    with_cache_mode(mode, [&](auto m) __attribute__((always_inline)) {
      loop_ddim<decltype(pred)::value, decltype(m)::value>(p.out + off, p.x + off, eps, g, hs, z, c, p.clip,
                                                           len);
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

}  // namespace

// The public entry points (csrc/cpu/step_cpu.h): the torch.ops registration below, and the C++ runner
// (csrc/runner/), which links this file too and calls them directly.
void ddpm_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                   const std::optional<at::Tensor>& noise, const at::Tensor& out, c10::string_view guide,
                   const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                   c10::string_view prediction, bool learned_var, bool clip, std::optional<int64_t> cfg_channels,
                   const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_index) {
  StepTensors t = prepare_step("cg_fast::ddpm_step", METHOD_DDPM, x, model_out, coef, noise, out, guide, fresh,
                               h, prediction, learned_var, clip, cfg_channels, seeds, step_index);
  run_step_cpu(t.args);
  t.finish();
}

void ddim_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                   const std::optional<at::Tensor>& noise, const at::Tensor& out, c10::string_view guide,
                   const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                   c10::string_view prediction, bool learned_var, bool clip, std::optional<int64_t> cfg_channels,
                   const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_index) {
  StepTensors t = prepare_step("cg_fast::ddim_step", METHOD_DDIM, x, model_out, coef, noise, out, guide, fresh,
                               h, prediction, learned_var, clip, cfg_channels, seeds, step_index);
  run_step_cpu(t.args);
  t.finish();
}

void dpmpp2m_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                      const at::Tensor& prev, const at::Tensor& out, c10::string_view guide,
                      const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                      c10::string_view prediction, bool learned_var, bool clip,
                      std::optional<int64_t> cfg_channels) {
  StepTensors t = prepare_step("cg_fast::dpmpp2m_step", METHOD_DPMPP2M, x, model_out, coef, std::nullopt, out, guide,
                               fresh, h, prediction, learned_var, clip, cfg_channels, std::nullopt, std::nullopt,
                               prev);
  run_step_cpu(t.args);
  t.finish();
}

void counter_normal_cpu(const at::Tensor& seeds, uint32_t step, const at::Tensor& out) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() >= 1,
              "counter_normal_cpu: out must be a contiguous float32 CPU tensor [B, ...]");
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.dim() == 1 &&
                  seeds.size(0) == out.size(0),
              "counter_normal_cpu: seeds must be an int64 CPU tensor [B] (one per row of out)");
  const at::Tensor s = seeds.contiguous();
  const int64_t rows = out.size(0), n = rows ? out.numel() / rows : 0;
  const int64_t* sp = s.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      alignas(64) float z[kChunk];  // counter_noise_chunk writes whole quads
      const int64_t len = std::min(kChunk, n - i0);
      counter_noise_chunk(z, static_cast<uint64_t>(sp[b]), step, i0, len);
      std::memcpy(op + b * n + i0, z, sizeof(float) * len);
    }
  }
}

}  // namespace cg_fast

#ifndef CG_FAST_STEP_NO_REGISTER  // the C++ runner's copy of the kernels registers nothing (csrc/runner/)
TORCH_LIBRARY_IMPL(cg_fast, CPU, m) {
  m.impl("ddpm_step", &cg_fast::ddpm_step_cpu);
  m.impl("ddim_step", &cg_fast::ddim_step_cpu);
  m.impl("dpmpp2m_step", &cg_fast::dpmpp2m_step_cpu);
}
#endif
