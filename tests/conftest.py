"""Shared fixtures: the synthetic transformers saved as model folders (model.onnx, model.json,
data.npz), a tiny trained tokenizer, hand-built norm -> linear graphs, and CLI helpers.

Everything here is seeded; a folder is built once per session and must not be edited by a test
(copy it with `fresh()` or `copy_model` first)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpass.cli.main import main
from graphpass.graph.io import save_model
from graphpass.testing.synthetic import (SyntheticConfig, build_llama, build_postln_encoder,
                                 build_prenorm_decoder, random_inputs)

CFG = SyntheticConfig()  # 2 layers, hidden 64, 4 heads (2 kv heads for Llama), ffn 128, vocab 256
CALIB_BATCH, CALIB_SEQ = 4, 16  # data.npz of every model folder
PROBE_BATCH, PROBE_SEQ = 3, 11  # a shape calibration never saw
EXACT_RTOL = 1e-5  # max |y' - y| / max |y| after an exact fold (float32 reassociation only)

VARIANTS = {
    "prenorm": (build_prenorm_decoder, CFG, "causal-lm"),
    "llama": (build_llama, CFG, "causal-lm"),  # rms_form "reciprocal"
    "llama-div": (build_llama, SyntheticConfig(rms_form="div"), "causal-lm"),
    "llama-simplified": (build_llama, SyntheticConfig(rms_form="simplified"), "causal-lm"),
    "llama-rmsnorm23": (build_llama, SyntheticConfig(rms_form="rmsnorm23", opset=23), "causal-lm"),
    "postln": (build_postln_encoder, CFG, "encoder"),
    "postln-gemm": (build_postln_encoder, SyntheticConfig(gemm=True), "encoder"),
}
RMS_VARIANTS = ["llama", "llama-div", "llama-simplified", "llama-rmsnorm23"]


# ---------------------------------------------------------------------------- small helpers
def copy_model(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model, feeds: dict, extra: list[str] = ()) -> dict[str, np.ndarray]:
    """Every graph output plus `extra` intermediate tensors, by name."""
    if extra:
        model = copy_model(model)
        for t in extra:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def max_rel_err(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """Worst over outputs of max |got - ref| / max |ref|."""
    worst = 0.0
    for k, r in ref.items():
        r64, g64 = r.astype(np.float64), got[k].astype(np.float64)
        worst = max(worst, float(np.abs(g64 - r64).max() / max(np.abs(r64).max(), 1e-30)))
    return worst


def op_counts(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


def inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def ort_runs(m: onnx.ModelProto) -> bool:
    try:
        session(m)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------- CLI helpers
def invoke(argv: list[str]) -> int:
    """graphpass.cli.main.main, with argparse's SystemExit turned into its status."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)


