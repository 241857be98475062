"""The pipeline on with-past graphs: `--decode-fusions` rewrites attention with its cache into
GroupQueryAttention (and norms, row rescales) after quantization, and the generation loop still
sees the same function: prefill then decode steps, fused vs unfused quantized graph."""
from __future__ import annotations

import numpy as np
import onnx

from decode_tiny import tiny_decoder
from graphpass.graph.decode import DecodeRunner, past_layout
from graphpass.graph.runtime import make_session
from graphpass.pipeline import PipelineConfig, quantize

TOL = 1e-4      # |Δlogits| <= TOL + TOL·|logits|: the fused ops reorder float sums


def _run(path, ids, prefix):
    m = onnx.load(path)
    r = DecodeRunner(make_session(path), past_layout(m))
    out = [r.prefill(ids[:, :prefix])]
    out += [r.step(ids[:, k:k + 1]) for k in range(prefix, ids.shape[1])]
    return np.concatenate(out, axis=1)


def test_decode_fusions_in_the_pipeline_keep_the_function(tmp_path):
    onnx.save(tiny_decoder(), tmp_path / "m.onnx")
    cfg = PipelineConfig(scheme="token", alpha=None)
    logs = []
    quantize(tmp_path / "m.onnx", tmp_path / "plain.onnx", None, cfg, progress=False, log=logs.append)
    quantize(tmp_path / "m.onnx", tmp_path / "fused.onnx", None,
             PipelineConfig(scheme="token", alpha=None, decode_fusions=True), progress=False, log=logs.append)
    fused = onnx.load(tmp_path / "fused.onnx")
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "RotaryEmbedding" in ops, ops
    assert len(fused.graph.node) < len(onnx.load(tmp_path / "plain.onnx").graph.node)
    assert any(line.startswith("decode:") for line in logs), logs
    plain_io = [(v.name, v.type.tensor_type.elem_type) for v in onnx.load(tmp_path / "m.onnx").graph.input]
    assert [(v.name, v.type.tensor_type.elem_type) for v in fused.graph.input] == plain_io
    ids = np.random.default_rng(0).integers(0, 64, size=(1, 14))
    a, b = _run(tmp_path / "plain.onnx", ids, 9), _run(tmp_path / "fused.onnx", ids, 9)
    assert np.all(np.abs(a - b) <= TOL + TOL * np.abs(a)), float(np.abs(a - b).max())
