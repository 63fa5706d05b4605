"""ONNX export (static shapes) of the UNet, the classifier and DiT, checked against ONNX Runtime on the CPU."""
from __future__ import annotations

import pytest
import torch

import cg_fast.models as M
from cg_fast.models.export import export_onnx, onnx_max_abs_diff
from cg_fast.models.testing import example_inputs, randomize_

pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install onnx")
pytest.importorskip("onnxscript", reason="ONNX export (dynamo=True) needs onnxscript: pip install onnxscript")
pytest.importorskip("onnxruntime", reason="the parity check needs onnxruntime: pip install onnxruntime")
# the exporter's own deprecation chatter (torch.export pytree internals), not ours
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("name", ["adm-tiny-cond", "adm-tiny-uncond", "adm-tiny-classifier", "dit-tiny"])
def test_onnx_matches_eager(tmp_path, name):
    model = randomize_(M.create(name), seed=3)
    inputs = example_inputs(model, 2, seed=4)
    path = export_onnx(model, tmp_path / f"{name}.onnx", inputs)
    import onnx

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["x", "t", "y"][: len(inputs)]
    assert all(d.dim_value > 0 for i in graph.input for d in i.type.tensor_type.shape.dim), "shapes must be static"
    assert onnx_max_abs_diff(model, path, inputs) < 1e-4
    # new inputs of the same shape: the graph is not specialised to the example values
    fresh = example_inputs(model, 2, seed=5)
    assert onnx_max_abs_diff(model, path, fresh) < 1e-4


def test_export_default_inputs_and_missing_package(tmp_path, monkeypatch):
    model = randomize_(M.create("dit-tiny"), seed=0)
    path = export_onnx(model, tmp_path / "d.onnx", batch_size=3)
    assert onnx_max_abs_diff(model, path, example_inputs(model, 3)) < 1e-4
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        onnx_max_abs_diff(model, path, example_inputs(model, 3))


def test_model_stays_in_train_mode_after_export(tmp_path):
    model = randomize_(M.create("dit-tiny")).train()
    export_onnx(model, tmp_path / "d.onnx")
    assert model.training
    assert torch.is_grad_enabled()
