"""Two-digit int8 activations (passes/digits.py) inside the outlier scheme.

The second digit quantizes the first digit's per-row rounding error again: the numpy model,
the node form through onnxruntime, op counts and sharing between readers, the split with both
float columns and two digits, the search's error model, config / CLI checks and the pipeline."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphpass
from conftest import cli_error, cli_ok, copy_model, make_model, node, op_counts, run
from graphpass.errors import GraphpassError
from graphpass.passes.digits import fake_quant_digits
from graphpass.passes.outlier import OutlierConfig, split_outliers
from graphpass.passes.qforms import quantize_weight
from graphpass.passes.quantize import QuantConfig
from graphpass.pipeline import PipelineConfig
from graphpass.search.alpha import fake_quant_act, fake_quant_weight
from graphpass.search.outlier_alpha import split_error

TOKEN = QuantConfig("token", lm_head=True)
K, N = 64, 24
FORM_RTOL = 2e-4   # onnxruntime vs the numpy model: float32 X / r may round a few elements the other way,
                   # each by one second-digit step r / 254 (<= 1e-4 of max|Y| here)
NAMES = ("MatMul_a", "MatMul_b")


def _two_readers(rng) -> tuple[onnx.ModelProto, dict]:
    ws = {n: rng.standard_normal((K, N)).astype(np.float32) for n in ("wa", "wb")}
    nodes = [node("MatMul", ["x", w], w[1]) for w in ws]
    return make_model(nodes, [("x", ["b", "s", K])], [(w[1], ["b", "s", N]) for w in ws], ws), ws


def _spiky(rng) -> np.ndarray:
    """Heavy-tailed rows (Student t, 2 degrees of freedom): each row's max is a spike in its own column."""
    return rng.standard_t(2, (2, 9, K)).astype(np.float32)


def _rel(y, ref) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def test_fake_quant_digits_step_is_254x_finer():
    x = _spiky(np.random.default_rng(0)).reshape(-1, K)
    r = np.abs(x).max(axis=1, keepdims=True) / 127.0
    assert np.abs(fake_quant_act(x, "token") - x).max() <= 0.5 * r.max() * (1 + 1e-6)
    assert np.all(np.abs(fake_quant_digits(x) - x) <= r / 508.0 * (1 + 1e-6))


def test_two_digit_form_matches_numpy_shares_digits_and_op_counts():
    rng = np.random.default_rng(1)
    m, ws = _two_readers(rng)
    q, rep = split_outliers(copy_model(m), TOKEN, {}, two_digit=frozenset(NAMES))
    c = op_counts(q)
    # one row quantizer and one second digit for the shared x; two int8 products per reader
    assert c["QuantizeLinear"] == 2 and c["DequantizeLinear"] == 1 and c["Sub"] == 1 and c["ReduceMax"] == 1
    assert c["MatMulIntegerToFloat"] == 4 and c["Add"] == 2 and "Gather" not in c and "MatMul" not in c
    assert sorted(rep.two_digit) == sorted(NAMES) and rep.float_share == 0.0
    x = _spiky(rng)
    y = run(q, {"x": x})
    tok = run(split_outliers(copy_model(m), TOKEN, {})[0], {"x": x})
    for name, w in ws.items():
        wq, s = quantize_weight(w)
        want = fake_quant_digits(x.reshape(-1, K)) @ (wq.astype(np.float64) * s)
        got = y[name[1]].reshape(-1, N)
        assert np.abs(got - want).max() <= FORM_RTOL * np.abs(want).max()
        ref = x.reshape(-1, K).astype(np.float64) @ w
        w_only = _rel(x.reshape(-1, K) @ fake_quant_weight(w), ref)      # activations in float
        # the activation rounding is gone: what is left is the weight rounding
        assert _rel(got, ref) <= 1.1 * w_only
        assert _rel(got, ref) <= 0.5 * _rel(tok[name[1]].reshape(-1, N), ref)


