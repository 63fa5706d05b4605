// CUDA kernels of the fused sampler steps (spec §4-§6): one thread per element, grid-stride loop.
//
// This file needs no torch header: it builds with nvcc alone (tests/test_kernels_csrc.py compiles it), and
// the torch-side operator lives in csrc/cuda/step_cuda.cpp. One thread computes one element with
// csrc/step_element.h, whose formulas are csrc/step_math.h, the same functions as the CPU kernel, in the same
// order; build with --fmad=false so nvcc does not contract products into FMAs. The results then match the CPU
// reference except for exp (expf here, MKL / SLEEF there): DDIM and the cache state h are bitwise.
//
// Memory traffic per element (fp32): read x, o (1x or 2x), z, [fresh], [h]; write x', [h]. One pass.
// DPM-Solver++ 2M (METHOD_DPMPP2M): read x, o, prev, [fresh], [h]; write x', prev, [h]; no z.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../step_args.h"

namespace cg_fast {

// Storage types -> float32 (exact), declared before step_element.h, which uses them.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace cg_fast

#include "../step_element.h"

namespace cg_fast {
namespace {

struct DeviceExp {
  __device__ __forceinline__ float operator()(float v) const { return expf(v); }
};

template <typename TO, typename TF>
__global__ void step_kernel(const StepArgs p) {
  const int64_t total = p.rows * p.n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    step_element<TO, TF>(p, idx, DeviceExp{});
  }
}

template <typename TO>
cudaError_t launch_for_fresh(const StepArgs& p, dim3 grid, dim3 block, cudaStream_t stream) {
  switch (p.f_dtype) {
    case DT_FLOAT16:
      step_kernel<TO, __half><<<grid, block, 0, stream>>>(p);
      break;
    case DT_BFLOAT16:
      step_kernel<TO, __nv_bfloat16><<<grid, block, 0, stream>>>(p);
      break;
    default:
      step_kernel<TO, float><<<grid, block, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

int launch_step(const StepArgs& p, CUstream_st* stream) {
  const int64_t total = p.rows * p.n;
  if (total == 0) return 0;
  constexpr int kThreads = 256;
  // Enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest.
  const int64_t want = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(want < 65536 ? want : 65536);
  const dim3 grid(blocks), block(kThreads);
  cudaError_t err;
  switch (p.o_dtype) {
    case DT_FLOAT16:
      err = launch_for_fresh<__half>(p, grid, block, stream);
      break;
    case DT_BFLOAT16:
      err = launch_for_fresh<__nv_bfloat16>(p, grid, block, stream);
      break;
    default:
      err = launch_for_fresh<float>(p, grid, block, stream);
      break;
  }
  return static_cast<int>(err);
}

}  // namespace cg_fast
