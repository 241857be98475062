"""The whole job (graphpass.pipeline.quantize and `graphpass quantize`): data as a dict or a
CalibrationDataReader, the summary, static ranges derived after smoothing, skip patterns, graphs
with nothing to quantize, external data in, self-contained model out, CLI errors."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader

import graphpass
from conftest import (CFG, cli_error, cli_ok, copy_model, inits, make_model, node, op_counts, run,
                      write_folder)
from graphpass.calibrate.collect import calibrate
from graphpass.graph import gs_io
from graphpass.errors import GraphpassError
from graphpass.graph.io import load_model, save_model
from graphpass.passes.qforms import static_qparams
from graphpass.passes.smooth import SmoothConfig, smooth
from graphpass.match.sites import analyze
from graphpass.pipeline import PipelineConfig, _ranges
from graphpass.testing.synthetic import build_llama, random_inputs

RANGE_RTOL = 1e-5  # derived range vs range recalibrated on the smoothed graph (float32 X / s)
REL_RMS_MAX = 0.10  # llama, token, alpha 0.5 on probe inputs (measured 0.063)
LLAMA_LINEARS = 15  # 14 layers + the tied LM head
QUIET = dict(progress=False, log=lambda s: None)


def rel_rms(ref: dict, got: dict) -> float:
    return max(float(np.linalg.norm(got[k].astype(np.float64) - r) / np.linalg.norm(r.astype(np.float64)))
               for k, r in ref.items())


def probe_rms(model: onnx.ModelProto, q: onnx.ModelProto) -> float:
    worst = 0.0
    for b, n, seed in ((3, 11, 2), (1, 20, 3)):
        feeds = random_inputs(model, b, n, seed=seed)
        worst = max(worst, rel_rms(run(model, feeds), run(q, feeds)))
    return worst


def float_weight_layers(q: onnx.ModelProto) -> list[str]:
    f = {t.name for t in q.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return [n.name for n in q.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in f]


class Reader(CalibrationDataReader):
    """onnxruntime's protocol: get_next() gives one feed dict, then None."""

    def __init__(self, data: dict[str, np.ndarray]):
        n = len(next(iter(data.values())))
        self.batches = iter([{k: v[i:i + 1] for k, v in data.items()} for i in range(n)])
        self.calls = 0

    def get_next(self):
        self.calls += 1
        return next(self.batches, None)


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- API
def test_quantize_with_dict_and_reader_agree(synth, tmp_path):
    s = synth("llama")
    cfg = PipelineConfig(scheme="token", alpha="auto")
    a = graphpass.quantize(s.path, tmp_path / "a.onnx", s.data, cfg, **QUIET)
    reader = Reader(s.data)
    b = graphpass.quantize(s.path, tmp_path / "b.onnx", reader, cfg, **QUIET)
    assert reader.calls == len(s.data["input_ids"]) + 1  # read once, to the end
    assert a.alphas == b.alphas and len(a.alphas) == 8
    qa, qb = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    wa, wb = inits(qa), inits(qb)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert op_counts(qa) == op_counts(qb)


def test_result_format_mentions_counts_and_sizes(synth, quantized):
    path, res, logs = quantized("llama", scheme="token", alpha=0.5)
    text = res.format()
    assert "14 linear layers quantized, 1 kept in float" in text
    assert f"{res.size_before / 1e6:.1f} MB -> {res.size_after / 1e6:.1f} MB" in text
    assert f"({res.size_after / res.size_before:.3f}x)" in text and str(path) in text
    for step in ("calibrate", "load", "smooth", "attention", "quantize", "save"):
        assert any(line.startswith(f"{step}:") for line in logs), (step, logs)
        assert f"  {step:<12}" in text
    assert res.size_before == synth("llama").path.stat().st_size
    assert res.size_after == path.stat().st_size
    assert res.size_after < 0.6 * res.size_before  # int8 weights; the float tied table remains


