"""Test oracle: guided-diffusion's sampling semantics, written out independently and literally.

This mirrors the operation order of OpenAI guided-diffusion's ``GaussianDiffusion`` (``p_mean_variance``,
``p_sample`` + ``condition_mean``, ``ddim_sample`` + ``condition_score``, ``SpacedDiffusion``): float64 numpy
tables, looked up per step, cast to float32 and broadcast to full tensors; noise ``th.randn(*shape)`` then
one ``th.randn_like`` per step. It shares no code with cg_fast, so cg_fast's bitwise agreement with it is
evidence of the "same seed, same samples" claim. Kept deliberately naive (slow, unfused).
"""
from __future__ import annotations

import numpy as np
import torch as th
import torch.nn.functional as F


def spaced_betas(base_betas: np.ndarray, use: set[int]) -> tuple[np.ndarray, list[int]]:
    acs = np.cumprod(1.0 - base_betas)
    last, betas, tmap = 1.0, [], []
    for i, a in enumerate(acs):
        if i in use:
            betas.append(1 - a / last)
            last = a
            tmap.append(i)
    return np.array(betas), tmap


class Oracle:
    def __init__(self, betas: np.ndarray, timestep_map: list[int], *, learned: bool, fixed: str = "large",
                 mean_type: str = "eps", clip: bool = True, class_cond: bool = True):
        self.class_cond = class_cond
        self.learned, self.fixed, self.mean_type, self.clip = learned, fixed, mean_type, clip
        self.tmap = timestep_map
        b = betas.astype(np.float64)
        self.betas = b
        self.n = len(b)
        ac = np.cumprod(1.0 - b)
        acp = np.append(1.0, ac[:-1])
        self.ac, self.acp = ac, acp
        self.sqrt_recip_ac = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / ac - 1)
        self.post_var = b * (1.0 - acp) / (1.0 - ac)
        self.post_logvar = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.c1 = b * np.sqrt(acp) / (1.0 - ac)
        self.c2 = (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac)

    @staticmethod
    def ex(arr, t, shape):
        res = th.from_numpy(arr)[t].float()
        while len(res.shape) < len(shape):
            res = res[..., None]
        return res + th.zeros(shape)

    def model_call(self, model, x, t, y):
        ts = th.tensor(self.tmap, dtype=t.dtype)[t]
        return model(x, ts, y) if self.class_cond else model(x, ts)

    def p_mean_variance(self, model, x, t, y):
        B, C = x.shape[:2]
        out = self.model_call(model, x, t, y)
        if self.learned:
            out, vv = th.split(out, C, dim=1)
            min_log = self.ex(self.post_logvar, t, x.shape)
            max_log = self.ex(np.log(self.betas), t, x.shape)
            frac = (vv + 1) / 2
            logvar = frac * max_log + (1 - frac) * min_log
            var = th.exp(logvar)
        else:
            if self.fixed == "large":
                v = np.append(self.post_var[1], self.betas[1:])
                lv = np.log(v)
            else:
                v, lv = self.post_var, self.post_logvar
            var, logvar = self.ex(v, t, x.shape), self.ex(lv, t, x.shape)
        if self.mean_type == "eps":
            x0 = self.ex(self.sqrt_recip_ac, t, x.shape) * x - self.ex(self.sqrt_recipm1_ac, t, x.shape) * out
        else:
            x0 = out
        if self.clip:
            x0 = x0.clamp(-1, 1)
        mean = self.ex(self.c1, t, x.shape) * x0 + self.ex(self.c2, t, x.shape) * x
        return {"mean": mean, "variance": var, "log_variance": logvar, "pred_xstart": x0}

    def cond(self, cond_fn, x, t, y):
        return cond_fn(x, th.tensor(self.tmap, dtype=t.dtype)[t], y)

    def p_sample(self, model, x, t, y, cond_fn=None):
        out = self.p_mean_variance(model, x, t, y)
        noise = th.randn_like(x)
        nonzero = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        if cond_fn is not None:
            out["mean"] = out["mean"].float() + out["variance"] * self.cond(cond_fn, x, t, y).float()
        return out["mean"] + nonzero * th.exp(0.5 * out["log_variance"]) * noise

    def eps_from_x0(self, x, t, x0):
        return (self.ex(self.sqrt_recip_ac, t, x.shape) * x - x0) / self.ex(self.sqrt_recipm1_ac, t, x.shape)

    def ddim_sample(self, model, x, t, y, cond_fn=None, eta=0.0):
        out = self.p_mean_variance(model, x, t, y)
        if cond_fn is not None:
            ab = self.ex(self.ac, t, x.shape)
            eps = self.eps_from_x0(x, t, out["pred_xstart"])
            eps = eps - (1 - ab).sqrt() * self.cond(cond_fn, x, t, y)
            out["pred_xstart"] = (self.ex(self.sqrt_recip_ac, t, x.shape) * x
                                  - self.ex(self.sqrt_recipm1_ac, t, x.shape) * eps)
        eps = self.eps_from_x0(x, t, out["pred_xstart"])
        ab = self.ex(self.ac, t, x.shape)
        abp = self.ex(self.acp, t, x.shape)
        sigma = eta * th.sqrt((1 - abp) / (1 - ab)) * th.sqrt(1 - ab / abp)
        noise = th.randn_like(x)
        mean = out["pred_xstart"] * th.sqrt(abp) + th.sqrt(1 - abp - sigma ** 2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        return mean + nonzero * sigma * noise

    def loop(self, model, shape, y=None, cond_fn=None, method="ddpm", eta=0.0, noise=None):
        x = noise if noise is not None else th.randn(*shape)
        for i in range(self.n)[::-1]:
            t = th.tensor([i] * shape[0])
            with th.no_grad():
                if method == "ddpm":
                    x = self.p_sample(model, x, t, y, cond_fn)
                else:
                    x = self.ddim_sample(model, x, t, y, cond_fn, eta)
        return x


def make_cond_fn(classifier, scale):
    """classifier_sample.py's cond_fn: grad of the selected log-probabilities, times the scale."""
    def cond_fn(x, t, y):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale
    return cond_fn
