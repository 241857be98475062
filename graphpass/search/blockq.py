"""MatMulNBits weight rounding in block space, in place: the searches' inner loop.

W [K, N] cut along K into blocks (passes/clip.block_view: [k_blocks, block, N], zero-padded) is
rounded per block b and output channel n as onnxruntime's packer rounds it:
  symmetric : s = v / -2^(bits-1), v the block's value of largest |v| (the first one on a tie);
              q = clip(rint(w / s), -2^(bits-1), 2^(bits-1) - 1)
  asymmetric: s = (max(hi, 0) - min(lo, 0)) / (2^bits - 1), z = clip(rint(-min(lo, 0) / s));
              q = clip(rint(w / s) + z) - z
and returned dequantized (q · s). v comes from the block's max and min (two reductions, or none: a
block clipped to [lo, hi] has max min(max, hi) and min max(min, lo)) instead of an argmax over |w|; only blocks where max = -min (a tie, frequent once the clip search has cut
both tails to ±ρ·max|w|) look up which comes first. The rounding writes into `out` (which may be
the input itself), so a search over many candidates reuses one buffer.
"""
from __future__ import annotations

import numpy as np

from graphpass.passes.clip import block_view
from graphpass.passes.nbits import NBitsConfig


def quantize_blocks(wb: np.ndarray, bits: int, symmetric: bool, out: np.ndarray | None = None,
                    mx: np.ndarray | None = None, mn: np.ndarray | None = None) -> np.ndarray:
    """wb [k_blocks, block, N] float32 -> its MatMulNBits rounding, dequantized, in `out`.
    `mx`, `mn` [k_blocks, 1, N]: the blocks' max and min when the caller knows them."""
    out = np.empty_like(wb) if out is None else out
    if mx is None or mn is None:
        mx, mn = wb.max(axis=1, keepdims=True), wb.min(axis=1, keepdims=True)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = np.where(mx >= -mn, mx, mn)
        _first_on_ties(wb, mx, mn, scale)
        scale /= np.float32(qmin)
        zp = None
    else:
        qmin, qmax = 0, 2 ** bits - 1
        lo = np.minimum(mn, 0)
        scale = (np.maximum(mx, 0) - lo) / np.float32(qmax)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    if not symmetric:
        zp = np.clip(np.rint(-lo * inv), qmin, qmax)
    np.multiply(wb, inv, out=out)
    np.rint(out, out=out)
    if zp is not None:
        out += zp
    np.clip(out, qmin, qmax, out=out)
    if zp is not None:
        out -= zp
    out *= scale
    return out


def fake_quant_act_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """int8 per row and per block of `block` channels (the kernel's int8 activation), dequantized."""
    r, c = x.shape
    kb = -(-c // block)
    xp = np.pad(x, ((0, 0), (0, kb * block - c))).reshape(r, kb, block)
    scale = np.maximum(np.abs(xp).max(-1, keepdims=True), 1e-30) / 127.0
    return (np.clip(np.rint(xp / scale), -127, 127) * scale).reshape(r, kb * block)[:, :c]


class NBitsScorer:
    """err(s) = Σ_k ||Y_k − A(X / s)·Q(diag(s)·W_k)||² / ||Y_k||² for one site (Y_k = X·W_k; A, Q
    as in search/nbits_alpha.py), with the readers' weights cut into blocks once and one scratch
    buffer per reader reused by every candidate s."""

    def __init__(self, x: np.ndarray, weights: list[np.ndarray], cfg: NBitsConfig,
                 ys: list[np.ndarray] | None = None):
        self.x, self.cfg = x, cfg
        self.ys = [x @ w for w in weights] if ys is None else ys
        self.norms = [max(float((y ** 2).sum()), 1e-30) for y in self.ys]
        self.blocks = [block_view(w.astype(np.float32, copy=False), cfg.block_size) for w in weights]
        self.bufs = [np.empty_like(b) for b in self.blocks]
        kb, bs = self.blocks[0].shape[:2] if self.blocks else (0, 0)
        self.s = np.ones((kb * bs, 1), np.float32)             # s, padded with ones to whole blocks

    def error(self, s: np.ndarray) -> float:
        c, cfg = self.x.shape[1], self.cfg
        xs = (self.x / s).astype(np.float32)
        xq = fake_quant_act_blocks(xs, cfg.block_size) if cfg.accuracy_level == 4 else xs
        self.s[:c, 0] = s
        err = 0.0
        for wb, buf, y, norm in zip(self.blocks, self.bufs, self.ys, self.norms):
            np.multiply(wb, self.s.reshape(wb.shape[0], wb.shape[1], 1), out=buf)
            quantize_blocks(buf, cfg.bits, cfg.symmetric, out=buf)
            yq = xq @ buf.reshape(-1, buf.shape[2])[:c]
            err += float(((y - yq) ** 2).sum() / norm)
        return err


def grid_scorers(x: np.ndarray, weights: list[np.ndarray], cfgs: list[NBitsConfig | None],
                 ys: list[np.ndarray] | None = None) -> list[NBitsScorer]:
    """One scorer per distinct grid the readers are packed on, so the activation is rounded once
    per grid, not per reader; a reader whose config is None (kept in float) gets none: its output
    is exact for any s."""
    def on(c, items):
        return [v for v, ci in zip(items, cfgs) if ci == c]

    return [NBitsScorer(x, on(c, weights), c, None if ys is None else on(c, ys))
            for c in dict.fromkeys(c for c in cfgs if c is not None)]


def _first_on_ties(wb: np.ndarray, mx: np.ndarray, mn: np.ndarray, v: np.ndarray) -> None:
    """Where a block's max equals -min (both signs reach max|w|), v = the first of them."""
    b, _, n = np.nonzero((mx == -mn) & (mx > 0))
    if b.size:
        sub = wb[b, :, n]                                   # [ties, block]
        v[b, 0, n] = sub[np.arange(b.size), np.abs(sub).argmax(axis=1)]