def test_rejects_calibration_less_smoothing(synth, tmp_path):
    s = synth("llama")
    with pytest.raises(GraphpassError, match="calibration data"):
        graphpass.quantize(s.path, tmp_path / "q.onnx", None, PipelineConfig(), **QUIET)
    with pytest.raises(GraphpassError, match="within"):
        PipelineConfig(alpha=1.5)
    with pytest.raises(GraphpassError, match="scheme"):
        PipelineConfig(scheme="int4")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- static ranges
@pytest.mark.parametrize("variant", ["llama", "postln", "postln-gemm"])
def test_static_ranges_after_smoothing_equal_recalibration(synth, quantized, tmp_path, variant):
    """[min_j(min_j/s_j), max_j(max_j/s_j)] from the FP32 stats == the smoothed graph's ranges."""
    s = synth(variant)
    stats = calibrate(s.path, s.data, batch_size=1, progress=False)
    m = load_model(s.path)
    an = analyze(m)
    _, rep = smooth(m, {site.act: stats.absmax(site.act) for site in an.sites}, SmoothConfig(0.5), an)
    save_model(m, tmp_path / "smoothed.onnx")
    again = calibrate(tmp_path / "smoothed.onnx", s.data, batch_size=1, progress=False)
    derived = _ranges(stats, rep)
    assert rep.scales and set(rep.scales) <= set(again.min)
    for t in again.min:
        lo, hi = float(again.min[t].min()), float(again.max[t].max())
        mag = max(abs(lo), abs(hi))
        assert abs(derived[t][0] - lo) <= RANGE_RTOL * mag and abs(derived[t][1] - hi) <= RANGE_RTOL * mag, t
    # and the pipeline's static quantizers use exactly those ranges
    path, _, _ = quantized(variant, scheme="static", alpha=0.5)
    q = onnx.load(str(path))
    w = inits(q)
    qs = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(n.input[0] in again.min for n in qs)
    for n in qs:
        scale, zp = static_qparams(float(again.min[n.input[0]].min()), float(again.max[n.input[0]].max()))
        assert float(w[n.input[1]]) == pytest.approx(float(scale), rel=RANGE_RTOL), n.input[0]
        assert abs(int(w[n.input[2]]) - int(zp)) <= 1 and w[n.input[2]].dtype == np.uint8


# ---------------------------------------------------------------------------- skip / nothing to do
def test_skip_patterns_keep_layers_float(synth, quantized):
    patterns = ("*/mlp/*", "*layers.1/self_attn/q_proj*")  # fnmatch on node names
    path, res, _ = quantized("llama", scheme="token", alpha=0.5, skip=patterns)
    q = onnx.load(str(path))
    skipped = {n for n, why in res.quant.skipped if why == "matches a --skip pattern"}
    mlp = {f"/model/layers.{i}/mlp/{p}/MatMul" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}
    assert skipped == mlp | {"/model/layers.1/self_attn/q_proj/MatMul"}
    assert len(res.quant.quantized) == 14 - 7 and not skipped & set(res.quant.quantized)
    assert set(float_weight_layers(q)) == skipped
    assert op_counts(q)["MatMulIntegerToFloat"] == 7
    assert "matches a --skip pattern" in res.quant.format()
    assert probe_rms(synth("llama").model, q) <= REL_RMS_MAX


def _no_matmul(tmp_path: Path) -> tuple[Path, dict]:
    m = make_model([node("Relu", ["x"], "h"), node("Mul", ["h", "g"], "y")], [("x", ["b", 8])],
                   [("y", ["b", 8])], {"g": np.linspace(0.5, 2, 8, dtype=np.float32)})
    p = write_folder(tmp_path / "src", m, "encoder")
    return p, {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}


