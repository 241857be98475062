"""`graphpass bench --decode`: TTFT and ms/token of two with-past graphs in one run, greedy
agreement, the prompt from --data, JSON, and one-line errors (a cache that cannot be fed back,
a no-cache graph, options that do not go together).

Greedy tokens are checked against generate_ids (the same runner loop, no timing) and across the
two forms, which share their weights (testing/past.py)."""
from __future__ import annotations

import json
import re
import math

import numpy as np
import onnx
import pytest
from conftest import cli_error, cli_ok
from test_generate import _int8_past, _perturbed

from graphpass.graph.decode import DecodeRunner, load_layout, past_layout
from graphpass.graph.runtime import make_session
from graphpass.testing.past import build_genai_past, build_optimum_past, genai_config
from graphpass.testing.synthetic import SyntheticConfig, build_llama
from graphpass.validate.bench_decode import bench_decode
from graphpass.validate.generate import generate_ids

CFG = SyntheticConfig()
P, N = 12, 10
PERTURB = 0.1    # relative weight noise: parts from the reference within N steps of this prompt
SECONDS = 0.05   # the budget is spent at once: MIN_ROUNDS generations each


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("benchdec")
    out = {}
    for name, m in (("optimum", build_optimum_past(CFG)), ("genai", build_genai_past(CFG)),
                    ("perturbed", _perturbed(build_optimum_past(CFG), PERTURB)), ("nocache", build_llama(CFG)),
                    ("int8past", _int8_past(build_optimum_past(CFG)))):
        (d / name).mkdir()
        onnx.save(m, d / name / "model.onnx")
        out[name] = d / name / "model.onnx"
    return out


def _greedy(path, prompt):
    model = onnx.load(str(path))
    return generate_ids(DecodeRunner(make_session(model, 1), past_layout(model)), list(prompt), N + 1)


def _prompt(res):
    return np.random.default_rng(0).integers(0, CFG.vocab, res["prompt_len"])


@pytest.mark.parametrize("form", ["optimum", "genai"])
def test_a_graph_against_itself(models, form):
    res = bench_decode(models[form], models[form], P, N, threads=1, seconds=SECONDS)
    assert res["prompt"] == f"synthetic ids < {CFG.vocab}" and res["forms"]["candidate"] == form
    assert res["tokens"]["candidate"] == res["tokens"]["reference"] == _greedy(models[form], _prompt(res))
    assert res["agree"] == {"prefix": N + 1, "same": N + 1, "tokens": N + 1}
    for k in ("reference", "candidate"):
        r = res[k]
        assert r["generations"] >= 2 and r["ttft_ms"] > 0 and r["decode_ms"] > 0
        assert math.isclose(r["tokens_per_s"], 1e3 / r["decode_ms"])
    assert math.isclose(res["ratio"]["decode"], res["candidate"]["decode_ms"] / res["reference"]["decode_ms"])
    assert math.isclose(res["ratio"]["ttft"], res["candidate"]["ttft_ms"] / res["reference"]["ttft_ms"])


def test_the_two_forms_agree_on_every_greedy_token(models):
    res = bench_decode(models["genai"], models["optimum"], P, N, threads=1, seconds=SECONDS)
    assert res["forms"] == {"reference": "optimum", "candidate": "genai"}
    assert res["agree"]["prefix"] == N + 1


def test_agreement_of_a_perturbed_candidate(models):
    res = bench_decode(models["perturbed"], models["optimum"], P, N, threads=1, seconds=SECONDS)
    cand, ref = _greedy(models["perturbed"], _prompt(res)), _greedy(models["optimum"], _prompt(res))
    assert res["tokens"] == {"candidate": cand, "reference": ref}
    k = next((i for i, (c, r) in enumerate(zip(cand, ref)) if c != r), N + 1)
    assert k < N + 1, "the perturbed candidate should part from the reference in this prompt"
    assert res["agree"] == {"prefix": k, "same": sum(c == r for c, r in zip(cand, ref)), "tokens": N + 1}


