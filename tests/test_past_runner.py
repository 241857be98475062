"""The with-past runner: form detection, feeds, cache handling, one-line errors.

Tolerance as in test_past_synthetic: 1e-4 absolute on O(10) logits."""
import json

import numpy as np
import onnx
import pytest

from graphpass.errors import GraphpassError
from graphpass.graph.decode import (DecodeRunner, check_past, empty_cache, load_layout, open_runner,
                                    past_layout, step_feeds)
from graphpass.graph.runtime import make_session
from graphpass.testing.past import build_genai_past, build_optimum_past, genai_config
from graphpass.testing.synthetic import SyntheticConfig, build_llama

ATOL = 1e-4
CFG = SyntheticConfig()


def _runner(model):
    return DecodeRunner(make_session(model, 1), past_layout(model))


def test_layout_of_both_forms_and_of_a_no_cache_graph():
    lo, lg = past_layout(build_optimum_past(CFG)), past_layout(build_genai_past(CFG))
    assert (lo.form, lo.position_ids, lg.form, lg.position_ids) == ("optimum", True, "genai", False)
    assert lo.past_names == [f"past_key_values.{i}.{t}" for i in range(2) for t in ("key", "value")]
    assert lg.present_names == [f"present.{i}.{t}" for i in range(2) for t in ("key", "value")]
    assert {(p.heads, p.head_dim, p.dtype) for p in lo.past} == {(2, 16, np.dtype(np.float32))}
    assert past_layout(build_llama(CFG)) is None


def test_genai_config_beside_the_model_names_the_form(tmp_path):
    onnx.save(build_optimum_past(CFG), tmp_path / "model.onnx")
    assert load_layout(tmp_path / "model.onnx").form == "optimum"
    (tmp_path / "genai_config.json").write_text(json.dumps(genai_config(CFG)))
    assert load_layout(tmp_path / "model.onnx").form == "genai"


@pytest.mark.parametrize("build", [build_optimum_past, build_genai_past])
def test_runner_prefill_and_steps_equal_one_prefill(build):
    model = build(CFG)
    run = _runner(model)
    ids = np.random.default_rng(0).integers(0, CFG.vocab, (2, 8))
    full = run.prefill(ids)
    assert run.cache.length == 8 and full.shape == (2, 8, CFG.vocab)
    np.testing.assert_allclose(run.prefill(ids[:, :3]), full[:, :3], atol=ATOL)
    if run.layout.form == "optimum":   # GroupQueryAttention takes n > 1 over a past at batch 1 only
        np.testing.assert_allclose(run.step(ids[:, 3:5]), full[:, 3:5], atol=ATOL)
    else:
        np.testing.assert_allclose(run.step(ids[:, 3:4])[:, 0],
                                   full[:, 3], atol=ATOL)
        np.testing.assert_allclose(run.step(ids[:, 4:5])[:, 0], full[:, 4], atol=ATOL)
    for t in range(5, 8):
        np.testing.assert_allclose(run.step(ids[:, t:t + 1])[:, 0], full[:, t], atol=ATOL)
    assert run.cache.past["past_key_values.0.key"].shape == (2, 2, 8, 16)


def test_runner_left_padded_rows_match_their_own_runs():
    model = build_optimum_past(CFG)
    run = _runner(model)
    ids = np.random.default_rng(1).integers(1, CFG.vocab, (2, 7))
    alone = run.prefill(ids[1:, 2:])[0]               # row 1 without its 2 leading pads
    mask = np.ones((2, 5), np.int64)
    mask[1, :2] = 0
    run.prefill(ids[:, :5], mask)
    out = run.step(ids[:, 5:6])
    np.testing.assert_allclose(out[1, 0], alone[3], atol=ATOL)
    assert step_feeds(run.layout, run.cache, ids[:, 6:])["position_ids"].tolist() == [[6], [4]]


