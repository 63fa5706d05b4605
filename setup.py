"""Build script: the pure-Python package cg_fast, plus the C++/CUDA step operators of csrc/ where possible.

Metadata lives in pyproject.toml; this file only adds the compiled extensions:

    cg_fast._C       csrc/ops.cpp (schemas, TORCH_LIBRARY) + csrc/cpu/step.cpp (CPU kernels, OpenMP)
    cg_fast._C_cuda  csrc/cuda/step_cuda.cpp + csrc/cuda/step.cu (CUDA kernels); only with a CUDA build of
                     torch and an nvcc of the same CUDA major version (CUDA_HOME); otherwise it is left
                     out, saying why, and the CPU extension is still built
    cg_fast._runner  csrc/runner/ (the C++ sampling loop over AOTInductor packages, its bindings) + its own
                     copy of csrc/cpu/step.cpp (step_kernels.cpp: called directly, no registration). Always
                     optional: a failed build leaves it out saying why, even with CG_FAST_REQUIRE_CSRC=1 (which
                     covers cg_fast._C), so the C++ runner can never cost the step operators;
                     CG_FAST_REQUIRE_RUNNER=1 makes its failure an error too

They are compiled against the torch that is installed, so build with ``pip install --no-build-isolation``
(``make install`` does). torch is deliberately not a build requirement: an isolated build would download
another (multi-GB) torch. When torch cannot be imported here, or a compile fails, the package is built
without the extension and says why; at run time cg_fast then uses the PyTorch reference step kernels (one
warning, same results). Environment variables:

    CG_FAST_NO_CSRC=1       build no extension
    CG_FAST_NO_CUDA=1       skip the CUDA extension even where it could be built
    CG_FAST_REQUIRE_CSRC=1  make a failed extension build an error (and the csrc tests fail, not skip)
    CG_FAST_NO_RUNNER=1     skip the C++ runner (cg_fast._runner)
    CG_FAST_REQUIRE_RUNNER=1  make a failed C++ runner build an error (and its tests fail, not skip)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# Bitwise agreement with the PyTorch reference needs IEEE float32 evaluation in source order: no FMA
# contraction (GCC contracts a * b + c by default), no -ffast-math. -O3 + OpenMP simd vectorise the loops.
# -fvisibility=hidden: only PyInit_* is exported, inline helpers are never called through the PLT.
# -fno-math-errno: sqrt (counter-based noise) inlined as the IEEE instruction and vectorised; no value changes.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fno-math-errno", "-fopenmp",
             "-fvisibility=hidden", "-Wall", "-Wno-psabi"]
NVCC_FLAGS = ["-O3", "--fmad=false"]  # no FMA contraction on the GPU either (CUDA kernels, csrc/cuda/step.cu)
LINK_FLAGS = ["-fopenmp"]


def _say(msg: str) -> None:
    print(f"cg_fast setup: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def nvcc_release(nvcc: str) -> str | None:
    """The CUDA release of ``nvcc`` ("12.4"), from ``nvcc --version``; None when it cannot be run or read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def cuda_mismatch(torch_cuda: str | None, nvcc: str | None) -> str | None:
    """Why the CUDA extension cannot be built with this nvcc for this torch, or None when it can.

    torch's BuildExtension refuses an nvcc whose CUDA major version differs from the one torch was built with
    (a RuntimeError raised before any extension is compiled, which would cost the CPU operators too), so
    the versions are compared first and only the CUDA extension is left out. Another minor version is fine.
    """
    if torch_cuda is None:
        return "torch has no CUDA"
    if nvcc is None:
        return "the CUDA version of nvcc could not be read (nvcc --version)"
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"nvcc is CUDA {nvcc} but torch was built with CUDA {torch_cuda}: the major versions must match "
                "(point CUDA_HOME at a matching toolkit)")
    return None


