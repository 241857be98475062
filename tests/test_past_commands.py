"""debug, the accuracy budget and report on with-past graphs (both forms): they run on the data
`graphpass data --model` writes (an empty past) and judge logits, never present.*."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import cli_ok
from graphpass.calibrate.data import build_data
from graphpass.pipeline import PipelineConfig
from graphpass.search.budget import Budget, quantize_within_budget
from graphpass.testing.past import build_genai_past, build_optimum_past
from graphpass.testing.synthetic import SyntheticConfig
from graphpass.validate.debug import debug
from graphpass.validate.evaluate import evaluate

CFG = SyntheticConfig()
S, N = 16, 8


@pytest.fixture(scope="module", params=["optimum", "genai"])
def job(request, tmp_path_factory):
    """(folder, FP32 path, static-quantized path, data) with data from text-like ids."""
    from graphpass.pipeline import quantize

    build = build_optimum_past if request.param == "optimum" else build_genai_past
    d = tmp_path_factory.mktemp(request.param)
    onnx.save(build(CFG), d / "model.onnx")
    m = onnx.load(d / "model.onnx")
    data = build_data(np.random.default_rng(11).integers(0, CFG.vocab, N * S), S, N, m)
    np.savez(d / "data.npz", **data)
    quantize(d / "model.onnx", d / "q.onnx", data, PipelineConfig(scheme="static", alpha=0.5, threads=1),
             progress=False, log=lambda *a: None)
    return d, d / "model.onnx", d / "q.onnx", data


def test_debug_ranks_every_quantized_layer(job):
    d, fp32, q, data = job
    res = debug(fp32, q, data, threads=1, progress=False)
    quantized = [r for r in res.layers if r.quantized]
    assert len(quantized) >= 10 and not res.unmatched
    assert all(np.isfinite(r.sqnr_db) and 0 < r.sqnr_db < 80 for r in quantized)


def test_budget_keeps_layers_in_float_until_kl_is_met(job):
    d, fp32, _, data = job
    plain = evaluate(d / "q.onnx", fp32, {k: v[-2:] for k, v in data.items()}, threads=1, progress=False)
    budget = Budget(max_kl=plain["kl"] / 2)
    res, bres = quantize_within_budget(fp32, d / "qb.onnx", data, PipelineConfig(scheme="static",
                                       alpha=0.5, threads=1), budget, bench_seconds=0, progress=False,
                                       log=lambda *a: None)
    assert bres.met and bres.kept_float and bres.reached["kl"] <= budget.max_kl
    q = onnx.load(d / "qb.onnx")
    assert [o.name for o in q.graph.output] == [o.name for o in onnx.load(fp32).graph.output]


def test_report_writes_html_from_with_past_graphs(capsys, job):
    d, fp32, q, _ = job
    out, _ = cli_ok(capsys, ["report", fp32, q, "--data", d / "data.npz", "-o", d / "r.html",
                             "--threads", 1, "--bench-seconds", 0])
    html = (d / "r.html").read_text()
    assert "wrote" in out and "perplexity" in html.lower() and "present." not in html


@pytest.mark.parametrize("build", [build_optimum_past, build_genai_past])
def test_smoothing_check_probes_with_past_graphs(build):
    """The fold check runs the graphs as a prefill over an empty past (it used to return 0.0,
    'unchanged', for any graph with past inputs): a changed gamma is seen, a real fold is not."""
    from onnx import numpy_helper

    from graphpass.passes.smooth_checked import output_change

    a = build(CFG)
    b = onnx.ModelProto()
    b.CopyFrom(a)
    t = next(t for t in b.graph.initializer if t.name == "model.layers.1.input_layernorm.weight")
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    assert output_change(a, b) > 1e-2
    assert output_change(a, a) == 0.0
