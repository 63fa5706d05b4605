"""Small conv denoisers and classifiers following cg_fast's protocols (tests, benchmarks, examples).

Random weights: they make no sense as images, but their cost profile (a conv net forward for the
denoiser, forward + backward to the input for the classifier) is that of the real thing in miniature.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["TinyConvEps", "TinyConvClassifier"]


class TinyConvEps(nn.Module):
    """``model(x, t, y=None)``: ``depth`` conv layers of ``width`` channels; C or 2C outputs (learn_sigma)."""

    def __init__(self, channels: int = 3, learn_sigma: bool = False, num_classes: int = 10, width: int = 8,
                 depth: int = 2):
        super().__init__()
        out = channels * (2 if learn_sigma else 1)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth - 2))
        self.outp = nn.Conv2d(width, out, 3, padding=1)
        self.t_emb = nn.Linear(1, width)
        self.y_emb = nn.Embedding(num_classes + 1, width)  # + 1: the CFG null label = num_classes
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.channels = channels

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.inp(x) + self.t_emb(t.float()[:, None] / 1000.0)[:, :, None, None]
        if y is not None:
            h = h + self.y_emb(y)[:, :, None, None]
        h = torch.tanh(h)
        for conv in self.mid:
            h = torch.tanh(conv(h)) + h
        o = self.outp(h)
        if self.learn_sigma:  # variance channels in [-1, 1], as ADM's learned range expects
            return torch.cat([o[:, : self.channels], torch.tanh(o[:, self.channels:])], dim=1)
        return o


class TinyConvClassifier(nn.Module):
    """``classifier(x, t) -> logits [B, num_classes]``: ``depth`` conv layers, mean pool, linear head."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 8, depth: int = 1):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth - 1))
        self.t_emb = nn.Linear(1, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x) + self.t_emb(t.float()[:, None] / 1000.0)[:, :, None, None])
        for conv in self.mid:
            h = torch.tanh(conv(h)) + h
        return self.head(h.mean(dim=(2, 3)))
