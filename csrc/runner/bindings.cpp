// Python bindings of the C++ runner (csrc/runner/runner.h): module cg_fast._runner, class Runner. The Python
// side that builds its inputs from a Sampler is cg_fast/runner.py (CppRunner).
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <map>

#include "runner.h"

namespace py = pybind11;
using cg_fast::runner::Config;
using cg_fast::runner::Runner;

PYBIND11_MODULE(_runner, m) {
  m.doc() = "cg_fast C++ sampling loop over AOTInductor packages (see cg_fast.runner)";
  py::class_<Runner>(m, "Runner")
      .def(py::init([](const std::map<int64_t, std::string>& denoisers, const std::string& classifier_grad,
                       const std::string& method, const std::string& guide, const std::string& prediction,
                       bool learned_var, bool clip, bool class_cond, bool stateful, bool cfg_batched,
                       std::optional<int64_t> cfg_channels, int64_t null_label) {
             Config c;
             c.method = method;
             c.guide = guide;
             c.prediction = prediction;
             c.learned_var = learned_var;
             c.clip = clip;
             c.class_cond = class_cond;
             c.stateful = stateful;
             c.cfg_batched = cfg_batched;
             c.cfg_channels = cfg_channels;
             c.null_label = null_label;
             return std::make_unique<Runner>(denoisers, classifier_grad, c);
           }),
           py::arg("denoisers"), py::arg("classifier_grad") = "", py::kw_only(), py::arg("method") = "ddpm",
           py::arg("guide") = "none", py::arg("prediction") = "eps", py::arg("learned_var") = false,
           py::arg("clip") = true, py::arg("class_cond") = true, py::arg("stateful") = false,
           py::arg("cfg_batched") = true, py::arg("cfg_channels") = py::none(), py::arg("null_label") = -1)
      .def(
          "sample",
          [](Runner& r, const at::Tensor& table, const at::Tensor& timesteps, const at::Tensor& guided,
             const at::Tensor& seeds, const std::optional<at::Tensor>& y, const std::vector<int64_t>& shape) {
            py::gil_scoped_release release;  // the loop touches no Python object
            return r.sample(table, timesteps, guided, seeds, y, shape);
          },
          py::arg("table"), py::arg("timesteps"), py::arg("guided"), py::arg("seeds"), py::arg("y"),
          py::arg("shape"))
      .def_property_readonly("denoiser_passes", &Runner::denoiser_passes)
      .def_property_readonly("method", [](const Runner& r) { return r.config().method; })
      .def_property_readonly("classifier_grads", &Runner::classifier_grads);
  m.def(
      "load_plan",
      [](const std::string& path) {
        const cg_fast::runner::Plan p = cg_fast::runner::load_plan(path);
        py::dict config;
        config["method"] = p.config.method;
        config["guide"] = p.config.guide;
        config["prediction"] = p.config.prediction;
        config["learned_var"] = p.config.learned_var;
        config["clip"] = p.config.clip;
        config["class_cond"] = p.config.class_cond;
        config["stateful"] = p.config.stateful;
        config["cfg_batched"] = p.config.cfg_batched;
        config["cfg_channels"] = p.config.cfg_channels.has_value() ? py::cast(*p.config.cfg_channels) : py::none();
        config["null_label"] = p.config.null_label;
        return py::make_tuple(config, p.table, p.timesteps, p.guided);
      },
      py::arg("path"), "The plan file as the C++ side reads it: (config, table, timesteps, guided).");
}
