"""Calibration runs without the softmax NaN guards that cannot fire (calibrate/collect.py), and
its statistics are those of the graph with them, to the bit."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T, helper as h, numpy_helper as nh

import graphpass.calibrate.collect as collect
from graphpass.graph.io import save_model

from test_attention import _attention


def _attention_then_linear() -> onnx.ModelProto:
    """The positional-mask attention of test_attention, read by a linear layer y·W."""
    m = _attention(padding_input=False)
    w = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    m.graph.initializer.append(nh.from_array(w, "w"))
    m.graph.node.append(h.make_node("MatMul", ["y", "w"], ["out"]))
    del m.graph.output[:]
    m.graph.output.append(h.make_tensor_value_info("out", T.FLOAT, ["b", "s", 5]))
    return m


def test_calibration_graph_has_no_inert_guard_and_the_same_stats(tmp_path, monkeypatch):
    m = _attention_then_linear()
    path = tmp_path / "m.onnx"
    save_model(m, path)
    sessions = []
    real = collect.make_session

    def spy(model, *a, **kw):
        sessions.append(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
        return real(model, *a, **kw)

    monkeypatch.setattr(collect, "make_session", spy)
    q = np.random.default_rng(1).normal(size=(3, 6, 8)).astype(np.float32)
    stats = collect.calibrate(path, {"q": q}, batch_size=3, progress=False)
    assert sessions and "IsNaN" not in {n.op_type for n in sessions[0].graph.node}
    m.graph.output.append(h.make_tensor_value_info("y", T.FLOAT, ["b", "s", 8]))   # y of the graph as given
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"q": q})[0]
    np.testing.assert_array_equal(stats.min["y"], y.reshape(-1, 8).min(0))
    np.testing.assert_array_equal(stats.max["y"], y.reshape(-1, 8).max(0))
