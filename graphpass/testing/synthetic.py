"""Tiny seeded transformers written directly in ONNX, shaped like real exports, with activation
outliers injected on purpose: the fixtures for pattern matching, calibration and quantization.

  build_prenorm_decoder  GPT-2: x += attn(LN(x)); x += fc2(gelu(fc1(LN(x)))); logits = LN(x) W
  build_llama            Llama: RMSNorm (decomposed), GQA + RoPE, SwiGLU, logits = RMSNorm(x) E^T
  build_postln_encoder   BERT:  h = LN(x + attn(x)); x = LN(h + fc2(gelu(fc1(h))))

Outliers. For c in outlier_channels and S = outlier_scale, every linear-layer input x gets
max|x[..., c]| ~ S * (typical channel) while the function stays tame:
  norm output feeding a linear   gamma[c] *= S
  o_proj / fc2 / down_proj input  W_v[:, c] *= S, W_fc1[:, c] *= S, W_up[:, c] *= S
  the linear layer reading it     W[c, :] /= S^d, d = outlier_damp (default 1/2: channel c weighs
                                                        sqrt(S) times a normal channel, not S times;
                                                        d = 1: as much as one, the massive-activation
                                                        case where int8 activations cost more than
                                                        4-bit weights)
The tied Llama LM head cannot be damped (its rows are the embedding); the post-LN encoder's
outliers also ride the residual stream, as in BERT, so its later LayerNorms boost by S^(1/4).
Inputs are int64 [batch, seq] with dim_params "batch" and "seq"; weights are float32.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphpass.testing import blocks as sb
from graphpass.testing.blocks import RMS_FORMS, GraphBuilder, attention, layer_norm, linear, rms_norm

WEIGHT_GAIN = 1.0  # linear weights ~ N(0, (gain / sqrt(fan_in))^2)
EMB_STD = 1.0  # GPT-2 / BERT token, position and type embeddings
LLAMA_EMB_STD = 0.05  # the tied table is also the LM head: keeps logits O(1)
META_KEY = "graphpass.synthetic"


@dataclass(frozen=True)
class SyntheticConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2  # build_llama only
    ffn: int = 128
    vocab: int = 256
    seed: int = 0
    outlier_channels: tuple[int, ...] = (3, 17)
    outlier_scale: float = 40.0
    outlier_damp: float = 0.5  # rows of the layer reading an outlier channel /= outlier_scale ** this
    opset: int = 18
    rms_form: str = "reciprocal"  # build_llama only: one of RMS_FORMS
    gemm: bool = False  # build_postln_encoder only: q/k/v, fc1, fc2 as Reshape -> Gemm(transB=1)
    max_positions: int = 512  # learned position table (GPT-2, BERT)
    type_vocab: int = 2  # BERT token types
    eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        object.__setattr__(self, "outlier_channels", tuple(int(c) for c in self.outlier_channels))
        problems = [
            (self.hidden % self.heads != 0, "hidden must be a multiple of heads"),
            (self.heads % self.kv_heads != 0, "heads must be a multiple of kv_heads"),
            ((self.hidden // self.heads) % 2 != 0, "head size must be even (RoPE)"),
            (any(not 0 <= c < min(self.hidden, self.ffn) for c in self.outlier_channels),
             "outlier_channels must lie in [0, min(hidden, ffn))"),
            (self.outlier_scale < 1, "outlier_scale must be >= 1"),
            (not 0 <= self.outlier_damp <= 1, "outlier_damp must lie in [0, 1]"),
            (self.opset < 17, "opset must be >= 17 (LayerNormalization)"),
            (self.rms_form not in RMS_FORMS, f"rms_form must be one of {RMS_FORMS}"),
            (self.rms_form == "rmsnorm23" and self.opset < 23,
             "rms_form 'rmsnorm23' needs opset >= 23"),
            (min(self.layers, self.vocab, self.max_positions, self.type_vocab) < 1,
             "sizes must be >= 1"),
        ]
        for bad, why in problems:
            if bad:
                raise ValueError(f"SyntheticConfig: {why}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# ---------------------------------------------------------------------------- weights
class _Init:
    """Seeded weights with the outlier recipe of the module docstring."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg, self.rng = cfg, np.random.default_rng(cfg.seed)
        self.ch = list(cfg.outlier_channels)

    def normal(self, shape, std) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def w(self, n_in: int, n_out: int, damp=None, boost=None) -> np.ndarray:
        """[in, out]; rows `damp` /= S^outlier_damp (outlier inputs), columns `boost` *= S."""
        w = self.normal((n_in, n_out), WEIGHT_GAIN / math.sqrt(n_in))
        w[self.ch if damp is None else damp, :] /= self.cfg.outlier_scale ** self.cfg.outlier_damp
        if boost:
            w[:, boost] *= self.cfg.outlier_scale
        return w

    def bias(self, n: int, boost=None) -> np.ndarray:
        b = self.normal(n, 0.02)
        if boost:
            b[boost] *= self.cfg.outlier_scale
        return b

    def gamma(self, boost: float | None = None) -> np.ndarray:
        g = (1.0 + self.normal(self.cfg.hidden, 0.1)).astype(np.float32)
        g[self.ch] *= self.cfg.outlier_scale if boost is None else boost
        return g

    def beta(self) -> np.ndarray:
        return self.normal(self.cfg.hidden, 0.02)

    def v_cols(self, kv_heads: int) -> list[int]:
        """v_proj columns whose head/dim lands on attention-output channel c."""
        d, rep = self.cfg.head_dim, self.cfg.heads // kv_heads
        return sorted({(c // d // rep) * d + c % d for c in self.ch})

    def attn_out_channels(self, kv_heads: int) -> list[int]:
        """Attention-output channels fed by a boosted v column (every head of its group)."""
        d, rep = self.cfg.head_dim, self.cfg.heads // kv_heads
        return sorted({h * d + j % d for j in self.v_cols(kv_heads)
                       for h in range(self.cfg.heads) if h // rep == j // d})


# ---------------------------------------------------------------------------- builders
def build_prenorm_decoder(cfg: SyntheticConfig = SyntheticConfig()) -> onnx.ModelProto:
    """GPT-2-like pre-LN causal decoder: input_ids -> logits [batch, seq, vocab]."""
    b, init, H = GraphBuilder(cfg.opset), _Init(cfg), cfg.hidden
    n = sb.seq_len(b, "input_ids")
    tok = b.op("Gather", [b.weight("transformer.wte.weight", init.normal((cfg.vocab, H), EMB_STD)),
                          "input_ids"], "/transformer/wte", axis=0)
    wpe = b.weight("transformer.wpe.weight", init.normal((cfg.max_positions, H), EMB_STD))
    pos = b.op("Gather", [wpe, sb.positions(b, n, "/transformer")], "/transformer/wpe", axis=0)
    x, mask = b.op("Add", [tok, pos], "/transformer"), sb.causal_mask(b, n)
    for i in range(cfg.layers):
        s = f"/transformer/h.{i}"
        h = layer_norm(b, x, f"{s}/ln_1", init.gamma(), init.beta(), cfg.eps)
        vb = init.v_cols(cfg.heads)
        q, k, v = (linear(b, h, f"{s}/attn/{p}_proj", init.w(H, H, boost=bo), init.bias(H, bo))
                   for p, bo in (("q", None), ("k", None), ("v", vb)))
        a = attention(b, q, k, v, f"{s}/attn", cfg.heads, cfg.heads, cfg.head_dim, mask)
        a = linear(b, a, f"{s}/attn/c_proj", init.w(H, H, damp=init.attn_out_channels(cfg.heads)),
                   init.bias(H))
        x = b.op("Add", [x, a], s)
        h = layer_norm(b, x, f"{s}/ln_2", init.gamma(), init.beta(), cfg.eps)
        f = linear(b, h, f"{s}/mlp/c_fc", init.w(H, cfg.ffn, boost=init.ch),
                   init.bias(cfg.ffn, init.ch))
        f = sb.gelu(b, f, f"{s}/mlp/act")
        f = linear(b, f, f"{s}/mlp/c_proj", init.w(cfg.ffn, H), init.bias(H))
        x = b.op("Add", [x, f], s)
    h = layer_norm(b, x, "/transformer/ln_f", init.gamma(), init.beta(), cfg.eps)
    linear(b, h, "/lm_head", init.w(H, cfg.vocab))
    return _finish(b, cfg, "tiny-prenorm", ["input_ids"], ("logits", cfg.vocab))


def build_llama(cfg: SyntheticConfig = SyntheticConfig()) -> onnx.ModelProto:
    """Llama-like causal decoder (SmolLM2 as the torch dynamo export writes it): input_ids ->
    logits; the LM head is MatMul(x, Transpose(embedding)), tied to the token embedding."""
    b, init, H, d = GraphBuilder(cfg.opset), _Init(cfg), cfg.hidden, cfg.head_dim
    kvd = cfg.kv_heads * d
    n = sb.seq_len(b, "input_ids")
    emb = b.weight("model.embed_tokens.weight", init.normal((cfg.vocab, H), LLAMA_EMB_STD))
    x = b.op("Gather", [emb, "input_ids"], "/model/embed_tokens", axis=0)
    mask, rope = sb.causal_mask(b, n), sb.rope_tables(b, n, d, cfg.rope_theta)
    for i in range(cfg.layers):
        s = f"/model/layers.{i}"
        h = rms_norm(b, x, f"{s}/input_layernorm", init.gamma(), cfg.eps, cfg.rms_form)
        q = linear(b, h, f"{s}/self_attn/q_proj", init.w(H, H))
        k = linear(b, h, f"{s}/self_attn/k_proj", init.w(H, kvd))
        v = linear(b, h, f"{s}/self_attn/v_proj", init.w(H, kvd, boost=init.v_cols(cfg.kv_heads)))
        a = attention(b, q, k, v, f"{s}/self_attn", cfg.heads, cfg.kv_heads, d, mask, rope)
        damp = init.attn_out_channels(cfg.kv_heads)
        x = b.op("Add", [x, linear(b, a, f"{s}/self_attn/o_proj", init.w(H, H, damp=damp))], s)
        h = rms_norm(b, x, f"{s}/post_attention_layernorm", init.gamma(), cfg.eps, cfg.rms_form)
        g = linear(b, h, f"{s}/mlp/gate_proj", init.w(H, cfg.ffn))
        u = linear(b, h, f"{s}/mlp/up_proj", init.w(H, cfg.ffn, boost=init.ch))
        m = sb.silu_mul(b, g, u, f"{s}/mlp/act_fn")
        x = b.op("Add", [x, linear(b, m, f"{s}/mlp/down_proj", init.w(cfg.ffn, H))], s)
    h = rms_norm(b, x, "/model/norm", init.gamma(), cfg.eps, cfg.rms_form)
    b.op("MatMul", [h, b.op("Transpose", [emb], "/lm_head", perm=[1, 0])], "/lm_head")
    return _finish(b, cfg, "tiny-llama", ["input_ids"], ("logits", cfg.vocab))


def build_postln_encoder(cfg: SyntheticConfig = SyntheticConfig()) -> onnx.ModelProto:
    """BERT-like post-LN encoder: input_ids, attention_mask, token_type_ids ->
    last_hidden_state. The attention LayerNorm output feeds fc1 AND the residual Add after
    fc2. cfg.gemm: q/k/v, fc1, fc2 become Reshape -> Gemm(transB=1) -> Reshape."""
    b, init, H = GraphBuilder(cfg.opset), _Init(cfg), cfg.hidden
    late = cfg.outlier_scale ** 0.25  # the residual stream already carries the outliers
    n = sb.seq_len(b, "input_ids")
    sc = "/embeddings"

    def embed(table: str, rows: int, ids: str) -> str:
        w = b.weight(f"embeddings.{table}.weight", init.normal((rows, H), EMB_STD))
        return b.op("Gather", [w, ids], sc, axis=0)

    word = embed("word_embeddings", cfg.vocab, "input_ids")
    typ = embed("token_type_embeddings", cfg.type_vocab, "token_type_ids")
    pos = embed("position_embeddings", cfg.max_positions, sb.positions(b, n, sc))
    x = b.op("Add", [b.op("Add", [word, typ], sc), pos], sc)
    x = layer_norm(b, x, f"{sc}/LayerNorm", init.gamma(), init.beta(), cfg.eps)
    mask = sb.padding_mask(b, "attention_mask")
    for i in range(cfg.layers):
        s = f"/encoder/layer.{i}"
        vb = init.v_cols(cfg.heads)
        q, k, v = (linear(b, x, f"{s}/attention/self/{p}", init.w(H, H, boost=bo), init.bias(H, bo),
                          cfg.gemm) for p, bo in (("query", None), ("key", None), ("value", vb)))
        a = attention(b, q, k, v, f"{s}/attention/self", cfg.heads, cfg.heads, cfg.head_dim, mask)
        a = linear(b, a, f"{s}/attention/output/dense",
                   init.w(H, H, damp=init.attn_out_channels(cfg.heads)), init.bias(H))
        h = b.op("Add", [a, x], f"{s}/attention/output")
        h = layer_norm(b, h, f"{s}/attention/output/LayerNorm", init.gamma(late), init.beta(),
                       cfg.eps)
        f = linear(b, h, f"{s}/intermediate/dense", init.w(H, cfg.ffn, boost=init.ch),
                   init.bias(cfg.ffn, init.ch), cfg.gemm)
        f = sb.gelu(b, f, f"{s}/intermediate/intermediate_act_fn")
        f = linear(b, f, f"{s}/output/dense", init.w(cfg.ffn, H), init.bias(H), cfg.gemm)
        x = b.op("Add", [f, h], f"{s}/output")
        x = layer_norm(b, x, f"{s}/output/LayerNorm", init.gamma(late), init.beta(), cfg.eps)
    return _finish(b, cfg, "tiny-postln", ["input_ids", "attention_mask", "token_type_ids"],
                   ("last_hidden_state", H))


def _finish(b: GraphBuilder, cfg: SyntheticConfig, name: str, inputs: list[str],
            output: tuple[str, int]) -> onnx.ModelProto:
    """Name the last node's output, add types and shapes, check (when onnx knows every op)."""
    out_name, width = output
    last = b.nodes[-1].output[0]
    b.nodes[-1].output[0] = out_name
    assert not any(last in nd.input for nd in b.nodes), "the output tensor must be a leaf"
    ins = [helper.make_tensor_value_info(i, TensorProto.INT64, ["batch", "seq"]) for i in inputs]
    outs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", "seq", width])]
    graph = helper.make_graph(b.nodes, name.replace("-", "_"), ins, outs, b.inits)
    opsets = [helper.make_opsetid("", cfg.opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="graphpass.synthetic")
    model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    helper.set_model_props(model, {META_KEY: json.dumps({"name": name, **asdict(cfg)})})
    known = cfg.rms_form != "simplified" or name != "tiny-llama"
    model = onnx.shape_inference.infer_shapes(model, check_type=known, strict_mode=known)
    if known:  # onnx has no schema for onnxruntime's SimplifiedLayerNormalization
        onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------- inputs
def random_inputs(model: onnx.ModelProto, batch: int = 2, seq: int = 16,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Valid int64 feeds: ids below the table size of the Gather that reads them,
    attention_mask with the tail of the last row padded, token_type_ids 0 then 1."""
    rng, feeds = np.random.default_rng(seed), {}
    inits = {t.name: t for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        name = vi.name
        if name == "attention_mask":
            m = np.ones((batch, seq), np.int64)
            m[-1, max(1, seq - max(1, seq // 4)):] = 0
            feeds[name] = m
        elif name == "token_type_ids":
            feeds[name] = (np.arange(seq)[None, :] >= seq // 2).astype(np.int64).repeat(batch, 0)
        else:
            rows = _table_rows(model, name, inits)
            feeds[name] = rng.integers(0, rows, (batch, seq), dtype=np.int64)
    return feeds


def _table_rows(model: onnx.ModelProto, name: str, inits: dict) -> int:
    for nd in model.graph.node:
        if nd.op_type == "Gather" and list(nd.input)[1:] == [name] and nd.input[0] in inits:
            return int(inits[nd.input[0]].dims[0])
    meta = {p.key: p.value for p in model.metadata_props}
    if META_KEY in meta:
        return int(json.loads(meta[META_KEY])["vocab"])
    raise ValueError(f"random_inputs: no embedding table found for input {name!r}")
