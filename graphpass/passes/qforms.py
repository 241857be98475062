"""Node forms for one W8A8 linear layer Y = X·W, W [K, N] int8 per output channel (scale w_n).

dynamic : (Xq, a, z) = DynamicQuantizeLinear(X)  uint8, per tensor
          Y = Cast(MatMulInteger(Xq, Wq, z)) * (a · w)        -> fused by onnxruntime into
          com.microsoft DynamicQuantizeMatMul (u8 x s8, the fast path; s8 x s8 has none).
token   : r_m = max_k |X_mk| / 127 per row (token),  Xq = QuantizeLinear(X / r, 1, 128) uint8
          Y = MatMulIntegerToFloat(Xq, Wq, 1, w, 128) * r       (com.microsoft: onnxruntime has no
          per-row activation scale in standard ops; MatMulInteger+Cast+Mul runs 2.2x slower).
static  : a, z from calibration;  Y = MatMul(DQ(Q(X, a, z)), DQ(Wq, w, axis=1))  (standard QDQ,
          fused by onnxruntime into QuantizeLinear + MatMulIntegerToFloat).
Quantized activations are shared by every layer reading the same X (q, k, v quantize X once).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphpass.graph.io import unique_name

MS = "com.microsoft"


def quantize_weight(w: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: W ≈ Wq * scale[None, :], Wq in [-127, 127].

    Works through `block` output channels at a time, so its float64 temporaries stay small
    (a whole 49152 x 576 token table at once would add ~0.7 GB to the peak)."""
    q = np.empty(w.shape, np.int8)
    scale = np.empty(w.shape[1], np.float64)
    for a in range(0, w.shape[1], block):
        blk = w[:, a:a + block]
        amax = np.abs(blk).max(axis=0).astype(np.float64)
        s = np.where(amax > 0, amax / 127.0, 1.0)
        q[:, a:a + block] = np.clip(np.rint(blk / s[None, :]), -127, 127)
        scale[a:a + block] = s
    return q, scale.astype(np.float32)


def static_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Asymmetric uint8 scale and zero point for [lo, hi] widened to contain 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zp)


class Emitter:
    """Appends nodes and initializers with unique names; one instance per rewritten graph."""

    def __init__(self, graph: onnx.GraphProto, opset: int, names: set[str]):
        self.graph, self.opset, self.names = graph, opset, names
        self.nodes: list[onnx.NodeProto] = []
        self.shared: dict[tuple, tuple] = {}   # (kind, tensor) -> outputs of the activation quantizer

    def name(self, base: str) -> str:
        return unique_name(base, self.names)

    def const(self, base: str, value) -> str:
        n = self.name(base)
        self.graph.initializer.append(numpy_helper.from_array(np.array(value, order="C"), n))
        return n

    def node(self, op: str, inputs: list[str], base: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(f"{base}_{op}_out{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"{base}_{op}"),
                                           domain=domain or None, **attrs))
        return outs


def emit_dynamic(e: Emitter, x: str, wq: str, ws: str, y: str, base: str) -> None:
    key = ("dynamic", x)
    if key not in e.shared:
        e.shared[key] = tuple(e.node("DynamicQuantizeLinear", [x], f"{base}_x", 3))
    xq, xs, xz = e.shared[key]
    (yi,) = e.node("MatMulInteger", [xq, wq, xz], base)
    (yf,) = e.node("Cast", [yi], base, to=TensorProto.FLOAT)
    (comb,) = e.node("Mul", [xs, ws], f"{base}_scale")
    e.nodes.append(helper.make_node("Mul", [yf, comb], [y], name=e.name(f"{base}_Mul")))


def _row_quantizer(e: Emitter, x: str, base: str) -> tuple[str, str, str, str]:
    key = ("token", x)
    if key not in e.shared:
        (a,) = e.node("Abs", [x], base)
        if e.opset >= 18:
            (r,) = e.node("ReduceMax", [a, e.const(f"{base}_axis", np.array([-1], np.int64))], base, keepdims=1)
        else:
            (r,) = e.node("ReduceMax", [a], base, keepdims=1, axes=[-1])
        (r2,) = e.node("Max", [r, e.const(f"{base}_eps", np.float32(1e-30))], base)
        (s,) = e.node("Mul", [r2, e.const(f"{base}_inv127", np.float32(1 / 127))], base)
        (xs,) = e.node("Div", [x, s], base)
        one, z = e.const(f"{base}_one", np.float32(1.0)), e.const(f"{base}_z128", np.uint8(128))
        (xq,) = e.node("QuantizeLinear", [xs, one, z], base)
        e.shared[key] = (xq, s, one, z)
    return e.shared[key]


def emit_token(e: Emitter, x: str, wq: str, ws: str, y: str, base: str) -> None:
    xq, s, one, z = _row_quantizer(e, x, f"{base}_x")
    (yp,) = e.node("MatMulIntegerToFloat", [xq, wq, one, ws, z], base, domain=MS)
    e.nodes.append(helper.make_node("Mul", [yp, s], [y], name=e.name(f"{base}_rowscale")))


def _static_quantizer(e: Emitter, x: str, base: str, qparams) -> tuple[str, str, str]:
    """QuantizeLinear of X with its calibrated scale and zero point, once per tensor."""
    key = ("static", x)
    if key not in e.shared:
        scale, zp = qparams
        sc, zc = e.const(f"{base}_x_scale", scale), e.const(f"{base}_x_zp", zp)
        (xq,) = e.node("QuantizeLinear", [x, sc, zc], f"{base}_x")
        e.shared[key] = (xq, sc, zc)
    return e.shared[key]


def emit_static_fused(e: Emitter, x: str, wq: str, ws: str, y: str, base: str, qparams, bias: str) -> None:
    """Static with a bias: QuantizeLinear + MatMulIntegerToFloat(bias), the op the QDQ form fuses to."""
    xq, sc, zc = _static_quantizer(e, x, base, qparams)
    e.nodes.append(helper.make_node("MatMulIntegerToFloat", [xq, wq, sc, ws, zc, "", bias], [y],
                                    name=e.name(f"{base}_MatMulIntegerToFloat"), domain=MS))


def emit_static(e: Emitter, x: str, wq: str, ws: str, y: str, base: str, qparams, n: int) -> None:
    key = ("static-dq", x)
    if key not in e.shared:
        xq, sc, zc = _static_quantizer(e, x, base, qparams)
        e.shared[key] = tuple(e.node("DequantizeLinear", [xq, sc, zc], f"{base}_x"))
    (xd,) = e.shared[key]
    wz = e.const(f"{base}_w_zp", np.zeros(n, np.int8))
    (wd,) = e.node("DequantizeLinear", [wq, ws, wz], f"{base}_w", axis=1)
    e.nodes.append(helper.make_node("MatMul", [xd, wd], [y], name=e.name(f"{base}_MatMul")))
