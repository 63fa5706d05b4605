"""Shared fixtures: tiny deterministic denoisers and classifiers that follow cg_fast's protocols."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU through the interpreter

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))  # the test oracle module


class TinyEps(nn.Module):
    """A small conv denoiser ``model(x, t, y=None)``: output C or 2C channels (learned variance)."""

    def __init__(self, channels: int = 3, learn_sigma: bool = False, num_classes: int = 10, width: int = 8):
        super().__init__()
        out = channels * (2 if learn_sigma else 1)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, out, 3, padding=1)
        self.t_emb = nn.Linear(1, width)
        self.y_emb = nn.Embedding(num_classes + 1, width)
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.channels = channels

    def forward(self, x, t, y=None):
        h = self.conv1(x) + self.t_emb(t.float()[:, None] / 1000.0)[:, :, None, None]
        if y is not None:
            h = h + self.y_emb(y)[:, :, None, None]
        o = self.conv2(torch.tanh(h))
        if self.learn_sigma:  # keep the variance channels in [-1, 1] as ADM's learned range expects
            return torch.cat([o[:, : self.channels], torch.tanh(o[:, self.channels:])], dim=1)
        return o


class TinyClassifier(nn.Module):
    """``classifier(x, t) -> logits [B, K]``."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.t_emb = nn.Linear(1, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x, t):
        h = torch.tanh(self.conv(x) + self.t_emb(t.float()[:, None] / 1000.0)[:, :, None, None])
        return self.head(h.mean(dim=(2, 3)))


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
