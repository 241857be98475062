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
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphpass.graph.io import unique_name

MS = "com.microsoft"
T = gs.Tensor


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
    """Adds nodes and constants with unique names to a gs.Graph; one instance per rewritten graph."""

    def __init__(self, graph: gs.Graph, opset: int, names: set[str]):
        self.graph, self.opset, self.names = graph, opset, names
        self.shared: dict[tuple, tuple] = {}   # (kind, tensor) -> outputs of the activation quantizer

    def name(self, base: str) -> str:
        return unique_name(base, self.names)

    def const(self, base: str, value) -> gs.Constant:
        return gs.Constant(self.name(base), np.array(value, order="C"))

    def emit(self, op: str, inputs: list[T], outputs: list[T], base: str, domain: str = "", **attrs) -> None:
        """A node writing `outputs` (existing tensors; their old producer must be detached)."""
        self.graph.nodes.append(gs.Node(op, self.name(base), attrs, list(inputs), list(outputs),
                                        domain or None))

    def node(self, op: str, inputs: list[T], base: str, n_out: int = 1, domain: str = "", **attrs) -> list[gs.Variable]:
        outs = [gs.Variable(self.name(f"{base}_{op}_out{i}")) for i in range(n_out)]
        self.emit(op, inputs, outs, f"{base}_{op}", domain, **attrs)
        return outs


def emit_dynamic(e: Emitter, x: T, wq: T, ws: T, y: T, base: str) -> None:
    key = ("dynamic", x.name)
    if key not in e.shared:
        e.shared[key] = tuple(e.node("DynamicQuantizeLinear", [x], f"{base}_x", 3))
    xq, xs, xz = e.shared[key]
    (yi,) = e.node("MatMulInteger", [xq, wq, xz], base)
    (yf,) = e.node("Cast", [yi], base, to=TensorProto.FLOAT)
    (comb,) = e.node("Mul", [xs, ws], f"{base}_scale")
    e.emit("Mul", [yf, comb], [y], f"{base}_Mul")


def _row_quantizer(e: Emitter, x: T, base: str) -> tuple[T, T, T, T]:
    key = ("token", x.name)
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
        e.shared[("token-xs", x.name)] = xs     # X / r, for a second digit (passes/digits.py)
    return e.shared[key]


def emit_token(e: Emitter, x: T, wq: T, ws: T, y: T, base: str) -> None:
    xq, s, one, z = _row_quantizer(e, x, f"{base}_x")
    (yp,) = e.node("MatMulIntegerToFloat", [xq, wq, one, ws, z], base, domain=MS)
    e.emit("Mul", [yp, s], [y], f"{base}_rowscale")


def _static_quantizer(e: Emitter, x: T, base: str, qparams) -> tuple[T, T, T]:
    """QuantizeLinear of X with its calibrated scale and zero point, once per tensor."""
    key = ("static", x.name)
    if key not in e.shared:
        scale, zp = qparams
        sc, zc = e.const(f"{base}_x_scale", scale), e.const(f"{base}_x_zp", zp)
        (xq,) = e.node("QuantizeLinear", [x, sc, zc], f"{base}_x")
        e.shared[key] = (xq, sc, zc)
    return e.shared[key]


def emit_static_fused(e: Emitter, x: T, wq: T, ws: T, y: T, base: str, qparams, bias: T) -> None:
    """Static with a bias: QuantizeLinear + MatMulIntegerToFloat(bias), the op the QDQ form fuses to."""
    xq, sc, zc = _static_quantizer(e, x, base, qparams)
    e.emit("MatMulIntegerToFloat", [xq, wq, sc, ws, zc, gs.Variable.empty(), bias], [y],
           f"{base}_MatMulIntegerToFloat", domain=MS)


def emit_static(e: Emitter, x: T, wq: T, ws: T, y: T, base: str, qparams, n: int) -> None:
    key = ("static-dq", x.name)
    if key not in e.shared:
        xq, sc, zc = _static_quantizer(e, x, base, qparams)
        e.shared[key] = tuple(e.node("DequantizeLinear", [xq, sc, zc], f"{base}_x"))
    (xd,) = e.shared[key]
    wz = e.const(f"{base}_w_zp", np.zeros(n, np.int8))
    (wd,) = e.node("DequantizeLinear", [wq, ws, wz], f"{base}_w", axis=1)
    e.emit("MatMul", [xd, wd], [y], f"{base}_MatMul")
