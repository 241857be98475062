"""decode_route: one top-level If on the new-token count; one token runs the int8 weights through
MatMulNBits, several through MatMulIntegerToFloat, the bytes stored once.

Bounds written out:
- prefill (several new tokens) runs the token graph's own nodes on the same int8 values read back
  from the MatMulNBits bytes: logits equal the token graph's bit for bit.
- decode (one new token) differs from the token graph only in how the activation is rounded
  (MatMulNBits accuracy_level 4: int8 per block of K; token: int8 per row): its distance to the
  float graph stays within 2x the token graph's distance plus 1e-3 of the logits' scale.
- the layout itself: MatMulNBits(X, B, scales) with accuracy_level 0 is X·(Wq·diag(w)) to float
  rounding (|Δ| <= 1e-5 + 1e-5·|y|), with K a multiple of the block and not.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from decode_tiny import tiny_decoder
from graphpass.errors import GraphpassError
from graphpass.graph.decode import DecodeRunner, past_layout
from graphpass.graph.gs_io import initializers
from graphpass.graph.runtime import make_session
from graphpass.passes.decode_route import nbits_layout
from graphpass.pipeline import PipelineConfig, quantize
from graphpass.testing.past import build_genai_past

PREFIX, TOTAL = 9, 14


def _run(path, ids):
    r = DecodeRunner(make_session(path), past_layout(onnx.load(path)))
    return r.prefill(ids[:, :PREFIX]), np.concatenate([r.step(ids[:, k:k + 1]) for k in range(PREFIX, TOTAL)], 1)


def _quantize(tmp_path, model, **kw):
    onnx.save(model, tmp_path / "m.onnx")
    out = {}
    for tag, route in (("token", False), ("route", True)):
        cfg = PipelineConfig(scheme="token", alpha=None, decode_fusions=True, decode_route=route, **kw)
        quantize(tmp_path / "m.onnx", tmp_path / f"{tag}.onnx", None, cfg, progress=False, log=lambda *_: None)
        out[tag] = tmp_path / f"{tag}.onnx"
    return tmp_path / "m.onnx", out["token"], out["route"]


def _check(fp32, token, route, vocab):
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, TOTAL))
    (pf, df), (pt, dt), (pr, dr) = _run(fp32, ids), _run(token, ids), _run(route, ids)
    np.testing.assert_array_equal(pr, pt)
    err_token, err_route = np.abs(dt - df).max(), np.abs(dr - df).max()
    assert err_route <= 2 * err_token + 1e-3 * np.abs(df).max(), (err_route, err_token)
    assert np.abs(dr - dt).max() > 0          # the decode branch did run MatMulNBits


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def _nbits_layers(graph: onnx.GraphProto) -> int:
    """Linear layers computed by MatMulNBits: one per node, or one per output of the Split after it."""
    packed = {n.output[0] for n in graph.node if n.op_type == "MatMulNBits"}
    splits = [n for n in graph.node if n.op_type == "Split" and n.input[0] in packed]
    return len(packed) + sum(len(n.output) - 1 for n in splits)


def test_optimum_form_prefill_exact_decode_within_bound(tmp_path):
    fp32, token, route = _quantize(tmp_path, tiny_decoder())
    _check(fp32, token, route, 64)
    m, t = onnx.load(route), onnx.load(token)
    assert _ops(m.graph).count("If") == 1
    (node,) = [n for n in m.graph.node if n.op_type == "If"]
    dec, pre = (next(a.g for a in node.attribute if a.name == k) for k in ("then_branch", "else_branch"))
    n_int8 = _ops(t.graph).count("MatMulIntegerToFloat")
    assert _nbits_layers(dec) == n_int8 and "MatMulIntegerToFloat" not in _ops(dec)
    assert _ops(dec).count("MatMulNBits") == n_int8 - 2 * 2 - 1 * 2      # q/k/v and gate/up packed per layer
    assert not {"QuantizeLinear", "Abs"} & set(_ops(dec))                 # no row quantizer at one token
    assert _ops(pre).count("MatMulIntegerToFloat") == n_int8 and "MatMulNBits" not in _ops(pre)
    # stored once: no int8 weight left anywhere; the uint8 bytes equal the token graph's int8 bytes
    big = [x for x in initializers(m) if np.prod(x.dims) >= 64]
    assert not [x for x in big if x.data_type == T.INT8]
    padded = sum(-(-x.dims[0] // 64) * 64 * x.dims[1] for x in t.graph.initializer    # [K, N], K to blocks of 64
                 if x.data_type == T.INT8 and np.prod(x.dims) >= 64)
    assert sum(np.prod(x.dims) for x in big if x.data_type == T.UINT8) == padded
    assert [i.name for i in m.graph.input] == [i.name for i in t.graph.input]
    assert [o.name for o in m.graph.output] == [o.name for o in t.graph.output]


def test_genai_form_with_tied_int8_head(tmp_path):
    """The builder's tied table: lookup and head read one set of MatMulNBits bytes. Also the regression
    test for onnx.checker on branches: ops onnxruntime adds to the ONNX domain (SimplifiedLayerNormalization)
    inside an If body were judged by the checker and refused."""
    fp32, token, route = _quantize(tmp_path, build_genai_past(), lm_head=True, embedding_int8=True)
    m = onnx.load(route)
    dec = next(a.g for n in m.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert _nbits_layers(dec) == _ops(onnx.load(token).graph).count("MatMulIntegerToFloat")
    r = DecodeRunner(make_session(route), past_layout(m))
    ids = np.random.default_rng(1).integers(0, 64, size=(1, TOTAL))
    ref = DecodeRunner(make_session(token), past_layout(onnx.load(token)))
    np.testing.assert_array_equal(r.prefill(ids[:, :PREFIX]), ref.prefill(ids[:, :PREFIX]))
    a, b = r.step(ids[:, PREFIX:PREFIX + 1]), ref.step(ids[:, PREFIX:PREFIX + 1])
    assert np.abs(a - b).max() <= 0.1 * np.abs(b).max()


@pytest.mark.parametrize("k,block", [(48, 16), (40, 16), (96, 64)])
def test_layout_is_the_int8_weight(k, block):
    rng = np.random.default_rng(k)
    n = 24
    wq = rng.integers(-128, 128, (k, n)).astype(np.int8)
    w = rng.uniform(0.01, 0.03, n).astype(np.float32)
    b, s = nbits_layout(wq.T, w, block)
    assert b.shape == (n, -(-k // block), block) and s.shape == b.shape[:2]
    node = h.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                       block_size=block, accuracy_level=0)
    g = h.make_graph([node], "l", [h.make_tensor_value_info("x", T.FLOAT, [3, k])],
                     [h.make_tensor_value_info("y", T.FLOAT, [3, n])], [nh.from_array(b, "b"), nh.from_array(s, "s")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = make_session(model).run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ (wq.astype(np.float64) * w)
    assert np.all(np.abs(y - ref) <= 1e-5 + 1e-5 * np.abs(ref)), float(np.abs(y - ref).max())


def test_route_needs_token_and_fusions():
    with pytest.raises(GraphpassError, match="--decode-route needs"):
        PipelineConfig(scheme="token", decode_route=True)
    with pytest.raises(GraphpassError, match="--decode-route needs"):
        PipelineConfig(scheme="dynamic", decode_fusions=True, decode_route=True)
    with pytest.raises(GraphpassError, match="not combined yet"):
        PipelineConfig(scheme="token", decode_fusions=True, decode_route=True, kv_cache="int8")


def test_int8_head_of_the_tiny_decoder_is_reported_by_name(tmp_path):
    """Regression: the report read a layer's name after the rewrite had detached its node, which
    failed (IndexError) for a node named by its output, e.g. the tiny decoder's head."""
    onnx.save(tiny_decoder(), tmp_path / "m.onnx")
    res = quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", None,
                   PipelineConfig(scheme="token", alpha=None, lm_head=True, embedding_int8=True),
                   progress=False, log=lambda *_: None)
    assert res.quant.quantized and all(res.quant.quantized)


