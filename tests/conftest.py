"""Shared fixtures: tiny deterministic denoisers and classifiers that follow cg_fast's protocols."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU through the interpreter

import pytest
import torch

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
