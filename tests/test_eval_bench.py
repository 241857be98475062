"""`graphpass eval` metrics (checked against numpy on the logits) and `graphpass bench`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from onnx import numpy_helper

from conftest import cli_error, cli_ok, run, write_folder
from graphpass.graph.io import model_size, save_model
from graphpass.validate.evaluate import evaluate
from graphpass.testing.synthetic import random_inputs

SAME_RTOL = 1e-9  # two float64 reductions of the same float32 numbers, summed in another order
PERTURB = 1.05  # factor on one weight matrix: a candidate that is measurably different
BENCH_SECONDS = 0.3


def _perturbed(tmp_path, saved, factor=PERTURB):
    """A copy of `saved` with its first 2-D [hidden, hidden] weight multiplied by `factor`."""
    m = saved.fresh()
    t = next(t for t in m.graph.initializer if len(t.dims) == 2 and t.dims[0] == t.dims[1])
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
    return write_folder(tmp_path / "cand", m, saved.kind)


def _numbers(res: dict, prefix="") -> dict[str, float]:
    out = {}
    for k, v in res.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


# ---------------------------------------------------------------------------- eval
@pytest.mark.parametrize("variant", ["prenorm", "llama"])
def test_causal_graph_against_itself(synth, variant):
    s = synth(variant)
    res = evaluate(s.path, s.path, s.data, progress=False)
    assert res["kind"] == "causal-lm" and res["samples"] == 4 and res["tokens"] == 4 * 16
    assert res["perplexity_reference"] == res["perplexity_candidate"]
    assert res["kl"] == 0.0 and res["top1"] == 1.0
    assert res["outputs"]["logits"] == {"max_abs": 0.0, "mean_abs": 0.0}


def test_perturbed_candidate_moves_every_metric(synth, tmp_path):
    s = synth("prenorm")
    res = evaluate(_perturbed(tmp_path, s), s.path, s.data, progress=False)
    assert res["kl"] > 0.0
    assert res["top1"] < 1.0 or res["perplexity_candidate"] != res["perplexity_reference"]
    assert res["outputs"]["logits"]["max_abs"] > 0.0


def test_perplexity_kl_top1_match_numpy(synth, tmp_path):
    s = synth("llama")
    cand = _perturbed(tmp_path, s)
    data = random_inputs(s.model, 2, 6, seed=9)
    res = evaluate(cand, s.path, data, batch_size=1, progress=False)
    ref, got = run(s.path, data)["logits"], run(cand, data)["logits"]

    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    ids = data["input_ids"]
    nll = [-lp[b, t, ids[b, t + 1]] for b in range(2) for t in range(5)]
    assert res["perplexity_reference"] == pytest.approx(math.exp(np.mean(nll)), rel=SAME_RTOL)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    assert res["kl"] == pytest.approx(kl, rel=SAME_RTOL)
    assert res["top1"] == pytest.approx((ref.argmax(-1) == got.argmax(-1)).mean(), rel=SAME_RTOL)
    assert res["outputs"]["logits"]["max_abs"] == pytest.approx(np.abs(ref - got).max(), rel=SAME_RTOL)


def test_encoder_against_itself_and_masked_cosine(synth, tmp_path):
    s = synth("postln")
    res = evaluate(s.path, s.path, s.data, progress=False)
    mask = s.data["attention_mask"]
    assert res["kind"] == "encoder" and res["tokens"] == int(mask.sum()) < mask.size
    assert abs(res["cosine_mean"] - 1.0) <= SAME_RTOL and abs(res["cosine_min"] - 1.0) <= SAME_RTOL
    cand = _perturbed(tmp_path, s, factor=1.5)
    res = evaluate(cand, s.path, s.data, progress=False)
    r = run(s.path, s.data)["last_hidden_state"].astype(np.float64)
    c = run(cand, s.data)["last_hidden_state"].astype(np.float64)
    cos = (r * c).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1))
    keep = mask.astype(bool)
    assert res["cosine_mean"] == pytest.approx(cos[keep].mean(), rel=SAME_RTOL)
    assert res["cosine_min"] == pytest.approx(cos[keep].min(), rel=SAME_RTOL)
    assert res["cosine_min"] < 1.0 - 1e-6


@pytest.mark.parametrize("variant", ["prenorm", "postln"])
def test_batch_size_does_not_change_metrics(synth, tmp_path, variant):
    s = synth(variant)
    cand = _perturbed(tmp_path, s)
    data = random_inputs(s.model, 6, 10, seed=4)
    a = _numbers(evaluate(cand, s.path, data, batch_size=1, progress=False))
    b = _numbers(evaluate(cand, s.path, data, batch_size=3, progress=False))
    c = _numbers(evaluate(cand, s.path, data, batch_size=4, progress=False))  # ragged last batch
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=SAME_RTOL, abs=0), k
        assert c[k] == pytest.approx(a[k], rel=SAME_RTOL, abs=0), k


def test_eval_cli_writes_json(capsys, synth, tmp_path):
    s = synth("prenorm")
    cand = _perturbed(tmp_path, s)
    out, _ = cli_ok(capsys, ["eval", cand, "--reference", s.path, "--data", s.data_path,
                             "--batch-size", 3, "--json", tmp_path / "m.json"])
    assert "perplexity" in out and "KL" in out and f"wrote {tmp_path / 'm.json'}" in out
    written = json.loads((tmp_path / "m.json").read_text())
    direct = evaluate(cand, s.path, s.data, batch_size=3, progress=False)
    assert _numbers(written) == pytest.approx(_numbers(direct), rel=SAME_RTOL)
    assert written["kind"] == "causal-lm"


def test_eval_cli_refuses_different_outputs(capsys, synth, tmp_path):
    m = synth("prenorm").fresh()
    m.graph.output[0].name = "scores"
    m.graph.node[-1].output[0] = "scores"
    cand = write_folder(tmp_path / "c", m, "causal-lm")
    msg = cli_error(capsys, ["eval", cand, "--reference", synth("prenorm").path,
                             "--data", synth("prenorm").data_path])
    assert "outputs ['scores'] differ" in msg


@pytest.mark.parametrize("variant", ["prenorm", "postln"])
def test_eval_with_no_countable_token_is_a_one_line_error(capsys, synth, tmp_path, variant):
    s = synth(variant)
    data = random_inputs(s.model, 2, 1 if variant == "prenorm" else 4, seed=0)
    if "attention_mask" in data:
        data["attention_mask"][:] = 0
    np.savez(tmp_path / "d.npz", **data)
    cli_error(capsys, ["eval", s.path, "--reference", s.path, "--data", tmp_path / "d.npz"])


# ---------------------------------------------------------------------------- bench
def test_bench_graph_against_itself(capsys, synth, tmp_path):
    s = synth("prenorm")
    out, _ = cli_ok(capsys, ["bench", s.path, "--reference", s.path, "--shape", "1x8", "--shape", "2x4",
                             "--seconds", BENCH_SECONDS, "--json", tmp_path / "b.json"])
    assert "latency" in out and "1x8" in out and "2x4" in out
    res = json.loads((tmp_path / "b.json").read_text())
    assert [t["shape"] for t in res["latency"]] == ["1x8", "2x4"]
    for t in res["latency"]:
        assert math.isfinite(t["ratio"]) and t["ratio"] > 0 and t["runs"] >= 5
        assert t["reference_ms"] > 0 and t["candidate_ms"] > 0
    size = res["size"]
    assert size["reference_bytes"] == size["candidate_bytes"] == s.path.stat().st_size
    assert size["ratio"] == 1.0


def test_external_data_counts_in_model_size(capsys, synth, tmp_path):
    s = synth("llama")
    ext = tmp_path / "ext"
    ext.mkdir()
    save_model(s.model, ext / "model.onnx", external=True)
    data_file = ext / "model.onnx.data"
    assert data_file.stat().st_size > ext.joinpath("model.onnx").stat().st_size
    assert model_size(ext / "model.onnx") == (ext / "model.onnx").stat().st_size + data_file.stat().st_size
    assert model_size(s.path) == s.path.stat().st_size
    cli_ok(capsys, ["bench", ext / "model.onnx", "--reference", s.path, "--shape", "1x4",
                    "--seconds", 0.1, "--json", tmp_path / "b.json"])
    size = json.loads((tmp_path / "b.json").read_text())["size"]
    assert size["candidate_bytes"] == model_size(ext / "model.onnx")


@pytest.mark.parametrize("shape", ["1by8", "0x8", "8", "x4", "2x-1"])
def test_bench_bad_shape(capsys, synth, tmp_path, shape):
    s = synth("prenorm")
    msg = cli_error(capsys, ["bench", s.path, "--reference", s.path, "--shape", shape,
                             "--json", tmp_path / "b.json"], absent=[tmp_path / "b.json"])
    assert f"shape '{shape}' is not BATCHxSEQ" in msg


@pytest.mark.parametrize("opt, value", [("--seconds", "0"), ("--threads", "-1"), ("--seconds", "abc")])
def test_bench_bad_numbers(capsys, synth, opt, value):
    s = synth("prenorm")
    msg = cli_error(capsys, ["bench", s.path, "--reference", s.path, opt, value])
    assert opt in msg


def test_synthetic_ids_stay_inside_a_small_vocabulary():
    """Regression: bench and the smoothing output check drew ids in [0, 100) whatever the table."""
    from graphpass.validate.bench import synthetic_inputs
    from graphpass.graph.io import input_specs
    from graphpass.passes.smooth_checked import output_change
    from graphpass.testing.synthetic import SyntheticConfig, build_llama

    m = build_llama(SyntheticConfig(vocab=40, layers=1))
    specs = input_specs(m)
    assert [s.limit for s in specs] == [40]
    ids = synthetic_inputs(specs, (4, 64))["input_ids"]
    assert ids.max() < 40 and len(np.unique(ids)) > 20
    assert output_change(m, m) == 0.0        # ran both graphs (ids 40..99 made onnxruntime fail)


def test_reference_cache_runs_the_reference_once_and_only_for_the_same_data(synth, tmp_path, monkeypatch):
    import sys

    ev = sys.modules["graphpass.validate.evaluate"]     # the package exports the function under this name
    s = synth("prenorm")
    cand = _perturbed(tmp_path, s)
    opened = []
    real = ev.make_session
    monkeypatch.setattr(ev, "make_session", lambda p, *a, **k: opened.append(str(p)) or real(p, *a, **k))
    cache = tmp_path / "ref"
    first = evaluate(cand, s.path, s.data, progress=False, ref_cache=cache)
    again = evaluate(cand, s.path, s.data, progress=False, ref_cache=cache)
    assert first == again == evaluate(cand, s.path, s.data, progress=False)
    assert [p == str(s.path) for p in opened] == [True, False, False, True, False]
    other = {k: v[:2] for k, v in s.data.items()}             # different data: the cache is redone
    opened.clear()
    res = evaluate(cand, s.path, other, progress=False, ref_cache=cache)
    assert [p == str(s.path) for p in opened] == [True, False] and res["samples"] == 2


class _SleepySession:
    """A session whose run takes `ms` milliseconds: timing with a known cost per run."""

    def __init__(self, ms: float):
        self.ms, self.runs = ms, 0

    def run(self, names, feeds):
        import time
        self.runs += 1
        time.sleep(self.ms / 1e3)


def test_bench_keeps_to_its_seconds_budget():
    """`--seconds S` is the timing budget per shape: the interleaved blocks shrink to fit it (they
    were 0.5 s each and at least 5 rounds of two, 5.5 s whatever S was)."""
    import time

    from graphpass.validate.bench import time_pair

    budget = 0.5
    ref, cand = _SleepySession(1.0), _SleepySession(2.0)
    t = time.perf_counter()
    r, c, n = time_pair(ref, cand, {}, seconds=budget)
    assert time.perf_counter() - t < 3 * budget
    assert n >= 5 and cand.runs >= 5 and 1.0 <= r < c


def test_bench_reports_progress_in_a_log(capsys, synth):
    """bench is a long step (6 s a shape by default): in a log it writes one line when it ends,
    like calibrate and eval."""
    s = synth("prenorm")
    _, err = cli_ok(capsys, ["bench", s.path, "--reference", s.path, "--shape", "1x8", "--shape", "2x4",
                             "--seconds", BENCH_SECONDS])
    assert "bench: 2/2 shapes" in err
