"""decode_rowscale: the token scheme's per-row rescale Mul -> MatMulIntegerToFloat's a_scale.

One float product is reordered ((P·w)·r -> P·(r·w)), so outputs agree to float32 rounding:
|Δ| <= 1e-5 + 1e-5·|y|.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

sys.path.insert(0, str(Path(__file__).parent))
from decode_tiny import feeds, tiny_decoder  # noqa: E402

from graphpass.passes.decode import fuse_decode  # noqa: E402


def _run(m, f):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f)


def _token_layer(scale_from_absmax: bool = True) -> onnx.ModelProto:
    """Y = MITF(QL(X / r, 1, 128), Wq, 1, w, 128) * r, r = max(absmax_row(X), ε)/127 (or a constant)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.integers(-127, 128, (8, 6)).astype(np.int8), "wq"),
             nh.from_array(np.linspace(0.01, 0.02, 6).astype(np.float32), "w"),
             nh.from_array(np.array([-1], np.int64), "ax"), nh.from_array(np.array(1e-30, np.float32), "eps"),
             nh.from_array(np.array(1 / 127, np.float32), "inv"), nh.from_array(np.array(1.0, np.float32), "one"),
             nh.from_array(np.array(128, np.uint8), "z"), nh.from_array(np.array(0.05, np.float32), "fixed")]
    r = "r" if scale_from_absmax else "fixed"
    nodes = [h.make_node("Abs", ["x"], ["a"]), h.make_node("ReduceMax", ["a", "ax"], ["m"], keepdims=1),
             h.make_node("Max", ["m", "eps"], ["mm"]), h.make_node("Mul", ["mm", "inv"], ["r"]),
             h.make_node("Div", ["x", r], ["xd"]), h.make_node("QuantizeLinear", ["xd", "one", "z"], ["xq"]),
             h.make_node("MatMulIntegerToFloat", ["xq", "wq", "one", "w", "z"], ["y0"], domain="com.microsoft"),
             h.make_node("Mul", ["y0", r], ["y"])]
    g = h.make_graph(nodes, "tok", [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])


def test_rescale_folds_and_matches():
    m = _token_layer()
    fused, rep = fuse_decode(m)
    assert rep.rescales == 1
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Mul") == 1 and ops[-1] == "MatMulIntegerToFloat"   # only r's /127 is left
    x = (np.random.default_rng(1).standard_normal((2, 3, 8)) * [[[1], [30], [0.01]]]).astype(np.float32)
    x[1, 2] = 0                                    # an all-zero row: ε keeps r finite in both
    np.testing.assert_allclose(_run(fused, {"x": x})[0], _run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_rescale_by_something_else_is_left():
    m = _token_layer(scale_from_absmax=False)
    fused, rep = fuse_decode(m)
    assert rep.rescales == 0 and fused is m


def test_quantized_decoder_every_layer_folds(tmp_path):
    from graphpass.pipeline import PipelineConfig, quantize

    src = tmp_path / "m.onnx"
    onnx.save(tiny_decoder(layers=2), src)
    quantize(src, tmp_path / "q.onnx", None, PipelineConfig(scheme="token", alpha=None), progress=False,
             log=lambda *_: None)
    q = onnx.load(tmp_path / "q.onnx")
    fused, rep = fuse_decode(q, attention=False, norms=False)
    n_mm = [n.op_type for n in q.graph.node].count("MatMulIntegerToFloat")
    assert rep.rescales == n_mm > 0
    f = feeds(q, np.array([[5, 2, 7]], np.int64), None)
    for a, b in zip(_run(q, f), _run(fused, f)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
