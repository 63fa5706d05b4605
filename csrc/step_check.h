// Argument validation of the cg_fast step operators, shared by the CPU and CUDA registrations: checks the
// tensors against the op schema (csrc/ops.cpp), makes them contiguous and fills a StepArgs.
// Every TORCH_CHECK message starts with the op name ("cg_fast::ddpm_step: ...").
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string_view>

#include "step_args.h"
#include "step_math.h"

namespace cg_fast {

// The tensors of one step call, kept alive while the kernel runs. `out` / `h` / `prev` are what the kernel
// writes: the caller's tensors when they are contiguous, else contiguous stand-ins that finish() copies back.
struct StepTensors {
  at::Tensor x, model_out, coef, noise, fresh, h, out, seeds, step_index, prev;
  at::Tensor h_user, out_user, prev_user;  // defined only when a stand-in is used
  StepArgs args;

  // Copy the stand-ins back into the caller's tensors (after the kernel has been enqueued).
  void finish() {
    if (out_user.defined()) out_user.copy_(out);
    if (h_user.defined()) h_user.copy_(h);
    if (prev_user.defined()) prev_user.copy_(prev);
  }
};

inline int parse_guide(const char* op, std::string_view guide) {
  if (guide == "none") return GUIDE_NONE;
  if (guide == "classifier") return GUIDE_CLASSIFIER;
  if (guide == "cfg") return GUIDE_CFG;
  TORCH_CHECK(false, op, ": unknown guide kind '", guide, "': use one of none, classifier, cfg");
  return -1;  // unreachable
}

inline int parse_prediction(const char* op, std::string_view prediction) {
  if (prediction == "eps") return PRED_EPS;
  if (prediction == "x0") return PRED_X0;
  if (prediction == "v") return PRED_V;
  TORCH_CHECK(false, op, ": unknown prediction '", prediction, "': use one of eps, x0, v");
  return -1;  // unreachable
}

inline int storage_dtype(const char* op, const char* what, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DT_FLOAT32;
    case at::kHalf:
      return DT_FLOAT16;
    case at::kBFloat16:
      return DT_BFLOAT16;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;  // unreachable
}

inline void check_device(const char* op, const char* what, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", what, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_like_x(const char* op, const char* what, const at::Tensor& t, const at::Tensor& x) {
  check_device(op, what, t, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", what, " must have the shape of x ", x.sizes(), ", got ",
              t.sizes());
}

// A batch-first tensor with `per_row` elements per row (or one of two accepted sizes).
inline void check_rows(const char* op, const char* what, const at::Tensor& t, int64_t rows, int64_t per_row,
                       int64_t alt_per_row, const at::Tensor& x) {
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == rows, op, ": ", what, " must have batch size ", rows,
              " (as x), got shape ", t.sizes());
  const bool ok = rows == 0 || t.numel() == rows * per_row || (alt_per_row > 0 && t.numel() == rows * alt_per_row);
  if (alt_per_row > 0) {
    TORCH_CHECK(ok, op, ": ", what, " must have ", per_row, " or ", alt_per_row,
                " elements per batch row (x has shape ", x.sizes(), "), got shape ", t.sizes());
  } else {
    TORCH_CHECK(ok, op, ": ", what, " must have ", per_row, " elements per batch row (x has shape ", x.sizes(),
                "), got shape ", t.sizes());
  }
}

// A state tensor the kernel reads and writes in place (h, prev): itself when contiguous, else a contiguous
// copy, with the caller's tensor kept in `user` for StepTensors::finish().
inline at::Tensor in_place_state(const at::Tensor& t, at::Tensor& user) {
  if (t.is_contiguous()) return t;
  user = t;
  return t.contiguous();
}

