"""The report's charts, as matplotlib figures (tests read their artists) and as PNG bytes.

  plot_site           per-channel max|X_j| and max|W_j| before / after smoothing (SmoothQuant,
                      Figure 4): after = max|X_j| / s_j and max|W_j| * s_j
  alpha_figure        α per smoothing site in graph order, one colour per site kind
  layer_error_figure  SQNR = 10·log10(Σy² / Σ(ŷ−y)²) per quantized layer, one horizontal bar per
                      layer (graph order, top to bottom), its name on the axis
"""
from __future__ import annotations

import io
import os

import numpy as np

ROW_INCHES = 0.17         # height of one layer's bar in the per-layer chart (7 pt labels fit)
WORST = 5                 # layers drawn in red in the per-layer chart
KIND_COLORS = {"rmsnorm": "tab:green", "layernorm": "tab:olive", "glu": "tab:orange", "attn": "tab:blue",
               "linear": "tab:purple"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _plt().close(fig)
    return buf.getvalue()


def plot_site(site_name: str, act_max: np.ndarray, w_max: np.ndarray, s: np.ndarray,
              path: str | os.PathLike | None = None) -> bytes:
    """Two rows (activation max|X_j|, weight max|W_j|) x two columns (before, after). PNG bytes."""
    fig, ax = _plt().subplots(2, 2, figsize=(11, 5.5), sharex=True, layout="constrained")
    panels = [(act_max, act_max / s, "activation max|X_j|", "tab:red"),
              (w_max, w_max * s, "weight max|W_j|", "tab:blue")]
    for r, (before, after, what, color) in enumerate(panels):
        top = max(before.max(), after.max()) * 1.05
        for col, (v, when) in enumerate(((before, "before"), (after, "after smoothing"))):
            a = ax[r, col]
            a.stairs(v, np.arange(v.size + 1) - 0.5, fill=True, color=color)   # one path, not C bars
            a.set_ylim(0, top)
            med = np.median(v)
            ratio = v.max() / med if med > 0 else float("inf")
            a.set_title(f"{what}, {when}  (max/median {ratio:.1f})", fontsize=9)
            if r == 1:
                a.set_xlabel("channel j")
    fig.suptitle(site_name, fontsize=10)
    out = png(fig, dpi=110)
    if path is not None:
        from graphpass.graph.io import write_bytes

        write_bytes(path, out)
    return out


def kind_colors(kinds) -> dict[str, str]:
    """A distinct colour per site kind (known kinds keep theirs across reports)."""
    spare = [c for c in ("tab:brown", "tab:pink", "tab:gray", "tab:cyan", "tab:red")
             if c not in KIND_COLORS.values()]
    out, k = {}, 0
    for kind in sorted(kinds):
        if kind in KIND_COLORS:
            out[kind] = KIND_COLORS[kind]
        else:
            out[kind], k = spare[k % len(spare)], k + 1
    return out


def alpha_figure(sites: list[dict]):
    """One bar per site at its graph position; one bar container (and legend entry) per kind."""
    plt = _plt()
    colors = kind_colors({s["kind"] for s in sites})
    fig, ax = plt.subplots(figsize=(11, 3.2), layout="constrained")
    for kind, color in colors.items():
        at = [k for k, s in enumerate(sites) if s["kind"] == kind]
        ax.bar(at, [float(sites[k]["alpha"]) for k in at], width=0.85, color=color, label=kind)
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.6, len(sites) - 0.4)
    ax.set_xlabel("smoothing site (graph order)")
    ax.set_ylabel("α")
    fig.legend(loc="outside upper center", ncol=len(colors), fontsize=8, frameon=False)
    return fig


def _short(name: str) -> str:
    """/model/layers.3/mlp/down_proj/MatMul -> model/layers.3/mlp/down_proj"""
    for op in ("/MatMul", "/Gemm"):
        name = name.removesuffix(op)
    return name.lstrip("/") or name


def layer_error_figure(q: list[dict]):
    """Horizontal bars (SQNR at the layer's output), dots (the layer alone), the worst in red."""
    plt = _plt()
    n = len(q)
    out = np.array([r["sqnr_db"] if r["sqnr_db"] is not None else np.nan for r in q], float)
    loc = np.array([r["layer_sqnr_db"] if r.get("layer_sqnr_db") is not None else np.nan for r in q], float)
    worst = set(np.argsort(np.nan_to_num(out, nan=np.inf))[:WORST].tolist())
    y = np.arange(n)
    fig, ax = plt.subplots(figsize=(11, 1.3 + ROW_INCHES * n), layout="constrained")
    rest = [k for k in range(n) if k not in worst]
    handles = [ax.barh(y[rest], np.nan_to_num(out[rest]), height=0.8, color="tab:blue",
                       label="SQNR at the layer's output"),
               ax.barh(y[sorted(worst)], np.nan_to_num(out[sorted(worst)]), height=0.8, color="tab:red",
                       label=f"the {len(worst)} lowest")]
    if np.isfinite(loc).any():
        handles += ax.plot(loc, y, "o", color="tab:orange", markersize=3, label="SQNR of the layer alone")
    ax.set_yticks(y, [_short(r.get("module") or r["name"]) for r in q], fontsize=7)
    for k in worst:
        ax.get_yticklabels()[k].set_color("tab:red")
    ax.set_ylim(n - 0.5, -0.5)                                # first layer on top
    ax.set_xlabel("SQNR, dB (higher is better)")
    ax.tick_params(axis="x", labeltop=n > 40)                 # a tall chart: the scale at both ends
    ax.grid(axis="x", color="#dde", linewidth=0.6)
    ax.set_axisbelow(True)
    fig.legend(handles=handles, loc="outside upper center", ncol=3, fontsize=8, frameon=False)
    return fig


def charts(rd) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG) of the per-layer error chart and the α chart, when there is data."""
    out = []
    q = [r for r in rd.layers if r["quantized"]]
    if q:
        out.append(("layer_sqnr", f"SQNR of the {len(q)} quantized layers, graph order top to bottom "
                                  f"({rd.debug_samples} samples); the {min(WORST, len(q))} lowest in red",
                    png(layer_error_figure(q))))
    if rd.sites:
        out.append(("alpha_per_site", f"α per smoothing site ({len(rd.sites)} sites), graph order",
                    png(alpha_figure(rd.sites))))
    return out