def cli_error(capsys, argv: list, absent: list = ()) -> str:
    """Run the CLI, expect exit 2 and exactly one stderr line; files in `absent` not written."""
    capsys.readouterr()
    rc = invoke(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    assert err.startswith("graphpass"), err
    for p in absent:
        assert not Path(p).exists(), f"{p} was written on error"
    leftovers = [q for p in absent for q in Path(p).parent.glob(f".{Path(p).name}.*")]
    assert not leftovers, leftovers
    return err.strip()


def cli_ok(capsys, argv: list) -> tuple[str, str]:
    capsys.readouterr()
    rc = invoke(argv)
    out, err = capsys.readouterr()
    assert rc == 0, (rc, out, err)
    return out, err


# ---------------------------------------------------------------------------- model folders
@dataclass
class Saved:
    variant: str
    dir: Path
    model: onnx.ModelProto  # shared: never edit, use fresh()
    kind: str

    @property
    def path(self) -> Path:
        return self.dir / "model.onnx"

    @property
    def data_path(self) -> Path:
        return self.dir / "data.npz"

    @property
    def data(self) -> dict[str, np.ndarray]:
        return random_inputs(self.model, CALIB_BATCH, CALIB_SEQ, seed=1)

    def probe(self, seed: int = 2) -> dict[str, np.ndarray]:
        return random_inputs(self.model, PROBE_BATCH, PROBE_SEQ, seed=seed)

    def fresh(self) -> onnx.ModelProto:
        return copy_model(self.model)


def write_folder(folder: Path, model: onnx.ModelProto, kind: str,
                 data: dict[str, np.ndarray] | None = None, external: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / "model.onnx", external=external)
    meta = {"kind": kind, "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output]}
    (folder / "model.json").write_text(json.dumps(meta) + "\n")
    if data is not None:
        np.savez(folder / "data.npz", **data)
    return folder / "model.onnx"


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """synth(variant) -> Saved: built, saved and given data.npz once per session."""
    cache: dict[str, Saved] = {}

    def get(variant: str) -> Saved:
        if variant not in cache:
            build, cfg, kind = VARIANTS[variant]
            m = build(cfg)
            if not ort_runs(m):
                pytest.skip(f"onnxruntime {ort.__version__} cannot run the {variant} model")
            folder = tmp_path_factory.mktemp(variant)
            write_folder(folder, m, kind, random_inputs(m, CALIB_BATCH, CALIB_SEQ, seed=1))
            cache[variant] = Saved(variant, folder, m, kind)
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def calibrated(synth):
    """calibrated(variant) -> Stats of the variant over its data.npz (cached)."""
    from graphpass.calibrate.collect import calibrate

    cache = {}

    def get(variant: str):
        if variant not in cache:
            s = synth(variant)
            cache[variant] = calibrate(s.path, s.data, batch_size=2, progress=False)
        return cache[variant]

    return get


# ---------------------------------------------------------------------------- text + tokenizer
CORPUS_WORDS = 600  # whitespace words in corpus.txt; the WordLevel vocabulary is 40 words + [UNK]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(text file, tokenizer.json) trained with the `tokenizers` library on that text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(7)
    words = [f"w{i}" for i in range(40)]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(CORPUS_WORDS // 12)]
    text = d / "corpus.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(d / "tokenizer.json"))
    return text, d / "tokenizer.json"


# ---------------------------------------------------------------------------- hand-built graphs
def make_model(nodes, inputs, outputs, initializers, opset: int = 18) -> onnx.ModelProto:
    """inputs / outputs: (name, shape) pairs of float tensors."""
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    inits_ = [numpy_helper.from_array(np.asarray(a), n) for n, a in initializers.items()]
    g = helper.make_graph(nodes, "hand_built", vi, vo, inits_)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def node(op: str, ins: list[str], out: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ins, [out], name=f"{op}_{out}", **attrs)


def norm_nodes(kind: str, x: str, out: str, c: int, rng, w: dict, gamma_boost=()) -> list:
    """A normalization of x over its last axis into `out`, weights added to `w`.

    kind: 'ln' (LayerNormalization with bias), 'ln_nobias', 'ln_decomposed' (Sub-mean ... Mul γ,
    Add β), 'rms_div', 'rms_reciprocal' (Pow, ReduceMean, Add, Sqrt, Div | Reciprocal+Mul, Mul γ)."""
    g = (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    g[list(gamma_boost)] *= 30.0
    b = (0.1 * rng.standard_normal(c)).astype(np.float32)
    w[f"{out}_gamma"], axes = g, f"{out}_axes"
    if kind in ("ln", "ln_nobias"):
        ins = [x, f"{out}_gamma"]
        if kind == "ln":
            w[f"{out}_beta"] = b
            ins.append(f"{out}_beta")
        return [node("LayerNormalization", ins, out, axis=-1, epsilon=1e-5)]
    w[axes], w[f"{out}_eps"], w[f"{out}_two"] = (np.array([-1], np.int64), np.float32(1e-5),
                                                 np.float32(2.0))
    nodes, src = [], x
    if kind == "ln_decomposed":
        nodes += [node("ReduceMean", [x, axes], f"{out}_mu", keepdims=1),
                  node("Sub", [x, f"{out}_mu"], f"{out}_xc")]
        src = f"{out}_xc"
    nodes += [node("Pow", [src, f"{out}_two"], f"{out}_sq"),
              node("ReduceMean", [f"{out}_sq", axes], f"{out}_ms", keepdims=1),
              node("Add", [f"{out}_ms", f"{out}_eps"], f"{out}_mse"),
              node("Sqrt", [f"{out}_mse"], f"{out}_rms")]
    if kind == "rms_reciprocal":
        nodes += [node("Reciprocal", [f"{out}_rms"], f"{out}_inv"),
                  node("Mul", [src, f"{out}_inv"], f"{out}_n")]
    else:
        nodes.append(node("Div", [src, f"{out}_rms"], f"{out}_n"))
    if kind == "ln_decomposed":
        w[f"{out}_beta"] = b
        return nodes + [node("Mul", [f"{out}_n", f"{out}_gamma"], f"{out}_gn"),
                        node("Add", [f"{out}_gn", f"{out}_beta"], out)]
    return nodes + [node("Mul", [f"{out}_gamma", f"{out}_n"], out)]


# ---------------------------------------------------------------------------- quantized models
@pytest.fixture(scope="session")
def quantized(synth, tmp_path_factory):
    """quantized(variant, **PipelineConfig fields) -> (path, PipelineResult, log lines).

    graphpass.pipeline.quantize run once per session per configuration on the variant's folder
    (its data.npz as calibration data); the output sits alone in a fresh folder."""
    from graphpass.pipeline import PipelineConfig, quantize

    cache = {}

    def get(variant: str, **fields):
        key = (variant, tuple(sorted(fields.items())))
        if key not in cache:
            s = synth(variant)
            out = tmp_path_factory.mktemp(f"q-{variant}") / "q.onnx"
            logs: list[str] = []
            res = quantize(s.path, out, s.data, PipelineConfig(**fields), progress=False,
                           log=logs.append)
            cache[key] = (out, res, logs)
        return cache[key]

    return get
