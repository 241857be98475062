"""Building blocks for the synthetic transformers in `synthetic.py`, emitted op by op the way
torch's ONNX exporters write them (node names like "/model/layers.0/self_attn/q_proj/MatMul").

  linear      y = MatMul(x, W[in,out]) (+ Add(bias, y))     or Reshape -> Gemm(transB=1) -> Reshape
  layer_norm  LayerNormalization(x, gamma, beta, axis=-1)
  rms_norm    y = x / sqrt(mean(x^2, -1) + eps) * gamma      in one of four encodings (RMS_FORMS)
  gelu        Gelu (opset >= 20) or 0.5 * x * (1 + erf(x / sqrt 2))
  attention   softmax(q k^T / sqrt(d) + mask) v, multi-head, optional RoPE and grouped-query heads
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphpass.graph.io import unique_name

RMS_FORMS = ("reciprocal", "div", "simplified", "rmsnorm23")
NEG = float(np.finfo(np.float32).min)  # additive mask value, as transformers uses
INT64_MAX = np.iinfo(np.int64).max


class GraphBuilder:
    """Collects nodes and initializers; hands out exporter-style unique names."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._flat: dict[str, str] = {}  # 3-D tensor -> its 2-D Reshape, shared by Gemms
        self.batch_seq: str | None = None  # int64 [2] tensor (batch, seq), for Gemm reshapes

    def _unique(self, base: str) -> str:
        return unique_name(base, self._names)

    def op(self, op_type: str, inputs: list[str], scope: str, n_out: int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        name = self._unique(f"{scope}/{op_type}")
        outs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, name: str, array: np.ndarray) -> str:
        name = self._unique(name)
        arr = np.array(array, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A shared constant initializer (scalars and small shape vectors)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"onnx::Constant_{len(self._consts)}", arr)
        return self._consts[key]


# ---------------------------------------------------------------------------- linear layers
def linear(b: GraphBuilder, x: str, scope: str, w: np.ndarray, bias: np.ndarray | None = None,
           gemm: bool = False) -> str:
    """x [..., in] -> [..., out]. `w` is [in, out]; the Gemm form stores it as [out, in]."""
    if gemm:
        return _gemm_linear(b, x, scope, w, bias)
    y = b.op("MatMul", [x, b.weight(f"onnx::MatMul_{len(b.inits)}", w)], scope)
    if bias is not None:  # the legacy exporter writes Add(bias, MatMul_output)
        y = b.op("Add", [b.weight(_param(scope, "bias"), bias), y], scope)
    return y


def _gemm_linear(b, x, scope, w, bias):
    if x not in b._flat:
        b._flat[x] = b.op("Reshape", [x, b.const([-1, w.shape[0]], np.int64)], scope)
    ins = [b._flat[x], b.weight(_param(scope, "weight"), w.T.copy())]
    if bias is not None:
        ins.append(b.weight(_param(scope, "bias"), bias))
    y = b.op("Gemm", ins, scope, alpha=1.0, beta=1.0, transB=1)
    shape = b.op("Concat", [b.batch_seq, b.const([w.shape[1]], np.int64)], scope, axis=0)
    return b.op("Reshape", [y, shape], scope)


def _param(scope: str, leaf: str) -> str:
    return scope.strip("/").replace("/", ".") + "." + leaf


# ---------------------------------------------------------------------------- norms, activations
def layer_norm(b: GraphBuilder, x: str, scope: str, gamma: np.ndarray, beta: np.ndarray,
               eps: float) -> str:
    g, bt = b.weight(_param(scope, "weight"), gamma), b.weight(_param(scope, "bias"), beta)
    return b.op("LayerNormalization", [x, g, bt], scope, axis=-1, epsilon=eps)


def rms_norm(b: GraphBuilder, x: str, scope: str, gamma: np.ndarray, eps: float, form: str) -> str:
    """'reciprocal': Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul(x, r), Mul(n, gamma)
    'div':        Pow, ReduceMean, Add, Sqrt, Div(x, s), Mul(gamma, n)   (weight first, as
                  the dynamo export of transformers' `self.weight * hidden_states`)
    'simplified': SimplifiedLayerNormalization in the default domain, as onnxruntime's own
                  fusion writes it (onnxruntime does not register a com.microsoft one)
    'rmsnorm23':  RMSNormalization (opset 23)"""
    g = b.weight(_param(scope, "weight"), gamma)
    if form == "simplified":
        return b.op("SimplifiedLayerNormalization", [x, g], scope, axis=-1, epsilon=eps,
                    stash_type=1)
    if form == "rmsnorm23":
        return b.op("RMSNormalization", [x, g], scope, axis=-1, epsilon=eps)
    sq = b.op("Pow", [x, b.const(2.0)], scope)
    ms = reduce_mean(b, sq, scope)
    s = b.op("Sqrt", [b.op("Add", [ms, b.const(eps)], scope)], scope)
    if form == "reciprocal":
        n = b.op("Mul", [x, b.op("Reciprocal", [s], scope)], scope)
        return b.op("Mul", [n, g], scope)
    if form == "div":
        return b.op("Mul", [g, b.op("Div", [x, s], scope)], scope)
    raise ValueError(f"rms_form must be one of {RMS_FORMS}, not {form!r}")


def reduce_mean(b: GraphBuilder, x: str, scope: str) -> str:
    if b.opset >= 18:
        return b.op("ReduceMean", [x, b.const([-1], np.int64)], scope, keepdims=1)
    return b.op("ReduceMean", [x], scope, axes=[-1], keepdims=1)