def test_two_digits_with_float_columns():
    """O = {3, 40} in float and two digits for the rest: exact split in float, numpy match in int8."""
    rng = np.random.default_rng(2)
    m, ws = _two_readers(rng)
    o = np.array([3, 40])
    x = _spiky(rng)
    x[..., o] *= 100.0
    qf, _ = split_outliers(copy_model(m), TOKEN, {"x": o}, int8=False, two_digit=frozenset(NAMES))
    ref = run(m, {"x": x})
    got = run(qf, {"x": x})
    assert max(np.abs(got[k] - r).max() / np.abs(r).max() for k, r in ref.items()) <= 1e-5
    q, rep = split_outliers(copy_model(m), TOKEN, {"x": o}, two_digit=frozenset(NAMES))
    assert op_counts(q)["Gather"] == 1 and op_counts(q)["MatMulIntegerToFloat"] == 4
    assert rep.columns == {n: (2, K) for n in NAMES}
    y = run(q, {"x": x})
    mask = np.ones(K, np.float32)
    mask[o] = 0
    xs = x.reshape(-1, K)
    for name, w in ws.items():
        wq, s = quantize_weight(w * mask[:, None])
        want = fake_quant_digits(xs * mask) @ (wq.astype(np.float64) * s) + xs[:, o].astype(np.float64) @ w[o]
        assert np.abs(y[name[1]].reshape(-1, N) - want).max() <= FORM_RTOL * np.abs(want).max()
        err = split_error(xs, [w], [xs @ w], np.ones(K, np.float32), o, digits=True)
        got_err = float(((y[name[1]].reshape(-1, N) - xs @ w) ** 2).sum() / ((xs @ w) ** 2).sum())
        assert got_err == pytest.approx(err, rel=1e-2)


def test_two_digit_kinds_are_checked():
    with pytest.raises(GraphpassError, match="unknown site kind 'mlp'"):
        OutlierConfig(two_digit=("mlp",))


def test_cli_two_digit_option(synth, tmp_path, capsys):
    s = synth("llama")
    out, _ = cli_ok(capsys, ["quantize", str(s.path), "-o", str(tmp_path / "all.onnx"), "--data", str(s.data_path),
                             "--scheme", "outlier", "--outlier-two-digit-first", "1"])
    assert "2 layers with two-digit int8 activations" in out
    out, _ = cli_ok(capsys, ["quantize", str(s.path), "-o", str(tmp_path / "none.onnx"), "--data", str(s.data_path),
                             "--scheme", "outlier", "--outlier-two-digit", "none"])
    assert "two-digit" not in out and op_counts(onnx.load(tmp_path / "none.onnx"))["DequantizeLinear"] == 0
    assert "apply to --scheme outlier" in cli_error(capsys, ["quantize", str(s.path), "-o", str(tmp_path / "a.onnx"),
                                                     "--data", str(s.data_path), "--outlier-two-digit", "glu"])
    assert "unknown site kind" in cli_error(capsys, ["quantize", str(s.path), "-o", str(tmp_path / "b.onnx"),
                                             "--data", str(s.data_path), "--scheme", "outlier",
                                             "--outlier-two-digit", "glu,mlp"])


def test_pipeline_two_digit_glu_sites(synth, tmp_path):
    """two_digit_first 1: every reader of a SwiGLU output (down_proj) takes two digits; no other layer does."""
    from graphpass.match.sites import analyze

    s = synth("llama")
    res = graphpass.quantize(s.path, tmp_path / "q.onnx", s.data,
                             PipelineConfig(scheme="outlier", alpha="auto", row_step=1,
                                            outlier=OutlierConfig(two_digit=("glu",), two_digit_first=1.0)),
                             progress=False, log=lambda t: None)
    an = analyze(s.fresh())
    down = {lin.name for st in an.sites if st.kind == "glu" for lin in st.consumers}
    assert down and set(res.quant.two_digit) == down
    q = onnx.load(tmp_path / "q.onnx")
    assert op_counts(q)["MatMulIntegerToFloat"] == len(res.quant.quantized) + len(down)


