"""LLM.int8()-style outlier split: a few input columns in float, the rest in W8A8 per token.

For a linear layer Y = X·W (W [K, N]) and outlier columns O ⊂ {0..K-1} fixed from calibration
(R = the rest), with m = 1 on R and 0 on O:
  Y = X[:, O]·W[O, :]                              float:  Gather(X, O, axis=-1) then MatMul
    + (X ⊙ m)·(W ⊙ m[:, None])                     int8:   the `token` form of qforms on X ⊙ m
The two parts are exact in float ((X ⊙ m)·W[R-rows only] = X[:, R]·W[R, :]); zeroing O in X
(one Mul) also keeps the outliers out of each row's int8 scale max_k |X_mk|, and zeroing O's rows
of W keeps them out of each output channel's weight scale. Measured on onnxruntime CPU
(512x576x1536, |O| = 6, tools/bench_outlier.py --forms): this mask form costs 1.20x the plain
token form; Gather of R (a copy of the int8 side) 1.98x; Gemm with the int8 part as C 1.27x.
X ⊙ m and X[:, O] are built once per (X, O) and shared by every reader (q, k, v read one X);
readers of one X with different O get their own pair. O = ∅ is the token form; O = every
column, or more than SPLIT_MAX_SHARE of them (where the split costs more), keeps the float MatMul.
On the site kinds of OutlierConfig.two_digit (default glu: the down_proj inputs, whose int8 error is
per-token spikes in varying columns) the int8 part takes X ⊙ m in two int8 digits (passes/digits.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphpass.errors import GraphpassError
from graphpass.graph.consts import attr
from graphpass.graph.gs_io import add_opset, export_into, opset_version
from graphpass.match.linears import Linear
from graphpass.match.sites import analyze
from graphpass.passes.digits import emit_token_digits
from graphpass.passes.qforms import MS, Emitter, emit_token, quantize_weight
from graphpass.passes.quantize import QuantConfig, QuantReport, _detach, _rewrite, _skip_reason

DEFAULT_THRESHOLD = 6.0
SITE_KINDS = ("rmsnorm", "layernorm", "attn", "glu")
# Above this share of float columns the float MatMul is cheaper than the split (key: two digits).
# One 512x576x1536 layer in units of its token form (tools/bench_outlier_forms.py, resid_bench):
# FP32 3.1, split overhead 0.2 + 3.1·|O|/K, int8 part 1 (one digit) or 2.2 (two digits), so the
# split pays while |O|/K < (3.1 − 0.2 − 1) / 3.1 ≈ 0.6, or (3.1 − 0.2 − 2.2) / 3.1 ≈ 0.25.
SPLIT_MAX_SHARE = {False: 0.6, True: 0.25}


@dataclass(frozen=True)
class OutlierConfig:
    """Which input columns go to float: max|X_j| > threshold, or the top k, or a fraction of them."""
    threshold: float = DEFAULT_THRESHOLD
    topk: int | None = None
    fraction: float | None = None
    slack: float = 0.1        # search: the fewest float columns within (1 + slack) x the best error
    two_digit: tuple[str, ...] = ("glu",)   # site kinds whose int8 activations take two digits (glu: down_proj)
    two_digit_first: float = 0.5      # ... on the first share of those sites in graph order (the earliest layers)

    def __post_init__(self):
        if self.topk is not None and self.fraction is not None:
            raise GraphpassError("give --outlier-topk or --outlier-fraction, not both")
        if not self.threshold > 0:
            raise GraphpassError(f"--outlier-threshold must be > 0, got {self.threshold}")
        if self.topk is not None and self.topk < 0:
            raise GraphpassError(f"--outlier-topk must be >= 0, got {self.topk}")
        if self.fraction is not None and not 0 <= self.fraction <= 1:
            raise GraphpassError(f"--outlier-fraction must be in [0, 1], got {self.fraction}")
        if self.slack < 0:
            raise GraphpassError(f"outlier search slack must be >= 0, got {self.slack}")
        if not 0 <= self.two_digit_first <= 1:
            raise GraphpassError(f"--outlier-two-digit-first must be in [0, 1], got {self.two_digit_first}")
        bad = [k for k in self.two_digit if k not in SITE_KINDS]
        if bad:
            raise GraphpassError(f"--outlier-two-digit: unknown site kind '{bad[0]}' (kinds: {', '.join(SITE_KINDS)})")

    @property
    def by_threshold(self) -> bool:
        return self.topk is None and self.fraction is None


def outlier_columns(absmax: np.ndarray, cfg: OutlierConfig, threshold: float | None = None) -> np.ndarray:
    """Sorted int64 indices of the float columns from calibrated per-channel max|X_j|."""
    a = np.asarray(absmax, np.float64).reshape(-1)
    if cfg.by_threshold:
        t = cfg.threshold if threshold is None else threshold
        return np.flatnonzero(~(a <= t)).astype(np.int64)   # NaN / Inf count as outliers
    k = cfg.topk if cfg.topk is not None else int(math.ceil(cfg.fraction * a.size - 1e-9))
    k = min(k, a.size)
    return np.sort(np.argsort(-a, kind="stable")[:k]).astype(np.int64)


@dataclass
class OutlierReport(QuantReport):
    columns: dict[str, tuple[int, int]] = field(default_factory=dict)   # layer -> (|O|, K)
    two_digit: list[str] = field(default_factory=list)                   # layers with two-digit activations

    @property
    def float_share(self) -> float:
        """Share of the input columns on the float path, over the quantized layers and those kept
        in float because of their outliers."""
        n, k = (sum(v[i] for v in self.columns.values()) for i in (0, 1))
        return n / k if k else 0.0

    def format(self) -> str:
        split = sum(1 for o, k in self.columns.values() if 0 < o < k)
        return (super().format() + f"\n  outlier split: {split} layers with float columns, "
                f"{100 * self.float_share:.3f}% of input columns on the float path"
                + (f"; {len(self.two_digit)} layers with two-digit int8 activations" if self.two_digit else ""))


def split_outliers(model: onnx.ModelProto | gs.Graph, config: QuantConfig, columns: dict[str, np.ndarray],
                   int8: bool = True, two_digit: frozenset[str] = frozenset()
                   ) -> tuple[onnx.ModelProto | gs.Graph, OutlierReport]:
    """Rewrite every linear layer in place; `columns` maps a layer name (or its input tensor's
    name) to its outlier columns O. `int8=False` keeps the R part in float (checks, debugging).
    `two_digit`: layer names whose int8 part takes its activation in two digits (passes/digits.py)."""
    if config.embedding_int8:
        raise GraphpassError("--embedding-int8 is not supported with --scheme outlier")
    an = analyze(model)
    g, c = an.graph, an.consts
    names = {lin.name for lin in an.linears}
    rep = OutlierReport(skipped=[u for u in an.uncovered if u[0] not in names])
    e = Emitter(g, opset_version(g), c._names)
    token = QuantConfig("token", config.lm_head, False, config.skip)
    for lin in an.linears:
        why = _skip_reason(lin, c, token, None)
        o = np.asarray(columns.get(lin.name, columns.get(lin.act, ())), np.int64)
        k = lin.shape(c)[0]
        digits = lin.name in two_digit
        dense = not why and (o.size >= k or int8 and o.size > SPLIT_MAX_SHARE[digits] * k)
        if dense:
            why = ("every input column is an outlier (float MatMul)" if o.size >= k else
                   f"{o.size} of {k} input columns are outliers: the float MatMul is cheaper than the split "
                   f"(above {SPLIT_MAX_SHARE[digits]:.0%})")
            rep.columns[lin.name] = (int(k), int(k))    # the whole layer is on the float path
        if why:
            rep.skipped.append((lin.name, why))
            continue
        if o.size == 0 and int8 and not digits:
            _rewrite(lin, c, e, token, None, {})
        else:
            _rewrite_split(lin, c, e, o, int8, digits)
            if digits:
                rep.two_digit.append(lin.name)
        rep.quantized.append(lin.name)
        rep.columns[lin.name] = (int(o.size), int(k))
    if any(n.domain == MS for n in g.nodes):
        add_opset(g, MS, 1)
    g.cleanup().toposort()
    if isinstance(model, onnx.ModelProto):
        export_into(model, g)
    return model, rep


def _rewrite_split(lin: Linear, c, e: Emitter, o: np.ndarray, int8: bool, digits: bool = False) -> None:
    n, base = lin.node, (lin.node.name or lin.node.outputs[0].name).strip("/").replace("/", "_")
    gain = np.float32(attr(n, "alpha", 1.0)) if n.op == "Gemm" else np.float32(1.0)
    beta = np.float32(attr(n, "beta", 1.0))
    bias = c.get(n.inputs[2]) if n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2].name else None
    w = lin.weight(c).astype(np.float32) * gain
    x, out = lin.x, _detach(n)
    y = gs.Variable(e.name(f"{base}_noBias")) if bias is not None else out
    emit_split(e, x, w, o, y, base, int8, digits)
    if bias is not None:
        e.emit("Add", [y, e.const(f"{base}_bias", bias.astype(np.float32) * beta)], [out], f"{base}_bias_Add")


def split_inputs(e: Emitter, x: gs.Tensor, o: np.ndarray, k: int, base: str) -> tuple[gs.Tensor, gs.Tensor]:
    """(X ⊙ m, X[..., O]), once per (X, O)."""
    key = ("outlier", x.name, o.tobytes())
    if key not in e.shared:
        m = np.ones(k, np.float32)
        m[o] = 0.0
        (xr,) = e.node("Mul", [x, e.const(f"{base}_inlier_mask", m)], f"{base}_inliers")
        (xo,) = e.node("Gather", [x, e.const(f"{base}_outlier_cols", o)], f"{base}_outliers", axis=-1)
        e.shared[key] = (xr, xo)
    return e.shared[key]


def emit_split(e: Emitter, x: gs.Tensor, w: np.ndarray, o: np.ndarray, y: gs.Tensor, base: str,
               int8: bool = True, digits: bool = False) -> None:
    """y = X[..., O]·W[O] + token_int8(X ⊙ m)·int8(W ⊙ m) (or that second product in float);
    `digits`: the int8 part's activation in two digits. O = ∅: the int8 part alone, on X."""
    if o.size == 0:
        xr, yi = x, y
    else:
        xr, xo = split_inputs(e, x, o, w.shape[0], base)
        yi = gs.Variable(e.name(f"{base}_int8_part"))
    wr = w.copy()
    wr[o] = 0.0
    if int8:
        q, s = quantize_weight(wr)
        emit = emit_token_digits if digits else emit_token
        emit(e, xr, e.const(f"{base}_w_int8", q), e.const(f"{base}_w_scale", s), yi, base)
    else:
        e.emit("MatMul", [xr, e.const(f"{base}_w_inliers", wr)], [yi], f"{base}_inlier_MatMul")
    if o.size == 0:
        return
    (yf,) = e.node("MatMul", [xo, e.const(f"{base}_w_outliers", np.ascontiguousarray(w[o]))], f"{base}_float_part")
    e.emit("Add", [yi, yf], [y], f"{base}_outlier_Add")


