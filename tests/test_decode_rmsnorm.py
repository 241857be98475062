"""decode_rmsnorm: residual Add + decomposed RMSNorm -> SkipSimplifiedLayerNormalization.

Numerics through onnxruntime; tolerance |Δ| <= 1e-4 + 1e-4·|y| (float32 rounding of the
reduction, on O(10) logits).
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
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, f)


def test_norms_fused_with_their_residual_adds():
    m = tiny_decoder(layers=2)
    fused, rep = fuse_decode(m, attention=False)
    ops = [n.op_type for n in fused.graph.node]
    # per layer two norms + the final one; the first reads the embedding (no Add): left to onnxruntime
    assert rep.norms == 4 and ops.count("SkipSimplifiedLayerNormalization") == 4
    assert ops.count("Pow") == 1 and ops.count("Add") < [n.op_type for n in m.graph.node].count("Add") - 4
    rng = np.random.default_rng(3)
    f = feeds(m, rng.integers(0, 64, (2, 5)).astype(np.int64), None)
    for x, y in zip(_run(m, f), _run(fused, f)):
        np.testing.assert_allclose(y, x, atol=1e-4, rtol=1e-4)


def test_both_rewrites_together_match_over_decode_steps():
    m = tiny_decoder(layers=3)
    fused, rep = fuse_decode(m)
    assert rep.attention == 3 and rep.norms == 6
    names = [o.name for o in m.graph.output]
    f = feeds(m, np.array([[1, 9, 4, 7]], np.int64), None)
    for _ in range(3):
        ra, rb = _run(m, f), _run(fused, f)
        for x, y in zip(ra, rb):
            np.testing.assert_allclose(y, x, atol=1e-4, rtol=1e-4)
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names, ra) if n.startswith("present")}
        f = feeds(m, np.array([[int(ra[0][0, -1].argmax())]], np.int64), past)


def _norm_graph(axes: int, gamma_const: bool) -> onnx.ModelProto:
    """y = γ · (x + r) / rms(x + r), with the sum also an output (the residual stream)."""
    ins = [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 4]), h.make_tensor_value_info("r", T.FLOAT, [2, 3, 4])]
    ins += [] if gamma_const else [h.make_tensor_value_info("g", T.FLOAT, [4])]
    inits = [nh.from_array(np.array(2.0, np.float32), "two"), nh.from_array(np.array([axes], np.int64), "ax"),
             nh.from_array(np.array(1e-6, np.float32), "eps"), nh.from_array(np.array(1.0, np.float32), "one")]
    if gamma_const:
        inits.append(nh.from_array(np.linspace(0.5, 2, 4).astype(np.float32), "g"))
    nodes = [h.make_node("Add", ["x", "r"], ["xs"]), h.make_node("Pow", ["xs", "two"], ["p"]),
             h.make_node("ReduceMean", ["p", "ax"], ["m"], keepdims=1),
             h.make_node("Add", ["m", "eps"], ["a"]), h.make_node("Sqrt", ["a"], ["s"]),
             h.make_node("Div", ["one", "s"], ["q"]), h.make_node("Mul", ["xs", "q"], ["n"]),
             h.make_node("Mul", ["g", "n"], ["y"]), h.make_node("Mul", ["xs", "two"], ["z"])]
    outs = [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("y", "z")]
    g = h.make_graph(nodes, "norm", ins, outs, inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18)])


def test_residual_norm_keeps_the_sum_for_its_other_reader():
    m = _norm_graph(-1, True)
    fused, rep = fuse_decode(m, attention=False)
    assert [n.op_type for n in fused.graph.node] == ["SkipSimplifiedLayerNormalization", "Mul"]
    rng = np.random.default_rng(0)
    f = {k: rng.standard_normal((2, 3, 4)).astype(np.float32) for k in ("x", "r")}
    for a, b in zip(_run(m, f), _run(fused, f)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_norm_over_another_axis_or_with_runtime_gamma_is_left():
    for m in (_norm_graph(1, True), _norm_graph(-1, False)):
        fused, rep = fuse_decode(m, attention=False)
        assert rep.norms == 0 and fused is m
