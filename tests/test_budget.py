"""graphpass quantize --max-kl / --max-ppl-increase: measured on held-out data, the most sensitive
layers go back to float, the shortest prefix of the ranking found by doubling then bisection."""
from __future__ import annotations

import fnmatch
import json
import math

import numpy as np
import onnx
import pytest

from conftest import cli_error, cli_ok
from graphpass.search.budget import Budget, escape, quantize_within_budget, split_holdout
from graphpass.validate.debug import debug
from graphpass.errors import GraphpassError
from graphpass.validate.evaluate import evaluate
from graphpass.pipeline import PipelineConfig
from graphpass.testing.synthetic import random_inputs

TIGHTER = 0.5      # the budget: half the KL plain token quantization reaches on the held-out data
N_LAYERS = 14      # quantized linear layers of the tiny llama (its tied LM head stays float)


def _data(saved):
    """(calibration, held-out) for the tiny llama: 8 + 4 samples, different seeds."""
    return random_inputs(saved.model, 8, 16, seed=1), random_inputs(saved.model, 4, 16, seed=5)


def _float_layers(path) -> set[str]:
    """Linear layers still a float MatMul on a float constant (the tied head reads a Transpose)."""
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return {n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


# ---------------------------------------------------------------------------- units
def test_holdout_is_the_last_quarter_and_never_calibrated_on():
    data = {"input_ids": np.arange(10 * 3).reshape(10, 3)}
    calib, held = split_holdout(data, None)
    assert calib["input_ids"].shape[0] == 8 and held["input_ids"].shape[0] == 2
    assert not set(calib["input_ids"][:, 0]) & set(held["input_ids"][:, 0])
    given = {"input_ids": np.zeros((3, 3), np.int64)}
    assert split_holdout(data, given) == (data, given)
    with pytest.raises(GraphpassError, match="hold-out needs 2"):
        split_holdout({"input_ids": np.zeros((1, 3))}, None)


@pytest.mark.parametrize("name", ["/model/layers.0/mlp/down_proj/MatMul", "a*b", "x?[1]", "[!q]"])
def test_escape_matches_exactly_one_name(name):
    others = ["/model/layers.0/mlp/down_proj/MatMulX", "aXb", "x1[1]", "q", "!", name[:-1]]
    assert fnmatch.fnmatchcase(name, escape(name))
    assert not any(fnmatch.fnmatchcase(o, escape(name)) for o in others if o != name)


def test_budget_limits():
    m = {"kl": 0.02, "perplexity_reference": 10.0, "perplexity_candidate": 10.3}
    assert Budget(max_kl=0.02).met(m) and not Budget(max_kl=0.019).met(m)
    assert Budget(max_ppl_increase=0.03).excess(m) == pytest.approx(1.0)
    assert not Budget(max_kl=0.1, max_ppl_increase=0.01).met(m)          # both limits apply
    with pytest.raises(GraphpassError, match="needs --max-kl"):
        Budget().check("causal-lm")
    with pytest.raises(GraphpassError, match="causal LM"):
        Budget(max_kl=0.1).check("encoder")
    with pytest.raises(GraphpassError, match="finite number"):
        Budget(max_kl=-1.0).check("causal-lm")


# ---------------------------------------------------------------------------- the search
@pytest.fixture(scope="module")
def tight(synth, tmp_path_factory):
    """The tiny llama quantized (token, α auto) under a KL budget half of what plain token reaches."""
    s = synth("llama")
    calib, held = _data(s)
    cfg = PipelineConfig(scheme="token")
    out = tmp_path_factory.mktemp("budget") / "q.onnx"
    # a first, loose run measures the plain graph (within budget at once); the budget under
    # test is half of its KL
    loose = tmp_path_factory.mktemp("loose") / "q.onnx"
    _, first = quantize_within_budget(s.path, loose, calib, cfg, Budget(max_kl=1e9), held, bench_seconds=0,
                                      progress=False, log=lambda *_: None)
    assert first.met and [t.floats for t in first.attempts] == [0] and first.kept_float == []
    plain_kl = first.attempts[0].kl
    res, bres = quantize_within_budget(s.path, out, calib, cfg, Budget(max_kl=TIGHTER * plain_kl), held,
                                       bench_seconds=0.1, progress=False, log=lambda *_: None)
    return s, out, held, plain_kl, res, bres


def test_budget_met_on_held_out_data(tight):
    s, out, held, plain_kl, _, bres = tight
    assert bres.met and bres.attempts[0].floats == 0 and not bres.attempts[0].met
    assert bres.attempts[0].kl == pytest.approx(plain_kl)
    again = evaluate(out, s.path, held, progress=False)                    # the file written
    assert again["kl"] <= TIGHTER * plain_kl
    assert again["kl"] == pytest.approx(bres.reached["kl"], rel=1e-6)


def test_shortest_prefix_by_doubling_then_bisection(tight):
    s, out, _, _, _, bres = tight
    k = len(bres.kept_float)
    assert 0 < k < N_LAYERS and bres.kept_float == bres.order[:k]
    seen = {t.floats: t.met for t in bres.attempts}
    assert seen[k] and seen[k - 1] is False                               # k - 1 measured: over budget
    assert len(bres.attempts) <= 2 * math.ceil(math.log2(N_LAYERS)) + 2
    assert _float_layers(out) == set(bres.kept_float)        # every other layer is int8


def test_order_covers_every_quantized_layer(tight):
    s, _, held, _, _, bres = tight
    assert len(bres.order) == N_LAYERS and bres.order_by == "layer"
    assert set(bres.order) == {r.name for r in debug(s.path, s.path, s.data, progress=False).layers
                               if r.name != "/lm_head/MatMul"}


def test_costs_are_reported(tight):
    *_, bres = tight
    assert bres.size["final"] > bres.size["plain"] and bres.size["fp32"] > bres.size["plain"]
    assert {"fp32_ms", "plain_ms", "final_ms", "plain_ratio", "final_ratio"} <= set(bres.latency)
    assert "kept in float" in bres.format()


def test_unreachable_budget_writes_the_closest_graph_and_warns(synth, tmp_path, capsys):
    """--embedding-int8 keeps the token table in int8 even with every layer in float: KL > 0."""
    s = synth("llama")
    calib, held = _data(s)
    np.savez(tmp_path / "calib.npz", **calib)
    np.savez(tmp_path / "held.npz", **held)
    out, err = cli_ok(capsys, ["quantize", s.path, "-o", tmp_path / "q.onnx", "--data", tmp_path / "calib.npz",
                               "--holdout", tmp_path / "held.npz", "--embedding-int8", "--max-kl", "1e-12",
                               "--bench-seconds", "0", "--report", tmp_path / "r.json"])
    assert "NOT met" in out
    warn = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "not reached" in warn[0]
    rep = json.loads((tmp_path / "r.json").read_text())["budget"]
    n = N_LAYERS + 1                                  # the tied LM head reads the int8 table too
    assert rep["met"] is False and len(rep["order"]) == n and len(rep["kept_float"]) == n
    assert rep["attempts"][-1]["float_layers"] == n and rep["attempts"][-1]["kl"] > 0
    assert (tmp_path / "q.onnx").is_file()


def test_cli_errors(synth, tmp_path, capsys):
    s = synth("llama")
    base = ["quantize", s.path, "-o", tmp_path / "q.onnx", "--data", s.data_path]
    assert "only used with" in cli_error(capsys, base + ["--holdout", s.data_path], [tmp_path / "q.onnx"])
    enc = synth("postln")
    err = cli_error(capsys, ["quantize", enc.path, "-o", tmp_path / "e.onnx", "--data", enc.data_path,
                             "--max-kl", "0.1"], [tmp_path / "e.onnx"])
    assert "causal LM" in err