def calibrated_columns(an, stats, smoothed, cfg: OutlierConfig,
                       thresholds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Layer name -> O from the calibrated max|X_j| of the input it reads now: max|X_j| / s_j
    after smoothing (`smoothed`: the SmoothReport, or None). `thresholds`: per site name."""
    site_of = {id(lin): st for st in an.sites for lin in st.consumers}
    out = {}
    for lin in an.linears:
        st = site_of.get(id(lin))
        if lin.act in (smoothed.scales if smoothed else {}):
            old, s = smoothed.scales[lin.act]
            a = stats.absmax(old) / s
        elif lin.act in stats.min or (st is not None and st.act in stats.min):
            a = stats.absmax(lin.act if lin.act in stats.min else st.act)
        else:
            continue
        t = (thresholds or {}).get(st.name) if st is not None else None
        out[lin.name] = outlier_columns(a, cfg, t)
    return out


def two_digit_sites(an, cfg: OutlierConfig) -> frozenset[str]:
    """Names of the sites whose int8 activations take two digits: per kind in cfg.two_digit, the
    first ceil(two_digit_first · n) of its n sites in graph order (an early layer's error passes
    through every later one)."""
    out = set()
    for kind in cfg.two_digit:
        sites = [st.name for st in an.sites if st.kind == kind]
        out.update(sites[:math.ceil(cfg.two_digit_first * len(sites) - 1e-9)])
    return frozenset(out)


def two_digit_layers(an, cfg: OutlierConfig) -> frozenset[str]:
    """Names of the linear layers reading a site of two_digit_sites."""
    names = two_digit_sites(an, cfg)
    return frozenset(lin.name for st in an.sites if st.name in names for lin in st.consumers)
