"""graphpass.validate.metrics: the chunked reductions give the metrics of the whole-array
implementation they replaced, and float64 sits exactly where it changes a result."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from conftest import run, write_folder
from graphpass.testing.synthetic import SyntheticConfig, build_llama, random_inputs
from graphpass.validate import metrics
from graphpass.validate.evaluate import evaluate

SAME_RTOL = 1e-9     # the target is 1e-6; float64 sums of the same numbers in another order reach 1e-12
KL_FLOAT32_MOVES = 1e-6   # float32 log-softmax moves KL by more than this (relative): float64 needed


def _whole_array_metrics(ids, ref, cand):
    """The pre-streaming evaluate, verbatim in substance: float64 log-softmax of whole arrays."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(cand)
    tgt = ids[:, 1:, None]
    n = tgt.size
    d = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    return {"perplexity_reference": np.exp(-np.take_along_axis(lp[:, :-1], tgt, -1).sum() / n),
            "perplexity_candidate": np.exp(-np.take_along_axis(lq[:, :-1], tgt, -1).sum() / n),
            "kl": (np.exp(lp) * (lp - lq)).sum(-1).mean(), "top1": (lp.argmax(-1) == lq.argmax(-1)).mean(),
            "max_abs": d.max(), "mean_abs": d.mean()}


def _perturbed(tmp_path, saved, factor=1.05):
    m = saved.fresh()
    t = next(t for t in m.graph.initializer if len(t.dims) == 2 and t.dims[0] == t.dims[1])
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
    return write_folder(tmp_path / "cand", m, saved.kind)


@pytest.mark.parametrize("variant", ["prenorm", "llama"])
def test_streamed_metrics_equal_the_whole_array_ones(synth, tmp_path, variant, monkeypatch):
    s = synth(variant)
    cand = _perturbed(tmp_path, s)
    data = random_inputs(s.model, 5, 12, seed=7)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 3 * 256 + 5)   # 3 rows a chunk: batches split unevenly
    res = evaluate(cand, s.path, data, batch_size=2, progress=False)
    old = _whole_array_metrics(data["input_ids"], run(s.path, data)["logits"], run(cand, data)["logits"])
    for k in ("perplexity_reference", "perplexity_candidate", "kl", "top1"):
        assert res[k] == pytest.approx(old[k], rel=SAME_RTOL), k
    for k in ("max_abs", "mean_abs"):   # |r - c| rounded once to float32: 2^-24 relative
        assert res["outputs"]["logits"][k] == pytest.approx(old[k], rel=1e-7), k
    assert res["kl"] > 0 and res["top1"] < 1


def test_float64_is_needed_for_kl_but_not_for_top1_or_the_error():
    """Where float64 changes a result: KL (log p - log q of O(10) numbers, a small difference).
    Where it does not: argmax (exact on the float32 logits) and |r - c| (one float32 rounding)."""
    m = build_llama(SyntheticConfig(vocab=4096, layers=1))
    data = random_inputs(m, 4, 16, seed=3)
    ref = run(m, data)["logits"]
    t = next(t for t in m.graph.initializer if len(t.dims) == 2 and t.dims[0] == t.dims[1])
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.05), t.name))
    cand = run(m, data)["logits"]

    def kl(dtype):
        def ls(x):
            x = x.astype(dtype)
            x = x - x.max(-1, keepdims=True)
            return x - np.log(np.exp(x).sum(-1, keepdims=True))
        lp, lq = ls(ref), ls(cand)
        return float((np.exp(lp) * (lp - lq)).sum(-1, dtype=np.float64).mean())

    assert abs(kl(np.float32) / kl(np.float64) - 1) > KL_FLOAT32_MOVES
    sums = metrics.Sums()
    rows = metrics.reference_rows(ref, metrics.next_tokens(data["input_ids"]), sums)
    metrics.candidate_rows(cand, metrics.next_tokens(data["input_ids"]), metrics.ArrayRows(ref), rows, sums)
    assert sums.s["kl"] / sums.s["positions"] == pytest.approx(kl(np.float64), rel=SAME_RTOL)
    lp64 = ref.astype(np.float64) - np.log(np.exp(ref.astype(np.float64)).sum(-1, keepdims=True))
    assert (lp64.argmax(-1) == ref.argmax(-1)).all()
    d64 = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    assert sums.s["sum_abs:logits"] == pytest.approx(d64.sum(), rel=1e-7)


def test_graph_against_itself_has_kl_exactly_zero_at_any_chunking(synth, monkeypatch):
    s = synth("prenorm")
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 7 * 256)
    res = evaluate(s.path, s.path, s.data, batch_size=3, progress=False)
    assert res["kl"] == 0.0 and res["top1"] == 1.0
    assert res["perplexity_reference"] == res["perplexity_candidate"]


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 7)])
def test_file_rows_read_back_any_row_range(tmp_path, shape):
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    metrics.write_rows(tmp_path / "a.npy", a)
    f = metrics.FileRows(tmp_path / "a.npy")
    flat = metrics.as_rows(a)
    assert f.shape == flat.shape
    n = flat.shape[0]
    for lo, hi in [(0, n), (0, 1), (n - 1, n), (n // 2, n)]:
        np.testing.assert_array_equal(f.rows(lo, hi), flat[lo:hi])
    f.close()


def test_encoder_cosine_streamed_equals_whole_array(synth, tmp_path, monkeypatch):
    s = synth("postln")
    cand = _perturbed(tmp_path, s, factor=1.5)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 5 * 64)
    res = evaluate(cand, s.path, s.data, batch_size=3, progress=False)
    r = run(s.path, s.data)["last_hidden_state"].astype(np.float64)
    c = run(cand, s.data)["last_hidden_state"].astype(np.float64)
    cos = (r * c).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1))
    keep = s.data["attention_mask"].astype(bool)
    assert res["cosine_mean"] == pytest.approx(cos[keep].mean(), rel=SAME_RTOL)
    assert res["cosine_min"] == pytest.approx(cos[keep].min(), rel=SAME_RTOL)


SMOLLM2 = Path("/work/models/smollm2/model.onnx")


@pytest.mark.e2e
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="no SmolLM2 export at /work/models/smollm2 (models/smollm2.py)")
def test_smollm2_streamed_metrics_equal_the_whole_array_ones(tmp_path):
    """SmolLM2 (vocabulary 49,152), int8 dynamic candidate, 2 x 512 tokens of Hamlet: the target is
    1e-6 relative to the whole-array implementation."""
    from graphpass.calibrate.data import build_data, play_path, tokenize
    from graphpass.pipeline import PipelineConfig, quantize

    data = build_data(tokenize(play_path("hamlet"), SMOLLM2.parent / "tokenizer.json"), 512, 2)
    cand = tmp_path / "int8.onnx"
    quantize(SMOLLM2, cand, None, PipelineConfig(scheme="dynamic", alpha=None), progress=False, log=lambda *_: None)
    res = evaluate(cand, SMOLLM2, data, progress=False)
    old = _whole_array_metrics(data["input_ids"], run(SMOLLM2, data)["logits"], run(cand, data)["logits"])
    for k in ("perplexity_reference", "perplexity_candidate", "kl", "top1"):
        assert res[k] == pytest.approx(old[k], rel=1e-6), k
