"""The > 2 GB code paths on a small model: weights read from and written to external data.

tools/make_large_model.py runs calibrate -> smooth -> quantize -> eval on a 2.4 GB model (minutes,
not CI). Here the same commands run on the tiny Llama saved with external data, with
graphpass.graph.io.EXTERNAL_DATA_THRESHOLD lowered so every output is written with external data too,
exactly as a model over the threshold would be. The tool's builder is checked to give the very
model graphpass.testing.synthetic.build_llama gives."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import EXACT_RTOL, cli_ok, inits, max_rel_err, run, write_folder
from graphpass.graph.io import load_model
from graphpass.calibrate.stats import Stats
from graphpass.testing.synthetic import SyntheticConfig, build_llama
from test_bad_inputs import snapshot

STATS_RTOL = 1e-6    # calibration of one graph, weights inline or external: same kernels, same data
QUANT_KL_MAX = 0.05  # KL(FP32 || int8) per position on the tiny Llama's data (measured 0.0054)
QUANT_TOP1_MIN = 0.85  # top-1 agreement over its 64 tokens (measured 0.94)
QUANT_REL_MAX = 0.1  # max |y_q - y| / max |y| on probe inputs, alpha 0.5 (measured 0.042)


@pytest.fixture
def external(synth, tmp_path, monkeypatch):
    """A copy of the tiny Llama folder whose weights sit in model.onnx.data; outputs forced external."""
    s = synth("llama")
    write_folder(tmp_path / "src", s.fresh(), "causal-lm", s.data, external=True)
    monkeypatch.setattr("graphpass.graph.io.EXTERNAL_DATA_THRESHOLD", 1024)
    return s, tmp_path / "src"


def _external_files(path: Path) -> set[str]:
    bare = onnx.load(str(path), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in bare.graph.initializer) >= 10
    return {e.value for t in bare.graph.initializer for e in t.external_data if e.key == "location"}


def test_calibrate_smooth_quantize_eval_through_external_data(capsys, tmp_path, external, calibrated):
    s, src = external
    model, data, before = src / "model.onnx", src / "data.npz", snapshot(src)
    assert _external_files(model) == {"model.onnx.data"}
    cli_ok(capsys, ["calibrate", model, "--data", data, "-o", tmp_path / "s.npz"])
    got, want = Stats.load(tmp_path / "s.npz"), calibrated("llama")
    assert got.min.keys() == want.min.keys()
    for t in want.min:
        scale = max(np.abs(want.min[t]).max(), np.abs(want.max[t]).max())
        assert np.abs(got.min[t] - want.min[t]).max() <= STATS_RTOL * scale
        assert np.abs(got.max[t] - want.max[t]).max() <= STATS_RTOL * scale
    for d in ("sm", "q"):
        (tmp_path / d).mkdir()
    cli_ok(capsys, ["smooth", model, "--stats", tmp_path / "s.npz", "-o", tmp_path / "sm" / "model.onnx"])
    cli_ok(capsys, ["quantize", model, "--data", data, "-o", tmp_path / "q" / "model.onnx"])
    for d in ("sm", "q"):
        out = tmp_path / d / "model.onnx"
        assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
        assert _external_files(out) == {"model.onnx.data"}
        onnx.checker.check_model(str(out))
    probe = s.probe()
    assert max_rel_err(run(s.model, probe), run(tmp_path / "sm" / "model.onnx", probe)) <= EXACT_RTOL
    for d, kl_max in (("sm", 1e-9), ("q", QUANT_KL_MAX)):
        cli_ok(capsys, ["eval", tmp_path / d / "model.onnx", "--reference", model, "--data", data,
                        "--json", tmp_path / f"{d}.json"])
        r = json.loads((tmp_path / f"{d}.json").read_text())
        assert r["kl"] <= kl_max and r["top1"] >= QUANT_TOP1_MIN, r
    assert snapshot(src) == before    # the source model and its data file untouched


@pytest.mark.parametrize("command", ["smooth", "quantize"])
def test_overwrite_in_place_replaces_model_and_data_together(capsys, tmp_path, external, calibrated, command):
    """The output is the input: its weights are still being read from model.onnx.data while the
    new model.onnx.data is written (under a temporary name, renamed at the end)."""
    s, src = external
    model = src / "model.onnx"
    calibrated("llama").save(tmp_path / "s.npz")
    extra = ["--stats", tmp_path / "s.npz", "--alpha", "0.5"] if command == "smooth" else \
        ["--data", src / "data.npz", "--alpha", "0.5"]
    cli_ok(capsys, [command, model, *extra, "--overwrite", "-o", model])
    assert sorted(p.name for p in src.iterdir()) == ["data.npz", "model.json", "model.onnx", "model.onnx.data"]
    assert _external_files(model) == {"model.onnx.data"}
    new = load_model(model)
    probe = s.probe()
    err = max_rel_err(run(s.model, probe), run(new, probe))
    assert err <= EXACT_RTOL if command == "smooth" else 0 < err <= QUANT_REL_MAX


def _tool(name: str):
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_large_model_builder_gives_build_llamas_model(tmp_path):
    """tools/make_large_model.py (scaled down): weights streamed to a scratch file while the graph
    is built, then saved by save_model(external=True) -> the same model build_llama returns."""
    tool = _tool("make_large_model")
    args = tool.argparse.Namespace(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512, seq=16,
                                   calib_samples=2, eval_samples=2)
    path = tool.build(tmp_path / "big", args)
    assert sorted(p.name for p in path.parent.iterdir()) == ["calib.npz", "eval.npz", "model.json", "model.onnx",
                                                            "model.onnx.data"]
    assert _external_files(path) == {"model.onnx.data"}
    want = build_llama(SyntheticConfig(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512, seed=0,
                                       outlier_channels=(3, 17)))
    got = load_model(path)
    a, b = inits(want), inits(got)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in want.graph.node]
    shutil.rmtree(tmp_path / "big")


def test_smooth_without_a_site_writes_a_self_contained_copy(capsys, tmp_path):
    """No site to fold: the weights were never read, yet the output (another folder) has them all."""
    from conftest import make_model, node
    from graphpass.graph.io import save_model

    w = {"W": np.arange(12 * 300, dtype=np.float32).reshape(12, 300)}
    m = make_model([node("Relu", ["x"], "r"), node("MatMul", ["r", "W"], "y")], [("x", ["n", 12])],
                   [("y", ["n", 300])], w)   # a MatMul read by a graph output: the LM head, no site
    (tmp_path / "src").mkdir()
    save_model(m, tmp_path / "src" / "m.onnx", external=True)
    Stats().save(tmp_path / "s.npz")
    (tmp_path / "out").mkdir()
    cli_ok(capsys, ["smooth", tmp_path / "src" / "m.onnx", "--stats", tmp_path / "s.npz",
                    "-o", tmp_path / "out" / "m.onnx"])
    shutil.rmtree(tmp_path / "src")
    assert np.array_equal(inits(load_model(tmp_path / "out" / "m.onnx"))["W"], w["W"])
