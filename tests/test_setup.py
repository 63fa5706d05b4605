"""setup.py: an nvcc of another CUDA major version leaves out only the CUDA extension, and says so.

The version logic is tested with stand-in nvcc scripts and a patched ``torch.version.cuda``; nothing is
compiled and no other toolkit is installed.
"""
from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_mod():
    spec = importlib.util.spec_from_file_location("cg_fast_setup_script", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not __main__: defines the helpers, runs no setup()
    return mod


def _fake_toolkit(tmp_path: Path, release: str) -> Path:
    """A CUDA_HOME whose bin/nvcc prints what a real one prints for ``release``."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    f"echo 'Cuda compilation tools, release {release}, V{release}.99'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return tmp_path


@pytest.mark.parametrize("torch_cuda, nvcc, ok", [
    ("12.8", "12.4", True),      # another minor version: torch only warns
    ("12.8", "12.8", True),
    ("12.8", "13.0", False),     # another major version: torch's check would raise
    ("13.0", "12.9", False),
    (None, "12.4", False),       # a CPU torch
    ("12.8", None, False),       # nvcc --version unreadable
])
def test_cuda_mismatch(setup_mod, torch_cuda, nvcc, ok):
    why = setup_mod.cuda_mismatch(torch_cuda, nvcc)
    assert (why is None) is ok
    if torch_cuda and nvcc and not ok:
        assert nvcc in why and torch_cuda in why and "major" in why


def test_nvcc_release(setup_mod, tmp_path):
    home = _fake_toolkit(tmp_path, "12.4")
    assert setup_mod.nvcc_release(str(home / "bin" / "nvcc")) == "12.4"
    assert setup_mod.nvcc_release(str(tmp_path / "missing" / "nvcc")) is None


@pytest.mark.parametrize("release, with_cuda", [("13.0", False), ("12.2", True)])
def test_extensions_leave_out_only_the_cuda_one(setup_mod, tmp_path, monkeypatch, capsys, release, with_cuda):
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(_fake_toolkit(tmp_path, release)))
    for var in ("CG_FAST_NO_CSRC", "CG_FAST_NO_CUDA", "CG_FAST_REQUIRE_CSRC", "CG_FAST_NO_RUNNER"):
        monkeypatch.delenv(var, raising=False)
    exts, cmdclass = setup_mod._extensions()
    names = [e.name for e in exts]
    cpu = ["cg_fast._C", "cg_fast._runner"]
    assert names == (cpu + ["cg_fast._C_cuda"] if with_cuda else cpu)
    if not with_cuda:
        err = capsys.readouterr().err
        assert "CUDA 13.0" in err and "CUDA 12.8" in err and "CPU operators only" in err
    assert "build_ext" in cmdclass


def test_a_failed_toolchain_check_still_builds_the_cpu_extension(setup_mod, tmp_path, monkeypatch, capsys):
    """Should torch's own check fail anyway (e.g. a host compiler too new for nvcc), the CPU extension is built."""
    from setuptools import Distribution
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(_fake_toolkit(tmp_path, "12.8")))
    for var in ("CG_FAST_NO_CSRC", "CG_FAST_NO_CUDA", "CG_FAST_REQUIRE_CSRC", "CG_FAST_NO_RUNNER"):
        monkeypatch.delenv(var, raising=False)  # CI sets REQUIRE for its own build
    exts, cmdclass = setup_mod._extensions()
    built = []
    _fail_the_cuda_toolchain_check(monkeypatch, cpp_extension, built)
    cmd = cmdclass["build_ext"](Distribution())
    cmd.extensions = exts
    cmd.build_extensions()
    assert built == ["cg_fast._C", "cg_fast._runner"]
    assert "leaving out the CUDA operators" in capsys.readouterr().err


def test_a_failed_toolchain_check_is_an_error_when_csrc_is_required(setup_mod, tmp_path, monkeypatch):
    """CG_FAST_REQUIRE_CSRC=1 promises every extension configured here, so a failed check must not pass quietly."""
    from setuptools import Distribution
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(_fake_toolkit(tmp_path, "12.8")))
    monkeypatch.delenv("CG_FAST_NO_CSRC", raising=False)
    monkeypatch.delenv("CG_FAST_NO_CUDA", raising=False)
    monkeypatch.setenv("CG_FAST_REQUIRE_CSRC", "1")
    exts, cmdclass = setup_mod._extensions()
    built = []
    _fail_the_cuda_toolchain_check(monkeypatch, cpp_extension, built)
    cmd = cmdclass["build_ext"](Distribution())
    cmd.extensions = exts
    with pytest.raises(RuntimeError, match="g\\+\\+"):
        cmd.build_extensions()
    assert built == []


def _fail_the_cuda_toolchain_check(monkeypatch, cpp_extension, built: list) -> None:
    """Stand in for torch's BuildExtension: its compiler check fails while the CUDA extension is configured."""

    def fake_build(self):
        if any(e.name == "cg_fast._C_cuda" for e in self.extensions):
            raise RuntimeError("The current installed version of g++ is greater than the maximum required version")
        built.extend(e.name for e in self.extensions)

    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extensions", fake_build)


def test_the_runner_is_optional_even_when_csrc_is_required(setup_mod, monkeypatch, capsys):
    """CG_FAST_REQUIRE_CSRC=1 covers cg_fast._C; the C++ runner stays optional (its failed build is reported and
    skipped) unless CG_FAST_REQUIRE_RUNNER=1; CG_FAST_NO_RUNNER=1 leaves it out."""
    from setuptools import Distribution
    from torch.utils import cpp_extension

    monkeypatch.setenv("CG_FAST_NO_CUDA", "1")
    monkeypatch.setenv("CG_FAST_REQUIRE_CSRC", "1")
    for var in ("CG_FAST_NO_CSRC", "CG_FAST_REQUIRE_RUNNER", "CG_FAST_NO_RUNNER"):
        monkeypatch.delenv(var, raising=False)
    exts, cmdclass = setup_mod._extensions()
    assert {e.name: e.optional for e in exts} == {"cg_fast._C": False, "cg_fast._runner": True}
    built = []

    def fake_build_extension(self, ext):
        if ext.name == "cg_fast._runner":
            raise RuntimeError("model_package_loader.h: No such file or directory")
        built.append(ext.name)

    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extension", fake_build_extension)
    cmd = cmdclass["build_ext"](Distribution())
    cmd.build_extension(exts[0])
    cmd.build_extension(exts[1])
    assert built == ["cg_fast._C"] and "building cg_fast._runner failed" in capsys.readouterr().err
    monkeypatch.setenv("CG_FAST_REQUIRE_RUNNER", "1")
    assert {e.name: e.optional for e in setup_mod._extensions()[0]}["cg_fast._runner"] is False
    monkeypatch.setenv("CG_FAST_NO_RUNNER", "1")
    assert [e.name for e in setup_mod._extensions()[0]] == ["cg_fast._C"]
