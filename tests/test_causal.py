"""split_causal_attention: query chunks read only the keys they see, only where the graph proves
the mask causal; the function is unchanged up to float summation order."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from graphpass.passes.attention import drop_softmax_nan_guards
from graphpass.passes.causal import split_causal_attention
from graphpass.runtime import make_session
from graphpass.synthetic import SyntheticConfig, build_llama

REL = 1e-5      # max |a - b| / max |a|: float summation order only
F32_MIN = float(np.finfo(np.float32).min)


def _copy(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _attention(form="keep", fill=-np.inf, padding=False, anticausal=False, two_ranges=False):
    """y = Softmax(q·kᵀ·0.5 + mask)·v with q, k, v [b, heads, s, 4] and the mask built from
    positions as exporters do: Where(keep, 0, fill) or Where(masked, fill, 0)."""
    nodes = [h.make_node("Shape", ["q"], ["shp"]),
             h.make_node("Gather", ["shp", "two"], ["s"], axis=0),
             h.make_node("Range", ["zero_i", "s", "one"], ["pos"]),
             h.make_node("Unsqueeze", ["pos", "ax1"], ["rows"]),          # query index i, axis -2
             h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             h.make_node("MatMul", ["q", "kt"], ["qk"]),
             h.make_node("Mul", ["qk", "half"], ["scores"])]
    cols = "pos"                                                           # key index j, axis -1
    if two_ranges:
        nodes.append(h.make_node("Range", ["zero_i", "s", "one"], ["pos2"]))
        cols = "pos2"
    a, b = (cols, "rows") if not anticausal else ("rows", cols)
    if form == "keep":
        nodes.append(h.make_node("LessOrEqual", [a, b], ["cond"]))          # j <= i kept
        vals = ["zf", "fill"]
    else:
        nodes.append(h.make_node("Greater", [a, b], ["cond"]))              # j > i masked
        vals = ["fill", "zf"]
    inputs = [h.make_tensor_value_info(n, T.FLOAT, ["b", 2, "s", 4]) for n in "qkv"]
    if padding:
        inputs.append(h.make_tensor_value_info("attention_mask", T.BOOL, ["b", 1, 1, "s"]))
        op = "And" if form == "keep" else "Or"
        if form != "keep":
            nodes.append(h.make_node("Not", ["attention_mask"], ["pad"]))
        nodes.append(h.make_node(op, ["cond", "attention_mask" if form == "keep" else "pad"], ["cond2"]))
        cond = "cond2"
    else:
        cond = "cond"
    nodes += [h.make_node("Where", [cond, *vals], ["mask"]),
              h.make_node("Add", ["scores", "mask"], ["masked"]),
              h.make_node("Softmax", ["masked"], ["p"], axis=-1),
              h.make_node("MatMul", ["p", "v"], ["y"])]
    inits = [nh.from_array(np.array(2, np.int64), "two"), nh.from_array(np.array(1, np.int64), "one"),
             nh.from_array(np.array(0, np.int64), "zero_i"), nh.from_array(np.array([1], np.int64), "ax1"),
             nh.from_array(np.array(0, np.float32), "zf"), nh.from_array(np.array(fill, np.float32), "fill"),
             nh.from_array(np.array(0.5, np.float32), "half")]
    g = h.make_graph(nodes, "attn", inputs, [h.make_tensor_value_info("y", T.FLOAT, ["b", 2, "s", 4])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18)])


def _feeds(shape, padding=False, seed=0):
    r = np.random.default_rng(seed)
    f = {n: r.standard_normal(shape).astype(np.float32) for n in "qkv"}
    if padding:
        f["attention_mask"] = r.random((shape[0], 1, 1, shape[2])) > 0.3
    return f


def _check_same(ref, out, shapes, padding=False):
    for shape in shapes:
        f = _feeds(shape, padding)
        a = make_session(ref).run(None, f)[0]
        b = make_session(out).run(None, f)[0]
        assert a.shape == b.shape
        assert np.array_equal(np.isnan(a), np.isnan(b))
        ok = ~np.isnan(a)
        assert np.abs(a[ok] - b[ok]).max(initial=0) <= REL * np.abs(a[ok]).max(initial=1)


SHAPES = [(1, 2, 1, 4), (2, 2, 2, 4), (1, 2, 3, 4), (2, 2, 17, 4), (1, 2, 64, 4)]


@pytest.mark.parametrize("form", ["keep", "mask"])
@pytest.mark.parametrize("fill", [-np.inf, F32_MIN])
@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_causal_attention_split_into_chunks_is_the_same_function(form, fill, chunks):
    m = _attention(form, fill)
    out, n = split_causal_attention(_copy(m), chunks)
    onnx.checker.check_model(out, full_check=True)
    ops = [x.op_type for x in out.graph.node]
    assert n == 1 and ops.count("Softmax") == chunks and ops.count("MatMul") == 2 * chunks
    _check_same(m, out, SHAPES)


def test_padding_mask_with_minus_inf_is_split_and_empty_rows_stay_nan():
    m = _attention("keep", -np.inf, padding=True)
    out, n = split_causal_attention(_copy(m), 3)
    assert n == 1
    _check_same(m, out, SHAPES, padding=True)


@pytest.mark.parametrize("kw", [dict(padding=True, fill=F32_MIN),      # a padded row would go uniform
                                dict(anticausal=True),                  # j >= i: later keys are seen
                                dict(two_ranges=True),                  # i, j not provably the same range
                                dict(fill=-1.0)])                       # not a mask at all
def test_attention_without_a_proven_causal_mask_is_left_alone(kw):
    m = _attention(**kw)
    before = m.SerializeToString()
    out, n = split_causal_attention(m, 3)
    assert n == 0 and out.SerializeToString() == before


def test_softmax_read_by_a_nan_guard_is_left_alone_until_the_guard_is_dropped():
    m = build_llama(SyntheticConfig(layers=1))
    p = next(x for x in m.graph.node if x.op_type == "Softmax")
    m.graph.node.append(h.make_node("IsNaN", [p.output[0]], ["nan"]))     # a second reader of P
    assert split_causal_attention(_copy(m), 3)[1] == 0
    m.graph.node.pop()
    assert split_causal_attention(_copy(m), 3)[1] == 1


def test_synthetic_llama_with_rope_and_grouped_heads():
    m = build_llama(SyntheticConfig(layers=2))
    m, _, _ = drop_softmax_nan_guards(m)
    out, n = split_causal_attention(_copy(m), 3)
    onnx.checker.check_model(out, full_check=True)
    assert n == 2
    for shape in [(1, 1), (2, 2), (1, 3), (2, 17), (1, 64)]:
        x = {"input_ids": np.random.default_rng(1).integers(0, 100, shape).astype(np.int64)}
        a = make_session(m).run(None, x)[0]
        b = make_session(out).run(None, x)[0]
        assert np.abs(a - b).max() <= REL * np.abs(a).max()


def test_one_chunk_or_old_opset_is_a_no_op():
    m = _attention()
    assert split_causal_attention(_copy(m), 1)[1] == 0
    m.opset_import[0].version = 14
    assert split_causal_attention(m, 3)[1] == 0


def test_bounds_come_from_the_mask_when_exported_shapes_prove_the_same_length():
    m = _attention()
    m.graph.value_info.append(h.make_tensor_value_info("mask", T.FLOAT, ["s", "s"]))
    out, n = split_causal_attention(_copy(m), 3)
    shapes = [x for x in out.graph.node if x.op_type == "Shape" and x.name.endswith("seq_Shape")]
    assert n == 1 and [x.input[0] for x in shapes] == ["mask"]
    _check_same(m, out, SHAPES)
    m.graph.value_info[0].type.tensor_type.shape.dim[0].dim_param = "t"     # not provably equal
    out, _ = split_causal_attention(_copy(m), 3)
    shapes = [x for x in out.graph.node if x.op_type == "Shape" and x.name.endswith("seq_Shape")]
    assert [x.input[0] for x in shapes] == ["q"]