def gelu(b: GraphBuilder, x: str, scope: str) -> str:
    if b.opset >= 20:
        return b.op("Gelu", [x], scope)
    e = b.op("Erf", [b.op("Div", [x, b.const(math.sqrt(2.0))], scope)], scope)
    y = b.op("Mul", [x, b.op("Add", [e, b.const(1.0)], scope)], scope)
    return b.op("Mul", [y, b.const(0.5)], scope)


def silu_mul(b: GraphBuilder, gate: str, up: str, scope: str) -> str:
    """SwiGLU: (gate * Sigmoid(gate)) * up."""
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate], scope)], scope)
    return b.op("Mul", [act, up], scope)


# ---------------------------------------------------------------------------- positions, masks
def seq_len(b: GraphBuilder, ids: str) -> str:
    """Scalar int64 sequence length of `ids` [batch, seq]; also sets b.batch_seq."""
    shape = b.op("Shape", [ids], "/model")
    b.batch_seq = shape
    return b.op("Gather", [shape, b.const(1, np.int64)], "/model", axis=0)


def positions(b: GraphBuilder, n: str, scope: str) -> str:
    """int64 [seq] = 0 .. seq-1."""
    return b.op("Range", [b.const(0, np.int64), n, b.const(1, np.int64)], scope)


def causal_mask(b: GraphBuilder, n: str) -> str:
    """float [seq, seq]: 0 on and below the diagonal, float32 min above."""
    scope = "/model/causal_mask"
    pos = positions(b, n, scope)
    rows = b.op("Unsqueeze", [pos, b.const([1], np.int64)], scope)
    cols = b.op("Unsqueeze", [pos, b.const([0], np.int64)], scope)
    future = b.op("Greater", [cols, rows], scope)
    return b.op("Where", [future, b.const(NEG), b.const(0.0)], scope)


def padding_mask(b: GraphBuilder, attention_mask: str) -> str:
    """float [batch, 1, 1, seq] = (1 - mask) * float32 min, as BERT's extended attention mask."""
    scope = "/model/extended_attention_mask"
    m = b.op("Unsqueeze", [attention_mask, b.const([1, 2], np.int64)], scope)
    m = b.op("Cast", [m], scope, to=TensorProto.FLOAT)
    return b.op("Mul", [b.op("Sub", [b.const(1.0), m], scope), b.const(NEG)], scope)


def rope_tables(b: GraphBuilder, n: str, head_dim: int, theta: float) -> tuple[str, str]:
    """cos, sin [seq, head_dim] for rotate-half RoPE (transformers' Llama convention)."""
    scope = "/model/rotary_emb"
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    pos = b.op("Cast", [positions(b, n, scope)], scope, to=TensorProto.FLOAT)
    pos = b.op("Unsqueeze", [pos, b.const([1], np.int64)], scope)
    freqs = b.op("Mul", [pos, b.const(inv[None, :])], scope)
    emb = b.op("Concat", [freqs, freqs], scope, axis=-1)
    return b.op("Cos", [emb], scope), b.op("Sin", [emb], scope)


def _rope(b, x, cos, sin, half, scope):
    axis = b.const([-1], np.int64)
    x1 = b.op("Slice", [x, b.const([0], np.int64), b.const([half], np.int64), axis], scope)
    x2 = b.op("Slice", [x, b.const([half], np.int64), b.const([INT64_MAX], np.int64), axis], scope)
    rot = b.op("Concat", [b.op("Neg", [x2], scope), x1], scope, axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos], scope), b.op("Mul", [rot, sin], scope)], scope)


# ---------------------------------------------------------------------------- attention
def attention(b: GraphBuilder, q: str, k: str, v: str, scope: str, heads: int, kv_heads: int,
              head_dim: int, mask: str, rope: tuple[str, str] | None = None) -> str:
    """q [B,S,heads*d], k/v [B,S,kv_heads*d] -> [B,S,heads*d]; `mask` broadcasts to
    [B,heads,S,S]. Grouped-query heads are repeated as transformers' repeat_kv exports:
    Unsqueeze -> Expand -> Reshape."""
    q, k, v = (_split_heads(b, t, n, head_dim, scope)
               for t, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    if rope is not None:
        q = _rope(b, q, *rope, head_dim // 2, scope)
        k = _rope(b, k, *rope, head_dim // 2, scope)
    if kv_heads != heads:
        k, v = (_repeat_kv(b, t, heads, kv_heads, head_dim, scope) for t in (k, v))
    kt = b.op("Transpose", [k], scope, perm=[0, 1, 3, 2])
    s = b.op("Mul", [b.op("MatMul", [q, kt], scope), b.const(1.0 / math.sqrt(head_dim))], scope)
    p = b.op("Softmax", [b.op("Add", [s, mask], scope)], scope, axis=-1)
    o = b.op("Transpose", [b.op("MatMul", [p, v], scope)], scope, perm=[0, 2, 1, 3])
    return b.op("Reshape", [o, b.const([0, 0, heads * head_dim], np.int64)], scope)


def _split_heads(b, x, n, d, scope):
    x = b.op("Reshape", [x, b.const([0, 0, n, d], np.int64)], scope)
    return b.op("Transpose", [x], scope, perm=[0, 2, 1, 3])


def _repeat_kv(b, x, heads, kv_heads, d, scope):
    x = b.op("Unsqueeze", [x, b.const([2], np.int64)], scope)
    x = b.op("Expand", [x, b.const([1, 1, heads // kv_heads, 1, 1], np.int64)], scope)
    return b.op("Reshape", [x, b.const([0, heads, -1, d], np.int64)], scope)
