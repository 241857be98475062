"""Per-channel gains between a reference and its smoothed candidate, read from the weights.

A smoothed, quantized linear layer stores W' ≈ diag(s_in)·W·diag(s_out)^-1: s_in smooths its
input X (the candidate computes X̂ = X / s_in), s_out the site its output feeds (a value or up
projection absorbs 1/s_out, so Ŷ = Y / s_out); either is 1 where there is none. With W' the
dequantized int8 weight, least squares over the other axis gives
  s_in_j  = Σ_c W'_jc W_jc / Σ_c W_jc²                 (a reader whose output is not rescaled)
  s_out_c = Σ_j (s_in_j W_jc)² / Σ_j W'_jc s_in_j W_jc
Rounding noise in W' is independent of W, so both are unbiased, and no data is involved: a
distorted activation upstream cannot leak into the gains (a fit on activations would absorb it).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphpass.graph.consts import Consts, attr
from graphpass.graph.gs_io import import_graph

GAIN_EPS = 1e-30


def dequantized_weight(c: Consts, y: gs.Tensor | None) -> np.ndarray | None:
    """W' as [in, out] float for the quantized layer writing `y`, in graphpass's forms (token,
    dynamic, static QDQ, with a Gemm bias Add) and onnxruntime's QDQ; None for any other form."""
    n = c.producer(y)
    if n is not None and n.op == "Add":                               # Gemm bias after the product
        n = next((p for p in map(c.producer, n.inputs) if p is not None and p.op in ("Mul", "MatMul")), None)
    if n is None:
        return None
    if n.op == "MatMul":                                              # X·DQ(Wq, w, z)
        dq = c.producer(n.inputs[1])
        if dq is None or dq.op != "DequantizeLinear":
            return None
        return _dq(c, dq)
    if n.op != "Mul":
        return None
    for i in n.inputs:
        p = c.producer(i)
        if p is not None and p.op == "MatMulIntegerToFloat":          # token: MMITF(xq, Wq, 1, w, z)·r
            return _scaled(c, p.inputs[1], p.inputs[3], p.inputs[5] if len(p.inputs) > 5 else None)
        if p is not None and p.op == "Cast":                          # dynamic: Cast(MMI(xq, Wq, z))·(a·w)
            mmi = c.producer(p.inputs[0])
            comb = c.producer(next(j for j in n.inputs if j is not i))
            if mmi is None or mmi.op != "MatMulInteger" or comb is None or comb.op != "Mul":
                return None
            w = next((j for j in comb.inputs if c.is_const(j) and (c.shape(j) or (1,))[-1] > 1), None)
            zp = mmi.inputs[3] if len(mmi.inputs) > 3 else None
            return None if w is None else _scaled(c, mmi.inputs[1], w, zp)
    return None


def _scaled(c: Consts, q: gs.Tensor, scale: gs.Tensor, zp: gs.Tensor | None) -> np.ndarray | None:
    wq, s = c.get(q), c.get(scale)
    if wq is None or s is None or wq.ndim != 2:
        return None
    z = c.get(zp) if zp is not None and zp.name else None
    w = wq.astype(np.float64) - (0.0 if z is None else z.astype(np.float64))
    return w * s.astype(np.float64).reshape(1, -1)


def _dq(c: Consts, dq: gs.Node) -> np.ndarray | None:
    wq, s = c.get(dq.inputs[0]), c.get(dq.inputs[1])
    if wq is None or s is None or wq.ndim != 2:
        return None
    z = c.get(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
    axis = attr(dq, "axis", 1)
    shape = (1, -1) if axis in (1, -1) else (-1, 1)
    w = wq.astype(np.float64) - (0.0 if z is None else z.astype(np.float64).reshape(shape))
    return w * s.astype(np.float64).reshape(shape)


def weight_gains(pairs, ref_consts: Consts, cand: onnx.ModelProto, cand_dir: str | None,
                 rescalable: set[str]) -> dict[str, np.ndarray]:
    """tensor -> g (Y ≈ g·Ŷ per channel) for the rescalable tensors the weights determine.
    Weights are read one layer at a time (inputs first, then the outputs that need them)."""
    c = Consts(import_graph(cand, cand_dir))
    tensors = c.graph.tensors()

    def both(p):
        if not p.quantized or p.lin is None:
            return None, None
        w1 = dequantized_weight(c, tensors.get(p.tensor))
        if w1 is None or w1.shape != tuple(p.lin.shape(ref_consts)):
            return None, None
        return p.lin.weight(ref_consts).astype(np.float64), w1

    gains: dict[str, np.ndarray] = {}
    for p in pairs:                                      # inputs, from readers of plain outputs
        if p.act in rescalable and p.tensor not in rescalable and p.act not in gains:
            w, w1 = both(p)
            if w is not None:
                gains[p.act] = (w1 * w).sum(1) / np.maximum((w * w).sum(1), GAIN_EPS)
    for p in pairs:                                      # outputs that absorbed 1/s
        if p.tensor in rescalable and not (p.act in rescalable and p.act not in gains):
            w, w1 = both(p)
            if w is None:
                continue
            ws = w * gains.get(p.act, np.ones(w.shape[0]))[:, None]
            den = (w1 * ws).sum(0)
            gains[p.tensor] = np.where(np.abs(den) > GAIN_EPS, (ws * ws).sum(0) / np.where(den == 0, 1, den), 1.0)
    return {t: g.astype(np.float32) for t, g in gains.items() if np.isfinite(g).all()}