// Validates one ddpm_step / ddim_step / dpmpp2m_step call (schemas in csrc/ops.cpp) and prepares its StepArgs.
// dpmpp2m (METHOD_DPMPP2M) takes `prev` and no noise; the other methods take noise or seeds and no `prev`.
inline StepTensors prepare_step(const char* op, int method, const at::Tensor& x, const at::Tensor& model_out,
                                const at::Tensor& coef, const std::optional<at::Tensor>& noise,
                                const at::Tensor& out, std::string_view guide,
                                const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                                std::string_view prediction, bool learned_var, bool clip,
                                std::optional<int64_t> cfg_channels, const std::optional<at::Tensor>& seeds,
                                const std::optional<at::Tensor>& step_index,
                                const std::optional<at::Tensor>& prev = std::nullopt) {
  StepArgs a;
  a.method = method;
  a.guide = parse_guide(op, guide);
  a.prediction = parse_prediction(op, prediction);
  a.learned_var = learned_var;
  a.clip = clip;
  const bool has_fresh = fresh.has_value() && fresh->defined();
  const bool has_h = h.has_value() && h->defined();
  TORCH_CHECK(a.guide != GUIDE_NONE || (!has_fresh && !has_h), op,
              ": guide='none' takes neither fresh guidance nor a cache state h");

  // x [B, C, ...] float32; n = x[0].numel()
  TORCH_CHECK(x.dim() >= 2, op, ": x must be batch-first with a channel dimension [B, C, ...], got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  const int64_t rows = x.size(0);
  const int64_t channels = x.size(1);
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d) n *= x.size(d);
  a.rows = rows;
  a.n = n;

  check_device(op, "model_out", model_out, x);
  a.o_dtype = storage_dtype(op, "model_out", model_out);
  a.o_row = learned_var ? 2 * n : n;
  check_rows(op, learned_var ? "model_out (learned_var=True: eps and variance channels)" : "model_out",
             model_out, rows, a.o_row, 0, x);

  check_device(op, "coef", coef, x);
  TORCH_CHECK(coef.scalar_type() == at::kFloat, op, ": coef must be float32, got ", coef.scalar_type());
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == rows && coef.size(1) == CG_NUM_COLS, op,
              ": coef must have shape [", rows, ", ", CG_NUM_COLS, "] (one table row per batch row), got ",
              coef.sizes());
  // the noise: a tensor like x, or counter-based from per-row seeds and the step index (rng.py layout)
  const bool has_noise = noise.has_value() && noise->defined();
  const bool has_seeds = seeds.has_value() && seeds->defined();
  const bool has_step = step_index.has_value() && step_index->defined();
  const bool has_prev = prev.has_value() && prev->defined();
  if (method == METHOD_DPMPP2M) {  // deterministic (reference.check_no_noise_args)
    TORCH_CHECK(!has_noise && !has_seeds && !has_step, op,
                ": dpmpp2m is deterministic: pass noise=None and no seeds / step_index");
  } else {
    TORCH_CHECK(has_noise != has_seeds, op,
                has_noise ? ": pass either noise or (seeds, step_index) for counter-based noise, not both"
                          : ": noise is None: counter-based noise needs seeds (int64 [B]) and step_index");
    TORCH_CHECK(has_seeds == has_step, op, ": seeds and step_index go together (counter-based noise)");
    TORCH_CHECK(!has_prev, op, ": prev is a state of dpmpp2m only");
  }
  if (has_noise) check_like_x(op, "noise", *noise, x);
  if (has_seeds) {
    check_device(op, "seeds", *seeds, x);
    check_device(op, "step_index", *step_index, x);
    TORCH_CHECK(seeds->scalar_type() == at::kLong, op, ": seeds must be int64, got ", seeds->scalar_type());
    TORCH_CHECK(step_index->scalar_type() == at::kLong, op, ": step_index must be int64, got ",
                step_index->scalar_type());
    TORCH_CHECK(seeds->dim() == 1 && seeds->size(0) == rows, op, ": seeds must have shape [", rows,
                "] (one per batch row), got ", seeds->sizes());
    TORCH_CHECK(step_index->numel() == 1 || step_index->numel() == rows, op,
                ": step_index must hold 1 or ", rows, " (one per row) values, got ", step_index->numel());
    TORCH_CHECK(n <= (int64_t{1} << 34), op, ": counter-based noise covers at most 2^34 elements per row, got ",
                n);
  }
  check_like_x(op, "out", out, x);
  if (method == METHOD_DPMPP2M) {  // reference.check_prev_arg
    TORCH_CHECK(has_prev, op, ": dpmpp2m needs prev: a float32 buffer shaped like x (zeros before the first step) "
                "that carries the previous step's data prediction");
    check_like_x(op, "prev", *prev, x);
  }

  StepTensors t;
  if (has_fresh) {
    const at::Tensor& f = *fresh;
    check_device(op, "fresh", f, x);
    a.f_dtype = storage_dtype(op, "fresh", f);
    // classifier: g has the shape of x; CFG: the unconditional output, with or without variance channels
    check_rows(op, a.guide == GUIDE_CFG ? "fresh (the unconditional model output)" : "fresh (the guidance)", f,
               rows, n, a.guide == GUIDE_CFG ? 2 * n : 0, x);
    t.fresh = f.contiguous();
    a.f_row = rows > 0 ? t.fresh.numel() / rows : n;
  }
  if (has_h) check_like_x(op, "h", *h, x);
  if (cfg_channels.has_value()) {
    TORCH_CHECK(*cfg_channels >= 0, op, ": cfg_channels must be >= 0 or None (all channels), got ",
                *cfg_channels);
  }
  // spec §6: with cfg_channels = k < C, element i of a row is guided iff i < k * (n / C) (CFG only; the
  // other guide kinds ignore cfg_channels, as the reference does)
  const bool restricted = a.guide == GUIDE_CFG && cfg_channels.has_value() && *cfg_channels < channels;
  a.guided_limit = restricted ? *cfg_channels * (n / channels) : n;

  t.x = x.contiguous();
  t.model_out = model_out.contiguous();
  t.coef = coef.contiguous();
  if (has_noise) t.noise = noise->contiguous();
  if (has_seeds) {
    t.seeds = seeds->contiguous();
    t.step_index = step_index->reshape({-1}).contiguous();
  }
  if (out.is_contiguous()) {
    t.out = out;
  } else {
    t.out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    t.out_user = out;
  }
  if (has_h) t.h = in_place_state(*h, t.h_user);
  if (has_prev) t.prev = in_place_state(*prev, t.prev_user);
  a.x = t.x.data_ptr<float>();
  a.model_out = t.model_out.data_ptr();
  a.coef = t.coef.data_ptr<float>();
  a.noise = has_noise ? t.noise.data_ptr<float>() : nullptr;
  a.seeds = has_seeds ? t.seeds.data_ptr<int64_t>() : nullptr;
  a.step_index = has_seeds ? t.step_index.data_ptr<int64_t>() : nullptr;
  a.step_stride = has_seeds && t.step_index.numel() > 1 ? 1 : 0;
  a.fresh = has_fresh ? t.fresh.data_ptr() : nullptr;
  a.h = has_h ? t.h.data_ptr<float>() : nullptr;
  a.out = t.out.data_ptr<float>();
  a.prev = has_prev ? t.prev.data_ptr<float>() : nullptr;
  t.args = a;
  return t;
}

}  // namespace cg_fast
