"""The CUDA-graph code paths checked on the CPU: whole-step graphs (cg_fast.engine.GraphRunner and the
sampler's graph cache), the graphed denoiser / classifier gradient, ONNX Runtime's I/O binding and the
TensorRT build, without a GPU.

A CUDA graph records the kernels issued while capturing and replays them on the same memory; no Python
runs at replay. :class:`EmulatedCuda` does the same on the CPU at the ATen level: while "capturing" it
records every op that reaches the dispatcher (autograd's backward included) with its arguments, and
``replay()`` runs the recorded ops again on the recorded tensors, copying each result into the tensor the
capture produced (fixed addresses). So, as in a real graph, Python values read during capture are frozen,
tensors rebound instead of copied into are never seen again, and outputs are overwritten by the next replay.
Ops a capture cannot contain raise :class:`CaptureError`: host syncs (``.item()``, ``bool(t)``, ``int(t)``,
ops returning Python values), tensors made from Python data (``torch.tensor([...])``), random numbers (they
would not follow the eager stream) and data-dependent shapes. The emulation runs the captured ops once at
capture (a real capture does not), which the runners must undo, as they undo their warm-up.
"""
from __future__ import annotations

import contextlib
import os
import types

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import cg_fast.sampler as sampler_mod
from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, NonFiniteError, Sampler
from cg_fast.engine import EagerRunner, GraphRunner, StepBuffers, StepProgram, module_signature
from cg_fast.guidance import Compress, Full, Interval
from cg_fast.kernels import ddpm_step
from cg_fast.testbeds.tiny import TinyConvClassifier, TinyConvEps

SCHED = NoiseSchedule.linear(1000)
SHAPE = (4, 3, 8, 8)
aten = torch.ops.aten


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- a CPU emulation of CUDA graph capture and replay --------------------------------------------------------
class CaptureError(RuntimeError):
    """An op a CUDA graph capture cannot contain."""


_HOST_SYNC = {aten._local_scalar_dense, aten.is_nonzero}
_FROM_PYTHON = {aten.lift_fresh, aten.lift_fresh_copy}
_TENSOR_TYPES = ("Tensor", "Optional[Tensor]", "List[Tensor]", "List[Optional[Tensor]]")


_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # data-dependent for masks only