def test_run_batch_takes_a_data_batch_with_empty_past():
    model = build_optimum_past(CFG)
    run = _runner(model)
    ids = np.random.default_rng(2).integers(0, CFG.vocab, (1, 6))
    feeds = step_feeds(run.layout, empty_cache(run.layout, 1), ids)
    np.testing.assert_allclose(run.run_batch(feeds), run.prefill(ids), atol=0)


def test_bad_past_inputs_are_one_line_errors():
    layout = past_layout(build_optimum_past(CFG))
    feeds = step_feeds(layout, empty_cache(layout, 1), np.zeros((1, 3), np.int64))
    with pytest.raises(GraphpassError, match=r"needs past input\(s\) past_key_values.0.key, "
                                             r"past_key_values.0.value \(and 2 more\)"):
        check_past(layout, {"input_ids": feeds["input_ids"]})
    bad = {**feeds, "past_key_values.1.key": feeds["past_key_values.1.key"].astype(np.float16)}
    with pytest.raises(GraphpassError, match="'past_key_values.1.key' is float16, graph expects float32"):
        check_past(layout, bad)
    bad = {**feeds, "past_key_values.0.value": np.zeros((1, 3, 0, 16), np.float32)}
    with pytest.raises(GraphpassError, match=r"shape \[1, 3, 0, 16\], graph expects \[batch, 2, past, 16\]"):
        check_past(layout, bad)
    run = _runner(build_optimum_past(CFG))
    with pytest.raises(GraphpassError, match="decode step before prefill"):
        run.step(np.zeros((1, 1), np.int64))


def test_graph_shapes_that_cannot_be_run_are_one_line_errors(tmp_path):
    m = build_optimum_past(CFG)
    m.graph.input[3].type.tensor_type.shape.dim[1].dim_param = "heads"
    with pytest.raises(GraphpassError, match="fixed kv_heads and head_dim .or genai_config.json.s., got \\[batch, heads, past, 16\\]"):
        past_layout(m)
    m = build_optimum_past(CFG)
    del m.graph.output[1]
    with pytest.raises(GraphpassError, match="'past_key_values.0.key' has no matching output 'present.0.key'"):
        past_layout(m)
    onnx.save(build_llama(CFG), tmp_path / "nocache.onnx")
    with pytest.raises(GraphpassError, match="not a with-past graph"):
        open_runner(tmp_path / "nocache.onnx")


def test_genai_symbolic_head_size_comes_from_genai_config(tmp_path):
    """The builder writes past axis 3 as 'kv_cache_dim'; genai_config.json holds head_size."""
    m = build_genai_past(CFG)
    for vi in m.graph.input:
        if vi.name.startswith("past_key_values."):
            vi.type.tensor_type.shape.dim[3].dim_param = "kv_cache_dim"
    onnx.save(m, tmp_path / "model.onnx")
    with pytest.raises(GraphpassError, match="got \\[batch, 2, past, kv_cache_dim\\]"):
        load_layout(tmp_path / "model.onnx")
    (tmp_path / "genai_config.json").write_text(json.dumps(genai_config(CFG)))
    layout = load_layout(tmp_path / "model.onnx")
    assert {(p.heads, p.head_dim) for p in layout.past} == {(CFG.kv_heads, CFG.head_dim)}
    run = open_runner(tmp_path / "model.onnx", 1)
    ids = np.random.default_rng(5).integers(0, CFG.vocab, (1, 5))
    full = run.prefill(ids)
    run.prefill(ids[:, :4])
    np.testing.assert_allclose(run.step(ids[:, 4:])[:, 0], full[:, 4], atol=ATOL)


def test_model_json_form_wins(tmp_path):
    onnx.save(build_optimum_past(CFG), tmp_path / "model.onnx")
    (tmp_path / "model.json").write_text(json.dumps({"kind": "causal-lm", "form": "genai"}))
    assert load_layout(tmp_path / "model.onnx").form == "genai"
