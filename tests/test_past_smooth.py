"""Smoothing folds on with-past graphs (optimum-onnx and onnxruntime-genai forms) are exact for
the graph's own generation loop: prefill, then decode steps reading back its own cache.

Sites checked: norms (decomposed RMSNorm, SimplifiedLayerNormalization, the γ of
SkipSimplifiedLayerNormalization, whose residual output 3 must not change), SwiGLU up -> down,
and v -> o through Concat(past, v) (optimum) or GroupQueryAttention with packed q/k/v (genai).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphpass.graph.decode import DecodeRunner, past_layout
from graphpass.graph.runtime import make_session
from graphpass.match.sites import analyze
from graphpass.passes.smooth import SmoothConfig, smooth
from graphpass.passes.smooth_checked import output_change
from graphpass.testing.past import build_genai_past, build_optimum_past

FORMS = {"optimum": build_optimum_past, "genai": build_genai_past}
RTOL = 2e-5     # max |Δlogits| / max |logits|: float32 reassociation only


def _smoothed(model: onnx.ModelProto, alpha: float = 0.5):
    an = analyze(model)
    rng = np.random.default_rng(1)
    absmax = {s.act: rng.uniform(0.05, 40.0, s.consumers[0].shape(an.consts)[0]) for s in an.sites}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    an2 = analyze(out)
    return smooth(out, absmax, SmoothConfig(alpha=alpha), an2)


def _decode(model, ids, prefix, steps):
    r = DecodeRunner(make_session(model), past_layout(model))
    out = [r.prefill(ids[:, :prefix])]
    for k in range(steps):
        out.append(r.step(ids[:, prefix + k:prefix + k + 1]))
    return np.concatenate(out, axis=1), r.last


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_site_matched_on_with_past_forms(form):
    an = analyze(FORMS[form]())
    kinds = sorted({s.kind for s in an.sites})
    assert kinds == ["attn", "glu", "rmsnorm"], (kinds, an.uncovered)
    assert an.uncovered == [] or all("lm_head" in name for name, _ in an.uncovered), an.uncovered


@pytest.mark.parametrize("form", sorted(FORMS))
def test_smoothing_is_exact_over_prefill_and_decode(form):
    m = FORMS[form]()
    sm, rep = _smoothed(m)
    assert len(rep.rows) == len(analyze(m).sites)
    ids = np.random.default_rng(2).integers(0, 60, size=(2, 12))
    ref, ref_last = _decode(m, ids, prefix=7, steps=5)
    got, got_last = _decode(sm, ids, prefix=7, steps=5)
    assert np.abs(got - ref).max() / np.abs(ref).max() < RTOL
    # the scales moved real magnitude: the value cache differs, the key cache does not
    lay = past_layout(m)
    v0 = lay.present_names[1] if lay.present_names[1].endswith("value") else lay.present_names[0]
    assert not np.allclose(got_last[v0], ref_last[v0], rtol=1e-3)
    assert output_change(m, sm) < RTOL


def test_skip_norm_residual_output_is_untouched():
    m = build_genai_past()
    sm, _ = _smoothed(m)
    skip = [n for n in sm.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    names = [n.output[3] for n in skip if len(n.output) > 3 and n.output[3]]
    assert names, "the builder's skip norms expose their residual output"
    for model in (m, sm):
        model.graph.output.extend(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in names)
    ids = np.random.default_rng(3).integers(0, 60, size=(1, 9))
    r1 = DecodeRunner(make_session(m), past_layout(m), extra_outputs=names)
    r2 = DecodeRunner(make_session(sm), past_layout(sm), extra_outputs=names)
    r1.prefill(ids), r2.prefill(ids)
    for x in names:
        np.testing.assert_allclose(r2.last[x], r1.last[x], rtol=1e-5, atol=1e-5)


def test_output_change_sees_a_wrong_fold():
    m = build_genai_past()
    sm, _ = _smoothed(m)
    qkv = next(n for n in sm.graph.node if n.op_type == "MatMul" and "qkv" in n.name)
    w = next(t for t in sm.graph.initializer if t.name == qkv.input[1])
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[:, -1] *= 3.0       # one value column off: the cache carries it into later steps
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    assert output_change(m, sm) > 1e-3


def test_save_with_check_accepts_onnxruntime_ops_of_the_onnx_domain(tmp_path):
    """Regression: quantize of the genai form failed at save with "No Op registered for
    SimplifiedLayerNormalization with domain_version of 18" (onnx does not know the op)."""
    from graphpass.graph.io import load_model, save_model

    m = build_genai_past()
    assert any(n.op_type == "SimplifiedLayerNormalization" and n.domain == "" for n in m.graph.node)
    save_model(m, tmp_path / "g.onnx", check=True)
    assert len(load_model(tmp_path / "g.onnx").graph.node) == len(m.graph.node)


