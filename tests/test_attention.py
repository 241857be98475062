"""drop_softmax_nan_guards: removes Where(IsNaN(P), 0, P) only where the mask is positional."""
import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from graphpass.passes.attention import drop_softmax_nan_guards
from graphpass.graph.runtime import make_session

EXACT = 0.0   # removing an inert guard changes no bit


def _attention(padding_input: bool) -> onnx.ModelProto:
    """scores = q·qᵀ + causal mask (from Shape only, or also from a padding-mask input)."""
    nodes = [
        h.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
        h.make_node("MatMul", ["q", "qt"], ["scores"]),
        h.make_node("Shape", ["q"], ["shp"]),
        h.make_node("Gather", ["shp", "one"], ["s"], axis=0),
        h.make_node("Range", ["zero_i", "s", "one"], ["pos"]),
        h.make_node("Unsqueeze", ["pos", "ax1"], ["pos_col"]),
        h.make_node("LessOrEqual", ["pos", "pos_col"], ["causal"]),   # key j <= query i
    ]
    inputs = [h.make_tensor_value_info("q", T.FLOAT, ["b", "s", 8])]
    keep = "causal"
    if padding_input:
        inputs.append(h.make_tensor_value_info("attention_mask", T.BOOL, ["b", 1, "s"]))
        nodes.append(h.make_node("And", ["causal", "attention_mask"], ["keep"]))
        keep = "keep"
    nodes += [
        h.make_node("Where", [keep, "zf", "ninf"], ["mask"]),
        h.make_node("Add", ["scores", "mask"], ["masked"]),
        h.make_node("Softmax", ["masked"], ["p"], axis=-1),
        h.make_node("IsNaN", ["p"], ["nan"]),
        h.make_node("Where", ["nan", "zf", "p"], ["p_safe"]),
        h.make_node("MatMul", ["p_safe", "q"], ["y"]),
    ]
    inits = [nh.from_array(np.array(1, np.int64), "one"), nh.from_array(np.array(0, np.int64), "zero_i"),
             nh.from_array(np.array([1], np.int64), "ax1"), nh.from_array(np.array(0, np.float32), "zf"),
             nh.from_array(np.array(-np.inf, np.float32), "ninf")]
    g = h.make_graph(nodes, "attn", inputs, [h.make_tensor_value_info("y", T.FLOAT, ["b", "s", 8])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18)])


def _ops(m):
    return [n.op_type for n in m.graph.node]


def test_guard_dropped_when_mask_is_positional_and_outputs_are_identical():
    m = _attention(padding_input=False)
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    out, n, why = drop_softmax_nan_guards(m)
    onnx.checker.check_model(out, full_check=True)
    assert n == 1 and why == ""
    assert "IsNaN" not in _ops(out) and _ops(out).count("Where") == 1   # the mask's Where stays
    for shape in [(2, 5, 8), (1, 9, 8)]:
        x = {"q": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        a = make_session(ref).run(None, x)[0]
        b = make_session(out).run(None, x)[0]
        assert np.abs(a - b).max() <= EXACT


def test_guard_kept_when_a_padding_mask_can_empty_a_row():
    m = _attention(padding_input=True)
    out, n, why = drop_softmax_nan_guards(m)
    assert n == 0 and "mask" in why
    assert "IsNaN" in _ops(out)
    x = {"q": np.ones((1, 3, 8), np.float32), "attention_mask": np.zeros((1, 1, 3), bool)}
    y = make_session(out).run(None, x)[0]
    assert np.isfinite(y).all()        # the guard still turns the all-masked rows into zeros


def test_graph_without_guards_is_unchanged():
    from graphpass.testing.synthetic import SyntheticConfig, build_llama

    m = build_llama(SyntheticConfig(layers=1))
    before = m.SerializeToString()
    out, n, _ = drop_softmax_nan_guards(m)
    assert n == 0 and out.SerializeToString() == before
