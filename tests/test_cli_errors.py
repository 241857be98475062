"""Model I/O (graphpass.graph.io) and the one-line errors of every command: exit 2, one stderr line,
no output file."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import cli_error, cli_ok, inits
from graphpass.errors import GraphpassError
from graphpass.graph.io import load_model, save_model


def _external_copy(tmp_path, model) -> tuple:
    folder = tmp_path / "ext"
    folder.mkdir()
    save_model(model, folder / "model.onnx", external=True)
    return folder / "model.onnx", folder / "model.onnx.data"


def _set_location(path, loc: str) -> None:
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = loc
    onnx.save_model(m, str(path))


# ---------------------------------------------------------------------------- bad model files
def _bad_model(kind: str, tmp_path, model) -> tuple:
    """(path, expected words in the error) for one way a model file can be wrong."""
    p = tmp_path / "bad.onnx"
    if kind == "missing":
        return tmp_path / "nope.onnx", "no such file"
    if kind == "directory":
        p.mkdir()
        return p, "is a directory"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "empty file"
    if kind == "random-bytes":
        p.write_bytes(np.random.default_rng(0).bytes(4096))
        return p, "not a readable ONNX model"
    if kind == "truncated":
        p.write_bytes(model.SerializeToString()[:5000])
        return p, "not a readable ONNX model"
    if kind == "tensor-proto":
        p.write_bytes(numpy_helper.from_array(np.arange(6, dtype=np.float32)).SerializeToString())
        return p, "holds no ONNX graph"
    path, data = _external_copy(tmp_path, model)
    if kind == "external-missing":
        data.unlink()
        return path, "external data file 'model.onnx.data' is missing"
    if kind == "external-truncated":
        data.write_bytes(data.read_bytes()[:1000])
        return path, "cannot read external data"
    if kind == "external-outside":
        (tmp_path / "x").write_bytes(data.read_bytes())
        _set_location(path, "../x")
        return path, "external data '../x' points outside the model's folder"
    if kind == "external-absolute":
        (tmp_path / "x").write_bytes(data.read_bytes())
        _set_location(path, str(tmp_path / "x"))
        return path, f"external data '{tmp_path / 'x'}' points outside the model's folder"
    raise ValueError(kind)


BAD = ["missing", "directory", "empty", "random-bytes", "truncated", "tensor-proto",
       "external-missing", "external-truncated", "external-outside", "external-absolute"]


@pytest.mark.parametrize("kind", BAD)
def test_load_model_errors_name_file_and_problem(tmp_path, synth, kind):
    path, needle = _bad_model(kind, tmp_path, synth("prenorm").model)
    with pytest.raises(GraphpassError) as e:
        load_model(path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and needle in msg and str(path) in msg, msg


@pytest.mark.parametrize("kind", ["missing", "random-bytes", "tensor-proto", "external-outside"])
def test_commands_report_bad_models_on_one_line(capsys, tmp_path, synth, kind):
    s = synth("prenorm")
    path, needle = _bad_model(kind, tmp_path, s.model)
    out = tmp_path / "out.onnx"
    for argv in (["eval", path, "--reference", s.path, "--data", s.data_path],
                 ["eval", s.path, "--reference", path, "--data", s.data_path],
                 ["bench", path, "--reference", s.path, "--shape", "1x4"],
                 ["calibrate", path, "--data", s.data_path, "-o", tmp_path / "st.npz"],
                 ["inspect", path]):
        assert needle in cli_error(capsys, argv, absent=[tmp_path / "st.npz", out])


# ---------------------------------------------------------------------------- save_model
@pytest.mark.parametrize("external", [False, True, None])
def test_save_model_round_trip(tmp_path, synth, external):
    m = synth("llama").model
    p = save_model(m, tmp_path / "m.onnx", external=external)
    files = sorted(q.name for q in tmp_path.iterdir())
    assert files == (["m.onnx", "m.onnx.data"] if external else ["m.onnx"])  # no temp file left
    back = load_model(p)
    a, b = inits(m), inits(back)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert [n.SerializeToString() for n in back.graph.node] == [n.SerializeToString() for n in m.graph.node]
    if external:
        raw = onnx.load(str(p), load_external_data=False)
        locs = {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"}
        assert locs == {"m.onnx.data"}


def test_save_model_overwrites_external_data_in_place(tmp_path, synth):
    save_model(synth("llama").model, tmp_path / "m.onnx", external=True)
    m = synth("prenorm").model
    save_model(m, tmp_path / "m.onnx", external=True)
    back = inits(load_model(tmp_path / "m.onnx"))
    assert all(np.array_equal(v, back[k]) for k, v in inits(m).items())


def test_save_model_refuses_a_missing_folder(tmp_path, synth):
    with pytest.raises(GraphpassError, match="output folder does not exist"):
        save_model(synth("prenorm").model, tmp_path / "no" / "m.onnx")


# ---------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("argv, needle", [
    ([], "required: command"),
    (["frobnicate"], "invalid choice"),
    (["eval", "m.onnx", "--data", "d.npz"], "--reference"),
    (["eval", "m.onnx", "--reference", "m.onnx", "--data", "d.npz", "--batch-size", "0"], "must be positive"),
    (["calibrate", "--data", "d.npz"], "--output"),
    (["smooth", "m.onnx", "-o", "x.onnx"], "--stats"),
])
def test_argument_errors_are_one_line(capsys, argv, needle):
    assert needle in cli_error(capsys, argv)


def test_calibrate_without_model_or_merge(capsys, tmp_path):
    msg = cli_error(capsys, ["calibrate", "-o", tmp_path / "s.npz"], absent=[tmp_path / "s.npz"])
    assert "give MODEL and --data" in msg


def test_inspect_lists_sites_and_plot_errors(capsys, tmp_path, synth, calibrated):
    s = synth("prenorm")
    calibrated("prenorm").save(tmp_path / "s.npz")
    out, _ = cli_ok(capsys, ["inspect", s.path, "--stats", tmp_path / "s.npz"])
    assert "13 linear layers, 7 smoothing sites, 2 not covered" in out
    assert "act max/med" in out
    png = tmp_path / "p.png"
    assert "--plot needs --stats" in cli_error(capsys, ["inspect", s.path, "--plot", "x", "-o", png], [png])
    assert "no site named 'nope'" in cli_error(capsys, ["inspect", s.path, "--stats", tmp_path / "s.npz",
                                                        "--plot", "nope", "-o", png], [png])
    assert "alpha must be within [0, 1]" in cli_error(capsys, ["inspect", s.path, "--alpha", "2"])


@pytest.mark.parametrize("flags,says", [(["--scheme", "w4"], "--no-smooth"),
                                        (["--scheme", "token"], "--no-smooth"),
                                        (["--scheme", "static", "--no-smooth"], "--scheme static calibrates"),
                                        (["--scheme", "outlier"], "--scheme outlier calibrates")])
def test_quantize_without_data_says_what_runs_without_it(capsys, synth, tmp_path, flags, says):
    """Without --data the error names the way out that works for the scheme: --no-smooth for
    dynamic / token / w8 / w4 (w4 was told 'use --no-smooth with a dynamic scheme'); none for static
    and outlier, whose ranges or columns are calibrated."""
    s = synth("llama")
    err = cli_error(capsys, ["quantize", s.path, "-o", tmp_path / "q.onnx", *flags], [tmp_path / "q.onnx"])
    assert says in err and "dynamic scheme" not in err
    if "--no-smooth" in says:
        cli_ok(capsys, ["quantize", s.path, "-o", tmp_path / "q.onnx", *flags, "--no-smooth"])
