"""graphpass debug: per-layer SQNR of a rewritten graph against FP32, in one merged session."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import cli_error, cli_ok, write_folder
from graphpass.validate.debug import debug
from graphpass.validate.debug_graph import PREFIX, build_merged
from graphpass.validate.debug_weights import INLINE_BYTES

LAST_DOWN = "/model/layers.1/mlp/down_proj/MatMul"   # its output feeds only the final norm
MID_V = "/model/layers.0/self_attn/v_proj/MatMul"     # absorbs 1/s of the attention site
MID_O = "/model/layers.0/self_attn/o_proj/MatMul"
MID_GATE = "/model/layers.0/mlp/gate_proj/MatMul"
SCALE_JITTER = 0.1        # per-channel weight-scale error injected: ~10% (20 dB) in one layer
SMOOTHED_SQNR_FLOOR = 80.0  # dB: an exact fold, float32 reassociation only
INT8_SQNR_FLOOR = 15.0    # dB: every honestly quantized tiny-llama layer is above this
JITTER_SQNR_CEIL = 23.0   # dB: the jittered layer alone is below this (others: 29+)


def _perturbed(tmp_path, qpath, layer_output: str, seed: int = 0):
    """A copy of a token-quantized graph whose one layer (by output tensor) has wrong weight scales."""
    m = onnx.load(str(qpath))
    prod = {o: n for n in m.graph.node for o in n.output}
    mul = prod[layer_output]                                  # Y = MatMulIntegerToFloat(...) * r
    mm = next(prod[i] for i in mul.input if i in prod and prod[i].op_type == "MatMulIntegerToFloat")
    t = next(t for t in m.graph.initializer if t.name == mm.input[3])
    s = numpy_helper.to_array(t)
    rng = np.random.default_rng(seed)
    t.CopyFrom(numpy_helper.from_array(s * (1 + SCALE_JITTER * rng.choice([-1, 1], s.shape)).astype(s.dtype),
                                       t.name))
    return write_folder(tmp_path / "perturbed", m, "causal-lm")


def _out(an_model, name: str) -> str:
    return next(n.output[0] for n in an_model.graph.node if n.name == name)


def test_graph_against_itself_has_no_error(synth, tmp_path):
    s = synth("llama")
    res = debug(s.path, s.path, s.data, progress=False)
    assert len(res.layers) == 15 and not res.unmatched and res.samples == 4
    assert all(not r.quantized for r in res.layers) and res.ranked() == []
    assert all(r.noise == 0.0 and r.rel_l2 == 0.0 and r.sqnr_db == math.inf for r in res.layers)
    assert all(r.signal > 0 for r in res.layers)
    assert res.to_json()["layers"][0]["sqnr_db"] is None               # JSON: null = no error
    assert not list(s.dir.glob(".graphpass-debug-*"))                   # temporary files removed


def test_smoothed_float_graph_shows_no_error_once_gains_are_fitted(synth, calibrated, tmp_path):
    """A smoothed, unquantized graph computes the same function with rescaled intermediates:
    its gains are fitted on data (no int8 weight to read them from) and the error vanishes."""
    from graphpass.passes.smooth import SmoothConfig
    from graphpass.passes.smooth_checked import smooth_model

    s = synth("llama")
    m, _ = smooth_model(s.fresh(), calibrated("llama"), SmoothConfig(alpha=0.5))
    res = debug(s.path, write_folder(tmp_path / "smoothed", m, "causal-lm"), s.data, progress=False)
    assert sum(r.rescaled for r in res.layers) >= 4                   # v_proj, up_proj outputs
    assert min(r.sqnr_db for r in res.layers) > SMOOTHED_SQNR_FLOOR


def test_merged_graph_shares_equal_weights(synth):
    """Against itself, no large weight is stored twice; the candidate's nodes are prefixed."""
    s = synth("llama")
    mg = build_merged(s.path, s.path)
    try:
        m = onnx.load(str(mg.path), load_external_data=False)
        big_q = [t.name for t in m.graph.initializer if t.name.startswith(PREFIX) and
                 (t.data_location == onnx.TensorProto.EXTERNAL or t.ByteSize() >= INLINE_BYTES)]
        assert big_q == []
        assert sum(n.name.startswith(PREFIX) for n in m.graph.node) >= len(s.model.graph.node) - 5
        assert all(o.name.startswith("gp_dbg_") for o in m.graph.output)
    finally:
        mg.folder.remove()


