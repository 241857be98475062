"""`graphpass data` (text -> tokenizer -> windows) and the data checks every command applies."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from tokenizers import Tokenizer

from conftest import cli_error, cli_ok, make_model, node, write_folder
from graphpass.calibrate.data import build_data, check_data, load_data, save_data
from graphpass.errors import GraphpassError

SEQ, SAMPLES = 16, 5


def _ids(text, tok):
    return np.asarray(Tokenizer.from_file(str(tok)).encode(text.read_text(), add_special_tokens=False).ids)


# ---------------------------------------------------------------------------- data command
def test_windows_are_consecutive_and_non_overlapping(capsys, tmp_path, corpus):
    text, tok = corpus
    out = tmp_path / "d.npz"
    stdout, _ = cli_ok(capsys, ["data", "--text", text, "--tokenizer", tok, "--seq-len", SEQ,
                                "--samples", SAMPLES, "-o", out])
    assert f"wrote {out}" in stdout
    data = load_data(out)
    assert list(data) == ["input_ids"]
    x = data["input_ids"]
    assert x.shape == (SAMPLES, SEQ) and x.dtype == np.int64
    ids = _ids(text, tok)
    np.testing.assert_array_equal(x, ids[: SAMPLES * SEQ].reshape(SAMPLES, SEQ))
    np.testing.assert_array_equal(x[1:, 0], ids[SEQ: SAMPLES * SEQ: SEQ])  # window k starts at k*SEQ


def test_model_fills_mask_ones_and_type_zeros(capsys, tmp_path, corpus, synth):
    text, tok = corpus
    out = tmp_path / "d.npz"
    cli_ok(capsys, ["data", "--text", text, "--tokenizer", tok, "--seq-len", SEQ, "--samples", 3,
                    "--model", synth("postln").path, "-o", out])
    data = load_data(out)
    assert sorted(data) == ["attention_mask", "input_ids", "token_type_ids"]
    assert all(v.shape == (3, SEQ) and v.dtype == np.int64 for v in data.values())
    assert (data["attention_mask"] == 1).all() and (data["token_type_ids"] == 0).all()
    assert check_data(data, synth("postln").model) == 3


def test_position_ids_are_filled_with_arange():
    m = make_model([], [], [], {})
    m.graph.input.extend([helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
                          for n in ("input_ids", "position_ids")])
    data = build_data(np.arange(40), 8, 4, m)
    np.testing.assert_array_equal(data["position_ids"], np.tile(np.arange(8), (4, 1)))


@pytest.mark.parametrize("words, seq, samples, needle", [
    (10, 16, 1, "shorter than one window of 16"),
    (40, 16, 3, "2 windows of 16, fewer than the 3 samples"),
])
def test_too_little_text(capsys, tmp_path, corpus, words, seq, samples, needle):
    _, tok = corpus
    text = tmp_path / "short.txt"
    text.write_text(" ".join(["w1"] * words))
    out = tmp_path / "d.npz"
    msg = cli_error(capsys, ["data", "--text", text, "--tokenizer", tok, "--seq-len", seq,
                             "--samples", samples, "-o", out], absent=[out])
    assert needle in msg and "short.txt" in msg


def test_missing_inputs(capsys, tmp_path, corpus):
    text, tok = corpus
    out = tmp_path / "d.npz"
    base = ["data", "--seq-len", SEQ, "--samples", 1, "-o", out]
    assert "no such text file" in cli_error(capsys, base + ["--text", tmp_path / "nope.txt",
                                                            "--tokenizer", tok], [out])
    assert "no such tokenizer file" in cli_error(capsys, base + ["--text", text, "--tokenizer",
                                                                 tmp_path / "nope.json"], [out])
    assert "exactly one of --text" in cli_error(capsys, base + ["--tokenizer", tok], [out])
    garbage = tmp_path / "tok.json"
    garbage.write_text("{not json")
    assert "not a tokenizer.json" in cli_error(capsys, base + ["--text", text, "--tokenizer", garbage],
                                               [out])


@pytest.mark.parametrize("opt, value, needle", [("--seq-len", 1, "--seq-len must be at least 2"),
                                                ("--samples", 0, "--samples must be at least 1")])
def test_bad_sizes(capsys, tmp_path, corpus, opt, value, needle):
    text, tok = corpus
    args = {"--seq-len": SEQ, "--samples": 1, opt: value}
    out = tmp_path / "d.npz"
    msg = cli_error(capsys, ["data", "--text", text, "--tokenizer", tok, *sum(args.items(), ()), "-o", out],
                    [out])
    assert needle in msg


# ---------------------------------------------------------------------------- loading
def test_save_load_round_trip(tmp_path):
    data = {"input_ids": np.arange(12, dtype=np.int64).reshape(3, 4),
            "x": np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)}
    save_data(data, tmp_path / "d.npz")
    back = load_data(tmp_path / "d.npz")
    assert set(back) == set(data)
    for k in data:
        assert back[k].dtype == data[k].dtype
        np.testing.assert_array_equal(back[k], data[k])
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]  # no temporary file left


def test_pickled_objects_are_refused(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, input_ids=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(GraphpassError, match="pickled objects; refusing"):
        load_data(p)


@pytest.mark.parametrize("payload, needle", [(b"", "not a readable .npz"),
                                             (b"PK\x03\x04garbage", "not a readable .npz")])
def test_unreadable_npz(tmp_path, payload, needle):
    p = tmp_path / "bad.npz"
    p.write_bytes(payload)
    with pytest.raises(GraphpassError, match=needle):
        load_data(p)
    with pytest.raises(GraphpassError, match="no such data file"):
        load_data(tmp_path / "missing.npz")


def test_empty_npz_is_refused(tmp_path):
    np.savez(tmp_path / "e.npz")
    with pytest.raises(GraphpassError, match="holds no arrays"):
        load_data(tmp_path / "e.npz")


# ---------------------------------------------------------------------------- data vs graph, via eval
def _float_model(tmp_path):
    """x float [batch, seq, 4] -> MatMul -> last_hidden_state (an encoder)."""
    m = make_model([node("MatMul", ["x", "w"], "last_hidden_state")], [("x", ["b", "s", 4])],
                   [("last_hidden_state", ["b", "s", 3])], {"w": np.ones((4, 3), np.float32)})
    return write_folder(tmp_path / "float", m, "encoder")


def _mutations(ids: np.ndarray):
    ok = {"attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {
        "missing": ({"input_ids": ids, "attention_mask": ok["attention_mask"]},
                    "missing graph input(s) token_type_ids"),
        "extra": ({"input_ids": ids, **ok, "labels": ids}, "labels are not graph inputs"),
        "dtype": ({"input_ids": ids.astype(np.int32), **ok}, "'input_ids' is int32, graph expects int64"),
        "rank": ({"input_ids": ids[..., None], **ok}, "'input_ids' has rank 3, graph expects 2"),
        "zero": ({k: v[:0] for k, v in {"input_ids": ids, **ok}.items()}, "zero samples"),
        "counts": ({"input_ids": ids, **{k: v[:1] for k, v in ok.items()}}, "disagree on the number"),
    }


@pytest.mark.parametrize("case", ["missing", "extra", "dtype", "rank", "zero", "counts"])
def test_eval_refuses_data_not_matching_the_graph(capsys, tmp_path, synth, case):
    s = synth("postln")
    data, needle = _mutations(s.data["input_ids"])[case]
    np.savez(tmp_path / "d.npz", **data)
    out = tmp_path / "m.json"
    msg = cli_error(capsys, ["eval", s.path, "--reference", s.path, "--data", tmp_path / "d.npz",
                             "--json", out], absent=[out])
    assert needle in msg and "d.npz" in msg


def test_eval_refuses_nan_in_float_input(capsys, tmp_path):
    path = _float_model(tmp_path)
    x = np.ones((2, 5, 4), np.float32)
    x[1, 2, 3] = np.nan
    np.savez(tmp_path / "d.npz", x=x)
    msg = cli_error(capsys, ["eval", path, "--reference", path, "--data", tmp_path / "d.npz"])
    assert "'x' holds NaN or Inf" in msg


def test_eval_refuses_pickled_data(capsys, tmp_path, synth):
    s = synth("prenorm")
    np.savez(tmp_path / "d.npz", input_ids=np.array([object(), 1], dtype=object))
    assert "refusing" in cli_error(capsys, ["eval", s.path, "--reference", s.path,
                                            "--data", tmp_path / "d.npz"])


def test_tokenizer_saved_with_truncation_still_reads_the_whole_text(capsys, tmp_path, corpus):
    """Regression: MiniLM's tokenizer.json truncates to 128 tokens; data must not inherit that."""
    text, tok = corpus
    t = Tokenizer.from_file(str(tok))
    t.enable_truncation(max_length=SEQ)
    trunc = tmp_path / "truncating.json"
    t.save(str(trunc))
    out = tmp_path / "d.npz"
    cli_ok(capsys, ["data", "--text", text, "--tokenizer", trunc, "--seq-len", SEQ,
                    "--samples", SAMPLES, "-o", out])
    assert load_data(out)["input_ids"].shape == (SAMPLES, SEQ)


