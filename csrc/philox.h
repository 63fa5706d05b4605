// Counter-based step noise (Philox4x32-10 + Box-Muller), shared by the CPU kernel (csrc/cpu/step.cpp, which
// vectorises it over a chunk) and the CUDA kernel (csrc/step_element.h, one element per thread). Free of torch
// and CUDA headers.
//
// The counter layout is specified at the top of cg_fast/kernels/rng.py (items 1-5); in brief, element e of a
// sample with seed s at step j is
//   (w0, w1, w2, w3) = Philox4x32-10(counter (e >> 2, j, 0, 0), key (s mod 2^32, s >> 32)),
//   (a, b) = (w0, w1) if ((e >> 1) & 1) == 0 else (w2, w3),
//   u(w) = (2 (w >> 9) + 1) 2^-24,   r = sqrt(-2 log u(a)),   theta = u(b) * float32(2 pi),
//   z = r cos(theta) (e even) or r sin(theta) (e odd).
// The words and uniforms are bitwise the same everywhere; log / cos / sin come from the device's library.
#pragma once

#include <cstdint>

#include "step_math.h"  // CG_HD

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace cg_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bumps
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr uint32_t kDomainNoise = 0u;         // counter word c3 of step noise (rng.py item 3)
constexpr float kTwoPiF32 = 6.2831854820251465f;  // float32(2 pi)
constexpr float kTwoM24 = 5.9604644775390625e-08f;  // 2^-24

// Philox4x32-10 (rng.py item 1): the counter (c0..c3) is replaced by the four output words.
CG_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
}

// u(w) = (2 (w >> 9) + 1) 2^-24 in (0, 1), exact (rng.py item 4)
CG_HD float philox_uniform(uint32_t w) {
  return static_cast<float>(static_cast<int32_t>((w >> 9) * 2u + 1u)) * kTwoM24;
}

// Box-Muller radius sqrt(-2 log u) from the uniform's log (rng.py item 5); sqrt is IEEE everywhere
CG_HD float box_muller_radius(float log_u) {
#if defined(__CUDA_ARCH__)
  return sqrtf(log_u * -2.0f);
#else
  return std::sqrt(log_u * -2.0f);
#endif
}

CG_HD float box_muller_angle(float u) { return u * kTwoPiF32; }

// One element's z (rng.py items 2-5), computed alone: the CUDA kernel's per-thread path. log / cos / sin are
// CUDA's logf / cosf / sinf on the device (<= 2 ulp, no fast-math), the C library's on the host.
CG_HD float counter_normal(uint64_t seed, uint32_t step, int64_t e) {
  uint32_t c0 = static_cast<uint32_t>(e >> 2), c1 = step, c2 = 0u, c3 = kDomainNoise;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const bool second = ((e >> 1) & 1) != 0;
  const float u1 = philox_uniform(second ? c2 : c0);
  const float theta = box_muller_angle(philox_uniform(second ? c3 : c1));
#if defined(__CUDA_ARCH__)
  const float r = box_muller_radius(logf(u1));
  return r * ((e & 1) ? sinf(theta) : cosf(theta));
#else
  const float r = box_muller_radius(std::log(u1));
  return r * ((e & 1) ? std::sin(theta) : std::cos(theta));
#endif
}

}  // namespace cg_fast