def test_prompt_from_data_and_json_through_the_cli(models, tmp_path, capsys):
    ids = np.random.default_rng(5).integers(0, CFG.vocab, (2, P + 3)).astype(np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    out, _ = cli_ok(capsys, ["bench", models["genai"], "--reference", models["optimum"], "--decode",
                             "--data", tmp_path / "d.npz", "--prompt-len", P, "--steps", N,
                             "--threads", 1, "--seconds", SECONDS, "--json", tmp_path / "r.json"])
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["prompt"] == "data window 0" and res["prompt_len"] == P and res["steps"] == N
    assert res["tokens"]["reference"] == _greedy(models["optimum"], ids[0, :P])
    assert "TTFT" in out and "load average" in out and f"the first {res['agree']['prefix']} of {N + 1} agree" in out


def test_symbolic_head_size_is_read_from_genai_config(tmp_path):
    """The builder declares past [batch, kv, past, kv_cache_dim]: head size from genai_config.json."""
    m = build_genai_past(CFG)
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name.startswith(("past_key_values.", "present.")):
            vi.type.tensor_type.shape.dim[3].dim_param = "kv_cache_dim"
    onnx.save(m, tmp_path / "model.onnx")
    (tmp_path / "genai_config.json").write_text(json.dumps(genai_config(CFG)))
    assert {(p.heads, p.head_dim) for p in load_layout(tmp_path / "model.onnx").past} == \
        {(CFG.kv_heads, CFG.head_dim)}
    res = bench_decode(tmp_path / "model.onnx", tmp_path / "model.onnx", P, 2, threads=1, seconds=SECONDS)
    assert res["agree"]["prefix"] == 3


def test_bad_input_is_one_line(models, tmp_path, capsys):
    base = ["--decode", "--prompt-len", P, "--steps", 2, "--threads", 1, "--seconds", SECONDS]
    err = cli_error(capsys, ["bench", models["int8past"], "--reference", models["optimum"], *base])
    assert "'present.0.key' is float32 but past input 'past_key_values.0.key' takes int8" in err
    err = cli_error(capsys, ["bench", models["nocache"], "--reference", models["optimum"], *base])
    assert "bench --decode needs a with-past graph" in err
    assert "--shape" in cli_error(capsys, ["bench", models["optimum"], "--reference", models["optimum"],
                                           *base, "--shape", "1x4"])
    assert "go with --decode" in cli_error(capsys, ["bench", models["optimum"], "--reference",
                                                    models["optimum"], "--steps", 3])
    np.savez(tmp_path / "short.npz", input_ids=np.zeros((1, P - 1), np.int64))
    assert "holds 11 tokens" in cli_error(capsys, ["bench", models["optimum"], "--reference",
                                                   models["optimum"], *base, "--data", tmp_path / "short.npz"])
    np.savez(tmp_path / "noids.npz", x=np.zeros((1, P), np.float32))
    assert "'input_ids'" in cli_error(capsys, ["bench", models["optimum"], "--reference",
                                               models["optimum"], *base, "--data", tmp_path / "noids.npz"])
    np.savez(tmp_path / "big.npz", input_ids=np.full((1, P), CFG.vocab + 5, np.int64))
    assert "onnxruntime failed" in cli_error(capsys, ["bench", models["optimum"], "--reference",
                                                      models["optimum"], *base, "--data", tmp_path / "big.npz"])
    assert "must be positive" in cli_error(capsys, ["bench", models["optimum"], "--reference",
                                                    models["optimum"], "--decode", "--steps", 0])


@pytest.mark.parametrize("form", ["optimum", "genai"])
def test_prefill_bench_of_a_with_past_graph_runs_over_an_empty_past(models, form, capsys):
    from graphpass.graph.decode import load_layout as layout_of
    from graphpass.graph.io import input_specs
    from graphpass.validate.bench import _prefill_inputs

    feeds = _prefill_inputs(input_specs(onnx.load(str(models[form]))), (2, 5), layout_of(models[form]))
    assert feeds["past_key_values.0.key"].shape == (2, CFG.kv_heads, 0, CFG.head_dim)
    assert feeds["attention_mask"].shape == (2, 5) and feeds["input_ids"].shape == (2, 5)
    out, _ = cli_ok(capsys, ["bench", models[form], "--reference", models[form], "--shape", "2x5",
                             "--threads", 1, "--seconds", SECONDS])
    assert "2x5" in out


def test_decode_bench_reports_progress_in_a_log(models, capsys):
    """bench --decode times generations for 20 s by default: in a log it writes one line when it
    ends, with the number of interleaved generations."""
    out, err = cli_ok(capsys, ["bench", models["genai"], "--reference", models["optimum"], "--decode",
                               "--prompt-len", P, "--steps", N, "--threads", 1, "--seconds", SECONDS])
    generations = re.search(r"(\d+) interleaved generations each", out).group(1)
    assert f"bench --decode: {generations} generations" in err
