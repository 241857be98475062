"""Token W8A8 with the activation in two int8 digits: the per-row rounding error quantized again.

With r_m = max_k |X_mk| / 127 per row and X' = X / r (as in qforms' token form):
  q1 = round(X')                      uint8 (zero point 128), |X' − q1| <= 1/2
  q2 = round(254 · (X' − q1))         uint8 (zero point 128), |q2| <= 127
  Y  = (q1·Wq·w + q2·Wq·w / 254) · r  = X·W up to the weight rounding and r / 508 per element
Two MatMulIntegerToFloat on one int8 weight: the activation's rounding step shrinks 254x for one
more int8 product (no float product, no larger weight). Used by the outlier scheme on the sites
whose int8 error is activation rounding that no column choice removes (SwiGLU outputs: per-token
spikes in varying columns). Both digits are built once per activation and shared by its readers.
"""
from __future__ import annotations

import numpy as np

from graphpass.passes.qforms import MS, Emitter, T, _row_quantizer

SECOND = 254.0   # 1/2 of the first digit's step spread over [-127, 127]


def emit_token_digits(e: Emitter, x: T, wq: T, ws: T, y: T, base: str) -> None:
    """y = (MatMulIntegerToFloat(q1) + MatMulIntegerToFloat(q2, a_scale 1/254)) · r."""
    xq, s, one, z = _row_quantizer(e, x, f"{base}_x")
    key = ("token-digit2", x.name)
    if key not in e.shared:
        (d,) = e.node("DequantizeLinear", [xq, one, z], f"{base}_x_digit1")
        (rest,) = e.node("Sub", [e.shared[("token-xs", x.name)], d], f"{base}_x_rest")
        step = e.const(f"{base}_x_step2", np.float32(1.0 / SECOND))
        (q2,) = e.node("QuantizeLinear", [rest, step, z], f"{base}_x_digit2")
        e.shared[key] = (q2, step)
    q2, step = e.shared[key]
    (y1,) = e.node("MatMulIntegerToFloat", [xq, wq, one, ws, z], base, domain=MS)
    (y2,) = e.node("MatMulIntegerToFloat", [q2, wq, step, ws, z], f"{base}_digit2", domain=MS)
    (ys,) = e.node("Add", [y1, y2], f"{base}_digits")
    e.emit("Mul", [ys, s], [y], f"{base}_rowscale")


def fake_quant_digits(x: np.ndarray) -> np.ndarray:
    """The activation as the two digits represent it (float64 model of emit_token_digits)."""
    x = np.asarray(x, np.float64)
    r = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30) / 127.0
    xs = x / r
    q1 = np.clip(np.rint(xs), -128, 127)
    q2 = np.clip(np.rint((xs - q1) * SECOND), -128, 127)
    return (q1 + q2 / SECOND) * r
