// CUDA implementations of cg_fast::ddpm_step / ddim_step / dpmpp2m_step: validate, then enqueue the kernel of
// csrc/cuda/step.cu on the current stream. Built (as the module cg_fast._C_cuda) only where torch has CUDA and
// nvcc exists; the schemas are in csrc/ops.cpp (module cg_fast._C, imported first).
//
// CUDA graphs: no allocation (unless a non-contiguous input needs a contiguous copy) and no host sync.
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>

#include "../step_args.h"
#include "../step_check.h"

namespace cg_fast {
namespace {

void run_step_cuda(const char* op, StepTensors& t) {
  const c10::cuda::CUDAGuard guard(t.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int err = launch_step(t.args, stream);
  TORCH_CHECK(err == 0, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  t.finish();
}

void ddpm_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                    const std::optional<at::Tensor>& noise, const at::Tensor& out, c10::string_view guide,
                    const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                    c10::string_view prediction, bool learned_var, bool clip, std::optional<int64_t> cfg_channels,
                    const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_index) {
  StepTensors t = prepare_step("cg_fast::ddpm_step", METHOD_DDPM, x, model_out, coef, noise, out, guide, fresh,
                               h, prediction, learned_var, clip, cfg_channels, seeds, step_index);
  run_step_cuda("cg_fast::ddpm_step", t);
}

void ddim_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                    const std::optional<at::Tensor>& noise, const at::Tensor& out, c10::string_view guide,
                    const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                    c10::string_view prediction, bool learned_var, bool clip, std::optional<int64_t> cfg_channels,
                    const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_index) {
  StepTensors t = prepare_step("cg_fast::ddim_step", METHOD_DDIM, x, model_out, coef, noise, out, guide, fresh,
                               h, prediction, learned_var, clip, cfg_channels, seeds, step_index);
  run_step_cuda("cg_fast::ddim_step", t);
}

void dpmpp2m_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                       const at::Tensor& prev, const at::Tensor& out, c10::string_view guide,
                       const std::optional<at::Tensor>& fresh, const std::optional<at::Tensor>& h,
                       c10::string_view prediction, bool learned_var, bool clip,
                       std::optional<int64_t> cfg_channels) {
  StepTensors t = prepare_step("cg_fast::dpmpp2m_step", METHOD_DPMPP2M, x, model_out, coef, std::nullopt, out,
                               guide, fresh, h, prediction, learned_var, clip, cfg_channels, std::nullopt,
                               std::nullopt, prev);
  run_step_cuda("cg_fast::dpmpp2m_step", t);
}

}  // namespace
}  // namespace cg_fast

TORCH_LIBRARY_IMPL(cg_fast, CUDA, m) {
  m.impl("ddpm_step", &cg_fast::ddpm_step_cuda);
  m.impl("ddim_step", &cg_fast::ddim_step_cuda);
  m.impl("dpmpp2m_step", &cg_fast::dpmpp2m_step_cuda);
}

// `import cg_fast._C_cuda` runs the registration above; the module is empty.
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "CUDA kernels of torch.ops.cg_fast.*", -1,
                               nullptr};
  return PyModule_Create(&module);
}
