"""kv_grouped.py: the int8 cache of decomposed attention read without the repeat-kv copy (the
query heads grouped over their kv head), exact against dequantize-then-float."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphpass.calibrate.data import build_data
from graphpass.calibrate.kv import cache_absmax, cache_scales
from graphpass.graph.decode import DecodeRunner, past_layout
from graphpass.graph.runtime import make_session
from graphpass.passes.kv_cache import quantize_kv_cache
from graphpass.testing.past import build_optimum_past, token_ids
from graphpass.testing.synthetic import SyntheticConfig

CFG = SyntheticConfig()
EXACT = 1e-4          # relative to max |logit|: float32 reassociation only



def _logits(model: onnx.ModelProto, path, ids, prefill=8) -> np.ndarray:
    onnx.save(model, path)
    r = DecodeRunner(make_session(path, 1), past_layout(model))
    out = [r.prefill(ids[None, :prefill])] + [r.step(ids[None, t:t + 1]) for t in range(prefill, len(ids))]
    return np.concatenate(out, 1)[0]


def _repeated(g: gs.Graph, present: str) -> tuple[gs.Variable, gs.Node]:
    """The repeat-kv output of `present` (Unsqueeze -> Expand -> Reshape) and its first reader."""
    t = next(o for o in g.outputs if o.name == present)
    for op in ("Unsqueeze", "Expand", "Reshape"):
        t = next(n for n in t.outputs if n.op == op).outputs[0]
    return t, t.outputs[0]


def _int8(model, scales, fold=True):
    g = gs.import_onnx(model)
    rep = quantize_kv_cache(g, scales, fold)
    return gs.export_onnx(g), rep


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("kvg")
    m = build_optimum_past(CFG)
    onnx.save(m, d / "f.onnx")
    return m, cache_scales(cache_absmax(d / "f.onnx", build_data(token_ids(CFG, 512), 64, 8, m), 2, progress=False))


def test_grouped_read_drops_every_repeat_copy_and_equals_dequantize_then_float(base, tmp_path):
    m, scales = base
    q, rep = _int8(m, scales)
    assert rep.grouped == rep.folded == 2 * CFG.layers and not rep.skipped
    assert sum(n.op_type == "Expand" for n in m.graph.node) == 2 * CFG.layers
    assert not [n for n in q.graph.node if n.op_type == "Expand"]
    ids = token_ids(CFG, 40, seed=3)
    a = _logits(q, tmp_path / "g.onnx", ids)
    b = _logits(_int8(m, scales, fold=False)[0], tmp_path / "d.onnx", ids)
    assert np.abs(a - b).max() <= EXACT * np.abs(b).max()


def test_a_scalar_on_the_keys_moves_to_the_grouped_query(base, tmp_path):
    """K·0.5 between the Transpose and the score MatMul (SmolLM2's export scales K by d^-1/4 there)."""
    m, scales = base
    g = gs.import_onnx(m)
    kt = next(n for n in g.nodes if n.op == "Transpose" and n.outputs[0].outputs[0].op == "MatMul"
              and n.inputs[0].inputs[0].op == "Reshape")
    mm = kt.outputs[0].outputs[0]
    half = gs.Variable("k_half", np.float32)
    g.nodes.append(gs.Node("Mul", inputs=[kt.outputs[0], gs.Constant("c_half", np.array(0.5, np.float32))],
                           outputs=[half]))
    mm.inputs[1] = half
    m2 = gs.export_onnx(g.toposort())
    q, rep = _int8(m2, scales)
    assert rep.grouped == 2 * CFG.layers
    ids = token_ids(CFG, 30, seed=4)
    a = _logits(q, tmp_path / "g.onnx", ids)
    b = _logits(_int8(m2, scales, fold=False)[0], tmp_path / "d.onnx", ids)
    assert np.abs(a - b).max() <= EXACT * np.abs(b).max()


@pytest.mark.parametrize("axis, dropped", [(2, True), (1, False)])
def test_a_shape_read_of_the_repeated_keys(base, tmp_path, axis, dropped):
    """Shape(repeated K)[2] (the key length, as the exporter's mask reads it) moves to the cache and
    the copy goes; Shape(...)[1] (the head count, h != kv) keeps it, with the reason."""
    m, scales = base
    g = gs.import_onnx(m)
    rk, _ = _repeated(g, "present.0.key")
    shp = g.layer(op="Shape", inputs=[rk], outputs=[gs.Variable("rk_shape", np.int64)])[0]
    n = g.layer(op="Gather", inputs=[shp, gs.Constant("ax", np.array(axis, np.int64))],
                outputs=[gs.Variable("rk_dim", np.int64, [])], attrs={"axis": 0})[0]
    g.outputs.append(n)
    m2 = gs.export_onnx(g)
    q, rep = _int8(m2, scales)
    expands = sum(x.op_type == "Expand" for x in q.graph.node)
    assert expands == (0 if dropped else 1)
    assert any("repeat-kv copy kept (Shape" in r for r in rep.skipped) != dropped
    onnx.save(q, tmp_path / "q.onnx")
    lay = past_layout(q)
    r = DecodeRunner(make_session(tmp_path / "q.onnx", 1), lay, ["rk_dim"])
    r.prefill(token_ids(CFG, 6)[None])
    r.step(token_ids(CFG, 1)[None])
    assert int(r.last["rk_dim"]) == (7 if axis == 2 else CFG.heads)