@pytest.mark.parametrize("pack,once", [(False, True), (True, False)])
def test_unpacked_and_stored_twice_keep_prefill_exact(tmp_path, pack, once):
    """RouteConfig(pack=False): one MatMulNBits per layer; store_once=False: the int8 copy stored
    beside the MatMulNBits bytes (no folding at load). Prefill stays the token graph's."""
    from graphpass.graph.gs_io import import_graph
    from graphpass.graph.io import load_model, save_graph
    from graphpass.passes.decode_route import RouteConfig, route_decode

    fp32, token, _ = _quantize(tmp_path, tiny_decoder())
    g = import_graph(load_model(token, load_weights=False), str(tmp_path))
    rep = route_decode(g, RouteConfig(block_size=16, pack=pack, store_once=once))
    save_graph(g, tmp_path / "r.onnx", check=True)
    m = onnx.load(tmp_path / "r.onnx")
    dec = next(a.g for n in m.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert _nbits_layers(dec) == len(rep.routed)
    assert ("Split" in _ops(dec)) == pack
    assert any(x.data_type == T.INT8 and np.prod(x.dims) >= 64 for x in initializers(m)) == (not once)
    _check(fp32, token, tmp_path / "r.onnx", 64)


def _tied(model: onnx.ModelProto) -> onnx.ModelProto:
    """The head reads Transpose(embedding table), as torch exports of tied heads do."""
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    head = next(n for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == "logits")
    old = head.input[1]
    model.graph.node.insert(0, h.make_node("Transpose", [gather.input[0]], ["tied_head_w"], perm=[1, 0]))
    head.input[1] = "tied_head_w"
    keep = [t for t in model.graph.initializer if t.name != old]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def test_float_head_on_the_int8_table_goes_to_nbits_at_decode(tmp_path):
    """--embedding-int8 without --lm-head: the head is a float MatMul over DequantizeLinear(table);
    at one token it reads the table's MatMulNBits bytes, in prefill the float head is untouched."""
    fp32, token, route = _quantize(tmp_path, _tied(tiny_decoder(vocab=256)), embedding_int8=True)   # tables >= 256 rows go int8
    m = onnx.load(route)
    dec = next(a.g for n in m.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    t_ops = _ops(onnx.load(token).graph)
    assert _nbits_layers(dec) == t_ops.count("MatMulIntegerToFloat") + 1
    assert "DequantizeLinear" not in _ops(dec)
    _check(fp32, token, route, 64)


def test_route_past_1_gb_saves_with_its_local_scale_in_external_data(tmp_path, monkeypatch):
    """A model past the external-data threshold writes the prefill body's own DequantizeLinear
    scale (the int8 table's, [vocab] float) into the data file too: the checked save must pass and
    the route run as before (threshold lowered to 0 to stand for a model past 1 GB)."""
    import graphpass.graph.io as gio

    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", 0)
    fp32, token, route = _quantize(tmp_path, _tied(tiny_decoder(vocab=256)), embedding_int8=True)
    assert (tmp_path / "route.onnx.data").exists()
    _check(fp32, token, route, 256)
