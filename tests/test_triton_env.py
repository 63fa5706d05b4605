"""TRITON_INTERPRET defaults to 1 only without CUDA (tests/conftest.py, benchmarks/conftest.py)."""
from __future__ import annotations

import os

from cg_fast.kernels.triton_env import default_interpret


def test_interpreter_only_without_cuda():
    env: dict[str, str] = {}
    assert default_interpret(env, cuda=True) is False and "TRITON_INTERPRET" not in env  # compiled on a GPU
    assert default_interpret(env, cuda=False) is True and env["TRITON_INTERPRET"] == "1"


def test_a_value_set_by_hand_is_kept():
    env = {"TRITON_INTERPRET": "1"}
    assert default_interpret(env, cuda=True) is True and env["TRITON_INTERPRET"] == "1"
    env = {"TRITON_INTERPRET": "0"}
    assert default_interpret(env, cuda=False) is False and env["TRITON_INTERPRET"] == "0"


def test_the_conftest_chose_before_triton_was_imported():
    import pytest
    import torch
    pytest.importorskip("triton")
    from cg_fast.kernels import triton_step
    assert triton_step._INTERPRETED is (os.environ.get("TRITON_INTERPRET", "0") == "1")
    if not torch.cuda.is_available():
        assert triton_step._INTERPRETED  # no CUDA: interpreted by default
