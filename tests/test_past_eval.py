"""eval on with-past graphs: logits only, from one prefill or (--decode-from) token by token.

Two tiny optimum-form graphs of different seeds stand for reference and candidate (same names,
shapes and dtypes). Decode-mode metrics must equal metrics computed here from one prefill over
the decoded positions: the FP32 cache reproduces the prefill's logits to ~1e-6, so relative 1e-4
on KL / perplexity and exact top-1 leave margin and still catch any misplaced position."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import cli_error, cli_ok
from graphpass.calibrate.data import build_data
from graphpass.errors import GraphpassError
from graphpass.graph.decode import DecodeRunner, past_layout
from graphpass.graph.runtime import make_session
from graphpass.testing.past import build_genai_past, build_optimum_past
from graphpass.testing.synthetic import SyntheticConfig, build_llama
from graphpass.validate.evaluate import evaluate

S, N, P = 10, 3, 6
RTOL = 1e-4


@pytest.fixture(scope="module", params=["optimum", "genai"])
def pair(request, tmp_path_factory):
    build = build_optimum_past if request.param == "optimum" else build_genai_past
    d = tmp_path_factory.mktemp(request.param)
    ref, cand = build(SyntheticConfig(seed=0)), build(SyntheticConfig(seed=0, outlier_scale=30.0))
    onnx.save(ref, d / "ref.onnx")
    onnx.save(cand, d / "cand.onnx")
    data = build_data(np.random.default_rng(4).integers(0, 256, N * S), S, N, ref)
    np.savez(d / "data.npz", **data)
    return d, data


def _log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _metrics(ids, r, c):
    lp, lq = _log_softmax(r), _log_softmax(c)
    nll = lambda l: -np.take_along_axis(l[:, :-1], ids[:, 1:, None], -1).mean()
    return {"perplexity_reference": np.exp(nll(lp)), "perplexity_candidate": np.exp(nll(lq)),
            "kl": (np.exp(lp) * (lp - lq)).sum(-1).mean(), "top1": (lp.argmax(-1) == lq.argmax(-1)).mean()}


def _prefill_logits(path, data):
    m = onnx.load(path)
    return DecodeRunner(make_session(m, 1), past_layout(m)).logits(data)


@pytest.mark.parametrize("decode_from", [0, P])
def test_eval_scores_logits_only_in_both_modes(pair, decode_from):
    d, data = pair
    res = evaluate(d / "cand.onnx", d / "ref.onnx", data, batch_size=2, threads=1, progress=False,
                   decode_from=decode_from)
    assert list(res["outputs"]) == ["logits"]
    r, c = _prefill_logits(d / "ref.onnx", data), _prefill_logits(d / "cand.onnx", data)
    want = _metrics(data["input_ids"][:, decode_from:], r[:, decode_from:], c[:, decode_from:])
    assert res["tokens"] == N * (S - decode_from)
    assert want["kl"] > 1e-3      # the two graphs really differ
    for k in ("perplexity_reference", "perplexity_candidate", "kl"):
        assert res[k] == pytest.approx(want[k], rel=RTOL), k
    assert res["top1"] == want["top1"]


def test_eval_against_itself_is_exact(pair):
    d, data = pair
    res = evaluate(d / "ref.onnx", d / "ref.onnx", data, threads=1, progress=False, decode_from=P)
    assert res["kl"] == pytest.approx(0.0, abs=1e-9) and res["top1"] == 1.0


def test_cli_eval_decode_from(capsys, pair, tmp_path):
    d, _ = pair
    out, _ = cli_ok(capsys, ["eval", d / "cand.onnx", "--reference", d / "ref.onnx", "--data",
                             d / "data.npz", "--decode-from", P, "--threads", 1, "--json", tmp_path / "m.json"])
    assert f"{N * (S - P)} tokens" in out and "present" not in out
    err = cli_error(capsys, ["eval", d / "cand.onnx", "--reference", d / "ref.onnx", "--data",
                             d / "data.npz", "--decode-from", S])
    assert f"decode start {S} must lie in [1, {S - 1}]" in err


def test_decode_mode_needs_a_with_past_graph(tmp_path):
    m = build_llama(SyntheticConfig())
    onnx.save(m, tmp_path / "m.onnx")
    data = {"input_ids": np.zeros((1, 8), np.int64)}
    with pytest.raises(GraphpassError, match="decode-mode evaluation needs a with-past graph"):
        evaluate(tmp_path / "m.onnx", tmp_path / "m.onnx", data, progress=False, decode_from=2)
