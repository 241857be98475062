"""`graphpass data --model` on with-past graphs, and the checks data gets against them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import cli_error, cli_ok
from graphpass.calibrate.data import build_data, check_data, load_data
from graphpass.errors import GraphpassError
from graphpass.graph.decode import DecodeRunner, past_layout
from graphpass.graph.runtime import make_session
from graphpass.testing.past import PAST_BUILDS, build_optimum_past
from graphpass.testing.synthetic import SyntheticConfig

CFG = SyntheticConfig()
SEQ = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for form, build in PAST_BUILDS.items():
        d = tmp_path_factory.mktemp(form)
        onnx.save(build(CFG), d / "model.onnx")
        out[form] = d
    return out


@pytest.mark.parametrize("form", ["optimum", "genai"])
def test_data_command_fills_an_empty_past(capsys, tmp_path, corpus, folders, form):
    text, tok = corpus
    out, model_path = tmp_path / "d.npz", folders[form] / "model.onnx"
    cli_ok(capsys, ["data", "--text", text, "--tokenizer", tok, "--seq-len", SEQ, "--samples", 3,
                    "--model", model_path, "-o", out])
    data = load_data(out)
    model = onnx.load(model_path)
    past = [n for n in data if n.startswith("past_key_values.")]
    assert len(past) == 2 * CFG.layers
    assert all(data[n].shape == (3, CFG.kv_heads, 0, CFG.head_dim) and data[n].dtype == np.float32
               for n in past)
    assert data["attention_mask"].shape == (3, SEQ) and (data["attention_mask"] == 1).all()
    assert ("position_ids" in data) == (form == "optimum")
    if form == "optimum":
        np.testing.assert_array_equal(data["position_ids"], np.tile(np.arange(SEQ), (3, 1)))
    assert check_data(data, model) == 3
    # the file is a valid prefill: the graph runs it and gives what the runner's own prefill gives
    run = DecodeRunner(make_session(model, 1), past_layout(model))
    np.testing.assert_allclose(run.run_batch(data), run.prefill(data["input_ids"]), atol=0)


def test_check_data_allows_an_empty_axis_only_on_the_past_length():
    model = build_optimum_past(CFG)
    data = build_data(np.arange(48) % CFG.vocab, SEQ, 4, model)
    assert check_data(data, model) == 4
    bad = {**data, "past_key_values.0.key": np.zeros((4, 0, 0, CFG.head_dim), np.float32)}
    with pytest.raises(GraphpassError, match=r"'past_key_values.0.key' has shape \[4, 0, 0, 16\]: an axis is empty"):
        check_data(bad, model)
    bad = {**data, "input_ids": data["input_ids"][:, :0], "position_ids": data["position_ids"][:, :0]}
    with pytest.raises(GraphpassError, match="'input_ids' has shape \\[4, 0\\]: an axis is empty"):
        check_data(bad, model)


def test_data_without_past_inputs_is_a_one_line_error_naming_them(capsys, tmp_path, folders):
    model = onnx.load(folders["optimum"] / "model.onnx")
    data = {k: v for k, v in build_data(np.arange(48) % CFG.vocab, SEQ, 4, model).items()
            if not k.startswith("past_key_values.")}
    with pytest.raises(GraphpassError, match=r"data: lacks the past input\(s\) past_key_values.0.key, "
                                             r"past_key_values.0.value \(and 2 more\)"):
        check_data(data, model)
    np.savez(tmp_path / "nopast.npz", **data)
    err = cli_error(capsys, ["eval", folders["optimum"] / "model.onnx", "--reference",
                             folders["optimum"] / "model.onnx", "--data", tmp_path / "nopast.npz"])
    assert "lacks the past input(s) past_key_values.0.key" in err


def test_past_lengths_and_mask_width_must_agree():
    model = build_optimum_past(CFG)
    data = build_data(np.arange(48) % CFG.vocab, SEQ, 4, model)
    two = np.zeros((4, CFG.kv_heads, 2, CFG.head_dim), np.float32)
    with pytest.raises(GraphpassError, match=r"past inputs disagree on the past length \[0, 2\]"):
        check_data({**data, "past_key_values.1.value": two}, model)
    past2 = {k: (two if k.startswith("past_") else v) for k, v in data.items()}
    with pytest.raises(GraphpassError, match="attention_mask has 8 columns, expected past 2 \\+ seq 8 = 10"):
        check_data(past2, model)
    past2["attention_mask"] = np.ones((4, 10), np.int64)
    assert check_data(past2, model) == 4
    bad = {**data, "past_key_values.0.key": data["past_key_values.0.key"].astype(np.float16)}
    with pytest.raises(GraphpassError, match="'past_key_values.0.key' is float16, graph expects float32"):
        check_data(bad, model)
