// Raw-pointer description of one fused step (StepArgs), shared by the CPU kernel (csrc/cpu/step.cpp) and the
// CUDA kernels (csrc/cuda/step.cu), and the launch interface of the latter. Free of torch and CUDA headers, so
// that the CUDA kernels compile with nvcc alone and their torch registration (csrc/cuda/step_cuda.cpp) is
// plain C++. csrc/step_check.h fills a StepArgs from validated tensors.
#pragma once

#include <cstdint>

struct CUstream_st;  // = cudaStream_t

namespace cg_fast {

// Storage type of model_out / fresh (both are upcast to float32 on load).
enum DType : int { DT_FLOAT32 = 0, DT_FLOAT16 = 1, DT_BFLOAT16 = 2 };

// One step over `rows` batch rows of `n` elements (n = x[0].numel()); all pointers point to contiguous
// storage on the kernel's device. Layout: x, noise, h, out [rows, n]; model_out [rows, o_row] with
// o_row = n, or 2n when learned_var (variance channel at [b, n + i]); fresh [rows, f_row] (f_row = n or 2n,
// the first n are used); coef [rows, CG_NUM_COLS] float32. `fresh` / `h` are null when absent. `out` may alias `x`
// (and nothing else). Counter-based noise: `noise` is null and `seeds` (one uint64 per row, stored as int64)
// and `step_index` (1 value, or one per row when step_stride is 1) are read by the kernel (on its device), so
// a CUDA graph replays new steps without re-capture (layout: cg_fast/kernels/rng.py, csrc/philox.h).
// DPM-Solver++ 2M (METHOD_DPMPP2M) is deterministic: `noise` and `seeds` are null, and `prev` [rows, n] (the
// previous step's data prediction) is read and overwritten with this step's x0; null for the other methods.
struct StepArgs {
  const float* x = nullptr;
  const void* model_out = nullptr;
  const float* coef = nullptr;
  const float* noise = nullptr;
  const void* fresh = nullptr;
  float* h = nullptr;
  float* out = nullptr;
  float* prev = nullptr;                // dpmpp2m: x0 of the previous step, in; this step's x0, out
  const int64_t* seeds = nullptr;       // counter-based noise: per-row sample seeds, or null (read `noise`)
  const int64_t* step_index = nullptr;  // counter-based noise: the step j
  int64_t step_stride = 0;              // 0: one step index for all rows; 1: one per row
  int64_t rows = 0;
  int64_t n = 0;
  int64_t o_row = 0;
  int64_t f_row = 0;
  int64_t guided_limit = 0;  // CFG: element i of a row is guided iff i < guided_limit (spec §6, channels)
  int method = 0;            // Method (step_math.h)
  int guide = 0;             // Guide
  int prediction = 0;        // Prediction
  int o_dtype = DT_FLOAT32;  // DType of model_out
  int f_dtype = DT_FLOAT32;  // DType of fresh
  bool learned_var = false;
  bool clip = true;
};

// CUDA: enqueues the step on `stream` (no synchronisation, no allocation: safe inside CUDA-graph capture).
// Returns the cudaError_t of the launch as an int (0 = success).
int launch_step(const StepArgs& args, CUstream_st* stream);

}  // namespace cg_fast
