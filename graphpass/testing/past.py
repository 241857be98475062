"""Tiny seeded Llama-style decoders WITH a KV cache, in the two forms people deploy, and the same
weights in both (so one can check the other).

  build_optimum_past  optimum-onnx `text-generation-with-past`: inputs input_ids [b,s],
                      attention_mask [b,P+s], position_ids [b,s], past_key_values.{i}.key/.value
                      [b,kv,P,d]; outputs logits [b,s,V], present.{i}.key/.value [b,kv,P+s,d].
                      Attention of query t (slot P+t) over slot j of Concat(past, new):
                        allowed(t, j) = j <= P + t  and  attention_mask[b, j] == 1
                      RoPE angles from position_ids; RMSNorm decomposed; LM head a [H,V] copy of
                      the embedding (the TorchScript export stores the tied table twice).
  build_genai_past    onnxruntime-genai builder: Simplified / SkipSimplifiedLayerNormalization,
                      q/k/v packed in one MatMul feeding com.microsoft GroupQueryAttention
                      (rotary inside from cos/sin caches [max_positions, d/2]),
                      seqlens_k = sum(attention_mask, 1) - 1 (int32),
                      total_sequence_length = attention_mask.shape[1] (int32); no position_ids.

Outliers are injected with synthetic.py's recipe (_Init): norm gammas x S on the outlier
channels, v columns and up columns x S, the reading rows / sqrt(S). Both builders draw the
weights from `_weights(cfg)`, so for equal cfg their logits agree wherever both are defined.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphpass.testing import blocks as sb
from graphpass.testing.blocks import NEG, GraphBuilder, linear, rms_norm
from graphpass.testing.synthetic import LLAMA_EMB_STD, META_KEY, SyntheticConfig, _Init

MS = "com.microsoft"


def _weights(cfg: SyntheticConfig) -> dict:
    """Every parameter, drawn in one fixed order from cfg.seed."""
    init, H, kvd = _Init(cfg), cfg.hidden, cfg.kv_heads * cfg.head_dim
    w = {"emb": init.normal((cfg.vocab, H), LLAMA_EMB_STD), "layers": []}
    for _ in range(cfg.layers):
        w["layers"].append({
            "ln1": init.gamma(), "q": init.w(H, H), "k": init.w(H, kvd),
            "v": init.w(H, kvd, boost=init.v_cols(cfg.kv_heads)),
            "o": init.w(H, H, damp=init.attn_out_channels(cfg.kv_heads)),
            "ln2": init.gamma(), "gate": init.w(H, cfg.ffn),
            "up": init.w(H, cfg.ffn, boost=init.ch), "down": init.w(cfg.ffn, H)})
    w["norm"] = init.gamma()
    return w


def _inv_freq(cfg: SyntheticConfig) -> np.ndarray:
    d = cfg.head_dim
    return (1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)


# ---------------------------------------------------------------------------- optimum form
def build_optimum_past(cfg: SyntheticConfig = SyntheticConfig()) -> onnx.ModelProto:
    """optimum-onnx with-past Llama decoder (see the module docstring)."""
    b, w, _d = GraphBuilder(cfg.opset), _weights(cfg), cfg.head_dim
    emb = b.weight("model.embed_tokens.weight", w["emb"])
    x = b.op("Gather", [emb, "input_ids"], "/model/embed_tokens", axis=0)
    mask, rope = _past_mask(b), _rope_from_positions(b, cfg)
    for i, lw in enumerate(w["layers"]):
        s = f"/model/layers.{i}"
        h = rms_norm(b, x, f"{s}/input_layernorm", lw["ln1"], cfg.eps, "reciprocal")
        q, k, v = (linear(b, h, f"{s}/self_attn/{p}_proj", lw[p]) for p in "qkv")
        a = _cached_attention(b, q, k, v, i, cfg, mask, rope)
        x = b.op("Add", [x, linear(b, a, f"{s}/self_attn/o_proj", lw["o"])], s)
        h = rms_norm(b, x, f"{s}/post_attention_layernorm", lw["ln2"], cfg.eps, "reciprocal")
        m = sb.silu_mul(b, linear(b, h, f"{s}/mlp/gate_proj", lw["gate"]),
                        linear(b, h, f"{s}/mlp/up_proj", lw["up"]), f"{s}/mlp/act_fn")
        x = b.op("Add", [x, linear(b, m, f"{s}/mlp/down_proj", lw["down"])], s)
    h = rms_norm(b, x, "/model/norm", w["norm"], cfg.eps, "reciprocal")
    _rename(b, linear(b, h, "/lm_head", w["emb"].T.copy()), "logits")
    ins = [_int64("input_ids", ["batch", "seq"]), _int64("attention_mask", ["batch", "total"]),
           _int64("position_ids", ["batch", "seq"])]
    return _finish(b, cfg, "tiny-optimum-past", ins, check=True)


def _past_mask(b: GraphBuilder) -> str:
    """float [b,1,s,P+s]: 0 where allowed(t, j), float32 min elsewhere."""
    sc = "/model/causal_mask"
    s = sb.seq_len(b, "input_ids")
    total = b.op("Gather", [b.op("Shape", ["attention_mask"], sc), b.const(1, np.int64)], sc, axis=0)
    past = b.op("Sub", [total, s], sc)
    rows = b.op("Add", [sb.positions(b, s, sc), past], sc)
    rows = b.op("Unsqueeze", [rows, b.const([1], np.int64)], sc)
    cols = b.op("Unsqueeze", [sb.positions(b, total, sc), b.const([0], np.int64)], sc)
    future = b.op("Greater", [cols, rows], sc)                                  # [s, P+s]
    pad = b.op("Equal", ["attention_mask", b.const(0, np.int64)], sc)
    pad = b.op("Unsqueeze", [pad, b.const([1, 2], np.int64)], sc)                # [b,1,1,P+s]
    return b.op("Where", [b.op("Or", [future, pad], sc), b.const(NEG), b.const(0.0)], sc)


def _rope_from_positions(b: GraphBuilder, cfg: SyntheticConfig) -> tuple[str, str]:
    """cos, sin [b,1,s,d] of angle position_ids[b,s] * inv_freq (rotate-half convention)."""
    sc = "/model/rotary_emb"
    pos = b.op("Cast", ["position_ids"], sc, to=TensorProto.FLOAT)
    pos = b.op("Unsqueeze", [pos, b.const([-1], np.int64)], sc)
    freqs = b.op("Mul", [pos, b.const(_inv_freq(cfg))], sc)
    emb = b.op("Unsqueeze", [b.op("Concat", [freqs, freqs], sc, axis=-1), b.const([1], np.int64)], sc)
    return b.op("Cos", [emb], sc), b.op("Sin", [emb], sc)


def _cached_attention(b, q, k, v, i, cfg, mask, rope) -> str:
    """q [b,s,h*d], k/v [b,s,kv*d]: RoPE, Concat(past, new) -> present, GQA repeat, softmax."""
    sc, d, h, kv = f"/model/layers.{i}/self_attn", cfg.head_dim, cfg.heads, cfg.kv_heads
    q, k, v = (sb._split_heads(b, t, n, d, sc) for t, n in ((q, h), (k, kv), (v, kv)))
    q, k = (sb._rope(b, t, *rope, d // 2, sc) for t in (q, k))
    k = b.op("Concat", [f"past_key_values.{i}.key", k], sc, axis=2)
    v = b.op("Concat", [f"past_key_values.{i}.value", v], sc, axis=2)
    _rename(b, k, f"present.{i}.key")
    _rename(b, v, f"present.{i}.value")
    k, v = f"present.{i}.key", f"present.{i}.value"
    if kv != h:
        k, v = (sb._repeat_kv(b, t, h, kv, d, sc) for t in (k, v))
    kt = b.op("Transpose", [k], sc, perm=[0, 1, 3, 2])
    s = b.op("Mul", [b.op("MatMul", [q, kt], sc), b.const(1.0 / math.sqrt(d))], sc)
    p = b.op("Softmax", [b.op("Add", [s, mask], sc)], sc, axis=-1)
    o = b.op("Transpose", [b.op("MatMul", [p, v], sc)], sc, perm=[0, 2, 1, 3])
    return b.op("Reshape", [o, b.const([0, 0, h * d], np.int64)], sc)


# ---------------------------------------------------------------------------- genai form
def build_genai_past(cfg: SyntheticConfig = SyntheticConfig()) -> onnx.ModelProto:
    """onnxruntime-genai builder-style decoder (see the module docstring)."""
    b, w, d = GraphBuilder(cfg.opset), _weights(cfg), cfg.head_dim
    x = b.op("Gather", [b.weight("model.embed_tokens.weight", w["emb"]), "input_ids"],
             "/model/embed_tokens", axis=0)
    seqlens, total = _genai_lengths(b)
    ang = np.arange(cfg.max_positions, dtype=np.float32)[:, None] * _inv_freq(cfg)[None, :]
    cos, sin = b.weight("cos_cache", np.cos(ang)), b.weight("sin_cache", np.sin(ang))
    res = None
    for i, lw in enumerate(w["layers"]):
        s = f"/model/layers.{i}"
        h, res = _genai_norm(b, x, res, f"{s}/input_layernorm", lw["ln1"], cfg.eps)
        qkv = linear(b, h, f"{s}/attn/qkv_proj", np.concatenate([lw["q"], lw["k"], lw["v"]], 1))
        a = b.op("GroupQueryAttention", [qkv, "", "", f"past_key_values.{i}.key",
                                         f"past_key_values.{i}.value", seqlens, total, cos, sin],
                 f"{s}/attn", n_out=3, domain=MS, num_heads=cfg.heads, kv_num_heads=cfg.kv_heads,
                 scale=1.0 / math.sqrt(d), do_rotary=1, rotary_interleaved=0, local_window_size=-1)
        _rename(b, a[1], f"present.{i}.key")
        _rename(b, a[2], f"present.{i}.value")
        x = linear(b, a[0], f"{s}/attn/o_proj", lw["o"])
        h, res = _genai_norm(b, x, res, f"{s}/post_attention_layernorm", lw["ln2"], cfg.eps)
        m = sb.silu_mul(b, linear(b, h, f"{s}/mlp/gate_proj", lw["gate"]),
                        linear(b, h, f"{s}/mlp/up_proj", lw["up"]), f"{s}/mlp/act_fn")
        x = linear(b, m, f"{s}/mlp/down_proj", lw["down"])
    h, _ = _genai_norm(b, x, res, "/model/norm", w["norm"], cfg.eps)
    _rename(b, linear(b, h, "/lm_head", w["emb"].T.copy()), "logits")
    ins = [_int64("input_ids", ["batch", "seq"]), _int64("attention_mask", ["batch", "total"])]
    return _finish(b, cfg, "tiny-genai-past", ins, check=False)


def _genai_lengths(b: GraphBuilder) -> tuple[str, str]:
    sc = "/model/attn_mask_reformat/attn_mask_subgraph"
    s = b.op("ReduceSum", ["attention_mask", b.const([1], np.int64)], sc, keepdims=0)
    seqlens = b.op("Cast", [b.op("Sub", [s, b.const(1, np.int64)], sc)], sc, to=TensorProto.INT32)
    total = b.op("Gather", [b.op("Shape", ["attention_mask"], sc), b.const(1, np.int64)], sc, axis=0)
    return seqlens, b.op("Cast", [total], sc, to=TensorProto.INT32)


def _genai_norm(b, x, res, scope, gamma, eps) -> tuple[str, str]:
    """(normed, new residual): SimplifiedLayerNormalization first, then
    SkipSimplifiedLayerNormalization(x, residual) whose 4th output is x + residual."""
    g = b.weight(sb._param(scope, "weight"), gamma)
    if res is None:
        return b.op("SimplifiedLayerNormalization", [x, g], scope, axis=-1, epsilon=eps,
                    stash_type=1), x
    out = b.op("SkipSimplifiedLayerNormalization", [x, res, g], scope, n_out=4, domain=MS,
               epsilon=eps)
    return out[0], out[3]


def genai_config(cfg: SyntheticConfig = SyntheticConfig(), filename: str = "model.onnx") -> dict:
    """The parts of genai_config.json that name the graph's inputs and outputs and the cache."""
    return {"model": {
        "type": "llama", "vocab_size": cfg.vocab, "context_length": cfg.max_positions,
        "eos_token_id": 0, "pad_token_id": 0, "bos_token_id": 1,
        "decoder": {"filename": filename, "head_size": cfg.head_dim, "hidden_size": cfg.hidden,
                    "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
                    "num_hidden_layers": cfg.layers,
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}}},
        "search": {"max_length": cfg.max_positions}}


