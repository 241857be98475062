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
from graphpass.graph.runtime import make_session
from graphpass.testing.synthetic import SyntheticConfig, build_llama

REL = 1e-5      # max |a - b| / max |a|: float summation order only
F32_MIN = float(np.finfo(np.float32).min)


def _copy(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _attention(form="keep", fill=-np.inf, padding=False, anticausal=False, two_ranges=False,
               extra=None, keep_value=0.0, outputs=(), length_of="q", q_rows="s"):
    """y = Softmax(q·kᵀ·0.5 + mask)·v with q, k, v [b, heads, s, 4] and the mask built from
    positions as exporters do: Where(keep, 0, fill) or Where(masked, fill, 0). `extra`: a
    further conjunct, "ones" (all-true, from the input's shape, as transformers exports) or
    "strict" (j < i, which masks row 0 entirely); `outputs`: intermediate tensors also made
    graph outputs; `length_of`: the tensor whose length the mask's Range takes."""
    nodes = [h.make_node("Shape", [length_of], ["shp"]),
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
        nodes.append(h.make_node("LessOrEqual", [a, b], ["cond0" if extra else "cond"]))   # j <= i kept
        if extra == "ones":
            nodes += [h.make_node("Shape", ["cond0"], ["cshape"]),
                      h.make_node("Expand", ["one", "cshape"], ["ones"]),
                      h.make_node("Cast", ["ones"], ["ones_b"], to=T.BOOL),
                      h.make_node("And", ["cond0", "ones_b"], ["cond"])]
        elif extra == "strict":
            nodes += [h.make_node("Less", [cols, "rows"], ["lt"]), h.make_node("And", ["cond0", "lt"], ["cond"])]
        vals = ["keepv", "fill"]
    else:
        nodes.append(h.make_node("Greater", [a, b], ["cond"]))              # j > i masked
        vals = ["fill", "zf"]
    inputs = [h.make_tensor_value_info(n, T.FLOAT, ["b", 2, q_rows if n == "q" else "s", 4]) for n in "qkv"]
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
             nh.from_array(np.array(0.5, np.float32), "half"), nh.from_array(np.array(keep_value, np.float32), "keepv")]
    outs = [h.make_tensor_value_info("y", T.FLOAT, ["b", 2, q_rows, 4])]
    outs += [h.make_tensor_value_info(t, T.FLOAT, None) for t in outputs]
    g = h.make_graph(nodes, "attn", inputs, outs, inits)
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


def test_finite_fill_needs_the_other_conjuncts_proven_all_true():
    """Regression (review): with float32 min a row masked everywhere goes uniform over all keys,
    so a conjunct that can empty a row (here j < i empties row 0) must stop the rewrite."""
    m = _attention(fill=F32_MIN, extra="strict")
    assert split_causal_attention(_copy(m), 3)[1] == 0
    m = _attention(fill=F32_MIN, extra="ones")         # ones expanded to a shape: provably true
    out, n = split_causal_attention(_copy(m), 3)
    assert n == 1
    _check_same(m, out, SHAPES)
    m = _attention(fill=-np.inf, extra="strict")       # -inf: an empty row is NaN either way
    out, n = split_causal_attention(_copy(m), 3)
    assert n == 1
    _check_same(m, out, SHAPES)


def test_kept_value_must_be_zero():
    """Regression (review): Where(keep, -1e38, -1e30) passed, and there the masked keys win."""
    m = _attention(fill=-1e30, keep_value=-1e38)
    assert split_causal_attention(_copy(m), 3)[1] == 0


@pytest.mark.parametrize("out", ["p", "masked", "scores", "qk"])
def test_intermediate_graph_outputs_are_left_alone(out):
    """Regression (review): a softmax or scores tensor that is also a graph output was deleted."""
    m = _attention(outputs=(out,))
    before = m.SerializeToString()
    res, n = split_causal_attention(m, 3)
    assert n == 0 and res.SerializeToString() == before


def test_mask_length_must_be_the_query_length():
    """Regression (review): a mask built from the keys' length with one query row broadcasts to
    one row per key; the split returned one row."""
    m = _attention(length_of="k", q_rows="t")
    assert split_causal_attention(_copy(m), 3)[1] == 0
    m = _attention(length_of="k")                      # same symbolic length: proven, rewritten
    out, n = split_causal_attention(_copy(m), 3)
    assert n == 1
    _check_same(m, out, SHAPES)


def _two_blocks():
    """Two attention blocks reading the same q: one causal, one causal and a window (j > i - 2)."""
    m = _attention()
    g = m.graph
    extra = [h.make_node("Sub", ["rows", "two"], ["rows2"]),
             h.make_node("Greater", ["pos", "rows2"], ["win"]),
             h.make_node("And", ["cond", "win"], ["cond_w"]),
             h.make_node("Where", ["cond_w", "zf", "fill"], ["mask_w"]),
             h.make_node("Add", ["scores", "mask_w"], ["masked_w"]),
             h.make_node("Softmax", ["masked_w"], ["p_w"], axis=-1),
             h.make_node("MatMul", ["p_w", "v"], ["y_w"])]
    g.node.extend(extra)
    g.output.append(h.make_tensor_value_info("y_w", T.FLOAT, None))
    return m


def test_blocks_sharing_queries_keep_their_own_masks():
    """Regression (review): bounds and mask slices were cached by q alone, so the second block
    reused the first block's mask slices."""
    m = _two_blocks()                                # scores has two readers: split by neither
    assert split_causal_attention(_copy(m), 3)[1] == 0
    m = _two_blocks()
    g = m.graph                                      # give the window block its own scores
    g.node.append(h.make_node("MatMul", ["q", "kt"], ["qk_w"]))
    g.node.append(h.make_node("Mul", ["qk_w", "half"], ["scores_w"]))
    for n in g.node:
        if n.output[0] == "masked_w":
            n.input[0] = "scores_w"
    out, n = split_causal_attention(_copy(m), 3)
    assert n == 2
    assert sum(x.op_type == "Shape" and x.name.endswith("seq_Shape") for x in out.graph.node) == 1
    _check_same(m, out, SHAPES)


def test_new_names_avoid_unused_graph_inputs():
    """Regression (review): an unread graph input named like a new constant collided with it."""
    m = _attention()
    m.graph.input.append(h.make_tensor_value_info("causal_zero", T.FLOAT, [1]))
    out, n = split_causal_attention(_copy(m), 3)
    assert n == 1
    onnx.checker.check_model(out, full_check=True)
    assert "causal_zero" not in {t.name for t in out.graph.initializer}