def _zero_dropout(func, args, kwargs) -> bool:
    """An op tagged random only for its dropout (attention), called with dropout 0: it draws nothing."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == "dropout_p":
            value = kwargs.get("dropout_p", args[i] if i < len(args) else a.default_value)
            return value == 0.0
    return False


def _why_forbidden(func, args, kwargs) -> str | None:
    packet = func.overloadpacket
    if packet in _INDEXING:  # integer indices are fine; a boolean mask means nonzero(), a host sync
        indices = args[1] if len(args) > 1 else []
        masks = [i for i in indices if isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8)]
        return "indexing with a boolean mask (a host synchronisation)" if masks else None
    if packet in _HOST_SYNC or any(str(r.type) not in _TENSOR_TYPES for r in func._schema.returns):
        return "a host synchronisation (.item(), bool(tensor), int(tensor), a Python value out of a tensor)"
    if packet in _FROM_PYTHON:
        return "a tensor made from Python data (torch.tensor(...) copies from the host)"
    if torch.Tag.nondeterministic_seeded in func.tags and not _zero_dropout(func, args, kwargs):
        return "random numbers (draw them outside the graph into a static buffer)"
    if torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags:
        return "a data-dependent output shape or value"
    return None


class _Recorder(TorchDispatchMode):
    def __init__(self, tape: list) -> None:
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _why_forbidden(func, args, kwargs)
        if why is not None:
            raise CaptureError(f"{func} inside a CUDA graph capture: {why}")
        out = func(*args, **kwargs)
        self.tape.append((func, args, kwargs, out))
        return out


def _flat(v) -> list:
    return list(v) if isinstance(v, (tuple, list)) else [v]


class EmulatedGraph:
    def __init__(self) -> None:
        self.tape: list = []
        self.replays = 0

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out in self.tape:
                new = func(*args, **kwargs)
                if any(r.alias_info is not None for r in func._schema.returns):
                    continue  # in place (it mutated its argument again) or a view of a recorded tensor
                for o, n in zip(_flat(out), _flat(new)):
                    if isinstance(o, Tensor) and isinstance(n, Tensor):
                        o.copy_(n)  # the result lands where the capture's did
        self.replays += 1


class _Stream:
    def wait_stream(self, other) -> None:
        pass


class EmulatedCuda:
    """The torch.cuda names GraphRunner and cudagraph._Graphed use, emulated on the CPU.

    ``devices`` records every device made current (``device(d)``) and every device a stream was asked for.
    """

    CUDAGraph = EmulatedGraph

    def __init__(self) -> None:
        self.captures = 0
        self.devices: list = []

    def Stream(self, device=None) -> _Stream:  # noqa: N802 - the torch.cuda name
        self.devices.append(("stream", device))
        return _Stream()

    def device(self, d) -> contextlib.AbstractContextManager:
        self.devices.append(("device", d))
        return contextlib.nullcontext()

    def current_stream(self, device=None) -> _Stream:
        self.devices.append(("current_stream", device))
        return _Stream()

    def stream(self, s) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def graph_pool_handle(self) -> object:
        return object()

    @contextlib.contextmanager
    def graph(self, graph: EmulatedGraph, pool=None, stream=None):
        self.captures += 1
        with _Recorder(graph.tape):
            yield


EMU = EmulatedCuda()


class EmulatedGraphRunner(GraphRunner):
    _api = EMU


@contextlib.contextmanager
def capture(graph: EmulatedGraph):
    with EMU.graph(graph):
        yield


# -- the emulation itself behaves like a graph -----------------------------------------------------------------
def test_emulation_replays_ops_on_fixed_buffers_with_frozen_python_values():
    x = torch.ones(3)
    scale = 2.0
    g = EmulatedGraph()
    with capture(g):
        tmp = x * scale          # a Python float: frozen at capture
        x.add_(tmp)
    assert torch.equal(x, torch.full((3,), 3.0))  # the emulation ran the ops once while capturing
    x.fill_(1.0)
    scale = 5.0  # noqa: F841 - a real graph would not see this either
    g.replay()
    assert torch.equal(x, torch.full((3,), 3.0))
    g.replay()
    assert torch.equal(x, torch.full((3,), 9.0))  # reads x's new values: same memory
    assert torch.equal(tmp, torch.full((3,), 6.0))  # intermediate overwritten by the replay


@pytest.mark.parametrize("bad", [
    lambda x: x.sum().item(),
    lambda x: bool(x.sum() > 0),
    lambda x: int(x.argmax()),
    lambda x: x + torch.tensor([1.0, 2.0, 3.0]),
    lambda x: x.normal_(),
    lambda x: x.nonzero(),
], ids=["item", "bool", "int", "tensor-from-list", "random", "nonzero"])
def test_emulation_rejects_what_a_capture_cannot_contain(bad):
    with pytest.raises(CaptureError), capture(EmulatedGraph()):
        bad(torch.ones(3))


def test_emulation_records_autograd_backward():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    g = EmulatedGraph()
    with capture(g):
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(lin(xi).square().sum(), xi)
    x.copy_(torch.randn(4, 3))
    g.replay()
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(lin(xr).square().sum(), xr)
    assert torch.equal(grad, want)


# -- GraphRunner -------------------------------------------------------------------------------------------------
def _models(seed=0):
    torch.manual_seed(seed)
    return TinyConvEps(learn_sigma=True).eval(), TinyConvClassifier().eval()


def _program_and_buffers(model, clf=None, stateful=False):
    torch.manual_seed(1)
    x = torch.randn(SHAPE)
    sampler = Sampler(model, SCHED, "10", learn_sigma=True, kernels="reference")
    guid = ClassifierGuidance(clf, 2.0, policy=Full(), cache="momentum" if stateful else "drop") if clf else None
    table = sampler.table(guid)
    bufs = StepBuffers(x=x, z=torch.randn(SHAPE), coef=table[3].expand(SHAPE[0], -1).clone(),
                       t=torch.full((SHAPE[0],), 700), h=torch.randn(SHAPE) if stateful else None,
                       y=torch.tensor([1, 2, 3, 4]))
    program = StepProgram(model=model, step=ddpm_step,
                          step_kw=dict(impl="reference", guide="classifier" if clf else "none", prediction="eps",
                                       learned_var=True, clip=True, cfg_channels=None),
                          guide="classifier" if clf else "none",
                          classifier=(lambda xx, tt, yy: guid.gradient(xx, tt, yy, check=False)) if clf else None)
    return program, bufs


def _clone(b: StepBuffers) -> StepBuffers:
    return StepBuffers(**{k: v.clone() if isinstance(v, Tensor) else v for k, v in vars(b).items()})  # flags as they are


@pytest.mark.parametrize("guided", [False, True])
def test_graph_runner_steps_once_per_call_like_eager(guided):
    model, clf = _models()
    program, bufs = _program_and_buffers(model, clf if guided else None, stateful=guided)
    ref = _clone(bufs)
    eager, graph = EagerRunner(program, ref), EmulatedGraphRunner(program, bufs, warmup=2)
    for step in range(3):  # capture (after a warm-up that must leave no trace), then replays
        want = eager.run(guided)
        rng = torch.get_rng_state()
        got = graph.run(guided)
        assert torch.equal(torch.get_rng_state(), rng)  # warm-up, capture and replay draw no random numbers
        assert torch.equal(bufs.x, ref.x), step
        if guided:
            assert torch.equal(bufs.h, ref.h)
            assert torch.equal(got["log_prob"], want["log_prob"])
        assert set(got) == set(want) and bool(got["ok_model"])
        bufs.z.copy_(torch.randn(SHAPE))  # the next step's noise, drawn outside the graph
        ref.z.copy_(bufs.z)
    assert len(graph.graphs) == 1 and graph.graphs[guided][0].replays == 3


def test_graph_runner_outputs_are_copies():
    model, _ = _models()
    program, bufs = _program_and_buffers(model)
    runner = EmulatedGraphRunner(program, bufs)
    first = runner.run(False)["ok_model"]
    _, outs = runner.graphs[False]
    assert first is not outs["ok_model"]


def test_graph_runner_needs_a_warmup_iteration():
    model, _ = _models()
    program, bufs = _program_and_buffers(model)
    with pytest.raises(ValueError, match="warm-up"):
        EmulatedGraphRunner(program, bufs, warmup=0)


def test_graph_runner_restores_state_when_capture_fails():
    model, _ = _models()
    program, bufs = _program_and_buffers(model)
    x0 = bufs.x.clone()

    def syncing_model(x, t, y=None):
        out = model(x, t, y)
        return out * float(out.abs().max())  # a host sync: fine eagerly, impossible in a capture

    checks = []
    program.model, program.check_output = syncing_model, lambda o, fresh: checks.append(o)
    with pytest.raises(CaptureError):
        EmulatedGraphRunner(program, bufs).run(False)
    assert torch.equal(bufs.x, x0)  # the warm-up's steps undone
    assert len(checks) == 2  # the host-side check ran in the warm-up only, and is restored for later use
    program.check_output(None, None)
    assert len(checks) == 3


# -- the sampler's graphed path ---------------------------------------------------------------------------------
@pytest.fixture
def graphs(monkeypatch):
    """Sampler(backend="cudagraph") runs on the CPU through the emulation."""
    monkeypatch.setattr(sampler_mod, "GraphRunner", EmulatedGraphRunner)
    monkeypatch.setattr(Sampler, "_resolve_backend", lambda self, dev: self.backend if self.backend != "auto"
                        else "eager")
    return EMU


Y = torch.tensor([1, 2, 3, 4])


def _sample(sampler, guidance, seed=0, y=Y, **kw):
    gen = torch.Generator().manual_seed(seed)
    return sampler.sample(SHAPE, y=y, guidance=guidance, generator=gen, **kw)


def _pair(model, method="ddpm", steps="20", **kw):
    return tuple(Sampler(model, SCHED, steps, method, learn_sigma=True, kernels="reference", backend=b, **kw)
                 for b in ("eager", "cudagraph"))


def _guidances(clf):
    return {
        "none": None,
        "classifier-compress": ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="compress"),
        "classifier-momentum": ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="momentum", beta=0.3,
                                                  decay=0.9),
        "classifier-skipped-first": ClassifierGuidance(clf, 2.0, policy=Interval(0.0, 2.0), cache="reuse"),
        "cfg-batched-channels": CFG(3.0, null_label=10, policy=Compress(rate=5), channels=2),
        "cfg-unbatched-momentum": CFG(3.0, null_label=10, policy=Compress(rate=5), cache="momentum", beta=0.5,
                                      batched=False),
    }


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp2m"])
@pytest.mark.parametrize("kind", ["none", "classifier-compress", "classifier-momentum", "classifier-skipped-first",
                                  "cfg-batched-channels", "cfg-unbatched-momentum"])
def test_graphed_sampling_equals_eager(graphs, method, kind):
    model, clf = _models()
    guid = _guidances(clf)[kind]
    eager_s, graph_s = _pair(model, method, eta=0.5 if method == "ddim" else 0.0)
    eager, graph = _sample(eager_s, guid), _sample(graph_s, guid)
    assert torch.equal(graph.x, eager.x)
    for f in ("denoiser_passes", "denoiser_rows", "classifier_grads", "guided_steps"):
        assert getattr(graph.stats, f) == getattr(eager.stats, f), f
    assert graph.stats.on_sampling.keys() == eager.stats.on_sampling.keys()
    for j, rec in eager.stats.on_sampling.items():
        assert torch.equal(graph.stats.on_sampling[j].log_prob, rec.log_prob)
        assert torch.equal(graph.stats.on_sampling[j].correct, rec.correct)
    (runner, _), = graph_s._graph_cache.values()
    assert set(runner.graphs) == ({False} if guid is None else {False, True})


def test_dpmpp2m_replay_starts_from_a_fresh_prev(graphs):
    """DPM-Solver++'s carried x0 lives in the captured buffers: a second run must not see the first's."""
    model, clf = _models()
    guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="reuse")
    eager_s, graph_s = _pair(model, "dpmpp2m")
    first = _sample(graph_s, guid, seed=3)
    second = _sample(graph_s, guid, seed=4)
    assert torch.equal(second.x, _sample(eager_s, guid, seed=4).x)
    assert torch.equal(_sample(graph_s, guid, seed=3).x, first.x) and len(graph_s._graph_cache) == 1


def test_global_rng_graphed_equals_eager(graphs):
    model, clf = _models()
    guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="momentum", beta=0.2)
    eager_s, graph_s = _pair(model)
    torch.manual_seed(7)
    eager = eager_s.sample(SHAPE, y=Y, guidance=guid)
    torch.manual_seed(7)
    graph = graph_s.sample(SHAPE, y=Y, guidance=guid)
    assert torch.equal(graph.x, eager.x)


def test_next_run_replays_the_cached_graphs(graphs):
    model, clf = _models()
    eager_s, graph_s = _pair(model)
    first_g = ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="compress")
    _sample(graph_s, first_g, seed=1)
    captures = graphs.captures
    # a new guidance object: same classifier, another scale, policy and (stateless) cache mode
    other = ClassifierGuidance(clf, 5.0, policy=Full(), cache="drop")
    y = torch.tensor([9, 0, 5, 5])
    got, want = _sample(graph_s, other, seed=2, y=y), _sample(eager_s, other, seed=2, y=y)
    assert torch.equal(got.x, want.x)
    assert graphs.captures == captures and len(graph_s._graph_cache) == 1
    again = _sample(graph_s, other, seed=2, y=y)
    assert torch.equal(again.x, got.x) and again.x is not got.x  # each run hands out its own copy


def test_cache_key_separates_what_changes_the_captured_program(graphs):
    model, clf = _models()
    clf2 = TinyConvClassifier().eval()
    eager_s, graph_s = _pair(model)
    runs = [
        ClassifierGuidance(clf, 2.0, policy=Compress(rate=5)),                       # new entry
        ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="momentum"),     # stateful: new
        ClassifierGuidance(clf2, 2.0, policy=Compress(rate=5)),                      # other classifier: new
        CFG(3.0, null_label=10, policy=Compress(rate=5)),                            # cfg: new
        CFG(3.0, null_label=10, policy=Compress(rate=5), channels=2),                # channels: new
        CFG(3.0, null_label=10, policy=Compress(rate=5), batched=False),             # unbatched: new
        CFG(5.0, null_label=10, policy=Full()),                                      # same as the 4th
        None,                                                                        # new
    ]
    sizes = []
    for guid in runs:
        assert torch.equal(_sample(graph_s, guid).x, _sample(eager_s, guid).x)
        sizes.append(len(graph_s._graph_cache))
    assert sizes == [1, 2, 3, 4, 5, 6, 6, 7]
    # new weights storage (what .half() or .to() does): recapture, no replay of stale pointers
    for prm in model.parameters():
        prm.data = prm.data * 1.5
    assert torch.equal(_sample(graph_s, None).x, _sample(eager_s, None).x)
    assert len(graph_s._graph_cache) == 8


def test_module_signature_follows_weight_storage():
    model, _ = _models()
    sig = module_signature(model)
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})  # in place: a graph sees it
    assert module_signature(model) == sig
    model.half()
    assert module_signature(model) != sig
    assert module_signature(_models()[0]) != module_signature(model)
    f = lambda x, t, y=None: x  # noqa: E731
    assert module_signature(f) == (id(f),)


def test_graph_buffers_do_not_alias_the_callers_labels(graphs):
    model, _ = _models()
    _, graph_s = _pair(model)
    y1 = torch.tensor([1, 2, 3, 4])
    _sample(graph_s, None, y=y1)
    _sample(graph_s, None, y=torch.tensor([7, 7, 7, 7]))
    assert torch.equal(y1, torch.tensor([1, 2, 3, 4]))


def test_label_range_checked_when_the_cache_is_hit_with_a_new_guidance_object(graphs):
    model, clf = _models()
    _, graph_s = _pair(model, num_classes=100)  # the sampler lets labels < 100 through; the classifier has 10
    _sample(graph_s, ClassifierGuidance(clf, 1.0, policy=Compress(rate=5)))
    with pytest.raises(ValueError, match="10 classes"):
        _sample(graph_s, ClassifierGuidance(clf, 1.0, policy=Compress(rate=5)), y=torch.tensor([1, 2, 3, 42]))


@pytest.mark.parametrize("check", ["deferred", None, True])
def test_nonfinite_flags_from_graphs_name_the_step(graphs, check):
    model, _ = _models()

    def bad(x, t, y=None):
        return model(x, t, y) * torch.where(t < 300, float("nan"), 1.0)[:, None, None, None]

    s = Sampler(bad, SCHED, "10", learn_sigma=True, kernels="reference", backend="cudagraph", check_finite=check)
    with pytest.raises(NonFiniteError, match="j=7"):
        s.sample(SHAPE, y=Y)


# -- the graphed denoiser and classifier gradient (cg_fast.backends.cudagraph) -------------------------------
def test_graphed_denoiser_and_classifier_gradient(monkeypatch):
    from cg_fast.backends import cudagraph
    monkeypatch.setattr(cudagraph._Graphed, "_api", EMU)
    model, clf = _models()
    den, grad = cudagraph.CUDAGraphDenoiser(model), cudagraph.CUDAGraphClassifierGrad(clf)
    t, y = torch.full((4,), 500), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        x = torch.randn(SHAPE)
        with torch.no_grad():
            want = model(x, t, y)
        assert torch.equal(den(x, t, y), want)
        g, logits = grad(x, t, y)
        xr = x.clone().requires_grad_(True)
        lp = torch.log_softmax(clf(xr, t), -1)[torch.arange(4), y].sum()
        (want_g,) = torch.autograd.grad(lp, xr)
        assert torch.equal(g, want_g) and torch.equal(logits, clf(x, t).detach())
    assert den.num_graphs == 1 and grad.num_graphs == 1


# -- ONNX Runtime I/O binding (the CUDA provider's path, bound on host memory) -------------------------------
def test_onnxruntime_io_binding(tmp_path):
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)
    import onnxruntime as ort

    from cg_fast.backends.onnxrt import _bound_dtype, export_denoiser, run_bound
    model, _ = _models()
    x, t, y = torch.randn(SHAPE), torch.full((4,), 321), torch.tensor([0, 3, 5, 9])
    path = export_denoiser(model, tmp_path / "m.onnx", x, t, y)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = run_bound(sess, [x, t.int(), y], torch.device("cpu"))  # int32 t: cast to the graph's int64
    want = torch.from_numpy(sess.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0])
    assert got.dtype == torch.float32 and got.shape == (4, 6, 8, 8)
    assert torch.equal(got, want)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x, t, y), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="not supported"):
        _bound_dtype(types.SimpleNamespace(name="out", type="tensor(bfloat16)"))


# -- TensorRT: the build against a stand-in of the TensorRT 10 API -----------------------------------------------
class _FakeTRT:
    """The parts of the TensorRT 10 Python API that TensorRTDenoiser._build uses, recording the calls."""

    class DataType:
        FLOAT, HALF, BF16, INT32, INT64, INT8, UINT8, BOOL = range(8)

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16, BF16 = "fp16", "bf16"

    def __init__(self, input_shapes: dict) -> None:
        self.input_shapes, self.calls = input_shapes, []
        trt = self

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                trt.calls.append(("create_network", flags))
                return types.SimpleNamespace(
                    num_inputs=len(trt.input_shapes),
                    get_input=lambda i: types.SimpleNamespace(name=list(trt.input_shapes)[i],
                                                              shape=list(trt.input_shapes.values())[i]))

            def create_builder_config(self):
                return types.SimpleNamespace(
                    set_memory_pool_limit=lambda pool, size: trt.calls.append(("pool", pool, size)),
                    set_flag=lambda f: trt.calls.append(("flag", f)),
                    add_optimization_profile=lambda p: trt.calls.append(("profile", dict(p.shapes))))

            def create_optimization_profile(self):
                shapes: dict = {}
                return types.SimpleNamespace(shapes=shapes, set_shape=lambda n, a, b, c: shapes.update({n: (a, b, c)}))

            def build_serialized_network(self, network, config):
                trt.calls.append(("build", os.path.exists(trt.parsed)))  # the ONNX file must still be there
                return b"engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                trt.parsed = path
                trt.calls.append(("parse", os.path.exists(path)))
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_tensorrt_build_sequence(monkeypatch, precision, dynamic):
    from cg_fast.backends import onnxrt
    from cg_fast.backends.tensorrt import TensorRTDenoiser, _torch_dtype

    x, t, y = torch.randn(SHAPE), torch.full((4,), 10), torch.tensor([1, 2, 3, 4])
    exported = {}

    def fake_export(model, path, xx, tt, yy, opset):
        exported.update(x=xx, t=tt, y=yy)
        path.write_bytes(b"onnx")
        return path

    monkeypatch.setattr(onnxrt, "export_denoiser", fake_export)
    shapes = {"x": (-1, 3, 8, 8) if dynamic else SHAPE, "t": (4,), "y": (4,)}
    trt = _FakeTRT(shapes)
    den = TensorRTDenoiser.__new__(TensorRTDenoiser)  # __init__ needs CUDA and TensorRT; _build does not
    den.trt, den.logger, den.model, den.precision = trt, None, _models()[0], precision
    den.workspace, den.opset_version, den.built = 1 << 30, None, 0
    assert den._build(x, t, y) == b"engine" and den.built == 1
    assert exported["x"] is x and exported["y"] is y  # exported where the model is, no .cpu()
    assert trt.calls[0] == ("create_network", 0) and ("parse", True) in trt.calls and ("build", True) in trt.calls
    assert ("pool", "workspace", 1 << 30) in trt.calls
    flags = [c[1] for c in trt.calls if c[0] == "flag"]
    assert flags == ({"fp16": ["fp16"], "bf16": ["bf16"], "fp32": []}[precision])
    profiles = [c[1] for c in trt.calls if c[0] == "profile"]
    assert profiles == ([{"x": (SHAPE, SHAPE, SHAPE)}] if dynamic else [])
    assert _torch_dtype(trt, trt.DataType.BF16) == torch.bfloat16
    assert _torch_dtype(trt, trt.DataType.INT64) == torch.int64
    with pytest.raises(TypeError):
        _torch_dtype(trt, 99)



# -- the real model code under the capture rules ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adm-tiny-cond", "dit-tiny"])
def test_graphed_sampling_of_the_model_zoo_equals_eager(graphs, name):
    import cg_fast.models as M
    torch.manual_seed(0)
    model = M.create(name, dtype=torch.float32).eval()
    cfg = model.cg_config
    if name.startswith("adm"):
        torch.manual_seed(1)
        guid = ClassifierGuidance(M.create("adm-tiny-classifier", dtype=torch.float32).eval(), 1.0,
                                  policy=Compress(rate=2, final=1), cache="momentum", beta=0.2)
    else:
        guid = CFG(4.0, null_label=cfg.null_label, policy=Compress(rate=2, final=1), channels=3)
    shape, y = (2, *cfg.input_shape), torch.tensor([1, 3])
    out = []
    for backend in ("eager", "cudagraph"):
        s = Sampler(model, NoiseSchedule.named(cfg.noise_schedule, cfg.diffusion_steps), "5",
                    learn_sigma=cfg.learn_sigma, clip_denoised=cfg.clip_denoised, kernels="reference", backend=backend)
        out.append(s.sample(shape, y=y, guidance=guid, generator=torch.Generator().manual_seed(0)).x)
    assert torch.equal(out[1], out[0])


# -- results that must survive the next call (CFG's two unbatched passes) ------------------------------------------
def _cfg_unbatched():
    return CFG(3.0, null_label=10, policy=Compress(rate=3), cache="momentum", beta=0.5, batched=False)


@pytest.mark.parametrize("clone_outputs", [True, False])
def test_graphed_denoiser_results_survive_the_next_call(monkeypatch, clone_outputs):
    """Two calls of one signature (CFG's conditional then unconditional pass): the first result must stay the
    conditional output. With the graph's static output returned (clone_outputs=False) it is overwritten, and
    CFG's direction eps_c - eps_u silently becomes 0; that is why copies are the default."""
    from cg_fast.backends import cudagraph
    monkeypatch.setattr(cudagraph._Graphed, "_api", EMU)
    model, _ = _models()
    den = cudagraph.CUDAGraphDenoiser(model, clone_outputs=clone_outputs)
    x, t = torch.randn(SHAPE), torch.full((4,), 500)
    cond = den(x, t, Y)
    uncond = den(x, t, torch.full((4,), 10))
    with torch.no_grad():
        want_c, want_u = model(x, t, Y), model(x, t, torch.full((4,), 10))
    assert torch.equal(uncond, want_u)
    assert torch.equal(cond, want_c) is clone_outputs
    # the whole sampler with CFG as two passes through the graphed denoiser, against the eager model
    eager = Sampler(model, SCHED, "12", learn_sigma=True, kernels="reference", backend="eager")
    wrapped = Sampler(den, SCHED, "12", learn_sigma=True, kernels="reference", backend="eager")
    same = torch.equal(_sample(wrapped, _cfg_unbatched()).x, _sample(eager, _cfg_unbatched()).x)
    assert same is clone_outputs


class _CudagraphTreeStandIn:
    """What torch.compile's cudagraph trees do to outputs: every call writes into the same output memory."""

    def __init__(self, model):
        self.model, self.out, self.calls = model, None, 0

    def __call__(self, *args):
        o = self.model(*args)
        if self.out is None:
            self.out = torch.empty_like(o)
        self.calls += 1
        return self.out.copy_(o)


def test_compile_modes_with_cudagraphs_copy_outputs_and_mark_steps(monkeypatch):
    from cg_fast.backends import compiled
    marks = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: _CudagraphTreeStandIn(model))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model, _ = _models()
    for mode, copies in (("reduce-overhead", True), ("max-autotune", True), (None, False)):
        marks.clear()
        den = compiled.CompiledDenoiser(model, mode=mode)
        x, t = torch.randn(SHAPE), torch.full((4,), 500)
        cond = den(x, t, Y)
        den(x, t, torch.full((4,), 10))
        with torch.no_grad():
            assert torch.equal(cond, model(x, t, Y)) is copies, mode
        assert len(marks) == (2 if copies else 0)
    # the sampler with CFG as two passes under reduce-overhead equals eager
    eager = Sampler(model, SCHED, "12", learn_sigma=True, kernels="reference", backend="eager")
    comp = Sampler(model, SCHED, "12", learn_sigma=True, kernels="reference", backend="compile",
                   backend_options={"mode": "reduce-overhead"})
    assert torch.equal(_sample(comp, _cfg_unbatched()).x, _sample(eager, _cfg_unbatched()).x)


