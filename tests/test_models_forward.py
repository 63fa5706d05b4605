"""Forward-pass properties: the denoiser/classifier protocols, capture safety (no host tensors, no syncs, no
graph breaks), reduced precision, channels-last, and input validation."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cg_fast.models as M
from cg_fast.models.testing import example_inputs, randomize_

# torch.compile's own internals warn about torch.jit deprecations; not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")

TINY = ["adm-tiny-cond", "adm-tiny-uncond", "adm-tiny-classifier", "dit-tiny"]


def tiny(name: str, **kw) -> torch.nn.Module:
    return randomize_(M.create(name, **kw), seed=0)


class HostTensorRecorder(TorchDispatchMode):
    """Records every op whose outputs are not on the meta device, and every device-to-host read."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.violations.append(f"{func} (host sync)")
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.device.type != "meta":
                self.violations.append(f"{func} -> {o.device} tensor")
        return out


def run_on_meta(model, inputs):
    with torch.no_grad(), HostTensorRecorder() as rec:
        out = model(*inputs)
    return out, rec.violations


def test_host_tensor_recorder_catches_reference_style_embedding():
    """Negative control: the reference UNet's timestep embedding (a CPU arange copied over) is flagged."""

    class RefStyle(torch.nn.Module):
        def forward(self, t):
            freqs = torch.exp(-torch.arange(4, dtype=torch.float32) / 4).to(t.device)
            return t.float()[:, None] * freqs

    _, violations = run_on_meta(RefStyle(), (torch.zeros(2, device="meta"),))
    assert violations and "cpu" in violations[0]


@pytest.mark.parametrize("name", M.list_configs())
def test_full_size_forward_is_capture_safe(name):
    """Every named config, at full size, runs on the meta device without one host tensor or sync."""
    model = M.create(name, device="meta")
    cfg = model.cg_config
    out, violations = run_on_meta(model, example_inputs(model, 2, device="meta"))
    assert not violations, violations[:5]
    if cfg.kind == "adm-classifier":
        assert out.shape == (2, cfg.num_classes)
    else:
        assert out.shape == (2, cfg.out_channels, cfg.input_size, cfg.input_size)
        assert cfg.out_channels == (2 if cfg.learn_sigma else 1) * cfg.in_channels


@pytest.mark.parametrize("name", TINY)
def test_fullgraph_trace_has_no_graph_break(name):
    """torch.compile(fullgraph=True) raises on any graph break (data-dependent branch, .item(), CPU tensor)."""
    torch._dynamo.reset()
    model = tiny(name)
    inputs = example_inputs(model, 2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _have_cxx(), reason="inductor on the CPU needs a C++ compiler (g++ or clang++)")
def test_inductor_compile_matches_eager():
    """One real inductor compile (20-50 s cold on 2 cores); the traces above cover every tiny model."""
    torch._dynamo.reset()
    model = tiny("dit-tiny")
    inputs = example_inputs(model, 2)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_batch_elements_are_independent(name):
    model = tiny(name)
    inputs = example_inputs(model, 3, seed=5)
    with torch.no_grad():
        full = model(*inputs)
        one = model(*(a[1:2] for a in inputs))
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["adm-tiny-cond", "adm-tiny-uncond", "adm-tiny-classifier"])
def test_channels_last_same_output(name):
    model = tiny(name)
    fast = M.create(name, channels_last=True)
    fast.load_state_dict(model.state_dict())
    assert fast.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    inputs = example_inputs(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(fast(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", TINY)
def test_reduced_precision_body(name, dtype):
    """fp16 / bf16 body with float32 norms, embeddings and head; output in x's dtype, close to float32."""
    ref = tiny(name)
    low = M.create(name, dtype=dtype)
    low.load_state_dict(ref.state_dict())  # a float32 checkpoint loads into the low-precision body
    inputs = example_inputs(ref, 2)
    with torch.no_grad():
        want = ref(*inputs)
        got = low(*inputs)
        got16 = low(inputs[0].to(dtype), *inputs[1:])
    assert got.dtype == torch.float32 and got16.dtype == dtype
    err = (got - want).abs().max() / want.abs().max()
    assert err < (2e-2 if dtype == torch.float16 else 6e-2), float(err)
    dtypes = {p.dtype for p in low.parameters()}
    assert dtypes == {torch.float32, dtype}


def test_use_fp16_flag_is_float16_body():
    model = M.adm.create_unet(image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="8",
                              num_res_blocks=1, use_fp16=True)
    assert model.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert model.out[2].weight.dtype == torch.float32


def test_whole_model_cast_still_runs():
    """`.to(torch.bfloat16)` on everything (not the recommended path) still works, norms computed in fp32."""
    for name in TINY:
        model = tiny(name).to(torch.bfloat16)
        x, *rest = example_inputs(model, 2)
        out = model(x.to(torch.bfloat16), *rest)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_output_dtype_follows_input():
    model = tiny("adm-tiny-cond")
    x, t, y = example_inputs(model, 2)
    assert model(x.double(), t, y).dtype == torch.float64


def test_class_conditioning_protocol():
    cond, uncond = tiny("adm-tiny-cond"), tiny("adm-tiny-uncond")
    x, t, y = example_inputs(cond, 2)
    with pytest.raises(ValueError, match="class-conditional"):
        cond(x, t)
    assert not torch.allclose(cond(x, t, y), cond(x, t, (y + 1) % 10))
    torch.testing.assert_close(uncond(x, t, y), uncond(x, t))  # unconditional models ignore y
    assert not torch.allclose(cond(x, t, y), cond(x, t.flip(0), y))


def test_dit_null_label_and_scalar_t():
    model = tiny("dit-tiny")
    x, t, y = example_inputs(model, 2)
    null = torch.full_like(y, model.cg_config.null_label)
    torch.testing.assert_close(model(x, t), model(x, t, null))
    assert not torch.allclose(model(x, t, y), model(x, t))
    torch.testing.assert_close(model(x, t[0]), model(x, t[:1].expand(2), null))


@pytest.mark.parametrize("name", TINY)
def test_bad_inputs_are_rejected(name):
    model = tiny(name)
    x, t, *rest = example_inputs(model, 2)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :1], t, *rest)
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:1], *rest)
    with pytest.raises(ValueError):
        model(x[..., 1:, 1:], t, *rest)  # 15x15 (ADM: odd size) / 7x7 (DiT: wrong latent size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("name", TINY)
def test_cuda_graph_capture_and_replay(name):
    model = tiny(name).cuda()
    inputs = [a.cuda() for a in example_inputs(model, 2)]
    with torch.no_grad():
        want = model(*inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up outside capture
                model(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                out = model(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        new_x = torch.randn_like(inputs[0])
        inputs[0].copy_(new_x)
        graph.replay()
        torch.testing.assert_close(out, model(new_x, *inputs[1:]), atol=1e-4, rtol=1e-4)
    assert want.shape == out.shape
