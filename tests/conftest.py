"""Shared fixtures: tiny deterministic denoisers and classifiers that follow cg_fast's protocols."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch


def _default_triton_interpret() -> None:
    """TRITON_INTERPRET=1 only where no CUDA device exists (cg_fast/kernels/triton_env.py). Loaded from its
    file, not through the cg_fast package, so that it runs before anything the package imports pulls triton in."""
    path = Path(__file__).resolve().parents[1] / "cg_fast" / "kernels" / "triton_env.py"
    spec = importlib.util.spec_from_file_location("_cg_fast_triton_env", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.default_interpret()


_default_triton_interpret()
# engine caches (ONNX exports, TensorRT plans) of a test session go to a fresh folder, never the user's ~/.cache
os.environ.setdefault("CG_FAST_CACHE", tempfile.mkdtemp(prefix="cg_fast_test_cache_"))
sys.path.insert(0, str(Path(__file__).parent))  # the test oracle module

from cg_fast.testbeds.tiny import TinyConvClassifier, TinyConvEps  # noqa: E402


TinyEps = TinyConvEps            # small conv denoiser, model(x, t, y=None)
TinyClassifier = TinyConvClassifier  # classifier(x, t) -> logits [B, 10]


def make_tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return TinyEps(**kw).eval()


@pytest.fixture
def tiny_eps():
    return make_tiny(0)


@pytest.fixture
def tiny_eps_learned():
    return make_tiny(1, learn_sigma=True)


@pytest.fixture
def tiny_classifier():
    torch.manual_seed(2)
    return TinyClassifier().eval()
