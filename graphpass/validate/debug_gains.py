"""Per-channel gains between a reference and its smoothed candidate, read from the weights.

A smoothed linear layer stores W' ≈ diag(s_in)·W·diag(s_out)^-1 (graphpass.match.rewritten reads
W' back from every form graphpass writes: float, int8, the outlier split of float and int8 rows):
s_in smooths its input (the candidate's layer reads X̂ = X / s_in), s_out the site its output
feeds (a value or up projection absorbs 1/s_out on the columns M its fold names, so Ŷ = Y / s_out
there and s_out = 1 elsewhere: with packed q/k/v, M is v's columns); either is 1 where there is
none. With W' read back (dequantized when int8), least squares over the other axis gives
  s_in_j  = Σ_{c∉M} W'_jc W_jc / Σ_{c∉M} W_jc²          (from a reader's columns no fold rescales)
  s_out_c = Σ_j (s_in_j W_jc)² / Σ_j W'_jc s_in_j W_jc   (c ∈ M)
Rounding noise in W' is independent of W, so both are unbiased, and no data is involved: a
distorted activation upstream cannot leak into the gains (a fit on activations would absorb it).
s_in is taken only where W' = diag(s_in)·W holds on those columns up to int8 rounding (_misfit):
another rewrite may rescale columns no site records (--kv-smooth), and a reader with such columns
gives neither s_in nor its output gain.
"""
from __future__ import annotations

import numpy as np
import onnx

from graphpass.graph.consts import Consts
from graphpass.graph.gs_io import import_graph
from graphpass.match.rewritten import read_rewritten
from graphpass.validate.debug_wide import WIDE

GAIN_EPS = 1e-30
MISFIT = 3.0            # misfit of W' to diag(s_in)·W above this x what rounding explains: not a smoothing


def weight_gains(pairs, ref_consts: Consts, cand: onnx.ModelProto, cand_dir: str | None,
                 rescalable: dict[str, np.ndarray | None]) -> tuple[dict[str, np.ndarray], set[str]]:
    """(tensor -> g (Y ≈ g·Ŷ per channel) for the rescalable tensors the weights determine,
    the outputs of readers whose W' is not diag(s_in)·W on the columns no fold rescales).
    `rescalable` maps a tensor to the channels smoothing may rescale (None: all). The second set
    are layers whose columns something else rescaled (--kv-smooth's σ moves between the q and k
    projections) or whose weights are wrong per column: they give no input gain, and what their
    output differs by is counted as error.
    Weights are read one layer at a time (every reader of a rescalable input, then the outputs)."""
    c = Consts(import_graph(cand, cand_dir))
    tensors = c.graph.tensors()

    def both(p):
        rw = read_rewritten(c, tensors.get(p.tensor)) if p.lin is not None else None
        if rw is not None and rw.form == "float" and p.lin.shape(ref_consts)[1] >= WIDE:
            return None, None, 0     # a float LM head: W and W' whole in float64 would cost GBs
        w1 = rw.weight(c) if rw is not None else None
        if w1 is None or w1.shape != tuple(p.lin.shape(ref_consts)):
            return None, None, 0
        return p.lin.weight(ref_consts).astype(np.float64), w1, rw.levels

    gains: dict[str, np.ndarray] = {}
    odd: set[str] = set()
    for p in pairs:                                      # inputs, from the columns not rescaled
        plain = _plain(rescalable, p.tensor) if p.act in rescalable else None
        w, w1, levels = both(p) if plain is not None else (None, None, 0)
        if w is None or not (w[:, plain] != 0).any():
            continue
        w, w1 = w[:, plain], w1[:, plain]
        s = gains.get(p.act)
        s = (w1 * w).sum(1) / np.maximum((w * w).sum(1), GAIN_EPS) if s is None else s
        if _misfit(w, w1, s, levels) > 1.0:
            odd.add(p.tensor)
        else:
            gains.setdefault(p.act, s)
    for p in pairs:                                      # outputs that absorbed 1/s
        if p.tensor not in rescalable or p.tensor in odd or (p.lin.act in rescalable and p.act not in gains):
            continue
        w, w1, _ = both(p)
        if w is None:
            continue
        ws = w * gains.get(p.act, np.ones(w.shape[0]))[:, None]
        den = (w1 * ws).sum(0)
        g = np.where(np.abs(den) > GAIN_EPS, (ws * ws).sum(0) / np.where(den == 0, 1, den), 1.0)
        mask = rescalable[p.tensor]
        gains[p.tensor] = g if mask is None else np.where(mask, g, 1.0)
    return {t: g.astype(np.float32) for t, g in gains.items() if np.isfinite(g).all()}, odd


def _misfit(w: np.ndarray, w1: np.ndarray, s: np.ndarray, levels: float = 127.0) -> float:
    """Σ (W' − diag(s)·W)² over MISFIT x what rounding of W' per column explains (K·Σ_c step_c²/12,
    step_c = max_j |W'_jc| / levels, plus 1e-3 of Σ W'²): <= 1 for a smoothing of the input,
    float, int8 or N-bit; a rescale of columns by 10% or more reads well above 1."""
    step = np.abs(w1).max(0) / levels
    room = w1.shape[0] * float((step * step).sum()) / 12.0 + 1e-3 * float((w1 * w1).sum())
    return float(((w1 - s[:, None] * w) ** 2).sum()) / max(MISFIT * room, GAIN_EPS)


def _plain(rescalable: dict, tensor: str):
    """The output columns of a layer writing `tensor` that no fold rescales: all (a slice), those
    outside its mask, or None when every column may be rescaled."""
    if tensor not in rescalable:
        return slice(None)
    mask = rescalable[tensor]
    return None if mask is None or mask.all() else ~mask
