"""graphpass debug aligns smoothed candidates whose layers read another tensor than the
reference's X of that name, or whose outputs smoothing rescales on part of their columns:
packed q/k/v (genai form: only v's columns absorb 1/s), the outlier split (float columns beside
int8 ones), a duplicated post-LN norm (the smoothed readers move to a copy); a row it cannot align
says why. The candidate's side is read by graphpass.match.rewritten, checked form by form here."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import write_folder
from graphpass.calibrate.collect import calibrate
from graphpass.calibrate.data import build_data
from graphpass.graph.consts import Consts
from graphpass.graph.gs_io import import_graph
from graphpass.match.rewritten import read_rewritten
from graphpass.match.sites import analyze
from graphpass.passes.outlier import split_outliers
from graphpass.passes.quantize import QuantConfig
from graphpass.passes.smooth import SmoothConfig
from graphpass.passes.smooth_checked import smooth_model
from graphpass.pipeline import PipelineConfig, quantize
from graphpass.testing.past import build_genai_past, build_optimum_past
from graphpass.testing.synthetic import SyntheticConfig
from graphpass.validate.debug import debug

EXACT_DB = 60.0        # dB: a smoothed, unquantized candidate, every row (float32 reassociation only)
INT8_DB = 15.0         # dB: every honestly quantized tiny layer, at its input and alone (before: -24..4)
W8_STEP = 1 / 127      # |W' − W| <= one 8-bit step of max |W| (onnxruntime's 8-bit packing
W4_STEP = 1 / 7        # rounds to 0.51 of a step, its 4-bit to 0.66: a misread is O(max |W|))
QKV = "/attn/qkv_proj/MatMul"


def _exact(res, what: str):
    for r in res.layers:
        got = [r.sqnr_db, r.input_sqnr] + ([r.layer_sqnr_db] if r.quantized else [])
        assert None not in got and min(got) > EXACT_DB, (what, r.name, got)


def _aligned(res, what: str):
    """Every quantized row with an input: the input and the layer alone read as int8 error."""
    rows = [r for r in res.ranked() if r.input_sqnr is not None]
    assert len(rows) == len(res.ranked()), [r.name for r in res.ranked() if r.input_sqnr is None]
    for r in rows:
        assert min(r.input_sqnr, r.layer_sqnr_db, r.sqnr_db) > INT8_DB, (what, r.name, r.input_sqnr,
                                                                        r.layer_sqnr_db, r.sqnr_db)


# ---------------------------------------------------------------------------- the matcher
@pytest.mark.parametrize("scheme", ["token", "dynamic", "static", "outlier", "w8", "w4"])
def test_rewritten_layers_read_back_their_input_and_weight(synth, quantized, scheme):
    """Unsmoothed: X̂ is the reference's X and W' is W up to rounding (one step of max |W| on the
    8-bit / 4-bit grid), in every form."""
    s = synth("llama")
    extra = {"awq": False, "awq_clip": False} if scheme in ("w8", "w4") else {}
    qpath, _, _ = quantized("llama", scheme=scheme, alpha=None, **extra)
    step = W4_STEP if scheme == "w4" else W8_STEP
    an = analyze(s.model)
    c = Consts(import_graph(onnx.load(str(qpath))))
    tensors = c.graph.tensors()
    forms = set()
    for lin in an.linears:
        rw = read_rewritten(c, tensors[lin.node.outputs[0].name])
        assert rw is not None and rw.x.name == lin.act, (lin.name, rw and rw.x.name)
        w, w1 = lin.weight(an.consts).astype(np.float64), rw.weight(c)
        assert np.abs(w1 - w).max() <= step * np.abs(w).max() * 1.0001, lin.name
        forms |= {rw.form} | {p.form for p in rw.parts}
    want = {"token": {"token", "float"}, "dynamic": {"dynamic", "float"}, "static": {"qdq", "float"},
            "outlier": {"split", "token", "digits", "float"}, "w8": {"nbits"}, "w4": {"nbits"}}[scheme]
    assert forms <= want and ("split" in forms) == (scheme == "outlier"), forms


# ---------------------------------------------------------------------------- genai: packed q/k/v
@pytest.fixture(scope="module")
def genai(tmp_path_factory):
    d = tmp_path_factory.mktemp("genai-debug")
    m = build_genai_past(SyntheticConfig())
    ref = write_folder(d / "ref", m, "causal-lm")
    data = build_data(np.random.default_rng(9).integers(0, 256, 96), 16, 6, m)
    sm, _ = smooth_model(onnx.load(str(ref)), calibrate(ref, data, batch_size=2, progress=False),
                         SmoothConfig(alpha=0.5))
    q = d / "q" / "model.onnx"
    q.parent.mkdir()
    quantize(ref, q, data, PipelineConfig(), progress=False, log=lambda _: None)
    return ref, write_folder(d / "smoothed", sm, "causal-lm"), q, data


def test_packed_qkv_rescaled_on_v_columns_only(genai):
    """Smoothing the attention output scales only v's columns of the packed q/k/v product: the
    gain is taken on those (the old test over all columns found none: 0.35 dB)."""
    ref, smoothed, q, data = genai
    res = debug(ref, smoothed, data, progress=False)
    _exact(res, "smoothed genai")
    assert sum(r.rescaled for r in res.layers if r.name.endswith(QKV)) == 2
    res = debug(ref, q, data, progress=False)
    _aligned(res, "quantized genai")
    assert all(r.rescaled for r in res.layers if r.name.endswith(QKV))


def test_layers_packed_into_one_nbits_product_are_read_back(tmp_path):
    """--decode-fusions packs q/k/v (and gate/up) into one MatMulNBits and a Split: each output
    is its columns of the packed weight (before: 'form not recognized', gains fitted on data)."""
    m = build_optimum_past(SyntheticConfig())
    ref = write_folder(tmp_path / "ref", m, "causal-lm")
    data = build_data(np.random.default_rng(9).integers(0, 256, 96), 16, 6, m)
    q = tmp_path / "q" / "model.onnx"
    q.parent.mkdir()
    quantize(ref, q, data, PipelineConfig(scheme="w8", decode_fusions=True), progress=False, log=lambda _: None)
    assert any(n.op_type == "Split" for n in onnx.load(str(q)).graph.node)
    res = debug(ref, q, data, progress=False)
    assert [r.note for r in res.layers if r.note] == []
    _aligned(res, "packed w8")


# ---------------------------------------------------------------------------- outlier split
def test_outlier_split_inputs_are_aligned(synth, quantized):
    """Smoothing + float columns: the gains come from both parts of the split (before: the int8
    part alone, zero on the float columns, so input and layer read -2..4 dB)."""
    s = synth("llama")
    qpath, res_q, _ = quantized("llama", scheme="outlier")
    assert any(0 < o < k for o, k in res_q.quant.columns.values())      # a real split is in it
    _aligned(debug(s.path, qpath, s.data, progress=False), "outlier")


def test_smoothed_float_split_reads_as_exact(synth, calibrated, tmp_path):
    s = synth("llama")
    m, _ = smooth_model(s.fresh(), calibrated("llama"), SmoothConfig(alpha=0.5))
    cols = {lin.name: np.array([3, 17], np.int64) for lin in analyze(m).linears}
    m, rep = split_outliers(m, QuantConfig("token"), cols, int8=False)
    assert len(rep.quantized) == 14
    _exact(debug(s.path, write_folder(tmp_path / "split", m, "causal-lm"), s.data, progress=False), "split")


# ---------------------------------------------------------------------------- post-LN encoder
def test_duplicated_postln_norm_is_compared_where_the_layers_read(synth, calibrated, quantized, tmp_path):
    """A post-LN norm also feeds the residual: smoothing gives its readers a copy, and the
    reference's X of that name stays unsmoothed in the candidate (before: the gain of the copy
    was applied to it, layer dB 0.5-2.8)."""
    s = synth("postln")
    m, rep = smooth_model(s.fresh(), calibrated("postln"), SmoothConfig(alpha=0.5))
    assert any(r["cloned"] for r in rep.rows)
    _exact(debug(s.path, write_folder(tmp_path / "smoothed", m, "encoder"), s.data, progress=False), "postln")
    qpath, _, _ = quantized("postln", scheme="token")
    _aligned(debug(s.path, qpath, s.data, progress=False), "postln token")


# ---------------------------------------------------------------------------- what cannot be aligned
def test_reader_with_columns_rescaled_beyond_the_folds_gives_no_input_gain(synth, calibrated, tmp_path):
    """q_proj's columns rescaled as --kv-smooth does (σ no site records): the shared input's gain
    comes from another reader (taken from q_proj, the input read 11 dB), and q_proj's row says
    why its output differs."""
    s = synth("llama")
    m, _ = smooth_model(s.fresh(), calibrated("llama"), SmoothConfig(alpha=0.5))
    q = next(n for n in m.graph.node if n.name == "/model/layers.0/self_attn/q_proj/MatMul")
    t = next(t for t in m.graph.initializer if t.name == q.input[1])
    w = onnx.numpy_helper.to_array(t)
    sigma = np.random.default_rng(3).uniform(0.5, 2.0, w.shape[1]).astype(np.float32)
    t.CopyFrom(onnx.numpy_helper.from_array(w * sigma, t.name))
    res = debug(s.path, write_folder(tmp_path / "sigma", m, "causal-lm"), s.data, progress=False)
    row = next(r for r in res.layers if r.name == q.name)
    assert row.input_sqnr > EXACT_DB and row.sqnr_db < 20.0 and "not diag(s)·W" in row.note
    assert [r.name for r in res.layers if r.note] == [q.name]


def test_row_of_an_unknown_form_says_why(synth, tmp_path, capsys):
    """A layer whose weight comes through an op the matcher does not know: its input is compared
    by name, and the row says so (text and JSON)."""
    m = synth("llama").fresh()
    at, mm = next((k, n) for k, n in enumerate(m.graph.node) if n.name == "/model/layers.1/mlp/down_proj/MatMul")
    m.graph.node.insert(at, onnx.helper.make_node("Identity", [mm.input[1]], ["w_through"], name="opaque"))
    mm.input[1] = "w_through"
    res = debug(synth("llama").path, write_folder(tmp_path / "odd", m, "causal-lm"), synth("llama").data,
                progress=False)
    odd = [r for r in res.layers if r.note]
    assert [r.name for r in odd] == [mm.name] and "not recognized" in odd[0].note
    assert odd[0].layer_sqnr_db > EXACT_DB                       # the same function: still exact
    assert f"^ {odd[0].note}" in res.format(top=20)
    assert next(r for r in res.to_json()["layers"] if r["name"] == mm.name)["note"] == odd[0].note
