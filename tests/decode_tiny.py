"""A tiny Llama-style decoder with a KV cache, node for node in the form optimum-onnx's TorchScript
export gives (text-generation-with-past): runtime shape arithmetic, the causal-and-padding mask
built from Range / LessOrEqual / And / Gather of attention_mask, rotate_half RoPE from
position_ids, repeat_kv by Unsqueeze-Expand-Reshape, the softmax NaN guard, decomposed RMSNorm.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


class B:
    def __init__(self, seed: int = 0):
        self.nodes, self.inits, self.i = [], [], 0
        self.rng = np.random.default_rng(seed)

    def c(self, val, dtype=np.int64) -> str:
        self.i += 1
        name = f"c{self.i}"
        self.inits.append(nh.from_array(np.array(val, dtype), name))
        return name

    def op(self, op: str, *inputs: str, **attrs) -> str:
        self.i += 1
        out = f"{op}_{self.i}"
        self.nodes.append(h.make_node(op, list(inputs), [out], name=f"n{self.i}_{op}", **attrs))
        return out

    def dim(self, x: str, i: int) -> str:
        return self.op("Gather", self.op("Shape", x), self.c(i), axis=0)

    def u(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", x, self.c([axis]))

    def w(self, *shape, scale=0.3) -> str:
        return self.c(self.rng.standard_normal(shape) * scale, np.float32)


def _rmsnorm(b: B, x: str, dim: int) -> str:
    ms = b.op("ReduceMean", b.op("Pow", x, b.c(2.0, np.float32)), b.c([-1]), keepdims=1)
    inv = b.op("Div", b.c(1.0, np.float32), b.op("Sqrt", b.op("Add", ms, b.c(1e-5, np.float32))))
    return b.op("Mul", b.c(1 + 0.1 * b.rng.standard_normal(dim), np.float32), b.op("Mul", x, inv))


def _mask(b: B, emb: str, causal: bool = True) -> str:
    """bool [b, 1, s, T]: (j <= past + i) & attention_mask[b, j], as the export builds it."""
    past = b.dim("past_key_values.0.key", 2)
    s = b.dim(emb, 1)
    cache_pos = b.op("Range", b.op("Cast", past, to=7), b.op("Cast", b.op("Add", past, s), to=7), b.c(1))
    total = b.op("Add", past, b.dim(cache_pos, 0))
    kv = b.op("Range", b.c(0), b.op("Cast", total, to=7), b.c(1))
    qp4 = b.u(b.u(b.u(cache_pos, 0), 1), 3)
    kv4 = b.u(b.u(b.u(kv, 0), 1), 2)
    keep = b.op("Cast", b.op("LessOrEqual", kv4, qp4), to=9) if causal else None
    am = b.op("Cast", "attention_mask", to=9)
    bidx = b.u(b.u(b.u(b.op("Range", b.c(0), b.op("Cast", b.dim(emb, 0), to=7), b.c(1)), 1), 2), 3)
    flat = b.op("Add", kv4, b.op("Mul", bidx, b.dim(am, 1)))
    pad = b.op("Gather", b.op("Flatten", am, axis=2), flat, axis=0)
    pad = b.op("Reshape", pad, b.op("Shape", flat))
    both = b.op("And", keep, pad) if causal else pad
    shape = b.op("Concat", b.u(b.dim(emb, 0), 0), b.c([1]), b.u(s, 0), b.u(total, 0), axis=0)
    return b.op("Expand", both, shape)


def _rotary(b: B, d: int) -> tuple[str, str]:
    inv = b.c((1.0 / 10000 ** (np.arange(0, d, 2) / d)).reshape(1, d // 2, 1), np.float32)
    pos = b.op("Cast", b.u("position_ids", 1), to=1)
    f = b.op("Transpose", b.op("MatMul", inv, pos), perm=[0, 2, 1])
    emb = b.op("Concat", f, f, axis=-1)
    return (b.op("Mul", b.op("Cos", emb), b.c(1.0, np.float32)),
            b.op("Mul", b.op("Sin", emb), b.c(1.0, np.float32)))


def _heads(b: B, x: str, hs: str, d: int) -> str:
    shape = b.op("Concat", b.u(b.dim(hs, 0), 0), b.u(b.dim(hs, 1), 0), b.c([-1]), b.c([d]), axis=0)
    return b.op("Transpose", b.op("Reshape", x, shape), perm=[0, 2, 1, 3])


def _rope(b: B, x: str, cos: str, sin: str) -> str:
    half = b.op("Cast", b.op("Div", b.dim(x, 3), b.c(2)), to=7)
    lo = b.op("Slice", x, b.c([0]), b.u(half, 0), b.c([3]), b.c([1]))
    hi = b.op("Slice", x, b.u(half, 0), b.c([2 ** 63 - 1]), b.c([3]), b.c([1]))
    rot = b.op("Concat", b.op("Neg", hi), lo, axis=-1)
    return b.op("Add", b.op("Mul", x, b.u(cos, 1)), b.op("Mul", rot, b.u(sin, 1)))


def _repeat(b: B, x: str, rep: int) -> str:
    dims = [b.dim(x, i) for i in range(4)]
    shape5 = b.op("Concat", b.u(dims[0], 0), b.u(dims[1], 0), b.c([rep]), b.u(dims[2], 0), b.u(dims[3], 0), axis=0)
    shape5 = b.op("Reshape", shape5, b.c([-1]))
    shape5 = b.op("Where", b.op("Equal", shape5, b.c([-1])), b.c([1]), shape5)
    ex = b.op("Expand", b.u(x, 2), shape5)
    shape4 = b.op("Concat", b.u(dims[0], 0), b.u(b.op("Mul", dims[1], b.c(rep)), 0), b.u(dims[2], 0),
                  b.u(dims[3], 0), axis=0)
    return b.op("Reshape", ex, shape4)


def _attention(b: B, i: int, hs: str, mask: str, cos: str, sin: str, cfg: dict) -> str:
    n, kv, d, hid = cfg["heads"], cfg["kv"], cfg["d"], cfg["hidden"]
    q = _heads(b, b.op("MatMul", hs, b.w(hid, n * d)), hs, d)
    k = _heads(b, b.op("MatMul", hs, b.w(hid, kv * d)), hs, d)
    v = _heads(b, b.op("MatMul", hs, b.w(hid, kv * d)), hs, d)
    q, k = _rope(b, q, cos, sin), _rope(b, k, cos, sin)
    b.nodes.append(h.make_node("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], axis=-2))
    b.nodes.append(h.make_node("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], axis=-2))
    kr = _repeat(b, f"present.{i}.key", n // kv)
    vr = _repeat(b, f"present.{i}.value", n // kv)
    sc = float(d ** -0.25)
    scores = b.op("MatMul", b.op("Mul", q, b.c(sc, np.float32)),
                  b.op("Mul", b.op("Transpose", kr, perm=[0, 1, 3, 2]), b.c(sc, np.float32)))
    end = b.u(b.dim(kr, 2), 0)
    m = b.op("Slice", mask, b.c([0]), end, b.c([3]), b.c([1]))
    bias = b.op("Where", m, b.c([0.0], np.float32), b.c([-np.inf], np.float32))
    p = b.op("Softmax", b.op("Add", scores, bias), axis=-1)
    p = b.op("Where", b.op("IsNaN", p), b.c([0.0], np.float32), p)
    o = b.op("Transpose", b.op("MatMul", p, vr), perm=[0, 2, 1, 3])
    shape = b.op("Concat", b.u(b.dim(hs, 0), 0), b.u(b.dim(hs, 1), 0), b.c([-1]), axis=0)
    return b.op("MatMul", b.op("Reshape", o, shape), b.w(n * d, hid))


def tiny_decoder(layers: int = 2, heads: int = 4, kv: int = 2, d: int = 8, vocab: int = 64,
                 causal: bool = True, seed: int = 0) -> onnx.ModelProto:
    cfg = {"heads": heads, "kv": kv, "d": d, "hidden": heads * d}
    b = B(seed)
    x = b.op("Gather", b.w(vocab, cfg["hidden"], scale=1.0), "input_ids", axis=0)
    mask = _mask(b, x, causal)
    cos, sin = _rotary(b, d)
    for i in range(layers):     # as exported: the norm and the residual both read Cast(x, float)
        x = b.op("Cast", x, to=1)
        x = b.op("Add", x, _attention(b, i, _rmsnorm(b, x, cfg["hidden"]), mask, cos, sin, cfg))
        x = b.op("Cast", x, to=1)
        hn = _rmsnorm(b, x, cfg["hidden"])
        g = b.op("MatMul", hn, b.w(cfg["hidden"], 2 * cfg["hidden"]))
        up = b.op("MatMul", hn, b.w(cfg["hidden"], 2 * cfg["hidden"]))
        x = b.op("Add", x, b.op("MatMul", b.op("Mul", b.op("Mul", g, b.op("Sigmoid", g)), up),
                                b.w(2 * cfg["hidden"], cfg["hidden"])))
    b.nodes.append(h.make_node("MatMul", [_rmsnorm(b, x, cfg["hidden"]), b.w(cfg["hidden"], vocab)], ["logits"]))
    ins = [h.make_tensor_value_info(n, T.INT64, ["batch", s]) for n, s in
           (("input_ids", "seq"), ("attention_mask", "total"), ("position_ids", "seq"))]
    outs = [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            ins.append(h.make_tensor_value_info(f"past_key_values.{i}.{kind}", T.FLOAT, ["batch", kv, "past", d]))
            outs.append(h.make_tensor_value_info(f"present.{i}.{kind}", T.FLOAT, ["batch", kv, "total", d]))
    g = h.make_graph(b.nodes, "tiny_decoder", ins, outs, b.inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18)], ir_version=9)


def feeds(model: onnx.ModelProto, ids: np.ndarray, past: dict | None, mask: np.ndarray | None = None,
          positions: np.ndarray | None = None) -> dict:
    """Inputs for one call: ids [b, s], past {name: [b, kv, P, d]} (None: empty), mask [b, P + s]."""
    bsz, s = ids.shape
    pin = [i for i in model.graph.input if i.name.startswith("past_key_values")]
    if past is None:
        kv, d = (pin[0].type.tensor_type.shape.dim[i].dim_value for i in (1, 3))
        past = {i.name: np.zeros((bsz, kv, 0, d), np.float32) for i in pin}
    plen = next(iter(past.values())).shape[2]
    mask = np.ones((bsz, plen + s), np.int64) if mask is None else mask
    if positions is None:
        positions = np.broadcast_to(np.arange(plen, plen + s), (bsz, s)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}


def session(model: onnx.ModelProto):
    """One-thread onnxruntime session over an in-memory model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(sess, model: onnx.ModelProto, *args, **kw) -> dict:
    """{output name: value} of one call with feeds(model, *args, **kw)."""
    return dict(zip([o.name for o in model.graph.output], sess.run(None, feeds(model, *args, **kw))))