# ---------------------------------------------------------------------------- shared
def _int64(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, dims)


def _rename(b: GraphBuilder, old: str, new: str) -> None:
    for nd in b.nodes:
        nd.output[:] = [new if o == old else o for o in nd.output]
        nd.input[:] = [new if t == old else t for t in nd.input]


def _finish(b: GraphBuilder, cfg: SyntheticConfig, name: str, ins: list, check: bool) -> onnx.ModelProto:
    kv, d = cfg.kv_heads, cfg.head_dim
    f32 = TensorProto.FLOAT
    for i in range(cfg.layers):
        ins += [helper.make_tensor_value_info(f"past_key_values.{i}.{t}", f32, ["batch", kv, "past", d])
                for t in ("key", "value")]
    outs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", cfg.vocab])]
    for i in range(cfg.layers):
        outs += [helper.make_tensor_value_info(f"present.{i}.{t}", f32, ["batch", kv, "total", d])
                 for t in ("key", "value")]
    graph = helper.make_graph(b.nodes, name.replace("-", "_"), ins, outs, b.inits)
    opsets = [helper.make_opsetid("", cfg.opset)] + ([] if check else [helper.make_opsetid(MS, 1)])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="graphpass.synthetic")
    model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    helper.set_model_props(model, {META_KEY: json.dumps({"name": name, **asdict(cfg)})})
    if check:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    return model


PAST_BUILDS = {"optimum": build_optimum_past, "genai": build_genai_past}   # the two forms, by name


# ---------------------------------------------------------------------------- feeds
def token_ids(cfg: SyntheticConfig, n: int, seed: int = 0) -> np.ndarray:
    """n seeded token ids in 2 .. vocab - 1, the text the tests feed these decoders."""
    return np.random.default_rng(seed).integers(2, cfg.vocab, n)


def empty_past(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    """past_key_values.* of length 0: [batch, kv_heads, 0, head_dim], float32."""
    out = {}
    for vi in model.graph.input:
        if vi.name.startswith("past_key_values."):
            dims = vi.type.tensor_type.shape.dim
            out[vi.name] = np.zeros((batch, dims[1].dim_value, 0, dims[3].dim_value), np.float32)
    return out
