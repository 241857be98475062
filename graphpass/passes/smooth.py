"""SmoothQuant, folded: Y = X·W = (X·diag(s)^-1)·(diag(s)·W), with no runtime op added.

Per site, over its readers k:  s_j = max|X_j|^α / (max_k max_o |W_k[j, o]|)^(1-α),
clamped to [1e-4, 1e4], and 1 wherever a channel is all-zero or not finite.
  readers:  W_k[j, :] *= s_j
  producer: γ_j /= s_j, β_j /= s_j (norm)   |   W_p[:, j] /= s_j, b_j /= s_j (linear, glu, attn)
With grouped-query attention the scale is reduced over the query heads that read one kv head,
so the fold into the value projection stays exact. A norm whose output has other readers (the
residual of a post-LN block) is duplicated: the readers that are not smoothed keep the original.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphpass.graph.consts import Consts
from graphpass.graph.gs_io import export_into
from graphpass.match.sites import Analysis, LinearFold, NormFold, Site, analyze

S_MIN, S_MAX = 1e-4, 1e4


@dataclass(frozen=True)
class SmoothConfig:
    alpha: float = 0.5
    site_alpha: tuple[tuple[str, float], ...] = ()   # (site name, anchor or tensor; α) overrides
    allow_mul: bool = False                           # a Mul before readers with no foldable producer

    def alpha_for(self, site: Site) -> float:
        for key, a in self.site_alpha:
            if key in (site.name, site.anchor, site.act):
                return a
        return self.alpha


@dataclass
class SmoothReport:
    rows: list[dict] = field(default_factory=list)
    uncovered: list[tuple[str, str]] = field(default_factory=list)
    muls_added: int = 0
    verified_error: float | None = None   # max relative output change on probe inputs
    scales: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # new X -> (old X, s)

    def format(self) -> str:
        lines = [f"{len(self.rows)} sites folded, {self.muls_added} Mul nodes added, "
                 f"{len(self.uncovered)} linear layers not covered"]
        lines.append(f"  {'site':<58} {'kind':<9} {'readers':>7} {'alpha':>5} "
                     f"{'act max/med':>17} {'weight max/med':>17}")
        for r in self.rows:
            lines.append(f"  {r['site'][:58]:<58} {r['kind']:<9} {len(r['consumers']):>7} {r['alpha']:>5.2f} "
                         f"{r['act_ratio_before']:>7.1f} -> {r['act_ratio_after']:<6.1f} "
                         f"{r['w_ratio_before']:>7.1f} -> {r['w_ratio_after']:<6.1f}")
        for name, why in self.uncovered:
            lines.append(f"  not covered: {name}: {why}")
        if self.verified_error is not None:
            lines.append(f"  outputs unchanged: max relative error {self.verified_error:.2e} on probe inputs")
        return "\n".join(lines)


def smoothing_scales(act_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    a = np.maximum(act_max.astype(np.float64), 1e-5)
    w = np.maximum(w_max.astype(np.float64), 1e-5)
    with np.errstate(all="ignore"):
        s = a ** alpha / w ** (1.0 - alpha)
    bad = ~np.isfinite(s) | ~(act_max > 0) | ~(w_max > 0) | ~np.isfinite(act_max)
    s[bad] = 1.0
    return np.clip(s, S_MIN, S_MAX)


def weight_absmax(site_readers, c: Consts) -> np.ndarray:
    return np.max([np.abs(lin.weight(c)).max(axis=1) for lin in site_readers], axis=0)


def site_scales(site: Site, c: Consts, act_max: np.ndarray, alpha: float,
                w_max: np.ndarray | None = None) -> np.ndarray:
    """s = act^α / w_max^(1-α) per channel (w_max: the readers' max|W| unless given)."""
    w_max = weight_absmax(site.consumers, c) if w_max is None else w_max
    cmap = site.fold.channel_map if isinstance(site.fold, LinearFold) else None
    if cmap is None:
        return smoothing_scales(act_max, w_max, alpha)
    n = int(cmap.max()) + 1   # reduce over the query heads sharing a kv channel
    a, w = np.zeros(n), np.zeros(n)
    np.maximum.at(a, cmap, act_max)
    np.maximum.at(w, cmap, w_max)
    return smoothing_scales(a, w, alpha)[cmap]


def _ratio(v: np.ndarray) -> float:
    med = float(np.median(v))
    return float(v.max() / med) if med > 0 else float("inf")


def smooth(model: onnx.ModelProto | gs.Graph, act_absmax: dict[str, np.ndarray],
           config: SmoothConfig = SmoothConfig(), analysis: Analysis | None = None
           ) -> tuple[onnx.ModelProto | gs.Graph, SmoothReport]:
    """Fold smoothing scales into `model` from per-channel max|X|; returns (model, report).

    A gs.Graph is edited in place (new weights stay numpy arrays in it until it is saved); a
    ModelProto is imported, edited, and written back into the same object.
    """
    an = analysis or analyze(model)
    g, c, rep = an.graph, an.consts, SmoothReport(uncovered=list(an.uncovered))
    for site in an.sites:
        alpha = config.alpha_for(site)
        act_name = site.act
        act = act_absmax[site.act].astype(np.float64)
        w_before = weight_absmax(site.consumers, c)
        s = site_scales(site, c, act, alpha, w_before)
        fold_site(g, c, site, s)
        rep.scales[site.consumers[0].act] = (act_name, s)
        rep.rows.append(dict(site=site.name, kind=site.kind, act=site.act,
                             consumers=[lin.name for lin in site.consumers], alpha=alpha,
                             act_ratio_before=_ratio(act), act_ratio_after=_ratio(act / s),
                             w_ratio_before=_ratio(w_before), w_ratio_after=_ratio(w_before * s),
                             cloned=isinstance(site.fold, NormFold) and site.fold.clone))
    if config.allow_mul:
        for act, readers in an.unfoldable:
            site = Site("mul", act, readers, NormFold([], None, None), act)
            s = site_scales(site, c, act_absmax[act].astype(np.float64), config.alpha_for(site))
            for lin in readers:
                lin.set_weight(c, lin.weight(c) * s[:, None].astype(np.float32))
            _insert_mul(g, c, readers, s)
            rep.scales[readers[0].act] = (act, s)
            rep.muls_added += 1
    g.toposort()
    if isinstance(model, onnx.ModelProto):
        export_into(model, g)
    return model, rep


def fold_site(g: gs.Graph, c: Consts, site: Site, s: np.ndarray) -> None:
    """X -> X·diag(s)^-1 into the site's producer, W_k -> diag(s)·W_k into its readers (exact)."""
    for lin in site.consumers:
        lin.set_weight(c, lin.weight(c) * s[:, None].astype(np.float32))
    if isinstance(site.fold, NormFold):
        _fold_norm(g, c, site, s)
    else:
        _fold_linear(c, site.fold, s)


def _fold_norm(g: gs.Graph, c: Consts, site: Site, s: np.ndarray) -> None:
    fold = site.fold
    if fold.clone:
        fold = _clone_tail(g, c, site)
    for at in (fold.scale, fold.bias):
        if at is None:
            continue
        node, i = at
        v = c.get(node.inputs[i])
        c.replace(node, i, v / s.reshape(v.shape).astype(v.dtype))


def _clone_tail(g: gs.Graph, c: Consts, site: Site) -> NormFold:
    """Duplicate the norm's affine tail; the site's readers move to the copy's output."""
    fold, renamed, clones = site.fold, {}, []
    for n in fold.nodes:
        y = n.outputs[0]
        out = gs.Variable(c.unique_name(y.name + "_smoothed"), y.dtype, y.shape)
        m = gs.Node(n.op, c.unique_name((n.name or n.op) + "_smoothed"), dict(n.attrs),
                    [renamed.get(id(i), i) for i in n.inputs], [out], n.domain)
        renamed[id(y)] = out
        g.nodes.append(m)
        clones.append(m)
    if fold.via is not None:          # the readers see the norm through a Reshape: move that
        fold.via.inputs[0] = clones[-1].outputs[0]
    else:
        for lin in site.consumers:
            lin.node.inputs[0] = clones[-1].outputs[0]
    pick = {id(n): m for n, m in zip(fold.nodes, clones)}
    at = lambda a: (pick[id(a[0])], a[1]) if a else None  # noqa: E731
    return NormFold(clones, at(fold.scale), at(fold.bias), clone=True, via=fold.via)


def _fold_linear(c: Consts, fold: LinearFold, s: np.ndarray) -> None:
    p = fold.producer
    w = p.weight(c)
    if fold.channel_map is not None:
        s_out = np.ones(w.shape[1])
        s_out[fold.channel_map] = s
    else:
        s_out = s
    p.set_weight(c, w / s_out[None, :].astype(np.float32))
    if p.bias_at is not None:
        node, i = p.bias_at
        b = c.get(node.inputs[i])
        if b.size == s_out.size:
            c.replace(node, i, b / s_out.reshape(b.shape).astype(b.dtype))
        else:  # a scalar Gemm bias becomes a vector
            c.replace(node, i, (np.full(s_out.size, b.reshape(-1)[0]) / s_out).astype(b.dtype))


def _insert_mul(g: gs.Graph, c: Consts, readers, s: np.ndarray) -> None:
    x = readers[0].x
    inv = gs.Constant(c.unique_name(x.name + "_inv_smooth"), (1.0 / s).astype(np.float32))
    out = gs.Variable(c.unique_name(x.name + "_smoothed"), x.dtype, x.shape)
    g.nodes.append(gs.Node("Mul", c.unique_name("Smooth_Mul"), inputs=[x, inv], outputs=[out]))
    for lin in readers:
        lin.node.inputs[0] = out