def test_shape_readers_of_the_cache_do_not_block_the_value_fold():
    """The TorchScript export reads present.{i}.value with four Shape nodes besides the head
    repeat; a Shape sees no values, so v -> o still folds (real SmolLM2: 30 attn sites)."""
    m = build_optimum_past()
    concat = next(n for n in m.graph.node if n.op_type == "Concat" and n.input[0].endswith(".value"))
    m.graph.node.append(onnx.helper.make_node("Shape", [concat.output[0]], ["gp_test_shape"]))
    kinds = [s.kind for s in analyze(m).sites]
    assert kinds.count("attn") == 2, kinds
    sm, _ = _smoothed(m)
    assert output_change(m, sm) < RTOL


def test_quantize_spills_inline_weights_and_leaves_no_trace(tmp_path, monkeypatch):
    """An inline-weight model (optimum writes SmolLM2 as one 540 MB file) is copied once with
    external data, so later steps read weights one at a time; the result equals the direct path."""
    import graphpass.graph.io as gio
    from graphpass.pipeline import PipelineConfig, quantize

    src = tmp_path / "m"
    src.mkdir()
    onnx.save(build_optimum_past(), src / "model.onnx")
    before = sorted(p.name for p in src.iterdir())
    cfg = PipelineConfig(scheme="dynamic", alpha=None)
    quantize(src / "model.onnx", tmp_path / "direct.onnx", None, cfg, progress=False, log=lambda *a: None)
    monkeypatch.setattr(gio, "INLINE_SPILL_BYTES", 0)
    res = quantize(src / "model.onnx", tmp_path / "spilled.onnx", None, cfg, progress=False, log=lambda *a: None)
    assert sorted(p.name for p in src.iterdir()) == before
    assert res.size_before == (src / "model.onnx").stat().st_size
    a, b = onnx.load(tmp_path / "direct.onnx"), onnx.load(tmp_path / "spilled.onnx")
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]


def test_spill_moves_inline_weights_without_loading_the_model(tmp_path):
    from graphpass.graph.spill import spill

    m = build_genai_past()
    onnx.save(m, tmp_path / "in.onnx")
    (tmp_path / "out").mkdir()
    moved = spill(tmp_path / "in.onnx", tmp_path / "out" / "model.onnx", threshold=64)
    big = [t for t in m.graph.initializer if len(t.raw_data) >= 64]
    assert big and moved == sum(len(t.raw_data) for t in big)
    back = onnx.load(tmp_path / "out" / "model.onnx")      # external data resolved by onnx
    assert [n.SerializeToString() for n in back.graph.node] == [n.SerializeToString() for n in m.graph.node]
    for a, b in zip(m.graph.initializer, back.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    stub = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in stub.graph.initializer) == len(big)


def test_spill_refuses_a_truncated_file(tmp_path):
    from graphpass.graph.spill import spill

    onnx.save(build_genai_past(), tmp_path / "in.onnx")
    raw = (tmp_path / "in.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError):
        spill(tmp_path / "cut.onnx", tmp_path / "out.onnx")


def test_model_size_counts_external_data_of_subgraph_weights(tmp_path):
    """model_size reads data locations from the wire format; a weight inside an If branch counts
    too (as onnx's own tensor walk counted it before)."""
    from onnx import TensorProto, helper, numpy_helper

    from graphpass.graph.io import model_size

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "Wb")
    br = helper.make_graph([helper.make_node("Identity", ["Wb"], ["o"])], "b", [],
                           [helper.make_tensor_value_info("o", TensorProto.FLOAT, [64, 64])], [w])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=br, else_branch=br)], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])])
    onnx.save(helper.make_model(g), tmp_path / "m.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").stat().st_size >= 64 * 64 * 4
    assert model_size(tmp_path / "m.onnx") == (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.data").stat().st_size