def test_python_api_takes_a_data_path(synth, tmp_path):
    """graphpass.quantize and graphpass.evaluate read an .npz path as `data` (it used to be
    iterated as a string: 'calibration batch 0: lacks the past input(s)...' or a ValueError)."""
    import graphpass

    s = synth("prenorm")
    out = tmp_path / "q.onnx"
    res = graphpass.quantize(s.path, out, s.data_path, graphpass.PipelineConfig(scheme="token"),
                             progress=False, log=lambda *a: None)
    assert res.quant.quantized and out.is_file()
    by_path = graphpass.evaluate(out, s.path, str(s.data_path), progress=False)
    assert by_path == graphpass.evaluate(out, s.path, load_data(s.data_path), progress=False)


def test_long_name_lists_in_data_errors_are_cut_short(synth):
    """A with-past model's 60 past arrays given to a no-cache graph (or the reverse) name a few
    arrays and count the rest: the one-line error was 1,500 characters wide on SmolLM2."""
    s = synth("llama")
    data = dict(s.data)
    empty = np.zeros((len(data["input_ids"]), 3, 0, 64), np.float32)
    data.update({f"past_key_values.{i}.{kv}": empty for i in range(30) for kv in ("key", "value")})
    with pytest.raises(GraphpassError) as e:
        check_data(data, s.model)
    msg = str(e.value)
    assert len(msg) < 300 and "(and 56 more)" in msg and "past_key_values.0.key" in msg
    big = make_model([node("Identity", ["x"], "y")], [(f"in_{i}", ["b"]) for i in range(20)] + [("x", ["b"])],
                     [("y", ["b"])], {})
    with pytest.raises(GraphpassError) as e:
        check_data({"x": np.zeros(2, np.float32)}, big)
    assert len(str(e.value)) < 300 and "in_0, in_1, in_2, in_3 (and 16 more)" in str(e.value)