@pytest.mark.parametrize("scheme", ["token", "dynamic", "static"])
def test_every_scheme_is_matched_by_name(synth, quantized, scheme):
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme=scheme)
    res = debug(s.path, qpath, s.data, progress=False)
    assert not res.unmatched and len(res.ranked()) == 14                # the tied LM head stays float
    for r in res.ranked():
        assert INT8_SQNR_FLOOR < r.sqnr_db < 80.0, (r.name, r.sqnr_db)
        assert r.layer_sqnr_db is not None and r.layer_sqnr_db > INT8_SQNR_FLOOR
    # smoothing rescales v_proj's output per channel (it absorbed 1/s); a plain comparison would
    # report ~0 dB there, the fitted gain recovers the true error
    v = next(r for r in res.layers if r.name == MID_V)
    assert v.rescaled and v.sqnr_db > INT8_SQNR_FLOOR


def test_perturbed_last_layer_ranks_worst(synth, quantized, tmp_path):
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme="token")
    bad = _perturbed(tmp_path, qpath, _out(s.model, LAST_DOWN))
    res = debug(s.path, bad, s.data, progress=False)
    for by in ("sqnr", "layer"):
        worst = res.ranked(by)
        assert worst[0].name == LAST_DOWN, (by, [(r.name, r.sqnr_db) for r in worst[:3]])
    assert worst[0].layer_sqnr_db < JITTER_SQNR_CEIL < worst[1].layer_sqnr_db


def test_perturbed_middle_layer_is_worst_alone(synth, quantized, tmp_path):
    """An early layer's error spreads downstream (output SQNR); its own error still stands out."""
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme="token")
    bad = _perturbed(tmp_path, qpath, _out(s.model, MID_GATE), seed=1)
    res = debug(s.path, bad, s.data, progress=False)
    worst = res.ranked("layer")
    assert worst[0].name == MID_GATE and worst[0].layer_sqnr_db < JITTER_SQNR_CEIL < worst[1].layer_sqnr_db


def test_gain_error_is_hidden_only_where_smoothing_rescales(synth, quantized, tmp_path):
    """v_proj absorbed 1/s: its per-channel gain is fitted, so a per-channel scale error there
    looks like smoothing (documented); the same error one layer later (o_proj) is caught."""
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme="token")
    res_v = debug(s.path, _perturbed(tmp_path / "v", qpath, _out(s.model, MID_V)), s.data, progress=False)
    res_o = debug(s.path, _perturbed(tmp_path / "o", qpath, _out(s.model, MID_O)), s.data, progress=False)
    v = next(r for r in res_v.layers if r.name == MID_V)
    o = next(r for r in res_o.layers if r.name == MID_O)
    assert v.rescaled and v.layer_sqnr_db > INT8_SQNR_FLOOR
    assert not o.rescaled and o.layer_sqnr_db < JITTER_SQNR_CEIL


def test_onnxruntime_qdq_graph(synth, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    s = synth("llama")
    rows = [{k: v[i:i + 1] for k, v in s.data.items()} for i in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(rows)

        def get_next(self):
            return next(self.it, None)

    out = tmp_path / "qdq.onnx"
    quantize_static(str(s.path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    res = debug(s.path, out, s.data, progress=False)
    assert not res.unmatched and len(res.ranked()) == 15              # QDQ quantizes the LM head too
    assert all(np.isfinite(r.sqnr_db) for r in res.ranked())


def test_cli_json_and_errors(synth, quantized, tmp_path, capsys):
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme="token")
    out, _ = cli_ok(capsys, ["debug", s.path, qpath, "--data", s.data_path, "--top", "3",
                             "--json", tmp_path / "d.json"])
    assert "rank" in out and out.count("/model/layers.") == 3
    d = json.loads((tmp_path / "d.json").read_text())
    assert len(d["ranked"]) == 14 and d["layers"][0]["signal"] > 0
    other = synth("postln")                                     # no input_ids-only graph in common
    err = cli_error(capsys, ["debug", s.path, other.path, "--data", s.data_path])
    assert "not inputs of the reference" in err or "no linear layer output" in err