@pytest.mark.parametrize("scheme", ["token", "dynamic"])
def test_nothing_to_quantize_is_a_noop(tmp_path, scheme):
    p, data = _no_matmul(tmp_path)
    logs = []
    res = graphpass.quantize(p, tmp_path / "q.onnx", data, PipelineConfig(scheme=scheme, alpha=None),
                             progress=False, log=logs.append)
    assert any(line.startswith("nothing to quantize") for line in logs), logs
    q = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(q, full_check=True)
    assert op_counts(q) == op_counts(onnx.load(str(p))) and not res.quant.quantized
    assert "0 linear layers quantized" in res.format()
    np.testing.assert_array_equal(run(q, data)["y"], np.maximum(data["x"], 0) * inits(q)["g"])


def test_nothing_to_quantize_with_default_config_is_a_noop(tmp_path):
    p, data = _no_matmul(tmp_path)
    logs = []
    graphpass.quantize(p, tmp_path / "q.onnx", data, PipelineConfig(), progress=False, log=logs.append)
    assert any(line.startswith("nothing to quantize") for line in logs)
    onnx.checker.check_model(onnx.load(str(tmp_path / "q.onnx")))


# ---------------------------------------------------------------------------- external data + overlay
@pytest.fixture(scope="module")
def external_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext-src")
    m = build_llama(CFG)
    save_model(copy_model(m), d / "model.onnx", external=True)
    src = onnx.load(str(d / "model.onnx"), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in src.graph.initializer) >= 10
    return m, d, random_inputs(m, 4, 16, seed=1)


EXTERNAL_JOBS = {"token": dict(scheme="token"), "static": dict(scheme="static"),
                 "emb": dict(scheme="token", embedding_int8=True),
                 "skip": dict(scheme="token", skip=("*/mlp/*",))}  # smoothed weights left in float


@pytest.mark.parametrize("job", list(EXTERNAL_JOBS))
@pytest.mark.parametrize("where", ["beside", "elsewhere"])
def test_external_source_gives_self_contained_output(external_llama, tmp_path, monkeypatch, job, where):
    """Weights read lazily from the source's .data, the output holds its own; routing every
    constant through save_graph's one-at-a-time writer (STUB_BYTES 1) writes the very same model."""
    m, d, data = external_llama
    fields = EXTERNAL_JOBS[job]
    before = {p.name: digest(p) for p in d.iterdir()}
    out = (d if where == "beside" else tmp_path) / f"q_{job}.onnx"
    graphpass.quantize(d / "model.onnx", out, data, PipelineConfig(alpha=0.5, **fields), **QUIET)
    pending = []
    set_ = gs_io.set_values

    def spy(c, value):
        set_(c, value)
        pending.append(isinstance(c._values, np.ndarray))

    monkeypatch.setattr("graphpass.graph.consts.set_values", spy)
    monkeypatch.setattr("graphpass.graph.gs_io.STUB_BYTES", 1)   # every constant written one by one
    graphpass.quantize(d / "model.onnx", tmp_path / "overlay.onnx", data,
                       PipelineConfig(alpha=0.5, **fields), **QUIET)
    assert sum(pending) >= 14, pending  # every smoothed linear weight waited in the graph as numpy
    bare = onnx.load(str(out), load_external_data=False)
    refs = [t.name for t in bare.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            and any(e.key == "location" and e.value == "model.onnx.data" for e in t.external_data)]
    assert refs == [], refs[:5]
    q = onnx.load(str(out))
    arrays = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}  # all readable
    via = inits(onnx.load(str(tmp_path / "overlay.onnx")))
    assert arrays.keys() == via.keys() and all(np.array_equal(arrays[k], via[k]) for k in arrays)
    assert {p.name: digest(p) for p in d.iterdir() if p.name in before} == before  # source untouched
    if where == "elsewhere":
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "overlay.onnx"])
    bound = 0.6 if fields["scheme"] == "static" else REL_RMS_MAX
    assert probe_rms(m, q) <= bound


# ---------------------------------------------------------------------------- CLI
@pytest.fixture
def llama_copy(synth, tmp_path):
    s = synth("llama")
    d = tmp_path / "m"
    shutil.copytree(s.dir, d)
    return d


