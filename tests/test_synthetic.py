"""The synthetic fixtures: valid, runnable, faithful in structure, numerically right, with
measurable activation outliers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpass.testing.synthetic import (SyntheticConfig, build_llama, build_postln_encoder,
                                 build_prenorm_decoder, random_inputs)

ROOT = Path(__file__).resolve().parents[1]
CFG = SyntheticConfig()
VARIANTS = {
    "prenorm": lambda: build_prenorm_decoder(CFG),
    "prenorm-gelu20": lambda: build_prenorm_decoder(SyntheticConfig(opset=20)),
    "llama-reciprocal": lambda: build_llama(CFG),
    "llama-div": lambda: build_llama(SyntheticConfig(rms_form="div")),
    "llama-simplified": lambda: build_llama(SyntheticConfig(rms_form="simplified")),
    "llama-rmsnorm23": lambda: build_llama(SyntheticConfig(rms_form="rmsnorm23", opset=23)),
    "postln": lambda: build_postln_encoder(CFG),
    "postln-gemm": lambda: build_postln_encoder(SyntheticConfig(gemm=True)),
}
_cache: dict[str, onnx.ModelProto] = {}


def model(variant: str) -> onnx.ModelProto:
    if variant not in _cache:
        _cache[variant] = VARIANTS[variant]()
    return _cache[variant]


def run(m: onnx.ModelProto, feeds: dict, extra: list[str] = ()) -> dict[str, np.ndarray]:
    """All graph outputs plus `extra` intermediate tensors, by name."""
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    for t in extra:
        m2.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m2.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in m2.graph.output], sess.run(None, feeds)))


def producers(m):
    return {o: n for n in m.graph.node for o in n.output}


def consumers(m, tensor):
    return [n for n in m.graph.node if tensor in n.input]


def linear_inputs(m) -> dict[str, str]:
    """node name -> activation input of every MatMul/Gemm whose weight is an initializer or
    a Transpose of one (the tied LM head)."""
    inits, prod = {t.name for t in m.graph.initializer}, producers(m)
    out = {}
    for n in m.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        w = prod.get(n.input[1])
        tied = w is not None and w.op_type == "Transpose" and w.input[0] in inits
        if n.input[1] in inits or tied:
            out[n.name] = n.input[0]
    return out


# ---------------------------------------------------------------------------- validity
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_valid_and_runs_with_dynamic_shapes(variant):
    m = model(variant)
    if variant == "llama-simplified":  # onnx has no schema for onnxruntime's op
        with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
            onnx.checker.check_model(m, full_check=True)
    else:
        onnx.checker.check_model(m, full_check=True)
    assert all(t.data_type == TensorProto.FLOAT for t in m.graph.initializer if len(t.dims) == 2)
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in m.graph.input]
    assert all(d == ["batch", "seq"] for d in dims)
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == len(names)
    out = m.graph.output[0]
    width = out.type.tensor_type.shape.dim[2].dim_value
    for batch, seq in ((2, 16), (3, 5)):
        y = run(m, random_inputs(m, batch, seq))[out.name]
        assert y.shape == (batch, seq, width) and y.dtype == np.float32
        assert np.isfinite(y).all()
        assert 0.1 < float(y.std()) < 20.0


def test_rms_forms_compute_the_same_function():
    feeds = random_inputs(model("llama-div"))
    ref = run(model("llama-reciprocal"), feeds)["logits"]
    for form in ("div", "simplified", "rmsnorm23"):
        got = run(model(f"llama-{form}"), feeds)["logits"]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=form)


def test_rmsnorm23_needs_opset_23():
    with pytest.raises(ValueError, match="opset >= 23"):
        SyntheticConfig(rms_form="rmsnorm23", opset=18)


def test_gelu_op_matches_erf_decomposition():
    ops18 = {n.op_type for n in model("prenorm").graph.node}
    ops20 = {n.op_type for n in model("prenorm-gelu20").graph.node}
    assert "Erf" in ops18 and "Gelu" not in ops18 and "Gelu" in ops20 and "Erf" not in ops20
    feeds = random_inputs(model("prenorm"))
    np.testing.assert_allclose(run(model("prenorm-gelu20"), feeds)["logits"],
                               run(model("prenorm"), feeds)["logits"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- outliers
@pytest.mark.parametrize("variant", ["prenorm", "llama-reciprocal", "postln", "postln-gemm"])
def test_every_linear_input_has_outlier_channels(variant):
    m = model(variant)
    sites = linear_inputs(m)
    assert len(sites) >= 6 * CFG.layers
    acts = run(m, random_inputs(m, 2, 16), list(dict.fromkeys(sites.values())))
    for node, tensor in sites.items():
        a = acts[tensor]
        chmax = np.abs(a.reshape(-1, a.shape[-1])).max(0)
        ratio = chmax.max() / np.median(chmax)
        assert ratio >= 10, f"{node}: max/median of per-channel max|x| = {ratio:.1f}"
        if "o_proj" not in node:  # GQA spreads a v outlier over its group of heads
            assert int(chmax.argmax()) in CFG.outlier_channels, node


def test_outlier_damp_scales_the_rows_reading_an_outlier():
    """Rows of the layer reading an outlier channel are / S^outlier_damp: with damp d and 1/2 on
    the same seed, those rows differ by S^(d - 1/2) and every other row is equal."""
    def weight(cfg):     # layer 0's gate_proj: the first [hidden, ffn] weight, reading the norm output
        return next(numpy_helper.to_array(t) for t in build_llama(cfg).graph.initializer
                    if list(t.dims) == [cfg.hidden, cfg.ffn])

    half = weight(SyntheticConfig(outlier_scale=300.0))
    full = weight(SyntheticConfig(outlier_scale=300.0, outlier_damp=1.0))
    rows = list(CFG.outlier_channels)
    np.testing.assert_allclose(half[rows] / full[rows], np.sqrt(300.0), rtol=1e-5)
    others = np.setdiff1d(np.arange(half.shape[0]), rows)
    np.testing.assert_array_equal(half[others], full[others])
    with pytest.raises(ValueError, match="outlier_damp must lie in"):
        SyntheticConfig(outlier_damp=1.5)


# ---------------------------------------------------------------------------- structure
def test_postln_norm_output_feeds_linear_and_residual():
    for variant in ("postln", "postln-gemm"):
        m = model(variant)
        both = []
        for n in m.graph.node:
            users = {c.op_type: c for c in consumers(m, n.output[0])}
            linear = users.keys() & {"MatMul", "Reshape"}  # Reshape -> Gemm in the gemm variant
            if n.op_type == "LayerNormalization" and "Add" in users and linear:
                both.append(n)
                after = consumers(m, users["Add"].output[0])  # post-LN: Add -> LayerNormalization
                assert [c.op_type for c in after] == ["LayerNormalization"]
        assert len(both) == 2 * CFG.layers, variant  # attention LN + the LN feeding each layer
    gemms = [n for n in model("postln-gemm").graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 5 * CFG.layers
    assert all(helper.get_attribute_value(a) == 1
               for g in gemms for a in g.attribute if a.name == "transB")


def test_gemm_variant_computes_the_same_function():
    feeds = random_inputs(model("postln"), 2, 12)
    got = run(model("postln-gemm"), feeds)["last_hidden_state"]
    want = run(model("postln"), feeds)["last_hidden_state"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_llama_lm_head_reads_transposed_embedding_and_gqa_is_expanded():
    m = model("llama-reciprocal")
    head = [n for n in m.graph.node if n.output[0] == "logits"][0]
    tr = producers(m)[head.input[1]]
    assert head.op_type == "MatMul" and tr.op_type == "Transpose"
    assert [helper.get_attribute_value(a) for a in tr.attribute] == [[1, 0]]
    gather = [n for n in m.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"][0]
    assert tr.input[0] == gather.input[0]
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    assert [CFG.hidden, CFG.vocab] not in shapes.values()
    kv = CFG.kv_heads * CFG.hidden // CFG.heads
    assert sum(s == [CFG.hidden, kv] for s in shapes.values()) == 2 * CFG.layers
    assert sum(n.op_type == "Expand" for n in m.graph.node) == 2 * CFG.layers
    rms = [n.op_type for n in m.graph.node if "input_layernorm" in n.name][:7]
    assert rms == ["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul"]


def test_determinism_by_seed():
    for build in (build_prenorm_decoder, build_llama, build_postln_encoder):
        a, b = build(SyntheticConfig(seed=1)), build(SyntheticConfig(seed=1))
        c = build(SyntheticConfig(seed=2))
        assert a.SerializeToString() == b.SerializeToString()
        wa = [numpy_helper.to_array(t) for t in a.graph.initializer if t.dims]
        wc = [numpy_helper.to_array(t) for t in c.graph.initializer if t.dims]
        assert any(not np.array_equal(x, y) for x, y in zip(wa, wc))
    r1, r2 = random_inputs(model("postln"), seed=3), random_inputs(model("postln"), seed=3)
    assert all(np.array_equal(r1[k], r2[k]) for k in r1)


# ---------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("variant", ["prenorm", "llama-reciprocal"])
def test_causal_prefix_invariance(variant):
    m = model(variant)
    ids = random_inputs(m, 2, 16)["input_ids"]
    full = run(m, {"input_ids": ids})["logits"]
    prefix = run(m, {"input_ids": ids[:, :7]})["logits"]
    np.testing.assert_allclose(prefix, full[:, :7], rtol=1e-4, atol=1e-4)


def test_encoder_ignores_padded_tokens():
    m = model("postln")
    feeds = random_inputs(m, 2, 16)
    pad = feeds["attention_mask"] == 0
    assert pad[-1].any() and not pad[0].any() and not pad[-1, 0]
    assert set(np.unique(feeds["token_type_ids"])) == {0, 1}
    ids = feeds["input_ids"]
    other = dict(feeds, input_ids=np.where(pad, (ids + 1) % CFG.vocab, ids))
    a, b = run(m, feeds)["last_hidden_state"], run(m, other)["last_hidden_state"]
    np.testing.assert_allclose(a[~pad], b[~pad], rtol=1e-4, atol=1e-4)
    assert not np.allclose(a[pad], b[pad], atol=1e-3)


def _rms(x, g, eps=CFG.eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def test_llama_matches_numpy_reference():
    """transformers' Llama math: rotate-half RoPE, repeat_kv, SiLU(gate) * up, tied head."""
    m = model("llama-reciprocal")
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    w = {"/".join(n.name.split("/")[2:5:2]): inits[n.input[1]]  # "layers.0/q_proj"
         for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    ids = random_inputs(m, 2, 10)["input_ids"]
    B, S, nh, kvh, d = *ids.shape, CFG.heads, CFG.kv_heads, CFG.hidden // CFG.heads
    emb = inits["model.embed_tokens.weight"]
    ang = np.arange(S)[:, None] / CFG.rope_theta ** (np.arange(0, d, 2) / d)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rope = lambda t: t * cos + np.concatenate([-t[..., d // 2:], t[..., : d // 2]], -1) * sin
    heads = lambda t, n: t.reshape(B, S, n, d).transpose(0, 2, 1, 3)
    future = np.triu(np.ones((S, S), bool), 1)
    x = emb[ids]
    for i in range(CFG.layers):
        L = f"layers.{i}"
        h = _rms(x, inits[f"model.{L}.input_layernorm.weight"])
        q = rope(heads(h @ w[f"{L}/q_proj"], nh))
        k = rope(heads(h @ w[f"{L}/k_proj"], kvh))
        v = heads(h @ w[f"{L}/v_proj"], kvh)
        k, v = np.repeat(k, nh // kvh, 1), np.repeat(v, nh // kvh, 1)
        s = np.where(future, -np.inf, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d))
        p = np.exp(s - s.max(-1, keepdims=True))
        o = (p / p.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(B, S, -1)
        x = x + o @ w[f"{L}/o_proj"]
        h = _rms(x, inits[f"model.{L}.post_attention_layernorm.weight"])
        g = h @ w[f"{L}/gate_proj"]
        x = x + (g / (1 + np.exp(-g)) * (h @ w[f"{L}/up_proj"])) @ w[f"{L}/down_proj"]
    want = _rms(x, inits["model.norm.weight"]) @ emb.T
    got = run(m, {"input_ids": ids})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)


def test_random_inputs_respect_vocab():
    for variant in ("prenorm", "llama-reciprocal", "postln"):
        feeds = random_inputs(model(variant), batch=3, seq=9, seed=5)
        assert feeds["input_ids"].shape == (3, 9) and feeds["input_ids"].dtype == np.int64
        assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < CFG.vocab


# ---------------------------------------------------------------------------- CLI
def test_cli_writes_model_and_meta(tmp_path):
    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, str(ROOT / "models" / "tiny.py"), "--kind", "postln",
                        "--out", str(out), "--layers", "1", "--hidden", "32", "--seed", "4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "model.json").read_text())
    assert meta["name"] == "tiny-postln" and meta["kind"] == "encoder"
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["outputs"] == ["last_hidden_state"]
    m = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert run(m, random_inputs(m, 1, 4))["last_hidden_state"].shape == (1, 4, 32)