def test_bench_outlier_rows_take_two_digit_kinds():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_outlier", Path(__file__).parents[1] / "tools" / "bench_outlier.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    name, (scheme, alpha, opts) = tool._extra("o+s, 1%=outlier,auto,fraction=0.01,two_digit=glu+attn")
    assert (name, scheme, alpha) == ("o+s, 1%", "outlier", "auto")
    assert OutlierConfig(**opts) == OutlierConfig(fraction=0.01, two_digit=("glu", "attn"))
    assert tool._extra("t=outlier,0.5,two_digit=none")[1][2] == {"two_digit": ()}


@pytest.mark.parametrize("digits", [False, True])
def test_layers_mostly_outliers_keep_the_float_matmul(digits):
    """Above SPLIT_MAX_SHARE[digits] of the columns the split costs more than the float MatMul:
    the layer stays float (exact), its columns count as float; just below, the split is emitted."""
    from graphpass.passes.outlier import SPLIT_MAX_SHARE

    rng = np.random.default_rng(3)
    m, _ = _two_readers(rng)
    limit = int(SPLIT_MAX_SHARE[digits] * K)
    cols = {"MatMul_a": np.arange(limit + 1), "MatMul_b": np.arange(limit)}
    q, rep = split_outliers(copy_model(m), TOKEN, cols, two_digit=frozenset(NAMES) if digits else frozenset())
    assert rep.quantized == ["MatMul_b"] and [n for n, _ in rep.skipped] == ["MatMul_a"]
    assert "the float MatMul is cheaper than the split" in rep.skipped[0][1]
    assert rep.columns == {"MatMul_a": (K, K), "MatMul_b": (limit, K)}
    assert rep.float_share == pytest.approx((K + limit) / (2 * K))
    x = _spiky(rng)
    ref, got = run(m, {"x": x}), run(q, {"x": x})
    assert np.array_equal(got["a"], ref["a"])


def test_two_digit_first_share_takes_the_earliest_sites(synth, tmp_path):
    """two_digit_first 0.5 on the 2-layer llama: layer 0's down_proj only, in the pass and in the
    search's error model (the one-digit site scores as the plain split)."""
    from graphpass.calibrate.collect import calibrate
    from graphpass.match.sites import analyze
    from graphpass.passes.outlier import two_digit_layers, two_digit_sites
    from graphpass.search.outlier_alpha import search_alpha_outlier

    s = synth("llama")
    an = analyze(s.fresh())
    glu = [st for st in an.sites if st.kind == "glu"]
    assert len(glu) == 2
    half = OutlierConfig(two_digit_first=0.5)
    assert two_digit_sites(an, half) == {glu[0].name}
    assert two_digit_layers(an, half) == {lin.name for lin in glu[0].consumers}
    assert two_digit_sites(an, OutlierConfig(two_digit_first=0.0)) == frozenset()
    stats = calibrate(s.path, s.data, 1, 1, False, row_step=1)
    one = {r["site"]: r["best_error"] for r in search_alpha_outlier(an, stats, OutlierConfig(two_digit=()), progress=False)[1]}
    mix = {r["site"]: r["best_error"] for r in search_alpha_outlier(an, stats, half, progress=False)[1]}
    assert mix[glu[1].name] == one[glu[1].name] and mix[glu[0].name] < 0.5 * one[glu[0].name]
    res = graphpass.quantize(s.path, tmp_path / "q.onnx", s.data,
                             PipelineConfig(scheme="outlier", alpha="auto", row_step=1, outlier=half),
                             progress=False, log=lambda t: None)
    assert set(res.quant.two_digit) == {lin.name for lin in glu[0].consumers}
    with pytest.raises(GraphpassError, match="two-digit-first"):
        OutlierConfig(two_digit_first=1.5)