def test_cli_quantize_end_to_end(capsys, llama_copy, synth):
    d = llama_copy
    out, rep = d / "q.onnx", d / "q.json"
    stdout, _ = cli_ok(capsys, ["quantize", d / "model.onnx", "-o", out, "--data", d / "data.npz",
                                "--scheme", "token", "--report", rep])
    assert "14 linear layers quantized" in stdout and "MB" in stdout
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    assert op_counts(q)["MatMulIntegerToFloat"] == 14
    assert probe_rms(synth("llama").model, q) <= REL_RMS_MAX
    r = json.loads(rep.read_text())
    assert len(r["quantized"]) == 14 and [k[0] for k in r["kept_float"]] == ["/lm_head/MatMul"]
    assert len(r["alphas"]) == 8 and all(0 <= a <= 1 for a in r["alphas"].values())  # default auto
    assert r["size_after"] < r["size_before"] and {s["step"] for s in r["steps"]} >= {"alpha", "save"}


def test_cli_quantize_without_smoothing_needs_no_data(capsys, llama_copy):
    out = llama_copy / "q.onnx"
    cli_ok(capsys, ["quantize", llama_copy / "model.onnx", "-o", out, "--no-smooth", "--scheme", "dynamic"])
    assert op_counts(onnx.load(str(out)))["MatMulInteger"] == 14


@pytest.mark.parametrize("extra,needle", [
    (["--scheme", "int4"], "invalid choice"),
    (["--alpha", "1.5"], "alpha must be within [0, 1], got 1.5"),
    (["--alpha", "strong"], "neither a number nor 'auto'"),
    (["--site-alpha", "x=2"], "alpha for site 'x' must be within"),
    (["--no-smooth", "--scheme", "static", "--nodata"], "--data"),
    (["--nodata"], "--data"),
])
def test_cli_quantize_errors(capsys, llama_copy, extra, needle):
    d = llama_copy
    out, rep = d / "q.onnx", d / "q.json"
    args = ["quantize", d / "model.onnx", "-o", out, "--report", rep]
    args += [] if "--nodata" in extra else ["--data", d / "data.npz"]
    err = cli_error(capsys, args + [a for a in extra if a != "--nodata"], absent=[out, rep])
    assert needle in err, err


def test_cli_output_is_input_needs_overwrite(capsys, llama_copy, synth):
    d = llama_copy
    model = d / "model.onnx"
    before = digest(model)
    err = cli_error(capsys, ["quantize", model, "-o", model, "--data", d / "data.npz"])
    assert "--overwrite" in err and digest(model) == before
    cli_ok(capsys, ["quantize", model, "-o", model, "--data", d / "data.npz", "--alpha", "0.5",
                    "--overwrite"])
    q = onnx.load(str(model))
    assert op_counts(q)["MatMulIntegerToFloat"] == 14
    assert probe_rms(synth("llama").model, q) <= REL_RMS_MAX
    assert sorted(p.name for p in d.iterdir()) == ["data.npz", "model.json", "model.onnx"]


def test_site_alpha_override_wins_over_auto_and_unknown_site_is_refused(synth, tmp_path):
    """Regression: a user's --site-alpha (by anchor) was shadowed by the searched alpha; an
    unknown site name was silently ignored."""
    from graphpass.errors import GraphpassError
    from graphpass.match.sites import analyze

    s = synth("llama")
    site = analyze(onnx.load(str(s.path))).sites[0]
    cfg = PipelineConfig(scheme="token", alpha="auto", site_alpha=((site.anchor, 0.25),))
    res = graphpass.quantize(s.path, tmp_path / "a.onnx", s.data, cfg, progress=False, log=lambda m: None)
    row = next(r for r in res.smooth.rows if r["site"] == site.name)
    assert row["alpha"] == 0.25
    with pytest.raises(GraphpassError, match="no smoothing site named 'nope'"):
        graphpass.quantize(s.path, tmp_path / "b.onnx", s.data,
                           PipelineConfig(alpha="auto", site_alpha=(("nope", 0.5),)), progress=False,
                           log=lambda m: None)
    assert not (tmp_path / "b.onnx").exists()