def _extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(): empty when the extension cannot be built here."""
    if _flag("CG_FAST_NO_CSRC"):
        _say("CG_FAST_NO_CSRC is set: building without the csrc operators")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        if _flag("CG_FAST_REQUIRE_CSRC"):
            raise
        _say(f"torch is not importable at build time ({err}), e.g. in an isolated build: building the pure-Python "
             "package without the csrc operators (cg_fast will use the PyTorch reference step kernels). To build "
             "them, install torch first and then: pip install --no-build-isolation -e .")
        return [], {}

    optional = not _flag("CG_FAST_REQUIRE_CSRC")
    exts = [
        CppExtension(
            "cg_fast._C",
            ["csrc/ops.cpp", "csrc/cpu/step.cpp"],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS,
            optional=optional,
        )
    ]
    if _flag("CG_FAST_NO_RUNNER"):
        _say("CG_FAST_NO_RUNNER is set: building without the C++ runner (cg_fast._runner)")
    else:
        exts.append(
            CppExtension(
                "cg_fast._runner",
                # step_kernels.cpp: its own copy of csrc/cpu/step.cpp, registering no operator (cg_fast._C does)
                ["csrc/runner/runner.cpp", "csrc/runner/bindings.cpp", "csrc/runner/step_kernels.cpp"],
                extra_compile_args={"cxx": CXX_FLAGS},
                extra_link_args=LINK_FLAGS,
                optional=not _flag("CG_FAST_REQUIRE_RUNNER"),
            )
        )
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if _flag("CG_FAST_NO_CUDA"):
        _say("CG_FAST_NO_CUDA is set: building the CPU operators only")
    elif torch.version.cuda is None:
        _say(f"torch {torch.__version__} has no CUDA: building the CPU operators only")
    elif not nvcc or not (os.path.exists(nvcc) or shutil.which("nvcc")):
        _say("nvcc not found (set CUDA_HOME): building the CPU operators only")
    elif (why := cuda_mismatch(torch.version.cuda, nvcc_release(nvcc if os.path.exists(nvcc) else "nvcc"))):
        _say(f"not building the CUDA operators: {why}. Building the CPU operators only (on CUDA tensors cg_fast "
             "uses the Triton step kernels).")
    else:
        exts.append(
            CUDAExtension(
                "cg_fast._C_cuda",
                ["csrc/cuda/step_cuda.cpp", "csrc/cuda/step.cu"],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
                extra_link_args=LINK_FLAGS,
                optional=optional,
            )
        )

    class BuildCsrc(BuildExtension):
        """torch's BuildExtension, saying which extension failed and what cg_fast does without it."""

        def build_extensions(self):
            try:  # torch checks the compiler (ABI, version) here, before building any extension
                super().build_extensions()
            except Exception as err:
                if not all(ext.optional for ext in self.extensions):
                    raise
                cuda = [ext for ext in self.extensions if ext.name == "cg_fast._C_cuda"]
                if cuda and len(cuda) < len(self.extensions):  # torch's checks of the CUDA toolchain failed
                    _say(f"torch's CUDA toolchain check failed ({type(err).__name__}: {err}); leaving out the CUDA "
                         "operators and building the CPU operators only.")
                    self.extensions = [ext for ext in self.extensions if ext not in cuda]
                    return self.build_extensions()
                _say(f"cannot build the csrc operators ({type(err).__name__}: {err}); continuing without them: "
                     "cg_fast falls back to the PyTorch reference step kernels. Set CG_FAST_REQUIRE_CSRC=1 to make "
                     "this an error.")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # compile / link errors of an optional extension
                if not ext.optional:
                    raise
                if ext.name == "cg_fast._runner":
                    _say(f"building cg_fast._runner failed ({type(err).__name__}: {err}); continuing without the C++ "
                         "runner (cg_fast.runner.CppRunner says so when used; everything else works). Set "
                         "CG_FAST_REQUIRE_RUNNER=1 to make this an error, CG_FAST_NO_RUNNER=1 to skip it.")
                    return
                _say(f"building {ext.name} failed ({type(err).__name__}: {err}); continuing without it: cg_fast "
                     "falls back to the PyTorch reference step kernels. Set CG_FAST_REQUIRE_CSRC=1 to make this "
                     "an error.")

    return exts, {"build_ext": BuildCsrc}


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