# -- the classifier gradient stays graphed with the onnx / tensorrt / compile backends -----------------------------
def test_classifier_gradient_is_replayed_with_backends_that_graph_only_the_denoiser(monkeypatch):
    from cg_fast import backends
    from cg_fast.backends import cudagraph
    monkeypatch.setattr(cudagraph._Graphed, "_api", EMU)
    monkeypatch.setattr(backends, "make_denoiser", lambda model, name, **kw: model)  # a stand-in of compile
    model, clf = _models()
    guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=3), cache="momentum", beta=0.3)
    eager = Sampler(model, SCHED, "12", learn_sigma=True, kernels="reference", backend="eager")
    comp = Sampler(model, SCHED, "12", learn_sigma=True, kernels="reference", backend="compile")
    calls = []
    real = ClassifierGuidance.gradient
    monkeypatch.setattr(ClassifierGuidance, "gradient", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    want = _sample(eager, guid)
    grads = len(calls)
    calls.clear()
    got = _sample(comp, guid)
    torch.testing.assert_close(got.x, want.x, rtol=1e-6, atol=1e-6)
    for j, rec in want.stats.on_sampling.items():
        torch.testing.assert_close(got.stats.on_sampling[j].log_prob, rec.log_prob)
    assert got.stats.classifier_grads == want.stats.classifier_grads == grads > 2
    (graph,) = comp._classifier_graphs.values()
    assert graph.num_graphs == 1 and graph.eager_reason is None
    (captured,) = graph._graphs.values()
    assert len(calls) == 1 and captured.graph.replays == grads - 1  # step 1 checks labels eagerly, the rest replay
    calls.clear()
    _sample(comp, ClassifierGuidance(clf, 4.0, policy=Compress(rate=3)))  # a new run and guidance: no recapture
    assert len(calls) == 1 and graph.num_graphs == 1 and len(comp._classifier_graphs) == 1


def test_a_classifier_that_cannot_be_captured_runs_eagerly_with_a_warning(monkeypatch):
    from cg_fast import backends
    from cg_fast.backends import cudagraph
    monkeypatch.setattr(cudagraph._Graphed, "_api", EMU)
    monkeypatch.setattr(backends, "make_denoiser", lambda model, name, **kw: model)
    model, clf = _models()

    def syncing(x, t):
        out = clf(x, t)
        return out * float(out.detach().abs().max() > -1)  # a host sync

    guid = ClassifierGuidance(syncing, 2.0, policy=Compress(rate=3))
    want = _sample(Sampler(model, SCHED, "12", learn_sigma=True, kernels="reference", backend="eager"), guid)
    comp = Sampler(model, SCHED, "12", learn_sigma=True, kernels="reference", backend="compile")
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        got = _sample(comp, guid)
    torch.testing.assert_close(got.x, want.x, rtol=1e-6, atol=1e-6)
    (graph,) = comp._classifier_graphs.values()
    assert graph.eager_reason is not None and "host synchronisation" in graph.eager_reason


# -- captures, streams and replays on the tensors' device (item: cuda:1 while cuda:0 is current) -------------------
def test_graphs_use_the_device_of_their_tensors(monkeypatch):
    from cg_fast.backends import cudagraph
    monkeypatch.setattr(cudagraph._Graphed, "_api", EMU)
    model, clf = _models()
    EMU.devices.clear()
    program, bufs = _program_and_buffers(model)
    runner = EmulatedGraphRunner(program, bufs)
    runner.run(False)
    runner.run(False)
    cudagraph.CUDAGraphDenoiser(model)(torch.randn(SHAPE), torch.full((4,), 5), Y)
    cudagraph.CUDAGraphClassifierGrad(clf)(torch.randn(SHAPE), torch.full((4,), 5), Y)
    kinds = {k for k, _ in EMU.devices}
    assert kinds == {"device", "stream", "current_stream"}
    assert all(d == bufs.x.device for _, d in EMU.devices), EMU.devices  # never None: the current device
