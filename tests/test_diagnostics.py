"""Per-step diagnostics (cg_fast.eval.diagnostics), the sampler's guidance callback, and PNG grids."""
from __future__ import annotations

import struct
import zlib

import pytest
import torch

from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.eval import ClassifierProbe, Diagnostics, GuidanceTrace, make_grid, save_grid
from cg_fast.guidance import Compress, Full, classifier_log_prob
from cg_fast.testbeds.gmm import GaussianMixture

SCHED = NoiseSchedule.linear(1000)
GMM = GaussianMixture.random(4, 6, std=0.3, seed=1)


def test_guidance_trace_cosines_by_hand():
    tr = GuidanceTrace()
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    tr({"j": 0, "guidance": g})
    tr({"j": 1, "guidance": None})             # a skipped step: nothing recorded
    tr({"j": 2, "guidance": 3 * g})             # same direction: cos 1
    tr({"j": 3, "guidance": torch.tensor([[0.0, 1.0], [0.0, -1.0]])})  # row 0 orthogonal, row 1 opposite
    assert tr.cosine == pytest.approx({2: 1.0, 3: -0.5})
    assert tr.norm == pytest.approx({0: 1.5, 2: 4.5, 3: 1.0})


def test_callback_guidance_is_the_fresh_classifier_gradient():
    """At j = 0 the state is the given noise, so the fresh guidance must equal the classifier's gradient there."""
    clf = GMM.classifier(SCHED)
    sampler = Sampler(GMM.eps_model(SCHED), SCHED, "20", class_cond=False, clip_denoised=False)
    y = torch.arange(8) % 4
    noise = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    guid = ClassifierGuidance(clf, 1.0, policy=Compress(rate=5, k=1), cache="compress")
    seen = {}
    sampler.sample((8, 6), y=y, guidance=guid, noise=noise, callback=lambda i: seen.__setitem__(i["j"], i["guidance"]))
    t0 = torch.full((8,), int(sampler.schedule.original_timesteps_in_sampling_order()[0]))
    g0, _ = guid.gradient(noise, t0, y)
    torch.testing.assert_close(seen[0], g0)
    mask = guid.policy.mask(20)
    assert [j for j, g in seen.items() if g is not None] == [j for j, m in enumerate(mask) if m]


def test_callback_guidance_is_the_cfg_direction(tiny_eps):
    sampler = Sampler(tiny_eps, SCHED, "10", clip_denoised=False)
    y = torch.arange(4) % 10
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = {}
    sampler.sample((4, 3, 8, 8), y=y, guidance=CFG(3.0, null_label=10, policy=Full()), noise=noise,
                   callback=lambda i: seen.__setitem__(i["j"], i["guidance"]))
    t0 = torch.full((4,), int(sampler.schedule.original_timesteps_in_sampling_order()[0]))
    with torch.no_grad():
        want = tiny_eps(noise, t0, y) - tiny_eps(noise, t0, torch.full_like(y, 10))
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-6)
    assert all(seen[j] is not None for j in range(10))


def test_probe_records_every_step_and_final_at_t0():
    clf = GMM.classifier(SCHED)
    sampler = Sampler(GMM.eps_model(SCHED), SCHED, "25", class_cond=False, clip_denoised=False)
    y = torch.arange(40) % 4
    diag = Diagnostics(sampler, y, probes={"exact": clf})
    out = sampler.sample((40, 6), y=y, guidance=ClassifierGuidance(clf, 1.0, policy=Full(), cache="drop"),
                         callback=diag, generator=torch.Generator().manual_seed(0))
    c = diag.curves()
    assert c["j"] == list(range(1, 26))
    final = classifier_log_prob(clf, out.x, torch.zeros(40, dtype=torch.long), y)
    assert c["exact_loss"][-1] == pytest.approx(final.loss)
    assert c["exact_acc"][-1] == pytest.approx(final.accuracy)
    # guidance makes the exact classifier more and more sure of y: the loss falls from near log K
    assert c["exact_loss"][0] > 1.0 > 0.5 > c["exact_loss"][-1]
    assert len(c["cosine"]) == 24 and diag.mean_cosine() is not None
    assert out.stats.classifier_grads == 25  # the probe's forward passes are not counted


def test_probe_does_not_change_samples():
    clf = GMM.classifier(SCHED)
    sampler = Sampler(GMM.eps_model(SCHED), SCHED, "10", class_cond=False, clip_denoised=False)
    y = torch.arange(12) % 4
    guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=3, k=1), cache="compress")
    plain = sampler.sample((12, 6), y=y, guidance=guid, generator=torch.Generator().manual_seed(3))
    probed = sampler.sample((12, 6), y=y, guidance=guid, generator=torch.Generator().manual_seed(3),
                            callback=ClassifierProbe({"c": clf}, y, sampler.schedule.original_timesteps_in_sampling_order()))
    assert torch.equal(plain.x, probed.x)


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = w * (3 if colour == 2 else 1)
    rows = [raw[i * (stride + 1) + 1:(i + 1) * (stride + 1)] for i in range(h)]
    return w, h, colour, torch.tensor([list(r) for r in rows], dtype=torch.uint8)


def test_grid_png_round_trip(tmp_path):
    x = torch.linspace(-1, 1, 3 * 2 * 2).reshape(3, 1, 2, 2)
    path = save_grid(x, tmp_path / "g.png", nrow=2, scale=1, pad=1)
    w, h, colour, px = _read_png(path)
    assert (w, h, colour) == (2 * 3 + 1, 2 * 3 + 1, 0)
    grid = make_grid(x, nrow=2, pad=1)
    want = ((grid[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(px, want)
    assert int(px[1, 1]) == 0 and int(px[0, 0]) == 255  # -1 is black, the padding white


def test_grid_errors(tmp_path):
    with pytest.raises(ValueError, match="1 or 3"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match="n, C, H, W"):
        make_grid(torch.zeros(4, 4))
