// Schemas of the cg_fast operators (the one TORCH_LIBRARY(cg_fast, ...) block of the project), and the
// Python module `cg_fast._C` that carries them.
//
// Implementations: csrc/cpu/step.cpp (CPU), csrc/cuda/step_cuda.cpp + step.cu (CUDA, separate module
// cg_fast._C_cuda). Fake (meta) implementations, used by torch.compile / FakeTensor tracing, are registered
// from Python in cg_fast/kernels/csrc_ops.py, next to the typed wrappers.
//
// The ops write x_{t-1} into `out` (which may alias x) and update the cache state `h` in place (spec §4);
// they return nothing, so that their only effects are the declared mutations `Tensor(a!)` / `Tensor(b!)?`
// (dpmpp2m_step also `Tensor(c!) prev`, its carried data prediction), which torch.compile functionalises and
// CUDA graphs capture (no allocation, no host sync in the kernels).
// Noise (ddpm_step / ddim_step; dpmpp2m_step is deterministic): `noise` (like x), or None with `seeds` (int64
// [B], uint64 bits) and `step_index` (int64, 1 or B values): counter-based z computed in the kernel (layout:
// cg_fast/kernels/rng.py; csrc/philox.h).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(cg_fast, m) {
  // One DDPM ancestral step, ADM p_sample + condition_mean (spec §5), with the CFG combine (spec §6) and the
  // cache update (spec §4) fused in; semantics of cg_fast.kernels.reference.ddpm_step_ref.
  m.def(
      "ddpm_step(Tensor x, Tensor model_out, Tensor coef, Tensor? noise, Tensor(a!) out, *, str guide=\"none\", "
      "Tensor? fresh=None, Tensor(b!)? h=None, str prediction=\"eps\", bool learned_var=False, bool clip=True, "
      "int? cfg_channels=None, Tensor? seeds=None, Tensor? step_index=None) -> ()");
  // One DDIM step (eta >= 0), ADM ddim_sample + condition_score (spec §5); semantics of ddim_step_ref.
  m.def(
      "ddim_step(Tensor x, Tensor model_out, Tensor coef, Tensor? noise, Tensor(a!) out, *, str guide=\"none\", "
      "Tensor? fresh=None, Tensor(b!)? h=None, str prediction=\"eps\", bool learned_var=False, bool clip=True, "
      "int? cfg_channels=None, Tensor? seeds=None, Tensor? step_index=None) -> ()");
  // One DPM-Solver++ 2M step (data prediction, multistep; spec §5 "DPM-Solver++"), guidance as DDIM; reads the
  // previous step's data prediction `prev` and overwrites it with this step's. Deterministic: no noise.
  // Semantics of dpmpp2m_step_ref.
  m.def(
      "dpmpp2m_step(Tensor x, Tensor model_out, Tensor coef, Tensor(c!) prev, Tensor(a!) out, *, "
      "str guide=\"none\", Tensor? fresh=None, Tensor(b!)? h=None, str prediction=\"eps\", bool learned_var=False, "
      "bool clip=True, int? cfg_channels=None) -> ()");
}

// `import cg_fast._C` loads this shared library, which runs the static registrations above and in
// csrc/cpu/step.cpp; the module itself is empty (the ops are reached as torch.ops.cg_fast.*).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cg_fast operators (torch.ops.cg_fast.*)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
